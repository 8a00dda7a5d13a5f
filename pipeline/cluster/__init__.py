"""Around a job on a cluster: the launch command for a SLURM allocation (launch), pre-flight
checks across ranks (doctor), sweeps as job arrays (sweep, sweepstate) and their leaderboard."""

"""MLPerf HPC logging: rank 0's mlperf.log through MLCommons' mllog (log), and the loop hook
that feeds it (docs/mlperf.md)."""

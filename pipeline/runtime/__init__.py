"""Process plumbing on every rank: Horovod and the collectives (dist), stop signals and the
watchdog (preempt), the flight recorder and its post-mortems (flight), faults on purpose (fault)."""

"""Offline analysis of run directories: step logs, metrics, Horovod timelines, post-mortems,
mlperf.log, and the communication model that projects them to more ranks."""

"""Offline analysis of run directories: step logs, metrics and Horovod timelines."""

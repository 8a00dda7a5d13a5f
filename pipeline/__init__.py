"""Distributed Keras training on HDF5 shards with Horovod, measured per rank.

The packages say what runs where, in their import order (each imports only those before it;
tests/test_layering.py holds it, docs/architecture.md gives the reasons):

- base (this folder's modules): config, rundir, errors (every exit code), fsutil, measure,
  target, stack (the TensorFlow stack and Keras 2); used everywhere, importing nothing else of
  the project.
- `pipeline.data`: shards, manifests and indexes on disk -> each rank's share -> batches.
- `pipeline.runtime`: the process's plumbing on every rank: Horovod (dist), stop signals and
  the watchdog (preempt), the flight recorder, debug.fault.
- `pipeline.mlperf`: rank 0's MLPerf HPC log, as a hook of the loop.
- `pipeline.train`: what every rank runs to train: the trainer's stages and loop, the step,
  evaluation, task, models, schedule, checkpoints, writers, step log, export.
- `pipeline.analysis`: offline, on run directories: `pipeline analyze`, `pipeline postmortem`,
  the communication model.
- `pipeline.cluster`: around a job: the SLURM launch command, `pipeline doctor`, sweeps and
  their leaderboard.
- `pipeline.bench`: the benchmarks.
- `pipeline.cli`: parses and dispatches.
"""

from pipeline import stack as _stack

__version__ = "0.1.0"

# Before anything imports TensorFlow: Keras 2 as tf.keras on TensorFlow >= 2.16 (tf-keras with
# TF_USE_LEGACY_KERAS=1), for the pipeline and for user model files alike (docs/setup.md).
_stack.prepare()

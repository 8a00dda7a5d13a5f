"""Distributed Keras training on HDF5 shards with Horovod, measured per rank.

Flow: pipeline.data (shards -> per-rank batches) -> pipeline.models -> pipeline.train
(the step loop) -> pipeline.checkpoint / pipeline.steplog -> pipeline.analyze.
"""

__version__ = "0.1.0"

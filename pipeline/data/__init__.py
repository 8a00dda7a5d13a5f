"""Data stage: HDF5 shards on disk -> a manifest -> each rank's equal share -> tf.data batches."""

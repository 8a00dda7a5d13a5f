"""Data stage: HDF5 shards on disk -> a manifest -> each rank's equal share -> what each call
of the compiled step reads (feed)."""

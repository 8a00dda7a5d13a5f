"""What each call of the compiled training steps reads (pipeline/train/step.py `compile_calls`).

- MemoryFeed: the rank's share held in memory as TensorFlow variables; each epoch's order of
  samples (rank-local indices, exactly the order the streaming reader gives: the same
  `reader.epoch_order`) is computed once per epoch on the host and handed to the graph, which
  gathers every batch itself. No Python runs per step, and no generator competes with the
  step for the GIL. The share is a variable, not a constant captured by the function, so its
  size is not bound by TensorFlow's 2 GiB limit on graph constants.
  On a GPU rank the share lives in GPU memory when it fits data.device_cache_mb
  (`placement`): the gather runs on the device and no batch crosses PCIe. GPUs have gather
  kernels for floating types and int64 only, so other types are held as int64: uint8 images
  as words (each row viewed as whole words, cast back bit for bit after the gather), a row
  that is no whole number of words (one int32 label) value by value (`device_layout`).
- StreamFeed: the reader's tf.data stacks of batches (data larger than memory); a call runs
  steps on the batches of one stack, never past its end. On a GPU rank the reader copies each
  stack to the device ahead of the call that uses it (pipeline/data/reader.py
  `train_dataset`).

Both: `prepare(step, n)` -> (first, n, inputs) for a call of at most n steps after global
step `step`, cut at the end of the epoch or stack; `batch_at(i, inputs)` gives batch i inside
the graph; `signature` is the inputs' tensor specs, so one traced function serves every call.
"""

from __future__ import annotations

import numpy as np

from pipeline.data import reader

# Largest piece copied at once into a share variable: bounds the temporary copy on top of
# the share itself.
_COPY_BYTES = 64 << 20


# Types a GPU gathers in place (TensorFlow's GPU gather kernels; int32 tensors live in host
# memory on GPU devices).
GPU_GATHER_TYPES = ("float16", "bfloat16", "float32", "float64", "int64", "complex64", "complex128", "bool")
WORD = 8  # bytes of the int64 words other types are held as on a GPU


def device_layout(dtype: str, row_bytes: int) -> str:
    """How one array of the share is held on a GPU: 'as is'; 'words' (its rows viewed as int64
    words, cast back bit for bit after the gather); 'widened' (each integer value as an int64,
    cast back: a row that is no whole number of words, such as one int32 label)."""
    if dtype in GPU_GATHER_TYPES:
        return "as is"
    return "words" if row_bytes % WORD == 0 else "widened"


def held_bytes(nbytes: int, itemsize: int, layout: str) -> int:
    return nbytes * WORD // itemsize if layout == "widened" else nbytes


def placement(share_bytes: int, budget_mb: int, gpu: bool) -> tuple[str, str]:
    """(device, why) for an in-memory share of `share_bytes` as held on a GPU: there when
    there is one and the share fits data.device_cache_mb; else in host memory."""
    if not gpu:
        return "/CPU:0", "host memory (no GPU)"
    if share_bytes > budget_mb * 2**20:
        return "/CPU:0", (f"host memory ({share_bytes / 2**20:.0f} MiB > data.device_cache_mb={budget_mb}); each "
                          f"batch is copied to the GPU")
    return "/GPU:0", f"GPU memory ({share_bytes / 2**20:.0f} MiB <= data.device_cache_mb={budget_mb})"


class _Held:
    """One array of the share in a variable on `device`, in `layout` (device_layout)."""

    def __init__(self, array: np.ndarray, name: str, device: str, layout: str):
        import tensorflow as tf

        self.dtype, self.shape, self.layout = tf.as_dtype(array.dtype), array.shape[1:], layout
        if layout == "words":
            array = array.reshape(len(array), -1).view(np.int64)
        elif layout == "widened":
            array = array.astype(np.int64)
        with tf.device(device):
            self.var = _variable(array, name)

    def gather(self, idx):
        import tensorflow as tf

        rows = tf.gather(self.var, idx)
        if self.layout == "words":
            return tf.reshape(tf.bitcast(rows, self.dtype), [-1, *self.shape])
        if self.layout == "widened":
            return tf.cast(rows, self.dtype)
        return rows


class MemoryFeed:
    def __init__(self, source: reader.MemorySource, blocks, plan, batch_size: int, seed: int, window: int,
                 shuffle: bool, device: str = "/CPU:0", layouts: tuple[str, str] | None = None):
        import tensorflow as tf

        self.blocks, self.plan, self.batch_size = blocks, plan, batch_size
        self.seed, self.window, self.shuffle = seed, window, shuffle
        self.steps_per_epoch = plan.steps_per_epoch
        # Host memory by default, where only each batch moves to the device; GPU memory where
        # `placement` put it. `layouts` forces the form of (x, y) either way (a test, on the CPU).
        if layouts is None:
            layouts = [device_layout(a.dtype.name, a[:1].nbytes) if device != "/CPU:0" else "as is"
                       for a in (source.x, source.y)]
        self.x = _Held(source.x, "share_x", device, layouts[0])
        self.y = _Held(source.y, "share_y", device, layouts[1])
        with tf.device("/CPU:0"):
            self.order = tf.Variable(tf.zeros([self.steps_per_epoch * batch_size], tf.int32), trainable=False,
                                     name="epoch_order")
        self.epoch: int | None = None
        self.signature = ()

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The samples this rank's steps of `epoch` take, in order (what batch_stacks reads)."""
        order = reader.epoch_order(self.blocks, self.seed, epoch, self.plan.rank, self.window, self.shuffle)
        return order[:self.steps_per_epoch * self.batch_size].astype(np.int32)

    def prepare(self, step: int, n: int) -> tuple[int, int, tuple]:
        epoch, first = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:
            self.order.assign(self.epoch_order(epoch))
            self.epoch = epoch
        return first, min(n, self.steps_per_epoch - first), ()

    def batch_at(self, i, inputs):
        import tensorflow as tf

        b = self.batch_size
        idx = self.order[i * b:(i + 1) * b]
        # Every batch is whole (an epoch's steps drop the remainder), so its shape is static:
        # the step then traces as for a fixed batch, without the shape arithmetic a batch of
        # unknown size adds to the gradients (BroadcastGradientArgs, Sum and Reshape per
        # broadcasting op), as Keras's `fit` traces when its batches divide the data.
        return (tf.ensure_shape(self.x.gather(idx), [b, *self.x.shape]),
                tf.ensure_shape(self.y.gather(idx), [b, *self.y.shape]))

    def close(self) -> None:
        pass


class StreamFeed:
    def __init__(self, dataset):
        self.signature = tuple(dataset.element_spec)
        self._it = iter(dataset)
        self._stack: tuple = ()
        self._pos = self._len = 0

    def prepare(self, step: int, n: int) -> tuple[int, int, tuple]:
        if self._pos >= self._len:
            self._stack = next(self._it)  # waits for the reader when it is behind
            self._pos, self._len = 0, int(self._stack[0].shape[0])
        first, n = self._pos, min(n, self._len - self._pos)
        self._pos += n
        return first, n, self._stack

    @staticmethod
    def batch_at(i, inputs):
        xs, ys = inputs
        return xs[i], ys[i]

    def close(self) -> None:
        self._it = None


def _variable(array: np.ndarray, name: str):
    """A variable holding `array`, filled piece by piece so that no second whole copy exists."""
    import tensorflow as tf

    var = tf.Variable(tf.zeros(array.shape, array.dtype), trainable=False, name=name)
    rows = max(1, _COPY_BYTES // max(1, array[:1].nbytes))
    for a in range(0, len(array), rows):
        var[a:a + rows].assign(array[a:a + rows])
    return var


def open_feed(inp: reader.Input, batch_size: int, seed: int, start_step: int, end_step: int, gpu: bool = False,
              say=None):
    """What the compiled steps read for one rank's input: a share in memory moves into
    variables the graph gathers from (the numpy copy is let go), in GPU memory where it fits
    data.device_cache_mb; a streamed one comes as the reader's stacks, copied to the GPU ahead
    of the step on a GPU rank (`gpu`: dist.pin_gpu chose one). `say` gets one line on where the
    share is."""
    if isinstance(inp.train, reader.MemorySource):
        src = inp.release_train()
        held = sum(held_bytes(a.nbytes, a.itemsize, device_layout(a.dtype.name, a[:1].nbytes)) for a in (src.x, src.y))
        device, why = placement(held, inp.data.device_cache_mb, gpu)
        if say and gpu:
            say(f"pipeline: training share in {why}")
        return MemoryFeed(src, inp.blocks, inp.plan, batch_size, seed, inp.data.shuffle_buffer, inp.data.shuffle,
                          device)
    return StreamFeed(inp.train_dataset(batch_size, seed, start_step, end_step, "/GPU:0" if gpu else None))

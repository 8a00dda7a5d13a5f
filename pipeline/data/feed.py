"""What each call of the compiled training steps reads (pipeline/train/step.py `compile_calls`).

- MemoryFeed: the rank's share held in memory as TensorFlow variables; each epoch's order of
  samples (rank-local indices, exactly the order the streaming reader gives: the same
  `reader.epoch_order`) is computed once per epoch on the host and handed to the graph, which
  gathers every batch itself. No Python runs per step, and no generator competes with the
  step for the GIL. The share is a variable, not a constant captured by the function, so its
  size is not bound by TensorFlow's 2 GiB limit on graph constants.
- StreamFeed: the reader's tf.data stacks of batches (data larger than memory); a call runs
  steps on the batches of one stack, never past its end.

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


class MemoryFeed:
    def __init__(self, source: reader.MemorySource, blocks, plan, batch_size: int, seed: int, window: int,
                 shuffle: bool):
        import tensorflow as tf

        self.blocks, self.plan, self.batch_size = blocks, plan, batch_size
        self.seed, self.window, self.shuffle = seed, window, shuffle
        self.steps_per_epoch = plan.steps_per_epoch
        # Host memory, also where the step runs on a GPU: only each batch moves to the device.
        with tf.device("/CPU:0"):
            self.x = _variable(source.x, "share_x")
            self.y = _variable(source.y, "share_y")
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
        return tf.gather(self.x, idx), tf.gather(self.y, idx)

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


def open_feed(inp: reader.Input, batch_size: int, seed: int, start_step: int, end_step: int):
    """What the compiled steps read for one rank's input: a share in memory moves into
    variables the graph gathers from (the numpy copy is let go); a streamed one comes as the
    reader's stacks."""
    if isinstance(inp.train, reader.MemorySource):
        return MemoryFeed(inp.release_train(), inp.blocks, inp.plan, batch_size, seed, inp.data.shuffle_buffer,
                          inp.data.shuffle)
    return StreamFeed(inp.train_dataset(batch_size, seed, start_step, end_step))

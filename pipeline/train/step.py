"""The compiled training step, with the knobs that change what one step does: gradient
accumulation (k micro-batches per update), fp16 gradient compression for the allreduce,
loss scaling for float16, and XLA.

Accumulation keeps the semantics of one pass at batch k*b: the k micro-batch gradients are
averaged (not summed) before the allreduce, so the same learning rate applies, and the
allreduce runs once per update, not once per micro-batch.
"""

from __future__ import annotations


def make_train_step(model, opt, loss_fn, dist, *, passes: int = 1, compression: str = "none",
                    jit_compile: bool = False, loss_scale: bool = False, prepare_x=None, clip_global_norm: float = 0.0):
    """loss_fn(y, prediction) -> the batch's scalar loss; prepare_x turns the stored input into
    what the model sees (default: uint8 to [0, 1], other types to float32). clip_global_norm > 0
    clips the gradient the update uses: averaged over the micro-batches and the ranks, and
    unscaled, so every rank clips the same numbers the same way."""
    import tensorflow as tf

    from pipeline.data.reader import to_float

    variables = model.trainable_variables
    prepare_x = prepare_x or to_float

    def forward_backward(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(prepare_x(x), training=True))
            scaled = opt.get_scaled_loss(loss) if loss_scale else loss
        return loss, tape, scaled

    # XLA compiles the forward and backward pass; Horovod's allreduce stays outside the
    # cluster (its ops have no XLA kernels unless Horovod was built with them).
    @tf.function(jit_compile=True)
    def local_grads_xla(x, y):
        loss, tape, scaled = forward_backward(x, y)
        return loss, tape.gradient(scaled, variables)

    def local_grads(x, y):
        if jit_compile:
            return local_grads_xla(x, y)
        loss, tape, scaled = forward_backward(x, y)
        return loss, tape.gradient(scaled, variables)

    @tf.function
    def train_step(xb, yb, stop):
        graph = tf.compat.v1.get_default_graph()
        first_op = len(graph.get_operations())
        if passes == 1 and not jit_compile:
            loss, tape, scaled = forward_backward(xb, yb)
            # Averaged over all ranks (ring-allreduce), each gradient's allreduce starting as
            # soon as backprop produces it; the stop flag with the first of them.
            grads, stops = dist.average_in_step(tape.gradient(scaled, variables), stop, compression)
        else:
            if passes == 1:
                loss, grads = local_grads(xb, yb)
            else:
                xs, ys = tf.split(xb, passes), tf.split(yb, passes)
                loss, grads = local_grads(xs[0], ys[0])
                for i in range(1, passes):
                    li, gi = local_grads(xs[i], ys[i])
                    loss += li
                    grads = [a + b for a, b in zip(grads, gi)]
                loss /= passes
                grads = [g / passes for g in grads]
            grads, stops = dist.average_in_step(grads, stop, compression, grouped=True)
        if loss_scale:
            grads = opt.get_unscaled_gradients(grads)
        if clip_global_norm > 0:
            grads, _ = tf.clip_by_global_norm(grads, clip_global_norm)
        # Any rank's stop request reaches every rank in this same step (stops > 0).
        opt.apply_gradients(zip(grads, variables))
        # Both results wait for every effect of the step (each variable's update, BatchNorm's
        # moving statistics, the iteration count, which is all apply_gradients returns), so a
        # clock read after them times the whole step, traced inline or called.
        with tf.control_dependencies(stateful_ops(graph.get_operations()[first_op:])):
            return tf.identity(loss), tf.identity(stops)

    return train_step


def stateful_ops(ops) -> list:
    """The ops among `ops` with effects beyond their outputs (variable assigns, optimizer
    updates, collectives): what a step must have run before it counts as done."""
    return [op for op in ops if op.op_def is not None and op.op_def.is_stateful]


def now_us() -> int:
    """Unix time in whole microseconds: what the graph's clock (tf.timestamp) reads."""
    import time

    return time.time_ns() // 1000


def graph_clock(deterministic: bool):
    """A clock op for the step's timings: unix seconds, in whole microseconds.

    tf.timestamp is a plain kernel; TensorFlow refuses it under op determinism (it would make
    a graph's outputs depend on time), so with train.deterministic the clock is a small
    Python call instead, which costs a few microseconds and takes the GIL."""
    import tensorflow as tf

    if not deterministic:
        return tf.timestamp

    import numpy as np

    def now():
        return tf.numpy_function(lambda: np.float64(now_us() / 1e6), [], tf.float64, stateful=True)

    return now


def compile_calls(train_step, stop_flag, batch_at, signature=(), clock=None):
    """Several training steps per call of one compiled function, so the host's cost (entering
    the function, reading results back) is paid once per call instead of once per step, as
    Keras's `steps_per_execution` does.

    `run(first, n, inputs)` runs steps for batches first .. first+n-1, batch i coming from
    `batch_at(i, inputs)` inside the graph; `signature` gives the specs of `inputs`, so every
    call, whatever its n or stack length, runs the one traced function.

    Each step reads `stop_flag` (a variable a signal sets while a call runs) and passes it to
    the step's allreduce; when the sum over ranks is positive, every rank ends the call after
    that same step. Each step is timed in the graph (`clock`, from graph_clock): `begin` (the
    step starts), `ready` (its batch is in hand) and `done` (the update is applied), all unix
    seconds, so nothing waits on the host to time a step.
    Returns (losses, begin, ready, done, stopped), one entry per step run.
    """
    import tensorflow as tf

    clock = clock or tf.timestamp
    # The step is traced into the loop's body rather than called as a function of its own:
    # one graph for the executor, no function call per step (its results wait for all its
    # effects either way; make_train_step).
    step = getattr(train_step, "python_function", train_step)

    @tf.function(input_signature=[tf.TensorSpec((), tf.int32), tf.TensorSpec((), tf.int32), tuple(signature)])
    def run(first, n, inputs):
        losses = tf.TensorArray(tf.float32, size=0, dynamic_size=True)
        begin, ready, done = (tf.TensorArray(tf.float64, size=0, dynamic_size=True) for _ in range(3))
        stopped = tf.constant(False)
        t_end = clock()
        for i in tf.range(n):
            # Each clock read waits for what it times (control dependencies): the previous
            # step's end, the batch, the update.
            with tf.control_dependencies([t_end]):
                t_begin = clock()
            with tf.control_dependencies([t_begin]):
                xb, yb = batch_at(first + i, inputs)
            with tf.control_dependencies([xb, yb]):
                t_ready = clock()
            with tf.control_dependencies([t_ready]):
                loss, stops = step(xb, yb, stop_flag.read_value())
            with tf.control_dependencies([loss, stops]):
                t_end = clock()
            losses = losses.write(i, tf.cast(loss, tf.float32))
            begin, ready, done = begin.write(i, t_begin), ready.write(i, t_ready), done.write(i, t_end)
            if stops > 0:
                stopped = True
                break
        return losses.stack(), begin.stack(), ready.stack(), done.stack(), stopped

    return run

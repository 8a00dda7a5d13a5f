"""What the compiled steps read, and how a call of several steps runs and stops
(pipeline/data/feed.py, pipeline/train/step.py `compile_calls`, pipeline/train/trainer.py `call_size`).

One process, no launcher: a Horovod sum over one rank is the value itself, so the stop flag's
path through the step is the one two ranks take (tests/runtime/test_preemption.py runs that under
mpirun).
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from pipeline.data import feed, reader, shards
from pipeline.data.sharding import assign
from pipeline.train.trainer import call_size


def _share(small_dataset, rank=1, size=2, batch=32, block=256):
    m = shards.load_manifest(small_dataset)
    plan = assign([s.num_samples for s in m.shards("train")], rank, size, batch)
    return m, plan, reader.cut_blocks(plan, block)


def _fed_batches(f, start: int, end: int, per_call: int) -> list:
    """The batches a feed gives for steps start+1 .. end, in calls of at most per_call steps."""
    out, step = [], start
    while step < end:
        first, n, inputs = f.prepare(step, min(per_call, end - step))
        out += [tuple(t.numpy() for t in f.batch_at(first + i, inputs)) for i in range(n)]
        step += n
    return out


@pytest.mark.parametrize("start", [0, 37])  # a fresh run, and one resumed mid-epoch
def test_memory_and_streamed_feeds_give_the_same_batches_in_the_same_order(small_dataset, start):
    m, plan, blocks = _share(small_dataset)
    batch, seed, window = 32, 7, 1000
    end = start + plan.steps_per_epoch + 20  # across an epoch boundary
    x, y = reader.read_share(m, "train", plan)
    mem = feed.MemoryFeed(reader.MemorySource(x, y), blocks, plan, batch, seed, window, shuffle=True)
    streamed = reader.ShardSource(m, "train")
    try:
        ds = reader.train_dataset(streamed, blocks, plan, batch, seed, start, end, window)
        a = _fed_batches(mem, start, end, per_call=5)
        b = _fed_batches(feed.StreamFeed(ds), start, end, per_call=5)
    finally:
        streamed.close()
    assert len(a) == len(b) == end - start
    for (xa, ya), (xb, yb) in zip(a, b):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    # And they are the samples the reader's order names: batch k of epoch e is
    # epoch_order(e)[k * batch:(k + 1) * batch] of the rank's share.
    e, k = divmod(start, plan.steps_per_epoch)
    idx = reader.epoch_order(blocks, seed, e, plan.rank, window)[k * batch:(k + 1) * batch]
    assert np.array_equal(a[0][0], x[idx]) and np.array_equal(a[0][1], y[idx])


def test_a_call_never_crosses_the_end_of_an_epoch_or_a_stack(small_dataset):
    m, plan, blocks = _share(small_dataset, rank=0, size=1)
    x, y = reader.read_share(m, "train", plan)
    mem = feed.MemoryFeed(reader.MemorySource(x, y), blocks, plan, 32, 1, 1000, shuffle=True)
    spe = plan.steps_per_epoch
    assert mem.prepare(spe - 3, 16)[:2] == (spe - 3, 3)
    assert mem.prepare(spe, 16)[:2] == (0, 16)
    streamed = reader.ShardSource(m, "train")
    try:
        ds = reader.train_dataset(streamed, blocks, plan, 32, 1, 0, 40, 1000)
        stacks = [int(xs.shape[0]) for xs, _ in ds]
        f = feed.StreamFeed(reader.train_dataset(streamed, blocks, plan, 32, 1, 0, 40, 1000))
        sizes, step = [], 0
        while step < 40:
            sizes.append(f.prepare(step, 1000)[1])
            step += sizes[-1]
    finally:
        streamed.close()
    assert sizes == stacks


def test_call_size_stops_at_the_first_step_where_something_else_happens():
    every_10 = lambda k: k % 10 == 0  # noqa: E731 - e.g. a checkpoint every 10 steps
    assert call_size(0, 16, every_10) == 10
    assert call_size(10, 16, every_10) == 10
    assert call_size(3, 4, every_10) == 4
    assert call_size(8, 4, every_10) == 2
    assert call_size(9, 1, every_10) == 1
    assert call_size(0, 16, lambda k: False) == 16


def _toy_step():
    import tensorflow as tf

    from pipeline.runtime.dist import Dist
    from pipeline.train.step import make_train_step

    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(3)])
    opt = tf.keras.optimizers.SGD(0.1)
    loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return model, make_train_step(model, opt, loss, Dist(), prepare_x=lambda v: tf.cast(v, tf.float32))


def _batches(steps=12):
    rng = np.random.default_rng(0)
    return rng.normal(size=(steps, 8, 4)).astype(np.float32), rng.integers(0, 3, size=(steps, 8)).astype(np.int32)


def _loop_body(concrete):
    """The FunctionDef of the one while loop in a traced function: its nodes by name."""
    loop = next(op for op in concrete.graph.get_operations() if op.type in ("While", "StatelessWhile"))
    body = loop.get_attr("body").name
    fdef = next(f for f in concrete.graph.as_graph_def().library.function if f.signature.name == body)
    return {n.name: n for n in fdef.node_def}


def _ancestors(nodes, name):
    seen, todo = set(), [name]
    while todo:
        n = todo.pop()
        if n not in seen and n in nodes:
            seen.add(n)
            todo += [i.lstrip("^").split(":")[0] for i in nodes[n].input]
    return seen


def test_the_clock_after_a_step_waits_for_every_update_it_makes():
    """A step is traced into the loop of steps, and the clock read that ends it waits for
    every variable's update (the optimizer's, with momentum, and BatchNorm's moving
    statistics), not only for the iteration count the optimizer returns: else `done`
    comes before the work it times."""
    import tensorflow as tf

    from pipeline.runtime.dist import Dist
    from pipeline.train.step import compile_calls, make_train_step

    model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(5), tf.keras.layers.BatchNormalization(),
                                 tf.keras.layers.Dense(3)])
    opt = tf.keras.optimizers.SGD(0.1, momentum=0.9)
    step = make_train_step(model, opt, tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), Dist())
    inputs = (tf.TensorSpec((None, 8, 4), tf.float32), tf.TensorSpec((None, 8), tf.int32))
    run = compile_calls(step, tf.Variable(0.0), lambda i, inp: (inp[0][i], inp[1][i]), inputs)
    nodes = _loop_body(run.get_concrete_function(tf.TensorSpec((), tf.int32), tf.TensorSpec((), tf.int32), inputs))
    updates = {n for n, d in nodes.items() if d.op.startswith(("Assign", "ResourceApply"))}
    # 3 kernels and biases and BatchNorm's gamma and beta, each with its momentum; BatchNorm's
    # 2 moving statistics; the iteration count
    assert len(updates) >= 13
    clocks = [n for n, d in nodes.items() if d.op == "Timestamp"]
    assert any(updates <= _ancestors(nodes, c) for c in clocks)


def test_a_call_of_several_steps_equals_the_same_steps_one_by_one():
    import tensorflow as tf

    from pipeline.train.step import compile_calls

    xs, ys = _batches()
    weights = []
    for per_call in (1, 5):
        model, step = _toy_step()
        flag = tf.Variable(0.0)
        run = compile_calls(step, flag, lambda i, inp: (inp[0][i], inp[1][i]),
                            (tf.TensorSpec((None, 8, 4), tf.float32), tf.TensorSpec((None, 8), tf.int32)))
        done, losses, ends = 0, [], []
        while done < len(xs):
            n = min(per_call, len(xs) - done)
            loss, begin, ready, end, stopped = run(tf.constant(done), tf.constant(n), (xs, ys))
            assert len(loss) == n and not bool(stopped)
            assert np.all(begin.numpy() <= ready.numpy()) and np.all(ready.numpy() <= end.numpy())
            losses += loss.numpy().tolist()
            ends += end.numpy().tolist()
            done += n
        assert ends == sorted(ends), "each step ends after the one before"
        weights.append(([v.numpy() for v in model.trainable_variables], losses))
    (w1, l1), (w5, l5) = weights
    np.testing.assert_allclose(l1, l5, rtol=1e-6)
    for a, b in zip(w1, w5):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_a_signal_during_a_call_stops_it_after_the_step_that_sees_it():
    """A real SIGUSR1 sent to this process from inside step 5's batch read (while the main
    thread is inside the compiled call, where Python runs no signal handler): the stop thread
    raises the flag, step 5 passes it to its allreduce and the call ends after step 5."""
    import tensorflow as tf

    from pipeline.runtime.preempt import StopSignals
    from pipeline.train.step import compile_calls

    xs, ys = _batches()
    model, step = _toy_step()
    flag = tf.Variable(0.0)

    def send_and_wait(i):
        if int(i) == 5:
            os.kill(os.getpid(), signal.SIGUSR1)
            deadline = time.monotonic() + 60  # a hang guard: the flag is up within milliseconds
            while flag.numpy() == 0 and time.monotonic() < deadline:
                time.sleep(0.001)  # waiting on an observable condition, the flag itself
        return np.int32(0)

    def batch_at(i, inp):
        with tf.control_dependencies([tf.numpy_function(send_and_wait, [i], tf.int32, stateful=True)]):
            return tf.identity(inp[0][i]), tf.identity(inp[1][i])

    run = compile_calls(step, flag, batch_at,
                        (tf.TensorSpec((None, 8, 4), tf.float32), tf.TensorSpec((None, 8), tf.int32)))
    with StopSignals(rank=0, on_signal=lambda signum: flag.assign(1.0)) as signals:
        loss, _, _, _, stopped = run(tf.constant(0), tf.constant(12), (xs, ys))
        assert signals.signum == signal.SIGUSR1
    assert bool(stopped) and len(loss) == 6, "steps 0..5 ran; the call ended after the step that saw the flag"


def test_slow_steps_run_fewer_per_call():
    from pipeline.train.trainer import steps_in_a_call

    assert steps_in_a_call(32, []) == 32
    assert steps_in_a_call(32, [0.005] * 10) == 32
    assert steps_in_a_call(32, [0.2, 0.2, 5.0]) == 15, "the median, not one slow step"
    assert steps_in_a_call(32, [0.4] * 3) == 7  # ResNet50's steps here: calls of about 3 s
    assert steps_in_a_call(32, [2.0]) == 1


@pytest.mark.parametrize("layouts", [("words", "widened"), ("widened", "widened")])
def test_the_gpu_forms_of_a_share_give_the_same_batches(small_dataset, layouts):
    """int64 words and widened values, the forms a GPU gathers uint8 images and int32 labels
    in (feed.device_layout), run here on the CPU: the batches are the same, bit for bit."""
    m, plan, blocks = _share(small_dataset, rank=0, size=1)
    x, y = reader.read_share(m, "train", plan)
    plain = feed.MemoryFeed(reader.MemorySource(x, y), blocks, plan, 32, 3, 1000, shuffle=True)
    held = feed.MemoryFeed(reader.MemorySource(x, y), blocks, plan, 32, 3, 1000, shuffle=True, layouts=layouts)
    a, b = _fed_batches(plain, 0, 12, per_call=4), _fed_batches(held, 0, 12, per_call=4)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xb.dtype == xa.dtype and yb.dtype == ya.dtype
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)


def test_where_a_share_is_held():
    assert feed.device_layout("float32", 4) == "as is"
    assert feed.device_layout("uint8", 28 * 28) == "words"       # 784 bytes: 98 words
    assert feed.device_layout("int32", 4) == "widened"           # one label
    assert feed.held_bytes(4000, 4, "widened") == 8000
    assert feed.placement(100 << 20, 2048, gpu=False)[0] == "/CPU:0"
    assert feed.placement(100 << 20, 2048, gpu=True)[0] == "/GPU:0"
    device, why = feed.placement(3000 << 20, 2048, gpu=True)
    assert device == "/CPU:0" and "data.device_cache_mb=2048" in why
    assert feed.placement(1, 0, gpu=True)[0] == "/CPU:0"  # 0: always host memory


@pytest.mark.parametrize("layouts", [None, ("words", "widened")])
def test_traced_batches_have_the_static_shape_of_a_whole_batch(small_dataset, layouts):
    """The step traces for a batch of known size (no shape arithmetic in its gradients), from
    the share in memory in each held form, and from the reader's stacks."""
    import tensorflow as tf

    m, plan, blocks = _share(small_dataset, rank=0, size=1)
    x, y = reader.read_share(m, "train", plan)
    mem = feed.MemoryFeed(reader.MemorySource(x, y), blocks, plan, 32, 3, 1000, shuffle=True, layouts=layouts)
    first, n, inputs = mem.prepare(0, 4)
    shapes = []

    @tf.function(input_signature=[tf.TensorSpec((), tf.int32)])
    def batch(i):
        xb, yb = mem.batch_at(i, inputs)
        shapes.append((xb.shape.as_list(), yb.shape.as_list()))
        return xb, yb

    xb, yb = batch(tf.constant(first + 1))
    assert shapes == [([32, *x.shape[1:]], [32])]
    assert np.array_equal(xb.numpy(), _fed_batches(mem, 0, 2, per_call=2)[1][0])
    streamed = reader.ShardSource(m, "train")
    try:
        spec = feed.StreamFeed(reader.train_dataset(streamed, blocks, plan, 32, 3, 0, 8, 1000)).signature
    finally:
        streamed.close()
    assert [s.shape.as_list()[1:] for s in spec] == [[32, *x.shape[1:]], [32]]

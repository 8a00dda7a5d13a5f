"""train.optimizer: each optimizer's first steps against its published update rule written out
in numpy on fixed numbers (and LAMB's and LARS's first step by hand), the clipped update, and
save, restore and continue giving the same variables as not stopping (in-process)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import train_section

from pipeline import config
from pipeline.errors import UserError

W0 = np.array([[3.0, 4.0], [0.5, -1.0]], np.float32)
GRADS = [np.array([[1.0, 1.0], [0.2, -0.4]], np.float32), np.array([[0.5, -2.0], [0.1, 0.3]], np.float32),
         np.array([[-1.0, 0.25], [0.0, 1.0]], np.float32)]
LR = 0.1


def _run(train, grads=GRADS, w0=W0):
    import tensorflow as tf

    from pipeline.train import optimizers

    w = tf.Variable(w0)
    opt = optimizers.build(train, LR)
    out = []
    for g in grads:
        opt.apply_gradients([(tf.constant(g), w)])
        out.append(w.numpy().copy())
    return out


def _reference(name, wd=0.0, momentum=0.9, nesterov=False, b1=0.9, b2=0.999, eps=1e-7, eta=0.001):
    """The update rules as published (Keras's forms for sgd and adam), step by step."""
    w, m, v, u = W0.astype(np.float64), 0.0, 0.0, 0.0
    out = []
    for t, g in enumerate(GRADS, start=1):
        g = g.astype(np.float64)
        if name in ("sgd", "adam", "adamw") and wd:
            w = w - LR * wd * w  # decoupled: Keras applies it before the update
        if name == "sgd":
            u = momentum * u - LR * g
            w = w + (momentum * u - LR * g if nesterov else u)
        elif name in ("adam", "adamw"):
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            alpha = LR * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
            w = w - alpha * m / (np.sqrt(v) + eps)
        elif name == "lamb":
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            r = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps) + wd * w
            w = w - LR * (np.linalg.norm(w) / np.linalg.norm(r)) * r
        elif name == "lars":
            local = eta * np.linalg.norm(w) / (np.linalg.norm(g) + wd * np.linalg.norm(w))
            u = momentum * u + LR * local * (g + wd * w)
            w = w - u
        out.append(w)
    return out


@pytest.mark.parametrize("name, over", [
    ("sgd", {}), ("sgd", {"nesterov": True, "momentum": 0.8}), ("sgd", {"weight_decay": 0.01}),
    ("adam", {}), ("adam", {"betas": [0.8, 0.99], "epsilon": 1e-6}), ("adamw", {"weight_decay": 0.05}),
    ("lamb", {"epsilon": 1e-6}), ("lamb", {"weight_decay": 0.01, "epsilon": 1e-6}),
    ("lars", {}), ("lars", {"weight_decay": 0.0005, "lars_trust": 0.01, "momentum": 0.5}),
], ids=lambda x: x if isinstance(x, str) else ",".join(f"{k}={v}" for k, v in x.items()) or "defaults")
def test_each_optimizers_first_steps_follow_its_published_rule(name, over):
    got = _run(train_section(optimizer=name, **over))
    ref_args = {"wd": over.get("weight_decay", 0.0), "momentum": over.get("momentum", 0.9),
                "nesterov": over.get("nesterov", False), "eps": over.get("epsilon", 1e-7),
                "eta": over.get("lars_trust", 0.001)}
    if "betas" in over:
        ref_args["b1"], ref_args["b2"] = over["betas"]
    for step, (a, b) in enumerate(zip(got, _reference(name, **ref_args)), start=1):
        np.testing.assert_allclose(a, b, rtol=5e-6, atol=1e-6, err_msg=f"{name} step {step}")


def test_lamb_and_lars_first_step_by_hand():
    # One layer w = [3, 4] (norm 5), g = [1, 1]. LAMB's first Adam direction is g / |g| = [1, 1]
    # (norm sqrt 2), so the trust ratio is 5 / sqrt 2 and w moves by lr * 5 / sqrt 2 each way.
    w0, g = np.array([3.0, 4.0], np.float32), [np.array([1.0, 1.0], np.float32)]
    (w,) = _run(train_section(optimizer="lamb", epsilon=1e-9), g, w0)
    np.testing.assert_allclose(w, [3 - 0.5 / math.sqrt(2), 4 - 0.5 / math.sqrt(2)], rtol=1e-6)
    # LARS: local rate eta * 5 / sqrt 2; no momentum yet; w moves by lr * local * g.
    (w,) = _run(train_section(optimizer="lars", lars_trust=0.01), g, w0)
    np.testing.assert_allclose(w, [3 - 0.1 * 0.01 * 5 / math.sqrt(2), 4 - 0.1 * 0.01 * 5 / math.sqrt(2)], rtol=1e-6)


def test_clipping_bounds_the_averaged_gradient_the_update_uses():
    import tensorflow as tf

    from pipeline.runtime.dist import Dist
    from pipeline.train.step import make_train_step

    x = tf.constant(np.ones((4, 2), np.float32))
    y = tf.constant(np.full((4, 1), 100.0, np.float32))
    moved = []
    for clip in (0.0, 0.5):
        model = tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(1, kernel_initializer="zeros")])
        before = [v.numpy().copy() for v in model.trainable_variables]
        step = make_train_step(model, tf.keras.optimizers.SGD(1.0, momentum=0.0), tf.keras.losses.MeanSquaredError(),
                               Dist(), clip_global_norm=clip)
        step(x, y, tf.constant(0.0))
        moved.append(math.sqrt(sum(float(np.sum((v.numpy() - b) ** 2))
                                   for v, b in zip(model.trainable_variables, before))))
    assert moved[0] > 100 and moved[1] == pytest.approx(0.5, rel=1e-5)  # lr 1 x the clipped norm


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "lamb", "lars"])
def test_save_restore_and_continue_equals_not_stopping(name, tmp_path):
    import tensorflow as tf

    from pipeline.train import optimizers
    from pipeline.train.checkpoint import variables_digest

    train = train_section(optimizer=name, weight_decay=0.01)
    rng = np.random.default_rng(0)
    batches = [(rng.normal(size=(8, 3)).astype(np.float32), rng.normal(size=(8, 1)).astype(np.float32))
               for _ in range(4)]

    def fresh():
        tf.keras.utils.set_random_seed(1)
        model = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(4, activation="tanh"),
                                     tf.keras.layers.Dense(1)])
        opt = optimizers.build(train, 0.05)
        opt.build(model.trainable_variables)
        return model, opt

    def steps(model, opt, part):
        for x, y in part:
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((model(x) - y) ** 2)
            opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))

    model, opt = fresh()
    steps(model, opt, batches)
    straight = variables_digest(model.variables + opt.variables)

    model, opt = fresh()
    steps(model, opt, batches[:2])
    tf.train.Checkpoint(model=model, optimizer=opt).write(str(tmp_path / "ck"))
    model, opt = fresh()
    tf.train.Checkpoint(model=model, optimizer=opt).read(str(tmp_path / "ck")).assert_existing_objects_matched()
    steps(model, opt, batches[2:])
    assert variables_digest(model.variables + opt.variables) == straight


def test_a_users_own_optimizer_and_bad_names(tmp_path):
    mine = tmp_path / "opt.py"
    mine.write_text("import tensorflow as tf\n"
                    "def rmsprop(learning_rate, train):\n"
                    "    return tf.keras.optimizers.RMSprop(learning_rate, epsilon=train.epsilon)\n"
                    "def nothing(learning_rate, train):\n"
                    "    return 3\n")
    from pipeline.train import optimizers

    opt = optimizers.build(train_section(optimizer=f"{mine}:rmsprop"), 0.01)
    assert type(opt).__name__ == "RMSprop"
    with pytest.raises(UserError, match="returned int, not a tf.keras optimizer"):
        optimizers.build(train_section(optimizer=f"{mine}:nothing"), 0.01)
    with pytest.raises(UserError, match="train.optimizer"):
        optimizers.build(train_section(optimizer=f"{tmp_path / 'nope.py'}:f"), 0.01)
    with pytest.raises(config.ConfigError, match="train.optimizer must be one of sgd, adam, adamw, lamb, lars"):
        train_section(optimizer="adagrad")
    with pytest.raises(config.ConfigError, match=r"train.betas must be \[beta_1, beta_2\]"):
        train_section(betas=[0.9])

import pytest
from conftest import train_section

from pipeline.train.schedule import keras_schedule, lr_at


def test_linear_scaling_with_warmup():
    assert lr_at(0, 0.1, size=4, warmup_steps=10) == pytest.approx(0.1)
    assert lr_at(5, 0.1, size=4, warmup_steps=10) == pytest.approx(0.25)
    assert lr_at(10, 0.1, size=4, warmup_steps=10) == pytest.approx(0.4)
    assert lr_at(1000, 0.1, size=4, warmup_steps=10) == pytest.approx(0.4)
    assert lr_at(0, 0.1, size=4, warmup_steps=0) == pytest.approx(0.4)
    assert lr_at(500, 0.1, size=4, warmup_steps=10, scale=False) == pytest.approx(0.1)


def test_cosine_decays_to_zero_after_warmup():
    kw = dict(base_lr=0.1, size=2, warmup_steps=10, schedule="cosine", total_steps=110)
    assert lr_at(10, **kw) == pytest.approx(0.2)
    assert lr_at(60, **kw) == pytest.approx(0.1)
    assert lr_at(110, **kw) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("kw", [
    dict(base_lr=0.001, size=2, warmup_steps=100),
    dict(base_lr=0.05, size=8, warmup_steps=7, schedule="cosine", total_steps=50),
    dict(base_lr=0.01, size=3, warmup_steps=0, scale=False),
    dict(base_lr=0.01, size=2, warmup_steps=5, schedule="step", step_every=25, step_factor=0.5),
])
def test_keras_schedule_equals_the_pure_function(kw):
    sched = keras_schedule(**kw)
    peak = kw["base_lr"] * kw["size"]
    for step in [0, 1, 3, 6, 7, 8, 25, 49, 50, 99, 100, 101, 1000]:
        assert float(sched(step)) == pytest.approx(lr_at(step, **kw), abs=4e-7 * peak), step  # float32


def test_step_decay():
    kw = dict(base_lr=0.1, size=2, warmup_steps=0, schedule="step", step_every=100, step_factor=0.1)
    assert lr_at(99, **kw) == pytest.approx(0.2)
    assert lr_at(100, **kw) == pytest.approx(0.02)
    assert lr_at(250, **kw) == pytest.approx(0.002)


def test_the_runs_rule_comes_from_the_train_section():
    from pipeline.config import TrainConfig
    from pipeline.train.schedule import LR

    train = TrainConfig(lr=0.01, warmup_steps=5, lr_schedule="step", lr_step_every=20, lr_step_factor=0.5)
    lr = LR.from_config(train, size=2, total_steps=100)
    assert [lr.at(s) for s in (0, 5, 19, 20, 45)] == pytest.approx([0.01, 0.02, 0.02, 0.01, 0.005])
    assert lr.at(45) == lr_at(45, 0.01, size=2, warmup_steps=5, schedule="step", total_steps=100, step_every=20,
                              step_factor=0.5)


def test_multistep_in_cosmoflows_and_deepcams_forms():
    from pipeline.train.schedule import LR

    # CosmoFlow: 4 warm-up epochs, then the peak x 0.25 from epoch 32 and x 0.125 from epoch 64
    # (10 steps per epoch here); base 0.001 at batch 64, linear scaling to a global batch of 256.
    cosmo = train_section(lr=0.001, lr_scaling="linear", lr_base_batch=64, warmup_epochs=4, warmup_steps=0,
                   lr_schedule="multistep", lr_boundaries=[32, 64], lr_decay_factors=[0.25, 0.125])
    lr = LR.from_config(cosmo, size=4, total_steps=1000, steps_per_epoch=10, global_batch=256, update_batch=64)
    assert (lr.warmup_steps, lr.boundaries, lr.peak) == (40, (320, 640), pytest.approx(0.004))
    assert [lr.at(s) for s in (0, 20, 40, 319, 320, 639, 640, 999)] == pytest.approx(
        [0.001, 0.0025, 0.004, 0.004, 0.001, 0.001, 0.0005, 0.0005])
    # DeepCAM: milestones in steps, the rate times gamma at each; no warm-up.
    deepcam = train_section(lr=0.0055, warmup_steps=0, scale_lr=False, lr_schedule="multistep", lr_boundary_unit="steps",
                     lr_boundaries=[800, 1600], lr_decay_gamma=0.1)
    lr = LR.from_config(deepcam, size=8, total_steps=2000, steps_per_epoch=100)
    assert [lr.at(s) for s in (0, 799, 800, 1600)] == pytest.approx([0.0055, 0.0055, 0.00055, 0.000055])


def test_polynomial_sqrt_scaling_and_the_warmup_factor():
    from pipeline.train.schedule import LR

    poly = train_section(lr=0.01, warmup_steps=10, scale_lr=False, lr_schedule="polynomial", lr_power=2.0, lr_end=0.001)
    lr = LR.from_config(poly, size=2, total_steps=110)
    assert [lr.at(s) for s in (10, 60, 110, 500)] == pytest.approx([0.01, 0.001 + 0.009 * 0.25, 0.001, 0.001])
    sq = LR.from_config(train_section(lr=0.01, lr_scaling="sqrt", lr_base_batch=64), size=4, total_steps=10,
                        global_batch=1024, update_batch=256)
    assert sq.peak == pytest.approx(0.04)  # sqrt(1024 / 64) = 4
    wf = LR.from_config(train_section(lr=0.01, warmup_factor=3.0, warmup_steps=4), size=8, total_steps=10)
    assert wf.peak == pytest.approx(0.03) and wf.at(2) == pytest.approx(0.02)


@pytest.mark.parametrize("kw", [
    dict(base_lr=0.001, warmup_steps=40, factor=4.0, schedule="multistep", boundaries=(320, 640),
         decay_factors=(0.25, 0.125)),
    dict(base_lr=0.0055, warmup_steps=0, scale=False, schedule="multistep", boundaries=(8, 50), gamma=0.1),
    dict(base_lr=0.01, size=2, warmup_steps=10, schedule="polynomial", total_steps=110, power=2.0, end_lr=0.001),
])
def test_keras_schedule_equals_the_pure_function_for_the_new_schedules(kw):
    sched = keras_schedule(**kw)
    for step in [0, 5, 7, 8, 9, 10, 39, 40, 49, 50, 60, 110, 319, 320, 321, 639, 640, 1000]:
        assert float(sched(step)) == pytest.approx(lr_at(step, **kw), rel=1e-6, abs=1e-9), step


def test_a_resumed_optimizer_takes_the_rate_of_its_step(tmp_path):
    """The rate is a function of the optimizer's step count alone, which the checkpoint keeps:
    restored after 45 steps, the optimizer's next rate is lr_at(45)."""
    import tensorflow as tf

    from pipeline.train.schedule import LR

    lr = LR.from_config(train_section(lr=0.01, warmup_steps=10, lr_schedule="multistep", lr_boundary_unit="steps",
                               lr_boundaries=[40, 80], lr_decay_gamma=0.5), size=2, total_steps=100)
    w = tf.Variable([1.0])
    opt = tf.keras.optimizers.SGD(lr.keras())
    for _ in range(45):
        opt.apply_gradients([(tf.constant([0.0]), w)])
    tf.train.Checkpoint(optimizer=opt, w=w).write(str(tmp_path / "ck"))
    opt2 = tf.keras.optimizers.SGD(lr.keras())
    w2 = tf.Variable([1.0])
    opt2.build([w2])
    tf.train.Checkpoint(optimizer=opt2, w=w2).read(str(tmp_path / "ck")).assert_existing_objects_matched()
    assert int(opt2.iterations) == 45
    assert float(opt2.learning_rate) == pytest.approx(lr.at(45)) == pytest.approx(0.01)  # 0.02 x 0.5


def test_schedule_keys_are_checked():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="one per boundary: 2"):
        train_section(lr_schedule="multistep", lr_boundaries=[10, 20], lr_decay_factors=[0.1])
    with pytest.raises(ConfigError, match="not both"):
        train_section(lr_schedule="multistep", lr_boundaries=[10], lr_decay_factors=[0.1], lr_decay_gamma=0.1)
    with pytest.raises(ConfigError, match="increasing"):
        train_section(lr_schedule="multistep", lr_boundaries=[20, 10], lr_decay_gamma=0.1)
    with pytest.raises(ConfigError, match="both set"):
        train_section(warmup_epochs=2, warmup_steps=50)

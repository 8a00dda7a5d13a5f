import pytest

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

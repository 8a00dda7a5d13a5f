import json

import pytest

from pipeline import config
from pipeline.config import ConfigError


def test_default_file_matches_built_in_defaults():
    from conftest import ROOT

    assert config.load(ROOT / "configs" / "default.yaml") == config.Config()


def test_overrides_are_typed():
    cfg = config.load(None, ["train.batch_size=128", "train.lr=2e-3", "train.warmup_steps=0", "train.deterministic=true",
                             "data.dir=123", "checkpoint.keep=5", "log.progress_every_s=1"])
    assert cfg.train.batch_size == 128 and cfg.train.lr == 0.002 and cfg.train.deterministic is True
    assert cfg.data.dir == "123"  # a path stays a string even when it looks like a number
    assert cfg.checkpoint.keep == 5 and cfg.log.progress_every_s == 1.0


@pytest.mark.parametrize("assignment, words", [
    ("train.batchsize=3", "unknown key"),
    ("nosuch.key=3", "unknown key"),
    ("train=3", "unknown key"),
    ("train.batch_size", "expected KEY=VALUE"),
    ("train.batch_size=abc", "train.batch_size must be int"),
    ("train.batch_size=1.5", "train.batch_size must be int"),
    ("train.batch_size=true", "train.batch_size must be int"),
    ("train.deterministic=1", "train.deterministic must be bool"),
])
def test_bad_overrides_name_the_key(assignment, words):
    with pytest.raises(ConfigError, match=words):
        config.load(None, [assignment])


@pytest.mark.parametrize("assignment, message", [
    ("train.batch_size=0", "train.batch_size must be > 0"),
    ("train.epochs=0", "train.epochs must be > 0"),
    ("train.max_steps=-1", "train.max_steps must be >= 0"),
    ("train.lr=0", "train.lr must be > 0"),
    ("train.optimizer=rmsprop", "train.optimizer must be"),
    ("model.name=resnet9000", "model.name must be one of"),
    ("checkpoint.keep=0", "checkpoint.keep must be >= 1"),
    ("data.prefetch=0", "data.prefetch must be"),
])
def test_each_section_validates_its_values(assignment, message):
    with pytest.raises(ConfigError, match=message):
        config.load(None, [assignment])


def test_yaml_file_unknown_key_and_type(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  batch_size: 32\n  bach: 1\n")
    with pytest.raises(ConfigError, match=r"unknown key train\.bach"):
        config.load(p)
    p.write_text("train:\n  batch_size: '32'\n")
    with pytest.raises(ConfigError, match=r"train\.batch_size must be int"):
        config.load(p)
    p.write_text("trian:\n  batch_size: 32\n")
    with pytest.raises(ConfigError, match="unknown section 'trian'"):
        config.load(p)
    p.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(p)
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "missing.yaml")


def test_variant_config_is_a_diff_of_the_default(tmp_path):
    p = tmp_path / "big-batch.yaml"
    p.write_text("train:\n  batch_size: 256\n")
    cfg = config.load(p)
    assert cfg.train.batch_size == 256 and cfg.train.epochs == config.TrainConfig().epochs


def test_resolved_config_is_readable_json():
    doc = json.loads(config.dumps(config.Config(), ranks=2))
    assert doc["train"]["batch_size"] == 64 and doc["ranks"] == 2


def test_float_keys_accept_exponents_without_a_dot(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1e-3\n")
    assert config.load(p).train.lr == 0.001
    with pytest.raises(ConfigError, match="train.lr must be float"):
        config.load(None, ["train.lr=fast"])


def test_a_runs_config_json_loads_back_as_the_same_config(tmp_path):
    cfg = config.load(None, ["train.batch_size=32", "train.deterministic=true", "data.dir=data/x"])
    p = tmp_path / "config.json"
    # The facts a run records beside its sections, as pipeline train writes them.
    p.write_text(config.dumps(cfg, ranks=2, hosts=["a", "b"], threads_per_rank=1, backend="horovod",
                              global_batch=64, steps_per_epoch=125, total_steps=250, dropped_train_samples=0,
                              model_params=93322, gradient_bytes=373288, dataset="/abs/data/x",
                              versions={"tensorflow": "2.15.1"}))
    assert config.load(p) == cfg
    assert config.load(p, ["train.max_steps=7"]).train.max_steps == 7


def test_an_older_runs_config_json_loads_too(tmp_path):
    # Written before gradient_bytes, model_params and the horovod section existed.
    p = tmp_path / "config.json"
    doc = {k: v for k, v in config.Config().to_dict().items() if k != "horovod"}
    p.write_text(json.dumps({**doc, "ranks": 2, "hosts": ["vm", "vm"], "threads_per_rank": 1, "backend": "horovod",
                             "global_batch": 128, "steps_per_epoch": 156, "total_steps": 312,
                             "dropped_train_samples": 32, "dataset": "/d", "versions": {}}))
    assert config.load(p) == config.Config()


def test_only_known_run_facts_are_written():
    with pytest.raises(ValueError, match="not run facts"):
        config.dumps(config.Config(), train_loss=1.0)

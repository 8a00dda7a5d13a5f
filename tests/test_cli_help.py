"""Every verb's --help, and the flags that mirror a config key: their default, type and help
come from pipeline/config.py, never a copy (the help shows the config's value)."""

import argparse
import contextlib
import dataclasses
import io

import pytest

from pipeline import cli, config

# Flags whose name is a config key's but which mean something else (documented in their help).
OTHER_MEANING = {
    ("data synth", "seed"), ("data convert", "seed"), ("data index", "seed"),  # the data's draw, not training's
    ("data synth", "compression"), ("data convert", "compression"),  # HDF5 compression, not horovod's
    ("data verify", "dir"), ("data stats", "dir"), ("bench data", "dir"), ("data stage", "dir"),  # the positional dataset
    ("analyze", "target"), ("sweep", "target"),  # a leaderboard's target, not mlperf's
    ("sweep", "status"), ("bench convert", "keep"),
}


def verbs(parser, path=()):
    """(path, parser) for the program and every verb and sub-verb."""
    yield path, parser
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from verbs(sub, path + (name,))


def config_keys() -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for section in dataclasses.fields(config.Config):
        for f in dataclasses.fields(getattr(config.Config(), section.name)):
            keys.setdefault(f.name, []).append(f"{section.name}.{f.name}")
    return keys


ALL_VERBS = [p for p, _ in verbs(cli.build_parser())]


@pytest.mark.parametrize("path", ALL_VERBS, ids=lambda p: " ".join(p) or "pipeline")
def test_every_verb_has_help(path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        cli.main([*path, "--help"])
    assert e.value.code == 0 and "usage: pipeline" in out.getvalue()


def test_flags_that_mirror_a_config_key_take_it_from_the_config():
    keys, mirrored = config_keys(), []
    for path, parser in verbs(cli.build_parser()):
        for a in parser._actions:
            if a.dest not in keys or (" ".join(path), a.dest) in OTHER_MEANING:
                continue
            key = next((k for k in keys[a.dest] if f"(as {k};" in (a.help or "")), None)
            assert key, (f"pipeline {' '.join(path)} {a.option_strings or a.dest}: named like config key(s) "
                         f"{keys[a.dest]} but not made by config.flag (or listed in OTHER_MEANING)")
            assert a.default == config.flag_default(key), (path, a.dest)
            assert f"default {config.flag_default(key)}" in a.help, (path, a.dest, a.help)
            mirrored.append((" ".join(path), a.dest))
    # The ones there are today; a new mirrored flag adds itself here by taking _config_flag.
    assert set(mirrored) >= {("bench data", "read_block"), ("bench data", "shuffle_buffer"),
                             ("bench data", "batch_size"), ("bench data", "threads"), ("bench run", "batch_size"),
                             ("bench knobs", "epochs"), ("data verify", "root"), ("data stats", "root"),
                             ("bench data", "root")}


def test_a_flag_help_shows_the_keys_choices_and_default():
    assert config.flag_help("train.precision").endswith(
        "(as train.precision; default float32; one of float32, mixed_float16, mixed_bfloat16)")

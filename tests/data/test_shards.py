"""The shard format on real HDF5 files: what synth writes, what the manifest says, what verify catches."""

import json

import h5py
import numpy as np
import pytest

from pipeline.data import shards
from pipeline.data.shards import split_counts
from pipeline.data.synth import prototypes, samples, synth
from pipeline.errors import UserError


def test_synth_writes_shards_and_manifest(tmp_path):
    out = tmp_path / "d"
    synth(out, samples_train=1000, samples_val=200, shards=3, seed=3, progress=lambda *_: None)
    m = shards.load_manifest(out)
    assert m.shape == (28, 28, 1) and m.num_classes == 10
    assert [s.num_samples for s in m.shards("train")] == [334, 333, 333]
    assert m.num_samples("val") == 200
    for s in m.shards("train"):
        with h5py.File(m.path(s), "r") as f:
            assert f["x"].dtype == np.uint8 and f["y"].dtype == np.int32
            assert f["x"].chunks[1:] == (28, 28, 1), "chunked along the sample axis only"
            assert f.attrs["schema_version"] == shards.SCHEMA_VERSION
            assert f.attrs["num_samples"] == s.num_samples == len(f["y"])
        assert shards.sha256_file(m.path(s)) == s.sha256
    assert list(shards.verify(m)) == []
    assert not list(out.glob(".*tmp*")), "no temporary files left behind"


def test_synth_is_deterministic_and_balanced():
    protos = prototypes(10, (28, 28, 1), seed=5)
    x1, y1 = samples(protos, 2000, np.random.default_rng(1))
    x2, y2 = samples(protos, 2000, np.random.default_rng(1))
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    counts = np.bincount(y1, minlength=10)
    assert counts.min() > 150, counts
    # Classes differ more than samples within a class: the structure a model can learn.
    means = np.stack([x1[y1 == k].astype(float).mean(0) for k in range(10)])
    within = np.mean([np.abs(x1[y1 == k] - means[k]).mean() for k in range(10)])
    between = np.abs(means[:, None] - means[None]).mean() * 10 / 9
    assert between > 0.25 * within


def test_split_counts():
    assert split_counts(10, 3) == [4, 3, 3] and sum(split_counts(12345, 7)) == 12345


def test_synth_refuses_to_overwrite(tmp_path):
    synth(tmp_path, samples_train=50, samples_val=0, shards=1, progress=lambda *_: None)
    before = (tmp_path / "manifest.json").read_bytes()
    with pytest.raises(UserError, match="already holds a dataset"):
        synth(tmp_path, samples_train=50, shards=1, progress=lambda *_: None)
    assert (tmp_path / "manifest.json").read_bytes() == before


@pytest.fixture
def dataset(tmp_path):
    synth(tmp_path / "d", samples_train=300, samples_val=60, shards=2, progress=lambda *_: None)
    return tmp_path / "d"


def test_manifest_errors_name_the_file(tmp_path, dataset):
    with pytest.raises(UserError, match="data directory not found"):
        shards.load_manifest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty.manifest\.json: manifest missing \(directory is empty"):
        shards.load_manifest(tmp_path / "empty")
    (dataset / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match=r"manifest\.json: manifest is not valid JSON"):
        shards.load_manifest(dataset)
    (dataset / "manifest.json").write_text(json.dumps({"schema_version": 1, "splits": {}}))
    with pytest.raises(UserError, match="manifest is malformed"):
        shards.load_manifest(dataset)


def test_check_exist_names_a_missing_shard(dataset):
    m = shards.load_manifest(dataset)
    shards.check_exist(m)
    first = m.path(m.shards("train")[0])
    first.unlink()
    with pytest.raises(UserError, match=rf"{first.name}: shard listed in .* is missing"):
        shards.check_exist(m)


def _rewrite(path, x=None, y=None, drop=None):
    """Replaces a shard's datasets in place (the manifest keeps the old description)."""
    with h5py.File(path, "r+") as f:
        if drop:
            del f[drop]
        if x is not None:
            del f["x"]
            f["x"] = x
        if y is not None:
            del f["y"]
            f["y"] = y


CORRUPTIONS = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "truncated"),
    "not hdf5": (lambda p: p.write_bytes(b"PK\x03\x04 this is a zip, not HDF5" * 100), "not an HDF5 file"),
    "missing dataset": (lambda p: _rewrite(p, drop="y"), "missing dataset 'y'"),
    "wrong shape": (lambda p: _rewrite(p, x=np.zeros((150, 28, 27, 1), np.uint8)), "sample shape (28, 27, 1)"),
    "wrong dtype": (lambda p: _rewrite(p, x=np.zeros((150, 28, 28, 1), np.float32)), "x has dtype float32"),
    "count mismatch": (lambda p: _rewrite(p, x=np.zeros((149, 28, 28, 1), np.uint8),
                                          y=np.zeros(149, np.int32)), "has 149 samples, manifest says 150"),
    "x y lengths": (lambda p: _rewrite(p, y=np.zeros(151, np.int32)), "x has 150 samples but y has shape (151,)"),
    "label out of range": (lambda p: _rewrite(p, y=np.full(150, 10, np.int32)), "label 10 out of range [0, 10)"),
    "checksum": (lambda p: _flip_a_pixel(p), "sha256 does not match"),
}


def _flip_a_pixel(path):
    with h5py.File(path, "r+") as f:
        f["x"][0, 0, 0, 0] ^= 0xFF


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_verify_names_the_file_and_the_problem(tmp_path, case):
    from conftest import pipeline

    synth(tmp_path / "d", samples_train=300, samples_val=60, shards=2, progress=lambda *_: None)
    m = shards.load_manifest(tmp_path / "d")
    victim = m.path(m.shards("train")[1])
    corrupt, words = CORRUPTIONS[case]
    corrupt(victim)
    if case not in ("truncated", "not hdf5", "checksum"):
        # Rewriting datasets changes the file size; keep the manifest's size so the
        # structural check, not the size check, is what speaks.
        doc = json.loads((tmp_path / "d" / "manifest.json").read_text())
        doc["splits"]["train"]["shards"][1]["bytes"] = victim.stat().st_size
        (tmp_path / "d" / "manifest.json").write_text(json.dumps(doc))
    r = pipeline("data", "verify", tmp_path / "d")
    assert r.returncode == 2, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(victim) in lines[0] and words in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    fast = pipeline("data", "verify", "--fast", tmp_path / "d")
    assert (fast.returncode == 0) == (case == "checksum"), "--fast skips only the checksum"


@pytest.mark.parametrize("content, words", [
    (None, "manifest missing"), ("{oops", "not valid JSON"), ('{"schema_version": 1}', "malformed"),
    ('{"schema_version": 99}', "schema_version 99")])
def test_verify_manifest_problems(tmp_path, content, words):
    from conftest import pipeline

    synth(tmp_path / "d", samples_train=50, samples_val=0, shards=1, progress=lambda *_: None)
    if content is None:
        (tmp_path / "d" / "manifest.json").unlink()
    else:
        (tmp_path / "d" / "manifest.json").write_text(content)
    r = pipeline("data", "verify", tmp_path / "d")
    assert r.returncode == 2 and "manifest.json" in r.stderr and words in r.stderr, r.stderr

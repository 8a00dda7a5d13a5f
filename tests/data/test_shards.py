"""The shard format on real HDF5 files: what synth writes, what the manifest says, what verify catches."""

import json

import h5py
import numpy as np
import pytest

from pipeline.data import shards
from pipeline.data.synth import prototypes, samples, split_counts, synth
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


def test_fast_check_and_verify_find_problems(dataset):
    m = shards.load_manifest(dataset)
    shards.check_fast(m)
    first, second = (m.path(s) for s in m.shards("train"))
    # A shard whose bytes changed: the checksum catches it; --fast does not read checksums.
    with h5py.File(second, "r+") as f:
        f["y"][0] = (f["y"][0] + 1) % 10
    problems = list(shards.verify(m))
    assert len(problems) == 1 and str(second) in problems[0] and "sha256" in problems[0]
    assert list(shards.verify(m, checksums=False)) == []
    first.write_bytes(b"not an hdf5 file")
    assert any(str(first) in p and "cannot be read as HDF5" in p for p in shards.verify(m))
    first.unlink()
    with pytest.raises(UserError, match=rf"{first.name}: shard listed in .* is missing"):
        shards.check_fast(m)

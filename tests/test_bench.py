"""The benchmark commands run end to end on small inputs and report what they promise.
Speed is not asserted here (a shared machine is noisy); the memory bound of conversion is."""

import json

import pytest

from conftest import mpirun, pipeline


@pytest.mark.mpi
def test_bench_data_under_two_ranks(tmp_path, small_dataset):
    out = tmp_path / "bench.json"
    r = mpirun(2, "bench", "data", small_dataset, "--repeats", "1", "--json", out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "reader / raw read (cold)" in r.stdout and "reader / training consumption" in r.stdout
    doc = json.loads(out.read_text())
    assert doc["ranks"] == 2 and [p["rank"] for p in doc["per_rank"]] == [0, 1]
    for key in ("reader_vs_raw", "reader_vs_raw_warm", "reader_vs_consumption"):
        assert doc[key]["value"] > 0 and doc[key]["min"] <= doc[key]["value"] <= doc[key]["max"]


def test_bench_convert_stays_bounded(tmp_path):
    r = pipeline("bench", "convert", "--gib", "0.05", "--work", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "limit 1024 MiB: bounded" in r.stdout
    assert not any(tmp_path.iterdir()), "generated files are removed"


def test_bench_layout_covers_every_layout(tmp_path):
    r = pipeline("bench", "layout", "--samples", "3000", "--repeats", "1", "--work", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line.split() for line in r.stdout.splitlines()[2:]]
    assert {(row[0], row[1]) for row in rows} == {(c, z) for c in ("64", "256", "1024", "4096")
                                                   for z in ("none", "lzf", "gzip:1", "gzip:6")}

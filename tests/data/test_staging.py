"""Staging as part of the run, on two simulated hosts (network namespaces, real OpenMPI over
TCP, tests/conftest.py's sim_hosts). The hosts share this machine's file system, as a
cluster's nodes share theirs; `data.stage_dir=.../{host}` gives each its own directory, as
`$SLURM_TMPDIR` does on a cluster. What cannot be had here is a second machine's disk."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, env, leftovers, read_jsonl, sim_hosts

from pipeline.data import stage
from pipeline.data.shards import load_manifest
from pipeline.analysis import mlperf_log

pytestmark = pytest.mark.multinode
PIPELINE = str(Path(sys.executable).parent / "pipeline")


def train_across(d, mca, run, data, stage_dir):
    e = dict(env(), **mca)
    cmd = subprocess.run([PIPELINE, "slurm", "command", "--hostfile", str(d / "hostfile"), "--", PIPELINE, "train",
                          "--config", str(ROOT / "configs" / "cosmoflow.yaml"), "--run-dir", str(run),
                          "--set", f"data.dir={data}", "--set", f"data.stage_dir={stage_dir}",
                          ],
                         capture_output=True, text=True, env=e)
    assert cmd.returncode == 0, cmd.stderr
    r = subprocess.run(cmd.stdout.split("\0")[:-1], capture_output=True, text=True, env=e, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def staging_pair(log) -> list[dict]:
    return [e for e in mlperf_log.events(log) if e["key"] in ("staging_start", "staging_stop")]


def test_each_host_stages_its_ranks_files_and_a_second_run_stages_nothing(tmp_path):
    """configs/cosmoflow.yaml to its MLPerf target (as tests/mlperf's run, 512 universes), with
    data.stage_dir per host; then again with the sources moved away."""
    from pipeline.data.synth_layouts import synth_layout

    raw = synth_layout("cosmoflow", tmp_path / "raw", files=512, progress=lambda *_: None)
    r = subprocess.run([PIPELINE, "data", "index", str(raw), "--out", str(tmp_path / "idx"), "--x", "full",
                        "--y", "unitPar", "--subvolume", "16", "--checksums"], capture_output=True, text=True,
                       env=env())
    assert r.returncode == 0, r.stderr
    m = load_manifest(tmp_path / "idx")
    stage_dir = f"{tmp_path}/local/{{host}}"
    with sim_hosts(tmp_path, 2, 1) as (d, hosts, mca):
        first = train_across(d, mca, tmp_path / "run1", tmp_path / "idx", stage_dir)
        assert "pipeline: staged" in first.stdout
        for rank, h in enumerate(hosts):
            dest = Path(stage_dir.format(host=h[0]))
            want = stage.files_for_ranks(m, [rank], 2, 8, 8)
            got = {str(p.relative_to(dest)) for p in dest.rglob("*.h5")}
            assert got == {s.file for s in want}, f"{h[0]} holds exactly rank {rank}'s files"
            assert all(hashlib.sha256((dest / s.file).read_bytes()).hexdigest() == s.sha256 for s in want)
        header = read_jsonl(tmp_path / "run1" / "steps" / "rank-1.jsonl")[0]
        assert header["staging"]["dir"] == stage_dir.format(host=hosts[1][0]) and header["staging"]["copied"] > 0
        pair = staging_pair(tmp_path / "run1" / "mlperf.log")
        assert [e["key"] for e in pair] == ["staging_start", "staging_stop"]
        meta = pair[0]["metadata"]
        assert meta["files"] == meta["copied"] > 0 and meta["reused"] == 0 and meta["bytes"] > 0
        check = subprocess.run([sys.executable, "-m", "mlperf_logging.compliance_checker", "--usage", "hpc",
                                "--ruleset", "3.0.0", "--log_output", str(tmp_path / "check"),
                                str(tmp_path / "run1" / "mlperf.log")], capture_output=True, text=True, env=env())
        assert check.returncode == 0 and "SUCCESS" in check.stdout + check.stderr, check.stdout + check.stderr

        # The sources out of reach (moved away): the staged copies are what the run reads.
        os.rename(raw, f"{raw}.away")
        train_across(d, mca, tmp_path / "run2", tmp_path / "idx", stage_dir)
        meta2 = staging_pair(tmp_path / "run2" / "mlperf.log")[0]["metadata"]
        assert (meta2["copied"], meta2["reused"], meta2["files"]) == (0, meta["files"], meta["files"])
        a = subprocess.run([PIPELINE, "analyze", str(tmp_path / "run2")], capture_output=True, text=True, env=env())
        assert a.returncode == 0 and f"0 copied, {meta['files']} already there" in a.stdout, a.stdout + a.stderr
    assert leftovers(d, hosts) == []

"""Staging (pipeline/data/stage.py): the files a host's ranks read under the run's plan,
copied to node-local storage, checked, reused when intact. Real HDF5 files and real copies;
the full disks are real tmpfs mounts (root)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from conftest import assert_user_error, mpirun, pipeline, require_root

from pipeline import config as config_mod
from pipeline.data import stage
from pipeline.data.shards import load_manifest
from pipeline.errors import UserError


@pytest.fixture
def indexed(tmp_path):
    """24 one-sample files (16 KiB each) in two folders, indexed with checksums."""
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for i in range(24):
        d = src / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        with h5py.File(d / f"s-{i:03d}.h5", "w") as f:
            f["x"] = rng.random((32, 32, 4), dtype=np.float32)
            f["y"] = np.int64(i % 3)
    r = pipeline("data", "index", src, "--out", tmp_path / "idx", "--x", "x", "--y", "y", "--per-file", "one",
                 "--num-classes", "3", "--val-fraction", "0.25", "--checksums")
    assert r.returncode == 0, r.stderr
    return load_manifest(tmp_path / "idx")


def digests(paths) -> dict:
    return {str(p): (os.stat(p).st_mtime_ns, hashlib.sha256(Path(p).read_bytes()).hexdigest()) for p in paths}


def all_files(m):
    return [s for split in m.splits for s in m.shards(split)]


# --- data.stage_dir's expansion ---

def test_stage_dir_is_expanded_per_host_and_rank():
    env = {"SLURM_TMPDIR": "/local/job7", "EMPTY": ""}
    assert stage.expand("$SLURM_TMPDIR/{host}", "n01", 3, env) == Path("/local/job7/n01")
    assert stage.expand("${SLURM_TMPDIR}/r{rank}", "n01", 3, env) == Path("/local/job7/r3")
    assert stage.expand("~/stage", "n01", 0, {}) == Path.home() / "stage"
    for bad, words in (("$NOPE/{host}", ["$NOPE is not set on n01", "data.stage_dir"]),
                       ("$EMPTY/x", ["$EMPTY is not set"]),
                       ("/tmp/{node}", ["only {host} and {rank}"]),
                       ("relative/{host}", ["not an absolute path"])):
        with pytest.raises(UserError) as e:
            stage.expand(bad, "n01", 0, env)
        assert all(w in str(e.value) for w in words), str(e.value)


# --- which files a host stages ---

@pytest.mark.parametrize("size", [2, 3, 5])
def test_a_group_stages_exactly_the_files_its_ranks_read(indexed, size):
    """What a rank reads under the trainer's own plan (training and validation shares) is
    what files_for_ranks gives for it; a host's set is the union of its ranks'."""
    from pipeline.train.trainer import make_plan

    cfg = config_mod.Config()
    cfg.train.batch_size = 2
    read = []
    for r in range(size):
        plan = make_plan(cfg, indexed, SimpleNamespace(rank=r, size=size))
        files = {indexed.shards("train")[i].file for i, _, _ in plan.train.ranges}
        files |= {indexed.shards("val")[i].file for i, _, _ in plan.val.ranges}
        read.append(files)
        assert {s.file for s in stage.files_for_ranks(indexed, [r], size, 2, 2)} == files
    host = stage.files_for_ranks(indexed, [0, size - 1], size, 2, 2)
    assert {s.file for s in host} == read[0] | read[-1] and len(host) == len({s.file for s in host})
    assert len(read[0]) < len(all_files(indexed)), "a rank reads only its share"


# --- the copy ---

def test_staged_copies_are_intact_and_a_second_stage_copies_nothing(indexed, tmp_path):
    before = digests(indexed.path(s) for s in all_files(indexed))
    dest = tmp_path / "local"
    files = stage.files_for_ranks(indexed, [0], 2, 2, 2)
    out = stage.Stager(indexed, dest, files, "n01", threads=3).run()
    assert (out.files, out.copied, out.reused) == (len(files), len(files), 0)
    for s in files:
        src, dst = indexed.path(s), dest / s.file
        assert dst.read_bytes() == src.read_bytes() and os.stat(dst).st_mtime_ns == os.stat(src).st_mtime_ns
    staged = {str(p.relative_to(dest)) for p in dest.rglob("*.h5")}
    assert staged == {s.file for s in files}, "exactly the group's files"
    assert not list(dest.rglob(f"*{stage.TMP_MARK}*"))
    again = stage.Stager(indexed, dest, files, "n01").run()
    assert (again.copied, again.reused, again.copied_bytes) == (0, len(files), 0)
    # A job on more ranks reads more files on this host: only the missing ones are copied.
    more = stage.files_for_ranks(indexed, [0, 1], 2, 2, 2)
    grown = stage.Stager(indexed, dest, more, "n01").run()
    assert (grown.copied, grown.reused) == (len(more) - len(files), len(files))
    assert digests(indexed.path(s) for s in all_files(indexed)) == before, "the sources are only read"


def test_a_changed_or_truncated_copy_is_copied_again(indexed, tmp_path):
    dest = tmp_path / "local"
    files = all_files(indexed)[:4]
    stage.Stager(indexed, dest, files, "n01").run()
    with open(dest / files[0].file, "r+b") as f:
        f.truncate(100)  # a copy cut short (a job killed mid-copy by an older tool)
    os.utime(dest / files[1].file, ns=(1, 1))  # another mtime: not the source's copy
    out = stage.Stager(indexed, dest, files, "n01").run()
    assert (out.copied, out.reused) == (2, 2)
    assert all((dest / s.file).read_bytes() == indexed.path(s).read_bytes() for s in files)


def test_with_the_sources_gone_intact_copies_are_used_and_a_missing_one_is_named(indexed, tmp_path):
    dest = tmp_path / "local"
    files = all_files(indexed)[:4]
    stage.Stager(indexed, dest, files, "n01").run()
    root = indexed.root or indexed.dir
    os.rename(root, f"{root}.away")
    out = stage.Stager(indexed, dest, files, "n01").run()
    assert (out.copied, out.reused) == (0, 4), "the record of the staged copies stands in for the sources"
    with pytest.raises(UserError) as e:
        stage.Stager(indexed, dest, all_files(indexed)[:5], "n01").run()
    msg = str(e.value)
    assert all_files(indexed)[4].file in msg and "missing on n01" in msg and "\n" not in msg


def test_a_copy_that_does_not_match_the_checksum_is_not_left_in_use(indexed, tmp_path):
    """The source changed after indexing (same size, other bytes): the sha256 check fails,
    the copy is removed, the message names the file and the host."""
    dest = tmp_path / "local"
    victim = all_files(indexed)[2]
    p = indexed.path(victim)
    data = bytearray(p.read_bytes())
    data[-20] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(UserError) as e:
        stage.Stager(indexed, dest, all_files(indexed)[:3], "n01", threads=1).run()
    assert str(p) in str(e.value) and "on n01" in str(e.value) and "sha256" in str(e.value)
    assert not (dest / victim.file).exists() and not list(dest.rglob(f"*{stage.TMP_MARK}*"))


def test_clean_removes_what_staging_put_there_only(indexed, tmp_path):
    dest = tmp_path / "local"
    stage.Stager(indexed, dest, all_files(indexed)[:3], "n01").run()
    (dest / "mine.txt").write_text("a user's file")
    files, nbytes = stage.clean(dest)
    assert files == 3 and nbytes > 0
    assert [p.name for p in dest.rglob("*") if p.is_file()] == ["mine.txt"]


def test_the_stage_command_stages_a_dataset_and_cleans_it(indexed, tmp_path):
    r = pipeline("data", "stage", indexed.dir, "--to", tmp_path / "local" / "{host}")
    assert r.returncode == 0, r.stderr
    assert "24 copied" in r.stdout and "--set data.root=" in r.stdout
    dest = next((tmp_path / "local").iterdir())
    assert len(list(dest.rglob("*.h5"))) == 24
    r = pipeline("data", "stage", indexed.dir, "--to", tmp_path / "local" / "{host}")
    assert "0 copied" in r.stdout and "24 already there" in r.stdout
    r = pipeline("data", "stage", "--clean", "--to", tmp_path / "local" / "{host}")
    assert r.returncode == 0 and "removed 24 staged files" in r.stdout, r.stderr
    assert not dest.exists()
    assert_user_error(pipeline("data", "stage", indexed.dir), "--to DEST")
    assert_user_error(pipeline("data", "stage", "--clean", "--run-dir", tmp_path), "config.json", "data.stage_dir")


# --- a full disk: real tmpfs mounts ---

@pytest.fixture
def small_disk(tmp_path):
    """A mount point the test mounts a small tmpfs on (root)."""
    require_root("a tmpfs mount (a small disk that fills up)", "root")
    d = tmp_path / "local"
    d.mkdir()
    mounted = []

    def mount(opts: str) -> Path:
        subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], check=True)
        mounted.append(d)
        return d

    yield mount
    for p in mounted:
        subprocess.run(["umount", str(p)], check=True)


@pytest.mark.root
def test_too_little_free_space_is_found_before_copying(indexed, small_disk):
    dest = small_disk("size=128k")
    before = digests(indexed.path(s) for s in all_files(indexed))
    with pytest.raises(UserError) as e:
        stage.Stager(indexed, dest / "stage", all_files(indexed), "n01").run()
    assert "does not fit on n01" in str(e.value) and "MB free" in str(e.value)
    assert not list((dest / "stage").rglob("*.h5")), "nothing copied"
    assert digests(indexed.path(s) for s in all_files(indexed)) == before


@pytest.mark.root
def test_a_disk_that_fills_during_the_copy_leaves_only_whole_files(indexed, small_disk):
    """Free bytes enough, but the file system runs out of inodes after a few files: a real
    ENOSPC from the kernel in the middle of the copy. The failing file is named with the
    host; no temporary file stays; what was renamed into place is whole; with room again the
    next stage reuses it and copies the rest."""
    dest = small_disk("size=8m,nr_inodes=8")
    before = digests(indexed.path(s) for s in all_files(indexed))
    files = all_files(indexed)
    with pytest.raises(UserError) as e:
        stage.Stager(indexed, dest, files, "n01", threads=2).run()
    msg = str(e.value)
    assert "on n01 failed (No space left on device)" in msg and "\n" not in msg
    assert any(str(indexed.path(s)) in msg for s in files)
    assert not list(dest.rglob(f"*{stage.TMP_MARK}*")), "no temporary file left"
    whole = [s for s in files if (dest / s.file).exists()]
    assert all((dest / s.file).read_bytes() == indexed.path(s).read_bytes() for s in whole)
    assert digests(indexed.path(s) for s in files) == before
    subprocess.run(["mount", "-o", "remount,nr_inodes=200", str(dest)], check=True)
    out = stage.Stager(indexed, dest, files, "n01").run()
    assert (out.copied, out.reused) == (len(files) - len(whole), len(whole))


@pytest.mark.mpi
@pytest.mark.root
def test_a_run_whose_stage_dir_is_full_ends_with_one_line_naming_file_and_host(indexed, small_disk, tmp_path):
    """2 ranks, data.stage_dir on a 64 KiB tmpfs: exit 2, one line naming the file that does
    not fit and the host, on every rank; the sources untouched, nothing staged."""
    dest = small_disk("size=64k")
    before = digests(indexed.path(s) for s in all_files(indexed))
    r = mpirun(2, "train", "--run-dir", tmp_path / "run", "--set", f"data.dir={indexed.dir}",
               "--set", f"data.stage_dir={dest}/{{host}}", "--set", "model.name=mlp",
               "--set", "train.batch_size=2", "--set", "train.max_steps=2")
    import socket

    # mpirun adds its own banner; the pipeline's part is one line, from rank 0 (rank 1 is quiet).
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("pipeline: error:")]
    assert len(errors) == 1, r.stderr
    assert "does not fit on " + socket.gethostname() in errors[0] and f"{dest}/" in errors[0] and ".h5" in errors[0]
    assert digests(indexed.path(s) for s in all_files(indexed)) == before
    assert not list(dest.rglob("*.h5"))

"""The step log: a header per process, then one line per step, appended (a resumed process adds
its own header after the earlier ones), readable by analyze; the file closes on every way out."""

import json

import pytest

from pipeline.analysis import logs
from pipeline.rundir import RunDir, is_header
from pipeline.train.steplog import StepLog, rss_mb

STEP = dict(epoch=1, rank=0, size=1, time=1.0, step_s=0.01, data_s=0.001, compute_s=0.009, samples=32, loss=0.5)


def test_records_are_appended_after_each_processes_header(tmp_path):
    run = RunDir(tmp_path)
    with StepLog(run, 0) as log:
        log.header(rank=0, start_step=0)
        log.steps([dict(STEP, step=1), dict(STEP, step=2)])
    with StepLog(run, 0) as log:  # the resumed process
        log.header(rank=0, start_step=2)
        log.steps([dict(STEP, step=3)])
    lines = [json.loads(x) for x in run.step_log(0).read_text().splitlines()]
    assert [is_header(x) for x in lines] == [True, False, False, True, False]
    assert [x["step"] for x in lines if not is_header(x)] == [1, 2, 3]
    assert log.records == 2 and log.cost_s > 0 and log.closed
    rank0 = logs.load(tmp_path).ranks[0]
    assert rank0.cols["step"].tolist() == [1, 2, 3] and len(rank0.headers) == 2


def test_the_file_is_closed_when_the_loop_raises(tmp_path):
    with pytest.raises(RuntimeError):
        with StepLog(RunDir(tmp_path), 1) as log:
            raise RuntimeError("a step failed")
    assert log.closed


def test_rss_is_this_processes_resident_memory():
    assert 10 < rss_mb() < 1 << 20

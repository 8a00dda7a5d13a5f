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


@pytest.mark.mpi
def test_bench_run_quick_writes_every_figure(tmp_path):
    # Functional, not a speed check: the figures are ratios the bench prints against targets.
    out = tmp_path / "bench"
    r = pipeline("bench", "run", "--quick", "--steps", "30", "--repeats", "1", "--out", out, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads((out / "bench.json").read_text())
    for key in ("pipeline_vs_keras", "pipeline_vs_horovod_loop"):
        assert set(res[key]) >= {"value", "min", "max", "target"} and res[key]["value"] > 0
    assert [row["ranks"] for row in res["scaling"]] == [1, 2]
    # ResNet50 is a full-run row only (its processes take half a minute each).
    assert [m["model"] for m in res["models"]] == ["cnn", "resnet20", "keras.applications.MobileNetV2"]
    assert res["pipeline_vs_itself"]["value"] > 0 and res["pipeline_vs_itself"]["ranks"] == 2
    for m in res["models"]:
        assert m["pipeline_vs_keras"]["value"] > 0 and m["pipeline_vs_horovod_loop"]["value"] > 0
        assert set(m["overhead_us_per_step"]) >= {"value", "min", "max"}
        # Each side's MFU against the same peak, from the pipeline run's model FLOPs.
        assert m["mfu"]["peak_flops_per_s"] > 0 and m["mfu"]["model_flops_per_sample"] > 0
        assert all(0 < m["mfu"][k] for k in ("pipeline_1", "keras", "pipeline_n", "horovod_loop"))
    for m in res["models"][1:]:
        # The last repeat's Horovod timelines of both sides, read per step.
        sides = m["timelines"]
        assert sides["pipeline"]["steps"] >= 1 and sides["horovod_loop"]["steps"] >= 1
        assert sides["pipeline"]["gradient_ops_per_step"] >= 1 and sides["horovod_loop"]["gradient_ops_per_step"] >= 1
        assert all(len(v) == 1 for v in m["baseline_settings"].values())  # one fit, at equal settings
    assert all(len(v) == 2 for v in res["models"][0]["baseline_settings"].values())  # CNN: both
    assert 0 < res["step_log_cost"]["value"] < 1
    assert res["scaling"][1]["efficiency"] == pytest.approx(
        res["scaling"][1]["throughput_samples_per_s"] / (2 * res["scaling"][0]["throughput_samples_per_s"]))
    sizes = [row["bytes"] for row in res["allreduce"]]
    assert sizes[0] == 4 << 10 and sizes[-1] == 64 << 20
    assert all(row["hvd_busbw_gbps"] > 0 and row["mpi_busbw_gbps"] > 0 for row in res["allreduce"])
    assert res["memcpy_gbps"] > 0 and "reader_vs_raw" in res and res["settings"]["steps"] == 30
    report = (out / "report.md").read_text()
    assert "A/A" in report and "| model | MFLOP/sample |" in report and "Horovod timelines" in report
    for png in ("scaling.png", "allreduce.png", "step-times.png"):
        assert f"]({png})" in report and (out / png).read_bytes()[:4] == b"\x89PNG"
    # Every pipeline run in the bench is a run directory analyze reads.
    a = pipeline("analyze", *res["scaling"][1]["run_dirs"], "--json")
    assert a.returncode == 0 and json.loads(a.stdout)["runs"][0]["ranks"] == 2


@pytest.mark.mpi
def test_bench_knobs_runs_each_knob_fresh_against_the_default(tmp_path, monkeypatch):
    import io

    from pipeline.bench import knobs

    monkeypatch.setattr(knobs, "KNOBS", [("default", []), ("fp16", ["horovod.compression=fp16"]),
                                         ("default again", [])])
    out = io.StringIO()
    rows = knobs.run(str(tmp_path / "k"), ranks=2, epochs=1, repeats=1, log=out)
    assert [r["knob"] for r in rows] == ["default", "fp16", "default again"]
    for r in rows:
        assert r["steps"] == 156 and r["val_accuracy"]["value"] > 0.5  # every run trained a full epoch
    header = json.loads((tmp_path / "k/runs/01-r0/steps/rank-0.jsonl").read_text().splitlines()[0])
    assert header["compression"] == "fp16"
    # Run again: each run directory starts fresh (no resume of the finished one).
    knobs.run(str(tmp_path / "k"), ranks=2, epochs=1, repeats=1, log=out)
    lines = (tmp_path / "k/runs/00-r0/steps/rank-0.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 156
    assert "| fp16 |" in out.getvalue()


def test_bench_model_plan_keeps_resnet50_for_models_runs():
    from pipeline.bench import suite

    def names(plan):
        return [m.model.rsplit(".", 1)[-1] for m, _, _ in plan]

    full = suite.model_plan(quick=False, models=False, repeats=5)
    assert names(full) == ["resnet20", "MobileNetV2"]
    assert [(steps, repeats) for _, steps, repeats in full] == [(40, 3), (30, 3)]
    # BENCH=models: the large-tensor row too, at its own steps and 3 repeats (--repeats lowers them)
    many = suite.model_plan(quick=False, models=True, repeats=5)
    assert names(many) == ["resnet20", "MobileNetV2", "ResNet50"] and many[-1][1:] == (16, 3)
    assert [r for _, _, r in suite.model_plan(quick=False, models=True, repeats=2)] == [2, 2, 2]
    # quick: one short repeat per row, and ResNet50 (no quick steps) never
    quick = suite.model_plan(quick=True, models=True, repeats=2)
    assert names(quick) == ["resnet20", "MobileNetV2"] and [(s, r) for _, s, r in quick] == [(13, 1), (10, 1)]


def test_bench_model_rows_alternate_which_side_runs_first():
    from pipeline.bench import suite

    calls = []

    def side(name):
        return lambda: calls.append(name) or name

    for rep in range(3):
        # results come back as (pipeline, baseline) whichever ran first
        assert suite.paired(rep, side("pipeline"), side("baseline")) == ("pipeline", "baseline")
    # even repeats the pipeline first, odd ones the baseline: no side always runs second
    assert calls == ["pipeline", "baseline", "baseline", "pipeline", "pipeline", "baseline"]


def test_bench_cnn_pairs_alternate_which_side_runs_first():
    """The CNN's pipeline / Keras and pipeline / Horovod loop pairs follow paired's order too;
    the runs themselves are stubbed (the order is what is checked, not a speed)."""
    from pipeline.bench import suite

    calls = []

    class StubBench:
        ranks, batch, cores, repeats = [1, 2], 64, 2, 2

        def say(self, msg):
            pass

        def pipeline_run(self, n, batch, rep, threads=0):
            # the batch tells the strong-scaling run (batch 128) from the pair's (64)
            calls.append(f"p{n}b{batch}" + ("" if threads == 0 else "t") + ("-again" if "again" in str(rep) else ""))
            return {"throughput_samples_per_s": 1.0}

        def baseline(self, mode, n, rep):
            calls.append(mode)
            return {"throughput_samples_per_s": 1.0}

    runs = suite.measure_training(StubBench())
    sides = ({"p1b64", "keras"}, {"p2b64", "horovod"})
    pairs = [(c, calls[i + 1]) for i, c in enumerate(calls[:-1]) if {c, calls[i + 1]} in sides]
    assert pairs == [("p1b64", "keras"), ("p2b64", "horovod"), ("keras", "p1b64"), ("horovod", "p2b64")]
    # the A/A run stands right after each repeat's 2-rank pair
    again = [i for i, c in enumerate(calls) if c.endswith("-again")]
    assert len(again) == 2 and all(set(calls[i - 2:i]) == {"p2b64", "horovod"} for i in again)
    assert len(runs.weak[2]) == len(runs.hvdloop) == len(runs.again) == 2

"""pipeline analyze on run directories written here with known answers, on damaged logs, and
on the logs and Horovod timeline of a real 2-rank run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import mpirun, pipeline, write_run

from pipeline.analysis import logs, report, summary, timeline


def test_percentiles_and_throughput_follow_their_definitions(tmp_path):
    rng = np.random.default_rng(3)
    times = rng.uniform(0.02, 0.08, size=(200, 2))
    d = write_run(tmp_path / "r", ranks=2, steps=200, step_s=lambda r, s: times[s - 1, r])
    s = summary.summarize(logs.load(d))
    steady = times[10:]  # warm-up: the first min(10, 200/5) steps
    assert s["warmup_steps"] == 10
    for q in (50, 90, 99):
        assert s["step_s"][f"p{q}"] == pytest.approx(np.percentile(steady.ravel(), q))
    assert s["step_s"]["max"] == pytest.approx(steady.max())
    # Global samples over the lock-step wall time (each step lasts as long as its slowest rank).
    assert s["throughput_samples_per_s"] == pytest.approx(190 * 2 * 32 / steady.max(axis=1).sum())
    assert s["per_rank"][1]["step_s_p50"] == pytest.approx(np.median(steady[:, 1]))


def test_warmup_restarts_each_segment_and_repeated_steps_keep_the_last(tmp_path):
    d = write_run(tmp_path / "r", ranks=1, steps=100)
    lines = (d / "steps/rank-0.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    # A crash after step 100 lost everything after step 80; the requeued job (60 s later)
    # re-ran 81..100 slower, then went on to 150.
    t = recs[-1]["time"] + 60
    with open(d / "steps/rank-0.jsonl", "a") as f:
        for s in range(81, 151):
            t += 0.07
            f.write(json.dumps({**recs[0], "step": s, "time": t, "step_s": 0.07}) + "\n")
    s = summary.summarize(logs.load(d))
    assert s["repeated_steps"] == 20
    assert s["segments"] == 2
    assert s["steps"] == 150 and s["steps_logged"] == 150
    assert s["warmup_steps"] == 10 + 10
    run = logs.load(d)
    assert run.ranks[0].cols["step_s"][85] == pytest.approx(0.07)  # step 86: the re-run's record


def test_rank_thirty_percent_slower_in_data_is_flagged(tmp_path):
    d = write_run(tmp_path / "slow", ranks=4, steps=300, step_s=0.05, noise=0.1, seed=1,
                  data_s=lambda r, s: 0.013 if r == 2 else 0.010)
    s = summary.summarize(logs.load(d))
    assert s["stragglers"] == [2]
    detail = next(x for x in s["straggler_details"] if x["figure"] == "data_s")
    assert detail["ratio"] == pytest.approx(1.3, rel=0.1)
    out = report.text({"runs": [s]})
    assert "straggler: rank 2 data_s" in out


@pytest.mark.parametrize("seed", range(5))
def test_balanced_noisy_run_flags_nobody(tmp_path, seed):
    d = write_run(tmp_path / "even", ranks=4, steps=300, step_s=0.05, noise=0.2, seed=seed, data_s=0.01)
    assert summary.summarize(logs.load(d))["stragglers"] == []


def test_straggler_rule_with_plain_numbers():
    base = np.full((100, 3), 0.010)
    slow = base.copy()
    slow[:, 1] = 0.013
    assert [s["rank"] for s in summary.stragglers(slow, 0.05, [0, 1, 2])] == [1]
    # One very slow step is noise, not a straggler.
    spike = base.copy()
    spike[7, 2] = 1.0
    assert summary.stragglers(spike, 0.05, [0, 1, 2]) == []
    # 30% slower but a negligible part of the step (0.3 ms of 500 ms): not worth flagging.
    assert summary.stragglers(slow, 0.5, [0, 1, 2]) == []


def test_scaling_matches_a_hand_calculation(tmp_path):
    # Per-rank batch 32; 1 rank 0.040 s/step, 2 ranks 0.050, 4 ranks 0.064.
    dirs = [write_run(tmp_path / f"n{n}", ranks=n, steps=100, step_s=t) for n, t in ((1, 0.040), (2, 0.050),
                                                                                    (4, 0.064))]
    res = report.analyze([str(x) for x in dirs])
    thr = {1: 32 / 0.040, 2: 64 / 0.050, 4: 128 / 0.064}
    rows = {r["ranks"]: r for r in res["scaling"]}
    for n in (1, 2, 4):
        assert rows[n]["throughput_samples_per_s"] == pytest.approx(thr[n])
        assert rows[n]["speedup"] == pytest.approx(thr[n] / thr[1])
        assert rows[n]["efficiency"] == pytest.approx(thr[n] / (n * thr[1]))
    assert rows[2]["mode"] == "weak"
    # Communication estimated from the 1-rank run at the same per-rank batch, marked as such.
    comm = res["runs"][1]["communication"]
    assert comm["source"] == "estimate"
    assert comm["per_step_s"] == pytest.approx((0.050 - 0.001) - (0.040 - 0.001))


def test_damaged_logs_are_counted_not_fatal(tmp_path):
    d = write_run(tmp_path / "bad", ranks=4, steps=50)
    with open(d / "steps/rank-0.jsonl", "a") as f:
        f.write("not json at all\n[1, 2]\n{\"step\": 51}\n")  # garbage, not an object, missing fields
        f.write('{"step": 52, "epoch": 1, "rank": 0, "step_s": 0.0')  # a run still being written
    lines = (d / "steps/rank-1.jsonl").read_text().splitlines()
    (d / "steps/rank-1.jsonl").write_text("\n".join(lines[:30]) + "\n")  # unequal steps
    (d / "steps/rank-2.jsonl").write_text("")  # empty
    (d / "steps/rank-3.jsonl").unlink()  # missing
    r = pipeline("analyze", d, "--json")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    s = json.loads(r.stdout)["runs"][0]
    assert s["skipped_lines"] == 4
    assert s["partial_last_lines"] == [0]
    assert s["missing_ranks"] == [2, 3]
    assert {p["rank"]: p["steps"] for p in s["per_rank"]} == {0: 50, 1: 30}
    text = pipeline("analyze", d).stdout
    assert "missing or empty rank logs: [2, 3]" in text and "skipped_lines 4" in text


def test_time_to_accuracy_and_compare(tmp_path):
    m = [{"epoch": e, "step": 50 * e, "time": 1_700_000_000.0 + 2.5 * e, "val_loss": 1.0,
          "val_accuracy": acc} for e, acc in ((1, 0.6), (2, 0.92), (3, 0.95))]
    a = write_run(tmp_path / "a", ranks=2, steps=150, step_s=0.05, metrics=m)
    b = write_run(tmp_path / "b", ranks=2, steps=150, step_s=0.04, batch=64, metrics=m)
    res = report.analyze([str(a), str(b)], target=0.9, compare=True)
    tta = res["runs"][0]["time_to_accuracy"]
    assert tta["reached"] and tta["step"] == 100 and tta["seconds"] == pytest.approx(5.0 - 0.0, abs=1e-6)
    rows = {r["key"]: r for r in res["compare"]}
    assert rows["global_batch"]["b_over_a"] == pytest.approx(2.0)
    assert rows["throughput_samples_per_s"]["b_over_a"] == pytest.approx((128 / 0.04) / (64 / 0.05))
    assert "scaling" not in res  # same rank count: nothing to scale
    assert not report.analyze([str(a)], target=0.99)["runs"][0]["time_to_accuracy"]["reached"]


def test_contract_keys_plots_and_report(tmp_path):
    d = write_run(tmp_path / "r", ranks=2, steps=60)
    r = pipeline("analyze", d, "--json", "--plots", tmp_path / "plots", "--report", tmp_path / "rep.html")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    run = out["runs"][0]
    for k in ("run_dir", "ranks", "global_batch", "steps", "warmup_steps", "throughput_samples_per_s", "step_s",
              "data_wait_fraction", "per_rank", "stragglers", "skipped_lines"):
        assert k in run
    assert set(run["step_s"]) >= {"p50", "p90", "p99", "max", "mean"}
    assert set(run["per_rank"][0]) >= {"rank", "steps", "step_s_p50", "data_s_p50"}
    pngs = list((tmp_path / "plots").glob("*.png"))
    assert len(pngs) == 4 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    page = (tmp_path / "rep.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "throughput" in page


def test_user_errors_exit_2_with_one_line(tmp_path):
    r = pipeline("analyze", tmp_path / "nope")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "nope" in r.stderr
    (tmp_path / "notarun").mkdir()
    r = pipeline("analyze", tmp_path / "notarun")
    assert r.returncode == 2 and "no steps/" in r.stderr
    d = write_run(tmp_path / "r", ranks=1, steps=20)
    r = pipeline("analyze", d, "--compare")
    assert r.returncode == 2 and "--compare takes exactly two" in r.stderr
    r = pipeline("analyze", d, "--report", tmp_path / "x.pdf")
    assert r.returncode == 2 and ".html or .md" in r.stderr


def test_truncated_timeline_is_read_to_its_last_whole_event(tmp_path):
    evs = [{"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "grad"}},
           {"ph": "B", "name": "NEGOTIATE_ALLREDUCE", "ts": 0, "pid": 1},
           {"ph": "X", "name": "0", "ts": 0, "pid": 1, "dur": 0},
           {"ph": "X", "name": "1", "ts": 400, "pid": 1, "dur": 0},
           {"ph": "E", "ts": 400, "pid": 1},
           {"ph": "B", "name": "ALLREDUCE", "ts": 410, "pid": 1},
           {"ph": "B", "name": "MPI_ALLREDUCE", "ts": 420, "pid": 1},
           {"ph": "E", "ts": 1420, "pid": 1},
           {"ph": "E", "ts": 1500, "pid": 1}]
    text = "[\n" + ",".join(json.dumps(e) for e in evs)
    p = tmp_path / "timeline.json"
    p.write_text(text + ',{"ph": "B", "name": "NEGOT')  # cut off mid-event
    res = timeline.analyze([p], 2)
    assert res["phases"]["MPI_ALLREDUCE"]["wall_s"] == pytest.approx(0.001)
    assert res["phases"]["NEGOTIATE_ALLREDUCE"]["wall_s"] == pytest.approx(0.0004)
    assert res["last_to_negotiate"][1] == {"rank": 1, "share": 1.0, "lateness_p50_s": pytest.approx(0.0004),
                                           "late_s_total": pytest.approx(0.0004)}


@pytest.mark.mpi
def test_real_two_rank_run_and_its_timeline(tmp_path, small_dataset):
    run = tmp_path / "run"
    r = mpirun(2, "train", "--run-dir", run, "--set", f"data.dir={small_dataset}", "--set", "train.max_steps=60",
               "--set", "log.timeline=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "timeline.json").exists()
    r = pipeline("analyze", run, "--json", "--report", tmp_path / "rep.md", "--link-gbps", "10")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)["runs"][0]
    # Both ranks on this host: the model has no network term; the gradients are a part of
    # all allreduce traffic (the per-step stop flag and evaluation sums are the rest).
    m = s["comm_model"]
    assert m["hosts"] == 1 and m["predicted_terms_s"]["bandwidth_s"] == 0
    assert m["gradient_bytes"] == s["gradient_bytes_per_step"]
    grad = s["communication"]["gradient_phases"]["MPI_ALLREDUCE"]
    assert 0 < grad["per_step_s"] <= s["communication"]["phases"]["MPI_ALLREDUCE"]["per_step_s"]
    assert m["measured_comm_s"] == grad["per_step_s"] and 1 <= m["fused_ops_per_step"] <= 10
    assert s["ranks"] == 2 and s["steps"] == 60 and s["skipped_lines"] == 0 and s["missing_ranks"] == []
    assert s["throughput_samples_per_s"] > 0 and s["gradient_bytes_per_step"] > 0
    comm = s["communication"]
    assert comm["source"] == "timeline"
    assert comm["phases"]["MPI_ALLREDUCE"]["count"] >= 60  # at least one fused allreduce per step
    assert 0 < comm["phases"]["MPI_ALLREDUCE"]["per_step_s"] < s["step_s"]["max"]
    assert comm["negotiations"] > 60  # the response cache is off: every negotiation has ticks
    assert sum(e["share"] for e in comm["last_to_negotiate"]) == pytest.approx(1.0)
    # The per-step stop flag rides in the gradients' fused allreduce: not a collective of its
    # own every step (that would be >= 1 per step); what is left alone is evaluation's sums.
    assert comm["solo_ops_per_step"] < 0.5, comm["solo_ops_per_step"]
    assert 0 < comm["exposed_tail_p50_s"] < s["step_s"]["max"]
    assert "collectives per step:" in pipeline("analyze", run).stdout
    assert (tmp_path / "rep.md").read_text().count("![") == 4


def test_bench_analyze_finds_the_slowed_rank(tmp_path):
    from pipeline.bench import analyze as bench_analyze

    res = bench_analyze.run(ranks=4, steps=3000, work=str(tmp_path))
    assert res["records"] == 12000 and res["stragglers"] == [3]


def _with_setup(d: Path, threads: int, precision: str = "float32") -> str:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(threads_per_rank=threads, model={"name": "cnn"}, train={"precision": precision})
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def test_runs_are_compared_like_with_like(tmp_path):
    # make bench's runs: 1 rank on 2 threads, 2 ranks on 1 thread each, 1 rank on 1 thread.
    one_t2 = _with_setup(write_run(tmp_path / "n1t2", ranks=1, steps=100, step_s=0.030), threads=2)
    two_t1 = _with_setup(write_run(tmp_path / "n2t1", ranks=2, steps=100, step_s=0.050), threads=1)
    one_t1 = _with_setup(write_run(tmp_path / "n1t1", ranks=1, steps=100, step_s=0.045), threads=1)

    # Without a 1-rank run of the same threads per rank, no estimate: the difference is named.
    res = report.analyze([one_t2, two_t1])
    comm = res["runs"][1]["communication"]
    assert comm["source"] is None and "threads per rank 1 vs 2" in comm["note"]
    assert res["scaling"] == [] and res["scaling_declined"][0]["differs"] == {"threads_per_rank": [2, 1]}
    assert "threads per rank 2 vs 1" in report.text(res)

    # With one, the estimate and the scaling use it, whatever the order of the runs.
    res = report.analyze([one_t2, two_t1, one_t1])
    comm = res["runs"][1]["communication"]
    assert comm["source"] == "estimate" and comm["baseline_run"] == one_t1
    assert comm["per_step_s"] == pytest.approx(0.050 - 0.045)
    rows = {r["run_dir"]: r for r in res["scaling"]}
    assert set(rows) == {one_t1, two_t1} and rows[two_t1]["base_run"] == one_t1
    assert rows[two_t1]["efficiency"] == pytest.approx((64 / 0.050) / (2 * 32 / 0.045))
    assert "scaling_declined" not in res  # the 2-thread 1-rank run has nothing of its kind to scale to

    # Precision counts too; compare names what differs and still compares.
    bf16 = _with_setup(write_run(tmp_path / "n1bf16", ranks=1, steps=100, step_s=0.045), threads=1,
                       precision="mixed_bfloat16")
    assert report.analyze([bf16, two_t1])["runs"][1]["communication"]["source"] is None
    res = report.analyze([one_t1, bf16], compare=True)
    assert res["compare_setup_differs"] == {"precision": ["float32", "mixed_bfloat16"]}
    assert "differ in: precision float32 vs mixed_bfloat16" in report.text(res)


def test_a_step_across_a_suspension_is_left_out_of_every_figure(tmp_path):
    """Step 50 of 100 ran across a 30 s suspension (suspended_s on each rank's record, as the
    watchdog writes it): throughput and percentiles are those of the run without it."""
    from pipeline.analysis.logs import load
    from pipeline.analysis.summary import summarize

    plain = summarize(load(write_run(tmp_path / "a", ranks=2, steps=100, step_s=0.05)))
    run = write_run(tmp_path / "b", ranks=2, steps=100, step_s=lambda r, s: 30.05 if s == 50 else 0.05)
    for r in range(2):
        p = run / "steps" / f"rank-{r}.jsonl"
        recs = [json.loads(x) for x in p.read_text().splitlines()]
        recs[49]["suspended_s"] = 30.0 - 0.01 * r
        p.write_text("".join(json.dumps(x) + "\n" for x in recs))
    s = summarize(load(run))
    assert (s["suspended_steps"], s["suspended_s"]) == (1, 30.0)
    assert s["step_s"]["max"] == pytest.approx(0.05) and s["steady_steps"] == plain["steady_steps"] - 1
    assert s["throughput_samples_per_s"] == pytest.approx(plain["throughput_samples_per_s"])
    assert plain["suspended_steps"] == 0


def _edit_steps(run: Path, edit) -> None:
    """edit(rank, record) on every step record of a written run."""
    for p in sorted((run / "steps").glob("rank-*.jsonl")):
        rank = int(p.stem.split("-")[1])
        recs = [json.loads(x) for x in p.read_text().splitlines()]
        for x in recs:
            edit(rank, x)
        p.write_text("".join(json.dumps(x) + "\n" for x in recs))


def test_mfu_from_the_runs_facts_and_a_note_where_one_is_missing(tmp_path):
    run = write_run(tmp_path / "r", ranks=2, steps=100, step_s=0.05)  # 64 samples / 0.05 s = 1280 samples/s
    cfg = json.loads((run / "config.json").read_text())
    facts = {"model_flops_per_sample": 2e7, "flops_source": "hand", "peak_flops_per_s": 1e11,
             "peak_source": "2 rank(s) x a made-up CPU", "peak_device": "CPU"}
    (run / "config.json").write_text(json.dumps({**cfg, **facts}))
    s = summary.summarize(logs.load(run))
    m = s["mfu"]
    assert m["achieved_flops_per_s"] == pytest.approx(2e7 * 1280)
    assert m["value"] == pytest.approx(2e7 * 1280 / 1e11) and m["peak_source"] == facts["peak_source"]
    assert "MFU: 25.6% (25.6 GFLOP/s achieved of 100 GFLOP/s peak" in "\n".join(report.text_summary(s))
    older = summary.summarize(logs.load(write_run(tmp_path / "old", ranks=1, steps=50)))
    assert older["mfu"]["value"] is None and "no model FLOPs" in older["mfu"]["note"]
    assert summary.summarize(logs.load(run))["gpu"] is None  # CPU records: no GPU figures


def test_gpu_figures_per_rank_and_their_spread(tmp_path):
    run = write_run(tmp_path / "g", ranks=3, steps=60, step_s=0.05)
    util = {0: 90.0, 1: 92.0, 2: 40.0}  # rank 2 keeps its GPU idle half the time

    def add(rank, rec):
        rec["gpu_mem_peak_mb"] = 1000.0 + 100 * rank + rec["step"]
        rec["gpu_util"] = util[rank] if rec["step"] > 10 else 5.0  # warm-up steps: not counted

    _edit_steps(run, add)
    s = summary.summarize(logs.load(run))
    assert [r["gpu_mem_peak_mb"] for r in s["per_rank"]] == [1060.0, 1160.0, 1260.0]
    assert [r["gpu_util_mean"] for r in s["per_rank"]] == pytest.approx([90.0, 92.0, 40.0])
    g = s["gpu"]["gpu_util_mean"]
    assert (g["min"], g["min_rank"], g["max"], g["max_rank"], g["spread"]) == (40.0, 2, 92.0, 1, 52.0)
    text = "\n".join(report.text_summary(s))
    assert "GPU across ranks: memory peak 1,060-1,260 MiB (ranks 0, 2), utilization 40-92% (ranks 2, 1" in text
    assert "GPU peak MiB  GPU util" in text

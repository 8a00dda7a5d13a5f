"""`pipeline bench run` (`make bench`): the local multi-process benchmark. Every figure is a
ratio of runs made in this one invocation, interleaved repeat by repeat, so a noisy machine
slows both sides of a ratio alike.

1. scaling: the pipeline at each rank count (same per-rank batch, threads = cores / ranks),
   and at a fixed global batch (strong scaling);
2. pipeline (1 rank, HDF5, step logs on) / plain Keras `model.fit` on in-memory arrays;
3. pipeline / the Horovod Keras loop from Horovod's examples, at the largest rank count;
4. allreduce: Horovod over MPI (and Gloo) against raw mpi4py, 4 KiB-64 MiB, with memcpy;
5. data: the reader against the raw h5py read (full run only).

Each pipeline run is an ordinary run directory under OUT/runs that `pipeline analyze` reads.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ..errors import UserError

TARGETS = {"pipeline_vs_keras": 0.97, "pipeline_vs_horovod_loop": 1.0, "efficiency_2": 0.85,
           "allreduce_ratio_16mib": 0.9}
# Settings the pipeline applies to training (pipeline/dist.py); the baselines get the same
# MPI environment so the comparison is about the code, not the launcher's defaults.
MPI_ENV = {"OMPI_MCA_mpi_yield_when_idle": "1"}


class Bench:
    def __init__(self, out: Path, quick: bool, ranks: list[int], repeats: int, steps: int, batch: int,
                 log=sys.stdout):
        self.out, self.quick, self.ranks, self.repeats = out, quick, ranks, repeats
        self.steps, self.batch, self.log = steps, batch, log
        self.cores = os.cpu_count() or 1
        self.py = sys.executable
        self.env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **MPI_ENV)
        self.env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        self.env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        self.data = out / "data"
        self.t0 = time.perf_counter()

    def say(self, msg: str) -> None:
        print(f"[bench {time.perf_counter() - self.t0:5.0f}s] {msg}", file=self.log, flush=True)

    def mpirun(self, n: int, args: list[str], timeout: int = 900, pe: int = 0) -> None:
        mpirun = shutil.which("mpirun")
        if not mpirun:
            raise UserError("mpirun not found on PATH (make env installs MPI)")
        pe = pe or max(1, self.cores // n)
        # Each rank bound to its own cores (cores / ranks of them), as SLURM would allot them.
        cmd = [mpirun, "-np", str(n), "--map-by", f"slot:PE={pe}", "--bind-to", "core", *args]
        self._run(cmd, timeout)

    def _run(self, cmd: list[str], timeout: int = 900) -> None:
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"bench step failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-2000:]}"
                               f"\n{r.stderr[-3000:]}")

    # --- the pieces ---
    def make_data(self) -> None:
        if (self.data / "manifest.json").exists():
            return
        samples = max(self.steps * self.batch * 2 + 1000, 20000)
        self.say(f"synthetic dataset: {samples} samples -> {self.data}")
        self._run([self.py, "-m", "pipeline", "data", "synth", "--out", str(self.data), "--samples", str(samples),
                   "--val-samples", "1000"])

    def pipeline_run(self, n: int, batch: int, rep: int, threads: int = 0) -> dict:
        t = threads or max(1, self.cores // n)
        run = self.out / "runs" / f"pipeline-n{n}-b{batch}-t{t}-r{rep}"
        shutil.rmtree(run, ignore_errors=True)
        self.mpirun(n, [self.py, "-m", "pipeline", "train", "--run-dir", str(run),
                        "--set", f"data.dir={self.data}", "--set", f"train.batch_size={batch}",
                        "--set", f"train.max_steps={self.steps}", "--set", f"train.threads={t}",
                        "--set", "checkpoint.every_steps=0", "--set", "log.progress_every_s=3600"], pe=t)
        return {"run_dir": str(run), "global_batch": batch * n, **wall_throughput(run, n, warmup=self.warmup)}

    @property
    def warmup(self) -> int:
        return 10

    def baseline(self, mode: str, n: int, rep: int) -> dict:
        out = self.out / "baselines" / f"{mode}-n{n}-r{rep}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        args = [self.py, "-m", "pipeline.bench.baselines", "--mode", mode, "--data", str(self.data),
                "--batch-size", str(self.batch), "--steps", str(self.steps), "--warmup", str(self.warmup),
                "--threads", str(max(1, self.cores // n)), "--out", str(out)]
        if mode == "horovod":
            self.mpirun(n, args)
        else:
            self._run(args)
        return json.loads(out.read_text())

    def allreduce(self, label: str, extra_env: dict, gloo: bool = False) -> dict:
        out = self.out / "allreduce" / f"{label}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        args = [self.py, "-m", "pipeline.bench.allreduce", "--out", str(out)] + (["--quick"] if self.quick else [])
        saved = self.env
        self.env = {**self.env, **extra_env}
        try:
            n = max(self.ranks)
            if gloo:
                hr = shutil.which("horovodrun") or str(Path(self.py).parent / "horovodrun")
                self._run([hr, "--gloo", "-np", str(n), "-H", f"localhost:{n}", *args, "--no-mpi"])
            else:
                self.mpirun(n, args)
        finally:
            self.env = saved
        return json.loads(out.read_text())


def wall_throughput(run: Path, n: int, warmup: int) -> dict:
    """Global samples/s from rank 0's step log: steps after warm-up over the wall time from the
    end of the last warm-up step to the end of the last step (the definition applied to the
    baselines), and the steady step times."""
    recs = [json.loads(line) for line in (run / "steps" / "rank-0.jsonl").read_text().splitlines() if line.strip()]
    recs = [r for r in recs if r.get("kind") != "header"]
    steady = recs[warmup:]
    wall = steady[-1]["time"] - recs[warmup - 1]["time"]
    return {"throughput_samples_per_s": len(steady) * recs[0]["samples"] * n / wall,
            "step_s": [r["step_s"] for r in recs]}


def summary(values: list[float], target: float | None = None) -> dict:
    out = {"value": statistics.median(values), "min": min(values), "max": max(values), "repeats": len(values)}
    if target is not None:
        out["target"] = target
        out["met"] = out["value"] >= target
    return out


def run(out: str = "runs/bench", quick: bool = False, ranks: list[int] | None = None, repeats: int | None = None,
        steps: int | None = None, batch: int = 64, log=sys.stdout) -> dict:
    cores = os.cpu_count() or 1
    ranks = ranks or sorted({1, 2} | ({cores} if cores <= 8 else set()))
    ranks = sorted(set(ranks))
    if ranks[0] != 1:
        ranks = [1] + ranks  # efficiency is measured against one rank
    b = Bench(Path(out), quick, ranks, repeats or (2 if quick else 5), steps or (100 if quick else 300), batch, log)
    b.out.mkdir(parents=True, exist_ok=True)
    b.make_data()
    nmax = max(ranks)
    strong_batch = batch * nmax  # fixed global batch for strong scaling

    weak = {n: [] for n in ranks}
    strong = {n: [] for n in ranks}
    keras, hvdloop = [], []
    # One rank on the cores one of N ranks gets: splits efficiency into what threads give
    # a single rank and what running N ranks costs (communication, contention).
    narrow = {n: [] for n in ranks if n > 1 and cores // n >= 1}
    for rep in range(b.repeats):
        b.say(f"repeat {rep + 1}/{b.repeats}")
        # Each ratio's two sides run back to back, so they see the same machine.
        r = b.pipeline_run(1, batch, rep)
        weak[1].append(r)
        b.say(f"  pipeline 1 rank, batch {batch}: {r['throughput_samples_per_s']:,.0f} samples/s")
        k = b.baseline("keras", 1, rep)
        keras.append(k)
        b.say(f"  plain Keras model.fit, 1 process: {k['throughput_samples_per_s']:,.0f} samples/s")
        for n in ranks[1:]:
            r = b.pipeline_run(n, batch, rep)
            weak[n].append(r)
            b.say(f"  pipeline {n} ranks, batch {batch}/rank: {r['throughput_samples_per_s']:,.0f} samples/s")
            if n == nmax:
                h = b.baseline("horovod", nmax, rep)
                hvdloop.append(h)
                b.say(f"  Horovod Keras loop, {nmax} ranks: {h['throughput_samples_per_s']:,.0f} samples/s")
            if n in narrow:
                r = b.pipeline_run(1, batch, rep, threads=max(1, cores // n))
                narrow[n].append(r)
                b.say(f"  pipeline 1 rank on {max(1, cores // n)} core(s): {r['throughput_samples_per_s']:,.0f} "
                      f"samples/s")
        for n in ranks:
            if n * batch == strong_batch:
                strong[n].append(weak[n][-1])
            elif strong_batch % n == 0:
                rs = b.pipeline_run(n, strong_batch // n, rep)
                strong[n].append(rs)
                b.say(f"  pipeline {n} rank(s), batch {strong_batch // n}/rank: "
                      f"{rs['throughput_samples_per_s']:,.0f} samples/s")

    def thr(rs):
        return [r["throughput_samples_per_s"] for r in rs]

    res: dict = {}
    res["pipeline_vs_keras"] = summary([p / k for p, k in zip(thr(weak[1]), thr(keras))],
                                       TARGETS["pipeline_vs_keras"])
    res["pipeline_vs_horovod_loop"] = summary([p / h for p, h in zip(thr(weak[nmax]), thr(hvdloop))],
                                              TARGETS["pipeline_vs_horovod_loop"])
    res["scaling"] = scaling_rows(weak, thr)
    res["strong_scaling"] = scaling_rows(strong, thr) if all(strong[n] for n in ranks) else []
    eff2 = next((r for r in res["scaling"] if r["ranks"] == 2), None)
    if eff2:
        res["efficiency_2_ranks"] = {**eff2["efficiency_summary"], "target": TARGETS["efficiency_2"],
                                     "met": eff2["efficiency"] >= TARGETS["efficiency_2"]}
    # efficiency = thread_bound x rank_efficiency (medians of per-repeat ratios, so the
    # product holds only approximately).
    res["efficiency_breakdown"] = [{
        "ranks": n, "threads_per_rank": max(1, cores // n),
        "thread_bound": summary([a / c for a, c in zip(thr(narrow[n]), thr(weak[1]))]),
        "rank_efficiency": summary([x / (n * a) for x, a in zip(thr(weak[n]), thr(narrow[n]))]),
    } for n in narrow if narrow[n]]
    res["throughput"] = {"keras": summary(thr(keras)), "horovod_loop": summary(thr(hvdloop)),
                         **{f"pipeline_{n}": summary(thr(weak[n])) for n in ranks},
                         **{f"pipeline_1_on_{max(1, cores // n)}_cores": summary(thr(narrow[n])) for n in narrow}}

    # --- allreduce: the pipeline's MPI settings, and Horovod's defaults for comparison ---
    b.say("allreduce: Horovod (pipeline settings) vs mpi4py")
    tuned = b.allreduce("tuned", {})
    b.say("allreduce: Horovod defaults (no MPI yield) vs mpi4py")
    default = b.allreduce("defaults", {"OMPI_MCA_mpi_yield_when_idle": "0"})
    gloo = None
    try:
        b.say("allreduce: Horovod over Gloo (horovodrun --gloo)")
        gloo = b.allreduce("gloo", {}, gloo=True)
    except (RuntimeError, FileNotFoundError, subprocess.TimeoutExpired) as e:
        b.say(f"  Gloo run failed, left out: {str(e).splitlines()[0]}")
    res["allreduce"] = allreduce_rows(tuned, default, gloo)
    res["memcpy_gbps"] = tuned["memcpy_gbps"]
    big = [r["ratio"] for r in res["allreduce"] if r["bytes"] >= 16 << 20]
    res["allreduce_ratio_16mib_plus"] = {"value": min(big), "target": TARGETS["allreduce_ratio_16mib"],
                                         "met": min(big) >= TARGETS["allreduce_ratio_16mib"]}

    b.say(f"data: reader vs raw h5py read ({nmax} ranks)")
    rv = b.out / "data-bench.json"
    try:
        b.mpirun(nmax, [b.py, "-m", "pipeline", "bench", "data", str(b.data), "--repeats", "1" if quick else "2",
                        "--json", str(rv)])
        d = json.loads(rv.read_text())
        worst = min(d["per_rank"], key=lambda r: r["stream_vs_raw_cold"]["value"])
        res["reader_vs_raw"] = {**worst["stream_vs_raw_cold"], "rank": worst["rank"], "cold": True,
                                "reader_vs_raw_warm": worst["stream_vs_raw_warm"],
                                "reader_vs_training": min(r["stream_vs_consume"]["value"] for r in d["per_rank"]),
                                "detail": str(rv)}
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        b.say(f"  data bench failed, left out: {str(e).splitlines()[0]}")

    res["settings"] = {
        "quick": quick, "ranks": ranks, "repeats": b.repeats, "steps": b.steps, "warmup_steps": b.warmup,
        "batch_per_rank": batch, "strong_scaling_global_batch": strong_batch, "model": "cnn",
        "threads_per_rank": {n: max(1, cores // n) for n in ranks}, "cores": cores,
        "binding": "mpirun --map-by slot:PE=cores/ranks --bind-to core", "mpi_env": MPI_ENV,
        "horovod_env": {k: v for k, v in os.environ.items() if k.startswith("HOROVOD_")},
        "machine": platform.node(), "python": platform.python_version(),
        "throughput_definition": "global samples over the steps after warm-up / wall time from the end of the "
                                 "last warm-up step to the end of the last step",
        "wall_s": round(time.perf_counter() - b.t0, 1),
    }
    (b.out / "bench.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    from . import bench_report

    bench_report.write(b.out, res, weak, keras, hvdloop)
    print(bench_report.table(res), file=log)
    b.say(f"wrote {b.out / 'bench.json'} and {b.out / 'report.md'}")
    return res


def scaling_rows(runs: dict, thr) -> list[dict]:
    base = statistics.median(thr(runs[1]))
    rows = []
    for n, rs in sorted(runs.items()):
        if not rs:
            continue
        t = statistics.median(thr(rs))
        effs = [x / (n * y) for x, y in zip(thr(rs), thr(runs[1]))]
        rows.append({"ranks": n, "global_batch": rs[0]["global_batch"], "throughput_samples_per_s": t, "speedup": t / base,
                     "efficiency": t / (n * base), "efficiency_summary": summary(effs),
                     "run_dirs": [r["run_dir"] for r in rs]})
    return rows


def allreduce_rows(tuned: dict, default: dict, gloo: dict | None) -> list[dict]:
    rows = []
    d = {r["bytes"]: r for r in default["rows"]}
    g = {r["bytes"]: r for r in gloo["rows"]} if gloo else {}
    for r in tuned["rows"]:
        row = {"bytes": r["bytes"], "hvd_busbw_gbps": r["hvd_busbw_gbps"], "mpi_busbw_gbps": r["mpi_busbw_gbps"],
               "ratio": r["ratio"],
               "hvd_busbw_range_gbps": [r["hvd_busbw_min_gbps"], r["hvd_busbw_max_gbps"]],
               "mpi_busbw_range_gbps": [r["mpi_busbw_min_gbps"], r["mpi_busbw_max_gbps"]]}
        if r["bytes"] in d:
            row.update({"hvd_default_busbw_gbps": d[r["bytes"]]["hvd_busbw_gbps"],
                        "mpi_default_busbw_gbps": d[r["bytes"]]["mpi_busbw_gbps"],
                        "ratio_defaults": d[r["bytes"]]["ratio"]})
        if r["bytes"] in g:
            row["hvd_gloo_busbw_gbps"] = g[r["bytes"]]["hvd_busbw_gbps"]
        rows.append(row)
    return rows

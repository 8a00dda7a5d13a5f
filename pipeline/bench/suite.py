"""`pipeline bench run` (`make bench`): the local multi-process benchmark. Every figure is a
ratio of runs made in this one invocation, interleaved repeat by repeat, so a noisy machine
slows both sides of a ratio alike.

1. scaling: the pipeline at each rank count (same per-rank batch, threads = cores / ranks),
   and at a fixed global batch (strong scaling);
2. pipeline (1 rank, HDF5, step logs on) / plain Keras `model.fit` on in-memory arrays;
3. pipeline / the Horovod Keras loop from Horovod's examples, at the largest rank count;
   both baselines measured with Keras's default steps_per_execution and with the pipeline's
   steps_per_call, each ratio taken against the faster of the two;
4. the same two ratios per model (MODEL_ROWS), with the pipeline's per-step overhead in
   microseconds (its step minus plain Keras's);
5. allreduce: Horovod over MPI (and Gloo) against raw mpi4py, 4 KiB-64 MiB, with memcpy;
6. data: the reader against the raw h5py read (full run only).

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
from dataclasses import dataclass
from pathlib import Path

from pipeline import config, measure
from pipeline.analysis import logs
from pipeline.errors import UserError
from pipeline.measure import median_range
from pipeline.rundir import RunDir

TARGETS = {"pipeline_vs_keras": 1.02, "pipeline_vs_horovod_loop": 1.05, "model_rows": 1.0, "efficiency_2": 0.85,
           "allreduce_ratio_16mib": 0.9}


@dataclass(frozen=True)
class ModelRow:
    """A model the bench compares beyond the default CNN, on a dataset of its input shape.
    Its baselines run once, at the pipeline's steps_per_call (equal settings): with steps of
    tens of milliseconds and more, Keras's host cost per execution is lost in the noise, and
    a second fit would cost a second trace. Steps stay within one epoch on every side."""
    model: str
    shape: str | None       # synth --shape; None: the bench's default dataset
    batch: int              # per rank
    steps: int              # per run (full bench)
    samples: int            # training samples of its dataset
    quick_steps: int = 0    # per run with --quick (0: a third of steps; None: left out of quick runs)
    repeats: int = 3        # at most (--repeats lowers it)
    extra: bool = False     # only with --models (make bench BENCH=models)

    def __post_init__(self):
        if self.quick_steps == 0:
            object.__setattr__(self, "quick_steps", max(1, self.steps // 3))


# Steps and repeats sized so the full bench stays under 20 minutes on 2 cores and BENCH=quick
# under 6 (docs/bench.md): most of a model row's time is starting processes and tracing, so a
# row has few repeats of many steps. MobileNetV2 (2.2 M parameters in 158 tensors) is the
# many-small-tensors case. ResNet50 (23.6 M in 214 tensors, 94 MB of gradients per step, up to
# 9.4 MB in one) is the large-tensor one; its four processes take about 2.6 minutes a repeat,
# nearly all of it start-up, tracing and the first steps, which the 20 minutes cannot hold:
# it runs with --models (make bench BENCH=models), 3 repeats of 16 steps.
MODEL_ROWS = (ModelRow("resnet20", None, 64, 40, 0),
              ModelRow("keras.applications.MobileNetV2", "96,96,3", 16, 30, 1400),
              ModelRow("keras.applications.ResNet50", "64,64,3", 8, 16, 400, quick_steps=None, extra=True))


def model_plan(quick: bool, models: bool, repeats: int) -> list[tuple[ModelRow, int, int]]:
    """The model rows a bench runs, each with its steps and repeats: the extra rows only with
    --models, rows without quick steps left out of quick runs; a row's repeats are its own at
    most (and --repeats'), one in a quick run, which then shows the row's ratios without their
    spread, to stay under 6 minutes."""
    return [(m, m.quick_steps if quick else m.steps, 1 if quick else min(repeats, m.repeats))
            for m in MODEL_ROWS if (models or not m.extra) and not (quick and m.quick_steps is None)]


# Settings the pipeline applies to training (pipeline/runtime/dist.py); the baselines get the same
# MPI environment so the comparison is about the code, not the launcher's defaults.
MPI_ENV = {"OMPI_MCA_mpi_yield_when_idle": "1"}


class Bench:
    def __init__(self, out: Path, quick: bool, ranks: list[int], repeats: int, steps: int, batch: int,
                 log=sys.stdout, models: bool = False):
        self.out, self.quick, self.ranks, self.repeats = out, quick, ranks, repeats
        self.models = models  # --models: the extra model rows too
        self.steps, self.batch, self.log = steps, batch, log
        self.cores = os.cpu_count() or 1
        self.py = sys.executable
        self.env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **MPI_ENV)
        self.env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        self.env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        self.data = out / "data"
        self.t0 = time.perf_counter()
        from pipeline.config import TrainConfig

        self.steps_per_call = TrainConfig().steps_per_call  # the pipeline's default

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
    def make_data(self, shape: str | None = None, samples: int = 0) -> Path:
        """The bench's dataset (shape None: the default synth shape), made once."""
        data = self.data if shape is None else self.out / f"data-{shape.replace(',', 'x')}"
        if (data / "manifest.json").exists():
            return data
        samples = samples or max(self.steps * self.batch * 2 + 1000, 20000)
        self.say(f"synthetic dataset: {samples} samples{f' of {shape}' if shape else ''} -> {data}")
        self._run([self.py, "-m", "pipeline", "data", "synth", "--out", str(data), "--samples", str(samples),
                   "--val-samples", "200" if shape else "1000", *(["--shape", shape] if shape else [])])
        return data

    def pipeline_run(self, n: int, batch: int, rep: int | str, threads: int = 0, model: str = "cnn",
                     data: Path | None = None, steps: int = 0, timeline: bool = False) -> dict:
        """One training run; timeline: with a Horovod timeline (RUN/timeline*.json)."""
        t = threads or max(1, self.cores // n)
        steps = steps or self.steps
        tag = "" if model == "cnn" else f"{model.rsplit('.', 1)[-1].lower()}-"
        run = self.out / "runs" / f"pipeline-{tag}n{n}-b{batch}-t{t}-r{rep}"
        shutil.rmtree(run, ignore_errors=True)
        self.mpirun(n, [self.py, "-m", "pipeline", "train", "--run-dir", str(run),
                        "--set", f"data.dir={data or self.data}", "--set", f"train.batch_size={batch}",
                        "--set", f"model.name={model}",
                        "--set", f"train.max_steps={steps}", "--set", f"train.threads={t}",
                        "--set", "checkpoint.every_steps=0", "--set", "log.progress_every_s=3600",
                        *(["--set", "log.timeline=true"] if timeline else [])], pe=t)
        return {"run_dir": str(run), "global_batch": batch * n,
                **wall_throughput(run, n, warmup=measure.warmup_count(steps))}

    @property
    def warmup(self) -> int:
        """Steps left out of every speed figure, the pipeline's and the baselines' alike."""
        return measure.warmup_count(self.steps)

    def baseline(self, mode: str, n: int, rep: int, model: str = "cnn", data: Path | None = None, steps: int = 0,
                 batch: int = 0, timeline: bool = False, only_given: bool = False) -> dict:
        """Keras fit or the Horovod loop, with steps_per_execution 1 and the pipeline's
        steps_per_call (pipeline/bench/baselines.py), which of them first alternating by repeat.
        timeline: the Horovod loop records a Horovod timeline (`timeline` in the result: its path);
        only_given: one fit, at the pipeline's steps_per_call."""
        steps, batch = steps or self.steps, batch or self.batch
        tag = "" if model == "cnn" else f"{model.rsplit('.', 1)[-1].lower()}-"
        out = self.out / "baselines" / f"{mode}-{tag}n{n}-r{rep}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        args = [self.py, "-m", "pipeline.bench.baselines", "--mode", mode, "--data", str(data or self.data),
                "--model", model, "--batch-size", str(batch), "--steps", str(steps),
                "--warmup", str(measure.warmup_count(steps)), "--threads", str(max(1, self.cores // n)),
                "--steps-per-execution", str(self.steps_per_call),
                "--order", "default-first" if rep % 2 == 0 else "default-last", "--out", str(out),
                *(["--only-given"] if only_given else [])]
        saved, traced = self.env, out.with_suffix(".timeline.json") if timeline and mode == "horovod" else None
        if traced:
            # As the pipeline records one (pipeline/runtime/dist.py): the response cache off,
            # so that every negotiation has its ranks' ticks, and both sides pay for it alike.
            self.env = {**self.env, "HOROVOD_TIMELINE": str(traced), "HOROVOD_CACHE_CAPACITY": "0"}
        try:
            if mode == "horovod":
                self.mpirun(n, args)
            else:
                self._run(args)
        finally:
            self.env = saved
        res = json.loads(out.read_text())
        if traced:
            res["timeline"] = str(traced)
        return res

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
    """Global samples/s from rank 0's step log (read by analysis.logs): steps after warm-up over
    the wall time from the end of the last warm-up step to the end of the last step (the
    definition applied to the baselines), and the steady step times."""
    cols = logs.read_rank_log(RunDir(run).step_log(0), 0).cols
    end = cols["time"]
    wall = end[-1] - end[warmup - 1]
    return {"throughput_samples_per_s": float((len(end) - warmup) * cols["samples"][0] * n / wall),
            "step_s": [float(x) for x in cols["step_s"]]}


def run(out: str = "runs/bench", quick: bool = False, ranks: list[int] | None = None, repeats: int | None = None,
        steps: int | None = None, batch: int = 64, log=sys.stdout, models: bool = False) -> dict:
    cores = os.cpu_count() or 1
    ranks = ranks or sorted({1, 2} | ({cores} if cores <= 8 else set()))
    ranks = sorted(set(ranks))
    if ranks[0] != 1:
        ranks = [1] + ranks  # efficiency is measured against one rank
    b = Bench(Path(out), quick, ranks, repeats or (2 if quick else 5), steps or (100 if quick else 300), batch, log,
              models)
    b.out.mkdir(parents=True, exist_ok=True)
    b.make_data()
    runs = measure_training(b)
    res = training_figures(b, runs)
    res["models"] = [model_row("cnn", b.batch, runs.weak[1], runs.keras, runs.weak[max(b.ranks)], runs.hvdloop)]
    res["models"] += model_figures(b)
    res["step_log_cost"] = step_log_cost(runs)
    res.update(allreduce_figures(b))
    res.update(data_figures(b))
    res["settings"] = settings(b)
    (b.out / "bench.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    from pipeline.bench import bench_report

    bench_report.write(b.out, res, runs.weak, runs.keras, runs.hvdloop)
    print(bench_report.table(res), file=log)
    b.say(f"wrote {b.out / 'bench.json'} and {b.out / 'report.md'}")
    return res


@dataclass
class TrainingRuns:
    """Each measured run's result by kind, one entry per repeat."""
    weak: dict      # ranks -> runs at the same per-rank batch
    strong: dict    # ranks -> runs at the same global batch
    narrow: dict    # ranks N -> 1-rank runs on the cores one of N ranks gets
    keras: list
    hvdloop: list
    again: list     # the N-rank pipeline run once more, right after the Horovod loop: A/A


def measure_training(b: Bench) -> TrainingRuns:
    """The training runs, interleaved repeat by repeat; each ratio's two sides run back to back,
    so they see the same machine, which of them first alternating by repeat (paired)."""
    ranks, batch, cores = b.ranks, b.batch, b.cores
    nmax = max(ranks)
    strong_batch = batch * nmax  # fixed global batch for strong scaling
    # One rank on the cores one of N ranks gets: splits efficiency into what threads give
    # a single rank and what running N ranks costs (communication, contention).
    runs = TrainingRuns({n: [] for n in ranks}, {n: [] for n in ranks},
                        {n: [] for n in ranks if n > 1 and cores // n >= 1}, [], [], [])

    def pipeline(n: int, per_rank: int, rep: int, label: str, threads: int = 0) -> dict:
        r = b.pipeline_run(n, per_rank, rep, threads)
        b.say(f"  {label}: {r['throughput_samples_per_s']:,.0f} samples/s")
        return r

    def baseline(mode: str, n: int, rep: int, label: str) -> dict:
        r = b.baseline(mode, n, rep)
        b.say(f"  {label}: {r['throughput_samples_per_s']:,.0f} samples/s")
        return r

    for rep in range(b.repeats):
        b.say(f"repeat {rep + 1}/{b.repeats}")
        # each ratio's two sides in the order paired gives: neither always runs second
        p, k = paired(rep, lambda: pipeline(1, batch, rep, f"pipeline 1 rank, batch {batch}"),
                      lambda: baseline("keras", 1, rep, "plain Keras model.fit, 1 process"))
        runs.weak[1].append(p)
        runs.keras.append(k)
        for n in ranks[1:]:
            if n == nmax:
                p, h = paired(rep, lambda: pipeline(n, batch, rep, f"pipeline {n} ranks, batch {batch}/rank"),
                              lambda: baseline("horovod", nmax, rep, f"Horovod Keras loop, {nmax} ranks"))
                runs.weak[n].append(p)
                runs.hvdloop.append(h)
                # A/A: the same run again where the loop's side stood, for the bench's own noise
                runs.again.append(pipeline(n, batch, f"{rep}-again", f"pipeline {n} ranks again (A/A)"))
            else:
                runs.weak[n].append(pipeline(n, batch, rep, f"pipeline {n} ranks, batch {batch}/rank"))
            if n in runs.narrow:
                t = max(1, cores // n)
                runs.narrow[n].append(pipeline(1, batch, rep, f"pipeline 1 rank on {t} core(s)", threads=t))
        for n in ranks:
            if n * batch == strong_batch:
                runs.strong[n].append(runs.weak[n][-1])
            elif strong_batch % n == 0:
                runs.strong[n].append(pipeline(n, strong_batch // n, rep,
                                               f"pipeline {n} rank(s), batch {strong_batch // n}/rank"))
    return runs


def model_figures(b: Bench) -> list[dict]:
    """MODEL_ROWS: per model and repeat, the pipeline and each baseline back to back, which of
    them first alternating by repeat (paired). In the last repeat the N-rank pair records
    Horovod timelines (both sides alike), summarised in the row's `timelines`."""
    nmax, rows = max(b.ranks), []
    plan = model_plan(b.quick, b.models, b.repeats)
    planned = {m.model for m, _, _ in plan}
    for m in MODEL_ROWS:
        if m.model not in planned:
            b.say(f"{m.model}: left out ({'quick run' if b.quick and m.quick_steps is None else 'runs with --models'})")
    for m, steps, repeats in plan:
        data = b.make_data(m.shape, m.samples)
        p1, keras, pn, hvd = [], [], [], []
        for rep in range(repeats):
            b.say(f"{m.model}: repeat {rep + 1}/{repeats}")
            traced = nmax > 1 and rep == repeats - 1
            r, k = paired(rep, lambda: b.pipeline_run(1, m.batch, rep, model=m.model, data=data, steps=steps),
                          lambda: b.baseline("keras", 1, rep, m.model, data, steps, m.batch, only_given=True))
            p1.append(r)
            keras.append(k)
            r, h = paired(rep, lambda: b.pipeline_run(nmax, m.batch, rep, model=m.model, data=data, steps=steps,
                                                      timeline=traced),
                          lambda: b.baseline("horovod", nmax, rep, m.model, data, steps, m.batch, timeline=traced,
                                             only_given=True))
            pn.append(r)
            hvd.append(h)
            b.say(f"  pipeline {_thr(p1)[-1]:,.0f} / Keras {_thr(keras)[-1]:,.0f}; pipeline {nmax} ranks "
                  f"{_thr(pn)[-1]:,.0f} / Horovod loop {_thr(hvd)[-1]:,.0f} samples/s")
        row = model_row(m.model, m.batch, p1, keras, pn, hvd)
        row["steps"], row["repeats"] = steps, repeats
        if nmax > 1:
            row["timelines"] = timeline_pair(pn[-1], hvd[-1], nmax)
        rows.append(row)
    return rows


def paired(rep: int, pipeline_side, baseline_side) -> tuple:
    """Runs a ratio's two sides (callables) and returns (pipeline result, baseline result):
    the pipeline first in even repeats, the baseline first in odd ones, so a machine that
    speeds up or slows down over a pair (the page cache, another tenant, clock drift) does not
    favour the side that always ran second. The model rows have 3 repeats, where one fixed order
    could put every repeat's ratio on the same side of 1."""
    if rep % 2 == 0:
        first = pipeline_side()
        return first, baseline_side()
    first = baseline_side()
    return pipeline_side(), first


def timeline_pair(pipeline_run: dict, loop: dict, n: int) -> dict:
    """Both sides' Horovod timelines of one repeat, per step: fused gradient allreduces,
    collectives of other tensors alone (the pipeline's stop flag, were it not fused), and the
    exposed tail (last gradient ready on every rank -> reduced)."""
    from pipeline.analysis import timeline

    out = {}
    for side, paths in (("pipeline", sorted(Path(pipeline_run["run_dir"]).glob("timeline*.json"))),
                        ("horovod_loop", [Path(loop["timeline"])] if loop.get("timeline") else [])):
        paths = [p for p in paths if p.exists()]
        if not paths:
            out[side] = None
            continue
        tl = timeline.analyze(paths, n)
        steps = max(tl["steps"], 1)
        out[side] = {"files": [str(p) for p in paths], "steps": tl["steps"],
                     "gradient_ops_per_step": tl["gradient_ops"] / steps, "solo_ops_per_step": tl["solo_ops"] / steps,
                     "exposed_tail_p50_s": tl["exposed_tail_p50_s"]}
    return out


def model_row(model: str, batch: int, p1: list, keras: list, pn: list, hvd: list) -> dict:
    """The two ratios for one model (medians of per-repeat ratios against the faster baseline
    setting), the pipeline's per-step overhead (its step time minus plain Keras's, in
    microseconds; negative: the pipeline's step is shorter), and each side's MFU: its median
    samples/s x the model's FLOPs per sample over the peak of the cores it ran on, both from the
    pipeline run's config.json (same model, same cores: the baselines get the same)."""
    target = TARGETS["pipeline_vs_keras"] if model == "cnn" else TARGETS["model_rows"]
    target_hvd = TARGETS["pipeline_vs_horovod_loop"] if model == "cnn" else TARGETS["model_rows"]
    return {"model": model, "batch_per_rank": batch,
            "pipeline_vs_keras": median_range([p / k for p, k in zip(_thr(p1), _thr(keras))], target),
            "pipeline_vs_horovod_loop": median_range([p / h for p, h in zip(_thr(pn), _thr(hvd))], target_hvd),
            "overhead_us_per_step": median_range([(batch / p - batch / k) * 1e6
                                                  for p, k in zip(_thr(p1), _thr(keras))]),
            "keras_best_steps_per_execution": [k.get("best_steps_per_execution", 1) for k in keras],
            "horovod_best_steps_per_execution": [h.get("best_steps_per_execution", 1) for h in hvd],
            # the steps_per_execution settings each baseline ran with
            "baseline_settings": {"keras": sorted(keras[0]["runs"], key=int),
                                  "horovod_loop": sorted(hvd[0]["runs"], key=int)},
            "mfu": mfu_sides(p1, keras, pn, hvd)}


def mfu_sides(p1: list, keras: list, pn: list, hvd: list) -> dict | None:
    """MFU of each side of a model row (medians), with the peak it is measured against."""
    one, many = _run_config(p1[-1]), _run_config(pn[-1])
    cfg = many or one
    flops = cfg.get("model_flops_per_sample")
    peaks = [one.get("peak_flops_per_s"), many.get("peak_flops_per_s")]
    if not flops or not all(peaks):
        return None
    sides = {"pipeline_1": (p1, peaks[0]), "keras": (keras, peaks[0]), "pipeline_n": (pn, peaks[1]),
             "horovod_loop": (hvd, peaks[1])}
    return {"model_flops_per_sample": flops, "flops_source": cfg.get("flops_source"),
            "peak_flops_per_s": peaks[1], "peak_source": cfg.get("peak_source"), "peak_device": cfg.get("peak_device"),
            **{k: statistics.median(_thr(rs)) * flops / peak for k, (rs, peak) in sides.items()}}


def _run_config(r: dict) -> dict:
    try:
        return json.loads((Path(r["run_dir"]) / "config.json").read_text())
    except (OSError, ValueError, KeyError):
        return {}


def step_log_cost(runs: TrainingRuns) -> dict:
    """The pipeline runs' step-log cost (ranks/rank-R.json step_log_overhead, worst rank)."""
    costs = []
    for rs in runs.weak.values():
        for r in rs:
            ranks = sorted(Path(r["run_dir"], "ranks").glob("rank-*.json"))
            costs.append(max(json.loads(f.read_text())["step_log_overhead"] for f in ranks))
    return median_range(costs)


def _per_setting(name: str, rs: list[dict]) -> dict:
    """A baseline's samples/s at each steps_per_execution it ran with."""
    return {f"{name}_steps_per_execution_{k}": median_range([r["runs"][k]["throughput_samples_per_s"] for r in rs])
            for k in rs[0]["runs"]} if rs else {}


def _thr(rs: list[dict]) -> list[float]:
    return [r["throughput_samples_per_s"] for r in rs]


def training_figures(b: Bench, runs: TrainingRuns) -> dict:
    ranks, cores, nmax = b.ranks, b.cores, max(b.ranks)
    weak, narrow = runs.weak, runs.narrow
    res: dict = {}
    res["pipeline_vs_keras"] = median_range([p / k for p, k in zip(_thr(weak[1]), _thr(runs.keras))],
                                            TARGETS["pipeline_vs_keras"])
    res["pipeline_vs_horovod_loop"] = median_range([p / h for p, h in zip(_thr(weak[nmax]), _thr(runs.hvdloop))],
                                                   TARGETS["pipeline_vs_horovod_loop"])
    if runs.again:
        res["pipeline_vs_itself"] = {**median_range([a / b for a, b in zip(_thr(weak[nmax]), _thr(runs.again))]),
                                     "ranks": nmax, "model": "cnn"}
    res["scaling"] = scaling_rows(weak)
    res["strong_scaling"] = scaling_rows(runs.strong) if all(runs.strong[n] for n in ranks) else []
    eff2 = next((r for r in res["scaling"] if r["ranks"] == 2), None)
    if eff2:
        res["efficiency_2_ranks"] = {**eff2["efficiency_summary"], "target": TARGETS["efficiency_2"],
                                     "met": eff2["efficiency"] >= TARGETS["efficiency_2"]}
    # efficiency = thread_bound x rank_efficiency (medians of per-repeat ratios, so the
    # product holds only approximately).
    res["efficiency_breakdown"] = [{
        "ranks": n, "threads_per_rank": max(1, cores // n),
        "thread_bound": median_range([a / c for a, c in zip(_thr(narrow[n]), _thr(weak[1]))]),
        "rank_efficiency": median_range([x / (n * a) for x, a in zip(_thr(weak[n]), _thr(narrow[n]))]),
    } for n in narrow if narrow[n]]
    res["throughput"] = {"keras": median_range(_thr(runs.keras)), "horovod_loop": median_range(_thr(runs.hvdloop)),
                         **_per_setting("keras", runs.keras), **_per_setting("horovod_loop", runs.hvdloop),
                         **{f"pipeline_{n}": median_range(_thr(weak[n])) for n in ranks},
                         **{f"pipeline_1_on_{max(1, cores // n)}_cores": median_range(_thr(narrow[n]))
                            for n in narrow}}
    return res


def allreduce_figures(b: Bench) -> dict:
    """Horovod with the pipeline's MPI settings, and with Horovod's defaults, against mpi4py."""
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
    rows = allreduce_rows(tuned, default, gloo)
    big = [r["ratio"] for r in rows if r["bytes"] >= 16 << 20]
    return {"allreduce": rows, "memcpy_gbps": tuned["memcpy_gbps"],
            "allreduce_ratio_16mib_plus": {"value": min(big), "target": TARGETS["allreduce_ratio_16mib"],
                                           "met": min(big) >= TARGETS["allreduce_ratio_16mib"]}}


def data_figures(b: Bench) -> dict:
    """The reader against the raw h5py read, at the largest rank count."""
    nmax = max(b.ranks)
    b.say(f"data: reader vs raw h5py read ({nmax} ranks)")
    rv = b.out / "data-bench.json"
    try:
        b.mpirun(nmax, [b.py, "-m", "pipeline", "bench", "data", str(b.data), "--repeats", "1" if b.quick else "2",
                        "--json", str(rv)])
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        b.say(f"  data bench failed, left out: {str(e).splitlines()[0]}")
        return {}
    d = json.loads(rv.read_text())
    worst = min(d["per_rank"], key=lambda r: r["stream_vs_raw_cold"]["value"])
    return {"reader_vs_raw": {**worst["stream_vs_raw_cold"], "rank": worst["rank"], "cold": True,
                              "reader_vs_raw_warm": worst["stream_vs_raw_warm"],
                              "reader_vs_training": min(r["stream_vs_consume"]["value"] for r in d["per_rank"]),
                              "detail": str(rv)}}


def settings(b: Bench) -> dict:
    cores = b.cores
    return {
        "quick": b.quick, "ranks": b.ranks, "repeats": b.repeats, "steps": b.steps, "warmup_steps": b.warmup,
        "warmup_rule": measure.WARMUP_RULE,
        "batch_per_rank": b.batch, "strong_scaling_global_batch": b.batch * max(b.ranks), "model": "cnn",
        "steps_per_call": b.steps_per_call,
        "models_flag": b.models,
        "model_rows": [{"model": m.model, "shape": m.shape or "synth default", "batch_per_rank": m.batch,
                        "steps": steps, "repeats": repeats, "baselines": "one fit at steps_per_call"}
                       for m, steps, repeats in model_plan(b.quick, b.models, b.repeats)],
        "threads_per_rank": {n: max(1, cores // n) for n in b.ranks}, "cores": cores,
        "binding": "mpirun --map-by slot:PE=cores/ranks --bind-to core", "mpi_env": MPI_ENV,
        "horovod_env": {k: v for k, v in os.environ.items() if k.startswith("HOROVOD_")},
        "machine": platform.node(), "python": platform.python_version(),
        "throughput_definition": "global samples over the steps after warm-up / wall time from the end of the "
                                 "last warm-up step to the end of the last step",
        "wall_s": round(time.perf_counter() - b.t0, 1),
    }


def scaling_rows(runs: dict) -> list[dict]:
    base = statistics.median(_thr(runs[1]))
    rows = []
    for n, rs in sorted(runs.items()):
        if not rs:
            continue
        t = statistics.median(_thr(rs))
        effs = [x / (n * y) for x, y in zip(_thr(rs), _thr(runs[1]))]
        rows.append({"ranks": n, "global_batch": rs[0]["global_batch"], "throughput_samples_per_s": t, "speedup": t / base,
                     "efficiency": t / (n * base), "efficiency_summary": median_range(effs),
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


# --- the command line (pipeline/cli.py dispatches) ---

def add_arguments(p) -> None:
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--quick", action="store_true", help="one repeat, fewer steps (make bench BENCH=quick)")
    p.add_argument("--models", action="store_true",
                   help="the extra model rows too: ResNet50 (make bench BENCH=models; about 8 minutes more)")
    p.add_argument("--ranks", help="rank counts, e.g. 1,2,4 (default: 1, 2 and the core count up to 8)")
    p.add_argument("--repeats", type=int, help="default 5 (quick: 2)")
    p.add_argument("--steps", type=int, help="steps per run (default 300; quick: 100)")
    config.flag(p, "--batch-size", "train.batch_size")
    p.set_defaults(func=cli)


def cli(a) -> int:
    ranks = [int(x) for x in a.ranks.split(",")] if a.ranks else None
    run(a.out, quick=a.quick, ranks=ranks, repeats=a.repeats, steps=a.steps, batch=a.batch_size, models=a.models)
    return 0

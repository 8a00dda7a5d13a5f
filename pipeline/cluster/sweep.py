"""`pipeline sweep`: a grid of training runs, as SLURM job arrays or in turn on this machine.

    pipeline sweep --config FILE --out DIR --grid KEY=V1,V2 [--grid ...] [--grid-file G.yaml]
                   --ranks 1,2 [--set KEY=VALUE ...] [--repeats N] [--sbatch-args "..."]
                   [--max-parallel K] [--target METRIC>=X] [--local] [--retry-failed]
    pipeline sweep --status DIR

Each point (one value per grid key x a rank count x a repeat) is an ordinary run directory,
DIR/<its knob values>, holding its resolved config (`sweep-config.json`, a valid --config)
and `sweep-point.json` (knobs, ranks, repeat). DIR/sweep.json records the sweep: config,
grid, every point, and every submission (array job id, which task ran which point).

On SLURM, one job array per rank count (an array has one resource request), each task
`slurm/train.sbatch` on its point (train.sbatch reads SWEEP_POINTS); then an analysis job
(`--dependency=afterany` on the arrays) writes DIR/leaderboard.{txt,json,html}. With
`--local`, the points run in turn under mpirun, then the leaderboard is written.

Running the same command again runs only what is missing: finished points are skipped,
queued or running ones left alone, preempted ones (status stopped) resume from their
checkpoints, failed ones are not run again unless --retry-failed (a failure needs a look:
`pipeline sweep --status DIR` says why), new grid values add points.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline import config as config_mod
from pipeline.cluster.sweepstate import (
    EXIT_FILE,
    LOG_FILE,
    MANIFEST,
    POINT_CONFIG,
    POINT_FILE,
    active_jobs,
    point_state,
    read_json,
    slurm,
)
from pipeline.errors import UserError
from pipeline.fsutil import atomic_write_text

_SAFE = re.compile(r"[^A-Za-z0-9._+-]+")


@dataclass(frozen=True)
class Point:
    knobs: tuple          # ((key, value), ...) in grid order
    ranks: int
    repeat: int
    name: str

    def sets(self) -> list[str]:
        return [f"{k}={_yaml_value(v)}" for k, v in self.knobs]


def _yaml_value(v) -> str:
    """A value as --set reads it back (YAML), e.g. [mae] or 'rank=0,step=5'."""
    if isinstance(v, str):
        return v
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def parse_grid(specs: list[str], grid_file: str | None) -> dict[str, list]:
    """--grid KEY=V1,V2 (each value read as YAML) and a YAML grid file (KEY: [V1, V2], the way
    to give values that contain commas), in that order; a key given twice is an error."""
    grid: dict[str, list] = {}
    if grid_file:
        try:
            raw = yaml.safe_load(Path(grid_file).read_text())
        except OSError as e:
            raise UserError(f"{grid_file}: cannot read the grid file ({e.strerror})") from None
        except yaml.YAMLError:
            raise UserError(f"{grid_file}: not valid YAML") from None
        if not isinstance(raw, dict) or not raw:
            raise UserError(f"{grid_file}: expected a mapping of KEY: [VALUES], e.g. train.batch_size: [32, 64]")
        for k, vs in raw.items():
            if not isinstance(vs, list) or not vs:
                raise UserError(f"{grid_file}: {k} must be a non-empty list of values")
            grid[str(k)] = vs
    for spec in specs:
        key, eq, text = spec.partition("=")
        if not eq or not key.strip() or text == "":
            raise UserError(f"--grid {spec!r}: expected KEY=V1,V2,... (values with commas: --grid-file)")
        key = key.strip()
        if key in grid:
            raise UserError(f"--grid {key}: the key is given twice")
        grid[key] = [yaml.safe_load(v) if v.strip() else "" for v in text.split(",")]
    if not grid:
        raise UserError("pipeline sweep: give at least one --grid KEY=V1,V2 or --grid-file")
    for k, vs in grid.items():
        if len({json.dumps(v, sort_keys=True, default=str) for v in vs}) != len(vs):
            raise UserError(f"--grid {k}: a value is given twice")
    return grid


def _name_part(v) -> str:
    text = v if isinstance(v, str) else json.dumps(v, default=str)
    return _SAFE.sub("_", text).strip("_") or "empty"


def point_name(knobs: tuple, ranks: int, repeat: int, repeats: int) -> str:
    """The directory name: the knob values, the rank count, the repeat (when several)."""
    parts = [f"{k}={_name_part(v)}" for k, v in knobs] + [f"ranks={ranks}"]
    if repeats > 1:
        parts.append(f"rep={repeat}")
    name = ",".join(parts)
    if len(name.encode()) > 200:  # file systems allow 255 bytes per name
        import hashlib

        name = name[:180] + "," + hashlib.sha256(name.encode()).hexdigest()[:12]
    return name


def points(grid: dict[str, list], ranks: list[int], repeats: int) -> list[Point]:
    out, names = [], {}
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        knobs = tuple(zip(keys, values))
        for r in ranks:
            for rep in range(repeats):
                p = Point(knobs, r, rep, point_name(knobs, r, rep, repeats))
                if p.name in names:
                    raise UserError(f"--grid: {dict(names[p.name].knobs)} and {dict(knobs)} give the same directory "
                                    f"name {p.name!r}; make the values differ in letters or digits")
                names[p.name] = p
                out.append(p)
    return out


def sbatch_script() -> Path:
    return Path(__file__).resolve().parents[2] / "slurm" / "train.sbatch"


# --- the command ---

def run(config: str | None, out: str, grid_specs: list[str], grid_file: str | None, ranks: list[int],
        sets: list[str], repeats: int = 1, sbatch_args: str = "", max_parallel: int = 0, target: str | None = None,
        local: bool = False, retry_failed: bool = False, log=sys.stdout) -> int:
    if repeats < 1 or not ranks or min(ranks) < 1:
        raise UserError("--ranks must list rank counts >= 1 (e.g. 1,2) and --repeats must be >= 1")
    grid = parse_grid(grid_specs, grid_file)
    pts = points(grid, ranks, repeats)
    out_dir = Path(out)
    target = target or _default_target(config, sets)
    # Every point's config is checked before anything is written or submitted.
    resolved = {}
    for p in pts:
        try:
            resolved[p.name] = config_mod.load(config, list(sets) + p.sets())
        except UserError as e:
            raise UserError(f"point {p.name}: {e}") from None
    manifest = _write_points(out_dir, config, sets, pts, resolved, grid, target, log)

    active = active_jobs(manifest) if not local else {}
    todo, counts = [], {}
    for p in pts:
        st, _ = point_state(out_dir / p.name, active)
        counts[st] = counts.get(st, 0) + 1
        if st in ("pending", "stopped") or (st == "failed" and retry_failed):
            todo.append(p)
    said = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    print(f"sweep: {len(pts)} points in {out_dir} ({said}); {len(todo)} to run", file=log, flush=True)
    if counts.get("failed") and not retry_failed:
        print(f"sweep: {counts['failed']} failed point(s) not run again (pipeline sweep --status {out_dir} says why; "
              f"--retry-failed runs them)", file=log)
    if local:
        for i, p in enumerate(todo):
            code, wall = run_point(p.ranks, out_dir / p.name / POINT_CONFIG, out_dir / p.name)
            st, why = point_state(out_dir / p.name)
            print(f"sweep: [{i + 1}/{len(todo)}] {p.name}: {st} in {wall:.0f}s" + (f" ({why})" if why else ""),
                  file=log, flush=True)
        _leaderboard_local(out_dir, target, log)
        return 0
    if not todo:
        print("sweep: nothing to submit", file=log)
        return 0
    return _submit(out_dir, manifest, todo, sbatch_args, max_parallel, target, log)


def _write_points(out_dir: Path, config: str | None, sets: list[str], pts: list[Point], resolved: dict, grid: dict,
                  target: str, log) -> dict:
    """Each point's run directory with its config (a point that ran keeps the one it ran with),
    and the sweep's manifest; returns the manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_json(out_dir / MANIFEST) or {"submissions": [], "points": {}}
    manifest.update(config=str(Path(config).resolve()) if config else None, sets=list(sets), target=target,
                    grid={**manifest.get("grid", {}), **grid})
    for p in pts:
        d = out_dir / p.name
        d.mkdir(exist_ok=True)
        text = config_mod.dumps(resolved[p.name])
        old = (d / POINT_CONFIG).read_text() if (d / POINT_CONFIG).exists() else None
        if old is None or point_state(d)[0] == "pending":
            atomic_write_text(d / POINT_CONFIG, text)
            atomic_write_text(d / POINT_FILE, json.dumps({"knobs": dict(p.knobs), "ranks": p.ranks,
                                                          "repeat": p.repeat, "sets": list(sets) + p.sets()},
                                                         default=str) + "\n")
        elif old != text:
            # A point that ran keeps the config it ran with (its run directory says what that was).
            print(f"sweep: {p.name} already ran with another config (the config or --set changed); kept as it "
                  f"was: use another --out to compare settings", file=log)
        manifest["points"][p.name] = {"knobs": dict(p.knobs), "ranks": p.ranks, "repeat": p.repeat}
    _save(out_dir, manifest)
    return manifest



def _default_target(config: str | None, sets: list[str]) -> str:
    cfg = config_mod.load(config, list(sets))
    return cfg.mlperf.target if cfg.mlperf.target else "val_accuracy>=0.9"


def _save(out_dir: Path, manifest: dict) -> None:
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=1, default=str) + "\n")


def _submit(out_dir: Path, manifest: dict, todo: list[Point], sbatch_args: str, max_parallel: int, target: str,
            log) -> int:
    if not shutil.which("sbatch"):
        raise UserError("sbatch not found: submit on a SLURM cluster, or run the points here with --local")
    import shlex

    jobs_dir = out_dir / ".jobs"
    jobs_dir.mkdir(exist_ok=True)
    env = dict(os.environ)
    env.setdefault("PIPELINE", str(Path(sys.executable).parent / "pipeline"))
    extra = shlex.split(sbatch_args or "")
    job_ids = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for r in sorted({p.ranks for p in todo}):
        names = [p.name for p in todo if p.ranks == r]
        listing = jobs_dir / f"ranks-{r}-{stamp}.txt"
        atomic_write_text(listing, "".join(str((out_dir / n).resolve()) + "\n" for n in names))
        array = f"0-{len(names) - 1}" + (f"%{max_parallel}" if max_parallel else "")
        cmd = ["sbatch", "--parsable", f"--array={array}", f"--job-name=sweep-{out_dir.name}-r{r}",
               "--nodes=1", f"--ntasks-per-node={r}", f"--output={jobs_dir.resolve()}/%A_%a.out",
               f"--export=ALL,SWEEP_POINTS={listing.resolve()}", *extra, str(sbatch_script())]
        res = slurm(cmd, env)
        if res.returncode != 0:
            raise UserError(f"sbatch refused the {r}-rank array: {res.stderr.strip().splitlines()[-1:]}")
        jid = res.stdout.strip().split(";")[0]
        job_ids.append(jid)
        manifest["submissions"].append({"job_id": jid, "ranks": r, "points": names, "time": time.time()})
        _save(out_dir, manifest)
        print(f"sweep: submitted job array {jid} ({len(names)} point(s) x {r} rank(s)): {' '.join(cmd)}", file=log)
    analysis = ["sbatch", "--parsable", f"--dependency=afterany:{':'.join(job_ids)}", "--ntasks=1",
                f"--job-name=sweep-{out_dir.name}-leaderboard", f"--output={(out_dir / 'leaderboard.out').resolve()}",
                *where_to_run(extra),
                "--wrap", leaderboard_command(out_dir, target, env["PIPELINE"])]
    res = slurm(analysis, env)
    if res.returncode != 0:
        raise UserError(f"sbatch refused the leaderboard job: {res.stderr.strip()}")
    jid = res.stdout.strip().split(";")[0]
    manifest["leaderboard_job"] = jid
    _save(out_dir, manifest)
    print(f"sweep: leaderboard job {jid} after {', '.join(job_ids)} -> {out_dir}/leaderboard.txt", file=log)
    return 0


def where_to_run(args: list[str]) -> list[str]:
    """The partition, account and QOS options among --sbatch-args (the analysis job runs
    where the arrays may), with their values whether joined (--partition=x) or not (-p x)."""
    keep, names = [], ("--partition", "-p", "--account", "-A", "--qos", "-q")
    for i, a in enumerate(args):
        if a in names and i + 1 < len(args):
            keep += [a, args[i + 1]]
        elif a.startswith(tuple(n + "=" for n in names if n.startswith("--"))) or \
                (a[:2] in ("-p", "-A", "-q") and len(a) > 2 and not a.startswith("--")):
            keep.append(a)
    return keep


def leaderboard_command(out_dir: Path, target: str, pipeline: str) -> str:
    import shlex

    d, t, p = (shlex.quote(str(x)) for x in (out_dir.resolve(), target, pipeline))
    return (f"{p} analyze --leaderboard {d} --target {t} --json > {d}/leaderboard.json && "
            f"{p} analyze --leaderboard {d} --target {t} --report {d}/leaderboard.html > {d}/leaderboard.txt")


def _leaderboard_local(out_dir: Path, target: str, log) -> None:
    from pipeline.cluster import leaderboard

    board = leaderboard.build(out_dir, target)
    atomic_write_text(out_dir / "leaderboard.json", json.dumps(board, indent=1, default=str) + "\n")
    text = leaderboard.text(board)
    atomic_write_text(out_dir / "leaderboard.txt", text)
    leaderboard.write_report(out_dir / "leaderboard.html", board)
    print(text, file=log, end="")


# --- the point runner (also pipeline bench knobs') ---

def train_command(ranks: int, config: Path | str | None, run_dir: Path | str, sets: list[str] = (),
                  cores: int | None = None) -> list[str]:
    """`pipeline train` for one point: alone for 1 rank, else under mpirun with each rank
    bound to cores/ranks cores, as SLURM would allot them."""
    cmd = [sys.executable, "-m", "pipeline", "train", "--run-dir", str(run_dir)]
    if config:
        cmd += ["--config", str(config)]
    for s in sets:
        cmd += ["--set", s]
    if ranks == 1:
        return cmd
    mpirun = shutil.which("mpirun")
    if not mpirun:
        raise UserError("mpirun not found on PATH (make env installs MPI)")
    pe = max(1, (cores or os.cpu_count() or 1) // ranks)
    return [mpirun, "-np", str(ranks), "--map-by", f"slot:PE={pe}", "--bind-to", "core", *cmd]


def run_point(ranks: int, config, run_dir: Path, sets: list[str] = (), env: dict | None = None,
              timeout: float | None = None) -> tuple[int | None, float]:
    """Runs one point here; its output goes to RUN/sweep-train.out, its exit code and wall
    time to RUN/sweep-exit.json. Returns (exit code, or None when killed at `timeout`; seconds)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(env or os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")  # what training applies (docs/training.md)
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    cmd = train_command(ranks, config, run_dir, sets)
    t0 = time.perf_counter()
    with open(run_dir / LOG_FILE, "a") as out:
        p = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        try:
            code = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            import signal

            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            code = None
    wall = time.perf_counter() - t0
    atomic_write_text(run_dir / EXIT_FILE, json.dumps({"exit_code": code, "wall_s": round(wall, 3),
                                                        "command": cmd}) + "\n")
    return code, wall


# --- status ---

def status(out: str, log=sys.stdout) -> int:
    out_dir = Path(out)
    manifest = read_json(out_dir / MANIFEST)
    if manifest is None:
        raise UserError(f"{out_dir}: no {MANIFEST} (not a sweep directory)")
    active = active_jobs(manifest)
    rows = [(name, *point_state(out_dir / name, active)) for name in manifest["points"]]
    counts: dict[str, int] = {}
    for _, st, _ in rows:
        counts[st] = counts.get(st, 0) + 1
    print(f"{out_dir}: {len(rows)} points: " + ", ".join(f"{counts[s]} {s}" for s in
          ("pending", "queued", "running", "stopped", "finished", "failed") if counts.get(s)), file=log)
    for name, st, why in rows:
        print(f"  {st:<8}  {name}" + (f"  ({why})" if why else ""), file=log)
    return 0


# --- the command line (pipeline/cli.py dispatches) ---

def add_arguments(p) -> None:
    p.add_argument("--config", help="YAML config every point starts from")
    p.add_argument("--out", help="the sweep directory: one run directory per point, sweep.json, the leaderboard")
    p.add_argument("--grid", action="append", metavar="KEY=V1,V2", help="a knob and its values (repeatable)")
    p.add_argument("--grid-file", metavar="FILE", help="YAML: KEY: [V1, V2] per knob (values may contain commas)")
    p.add_argument("--ranks", default="1", help="rank counts, e.g. 1,2,4: one job array each (default 1)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a setting for every point")
    p.add_argument("--repeats", type=int, default=1, help="runs of each point (the leaderboard shows the median)")
    p.add_argument("--sbatch-args", default="", help="more sbatch options, e.g. \"--partition=gpu --time=02:00:00\"")
    p.add_argument("--max-parallel", type=int, default=0, help="array tasks running at once (%%K; default: all)")
    p.add_argument("--target", help="the leaderboard's quality target, METRIC>=X or METRIC<=X (default: the "
                                    "config's mlperf.target, else val_accuracy>=0.9)")
    p.add_argument("--local", action="store_true", help="run the points here in turn under mpirun, not as jobs")
    p.add_argument("--retry-failed", action="store_true", help="run failed points again (default: leave them)")
    p.add_argument("--status", metavar="DIR", help="say what is pending, queued, running, finished and failed")
    p.set_defaults(func=cli)


def cli(a) -> int:
    if a.status:
        return status(a.status)
    if not a.out:
        raise UserError("pipeline sweep: give --out DIR (or --status DIR)")
    try:
        ranks = [int(x) for x in a.ranks.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--ranks {a.ranks!r}: expected rank counts such as 1,2,4") from None
    return run(a.config, a.out, a.grid or [], a.grid_file, ranks, a.set or [], repeats=a.repeats,
               sbatch_args=a.sbatch_args, max_parallel=a.max_parallel, target=a.target, local=a.local,
               retry_failed=a.retry_failed)

"""One training run, as a few named stages:

    preflight -> join -> plan -> build -> loop -> summarize -> finish

`preflight` checks what a user can get wrong before any rank joins; `join` starts the
distribution context and checks the data once for all ranks; `plan` fixes, from the
manifest alone, what every rank will do (identical step counts everywhere); `build` makes
the model, optimizer, writers and input and resumes from the newest complete checkpoint;
`loop` runs the steps; `summarize` and `finish` write each rank's summary and the model.
Every stage can be called on its own (tests/train/test_train_inprocess.py). `run` wraps them so
that whatever happens, the signal handlers, the watchdog, the step log, the TensorBoard
writer and Horovod are closed.

Steps run in calls of several steps each (`train.steps_per_call`); the graph times each step
itself, so per step each rank logs `data_s` (waiting for its batch) apart from `compute_s`
(forward, backward, allreduce and update, to completion) without the host waiting per step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import config as config_mod, faultspec, measure
from pipeline.data import feed as feed_mod, reader, sharding, shards, stage
from pipeline.errors import UserError
from pipeline.fsutil import atomic_write_text
from pipeline.mlperf.hook import ABORTED, MLPerfHook, drop_page_cache
from pipeline.rundir import VAL_COUNT, RunDir, is_metric
from pipeline.runtime import devstats, dist as dist_mod, flight
from pipeline.runtime.hooks import FaultHook, FlightHook, Hooks, WatchdogHook, signal_name
from pipeline.runtime.preempt import StopSignals, Watchdog
from pipeline.train import checkpoint, flops as flops_mod, models, optimizers, profile, staging, step as step_mod, \
    writers as writers_mod
from pipeline.train.evaluate import Evaluator
from pipeline.train.schedule import LR
from pipeline.train.steplog import StepLog, rss_mb
from pipeline.train.task import Task


def run(cfg: config_mod.Config, run_dir: str | Path, out=sys.stdout) -> dict:
    """One run, start to end (or to a stop signal); returns this rank's summary.

    The flight recorder and the watchdog start first (pipeline/runtime/flight.py): a rank stuck
    joining the job or in its first broadcast is caught by train.startup_timeout_s, and any
    way a rank fails leaves its post-mortem."""
    t_start = time.time()
    rd = RunDir(run_dir)
    manifest = preflight(cfg, rd)
    fault = faultspec.parse(cfg.debug.fault)
    rank = flight.launch_rank()
    rec = flight.start(rd.path, rank)
    ml = MLPerfHook(cfg.mlperf, rank, t_start)  # init_start: the process's start
    watchdog = Watchdog(cfg.train.startup_timeout_s, rank, what="startup", flight=rec)
    early = StopSignals(rank, signals=(signal.SIGTERM, signal.SIGUSR1),
                        on_signal=lambda signum: _signal_at_startup(rec, signum))
    dist = None
    try:
        if fault is not None:
            FaultHook(fault, rank, rec).on_phase("startup", 0)
        rec.event("phase", "init")
        dist = join(cfg, rd)
        rec.event("phase", "setup")
        if not cfg.data.stage_dir:
            check_data(manifest, dist)  # staged: each host checks its own copies instead
        plan = make_plan(cfg, manifest, dist)
        staged = None
        if cfg.data.stage_dir:
            rec.event("phase", "staging")
            staged = staging.stage_for_run(cfg, plan, dist, watchdog, out)
            plan = dataclasses.replace(plan, manifest=staged.manifest)
        if cfg.mlperf.enabled:
            clear_cache(plan, dist, ml, staged)
        with contextlib.ExitStack() as resources:
            trainer = build(cfg, rd, dist, plan, out, resources, ml, staged)
            rec.attach()  # past every check a user can fail: now into the run directory
            ml.attach(rd.path)
            early.close()
            state = loop(trainer, resources, watchdog)
        ml.run_stop(*ml.status_of(state))
        summary = summarize(trainer, state, t_start)
        rec.event("phase", "done")
        finish(trainer, state, summary, watchdog)
        dist.stop_timeline()
        return summary
    except UserError:
        raise
    except BaseException as e:
        # The first real exception, before Horovod's shutdown makes every peer raise its own.
        rec.postmortem(f"raised {type(e).__name__}: {e}", exc=e, exit_code=1)
        ml.run_stop(ABORTED, f"raised {type(e).__name__}")
        raise
    finally:
        early.close()
        watchdog.close()
        ml.close()
        # On any way out: a failing rank leaves the job, so its peers' collectives fail with
        # an error instead of waiting for it until the watchdog or the job's time limit.
        if dist is not None:
            dist.shutdown()
        rec.close()


def clear_cache(plan: "RunPlan", dist: dist_mod.Dist, ml, staged: "staging.Staged | None" = None) -> None:
    """MLPerf's cache_clear: the first rank on each host drops the dataset's pages from the
    page cache before any rank reads a sample, so the run starts cold. Staged: each group's
    first rank drops its host's staged copies, the files the run reads."""
    m = plan.manifest
    if staged is not None:
        files, ok = drop_page_cache(staged.paths) if staged.leader else (0, True)
    else:
        paths = sorted({str(m.path(x)) for x in m.shards("train") + m.shards("val")})
        files, ok = drop_page_cache(paths) if dist.local_rank == 0 else (0, True)
    results = dist.allgather_object((files, ok), name="cache_clear")
    ml.cache_cleared(sum(f for f, _ in results), all(o for _, o in results))


def _signal_at_startup(rec, signum: int | None) -> None:
    """A stop signal before the first step: nothing to checkpoint yet. The rank leaves its
    post-mortem (the launcher may be ending the job after another rank died) and exits."""
    signum = signum or signal.SIGTERM
    code = 128 + signum
    name = signal_name(signum)
    rec.event("signal", label=name)
    rec.postmortem(f"{name} during start-up, before the first step (nothing to checkpoint)", exit_code=code,
                   bound_s=5.0)
    os._exit(code)


# --- preflight and join ---

def preflight(cfg: config_mod.Config, rd: RunDir) -> shards.Manifest:
    """Everything a user can get wrong, checked before any rank joins, reads or writes."""
    manifest = shards.load_manifest(cfg.data.dir, cfg.data.root or None)
    if cfg.data.stage_dir:
        # A staged copy may stand in for a source: the stager checks what it copies.
        stage.expand(cfg.data.stage_dir, socket.gethostname(), flight.launch_rank(), os.environ)
    else:
        shards.check_exist(manifest)
    if rd.path.exists() and not rd.path.is_dir():
        raise UserError(f"{rd.path}: run directory path exists and is not a directory")
    return manifest


def join(cfg: config_mod.Config, rd: RunDir) -> dist_mod.Dist:
    """Joins the job and pins threads before TensorFlow runs its first op."""
    if cfg.horovod.autotune:
        rd.path.mkdir(parents=True, exist_ok=True)  # Horovod opens its autotune log at init
    return dist_mod.init(cfg.train.threads, timeline=cfg.log.timeline, horovod_env=cfg.horovod.environment(rd.path))


def check_data(manifest: shards.Manifest, dist: dist_mod.Dist) -> None:
    """Rank 0 alone opens every shard for the fast checks (no checksums) and tells the others:
    hundreds of ranks each opening every shard would hammer a shared file system."""
    problems = dist.broadcast_object(list(shards.verify(manifest, checksums=False)) if dist.is_root else None,
                                     name="data_problems")
    if problems:
        more = f" (and {len(problems) - 1} more; run: pipeline data verify {manifest.dir})" if len(problems) > 1 else ""
        raise UserError(problems[0] + more, quiet=not dist.is_root)


# --- plan ---

@dataclass(frozen=True)
class RunPlan:
    """What every rank will do, from the manifest alone: identical step counts on every rank."""
    manifest: shards.Manifest
    train: sharding.Plan            # this rank's training share
    val: sharding.Plan | None       # this rank's validation share (None: no validation split)
    passes: int                     # micro-batches per update (gradient accumulation)
    update_batch: int               # samples per rank per update: batch_size x passes
    global_batch: int
    total: int                      # the last global step
    train_samples: int

    @property
    def steps_per_epoch(self) -> int:
        return self.train.steps_per_epoch

    def epoch_of(self, step: int) -> int:
        return (step - 1) // self.steps_per_epoch + 1

    def evaluates_after(self, step: int) -> bool:
        return step % self.steps_per_epoch == 0 or step == self.total


def make_plan(cfg: config_mod.Config, manifest: shards.Manifest, dist: dist_mod.Dist) -> RunPlan:
    # One step is one update: k micro-batches of batch_size with gradient accumulation.
    passes = cfg.horovod.backward_passes_per_step
    update_batch = cfg.train.batch_size * passes
    train_counts = [s.num_samples for s in manifest.shards("train")]
    val_counts = [s.num_samples for s in manifest.shards("val")]
    share = sharding.assign(train_counts, dist.rank, dist.size, update_batch)
    if share.steps_per_epoch == 0:
        raise UserError(
            f"{manifest.dir}: {sum(train_counts)} training samples over {dist.size} ranks give each rank "
            f"{sum(train_counts) // dist.size}, fewer than train.batch_size={cfg.train.batch_size}"
            + (f" x horovod.backward_passes_per_step={passes}" if passes > 1 else ""))
    val = sharding.assign(val_counts, dist.rank, dist.size, cfg.train.batch_size, drop_last=False) \
        if val_counts else None
    return RunPlan(manifest, share, val, passes, update_batch, update_batch * dist.size,
                   sharding.total_steps(share.steps_per_epoch, cfg.train.epochs, cfg.train.max_steps),
                   sum(train_counts))


# --- build ---

@dataclass
class Trainer:
    """The run's parts, built once; the loop's changing state is in LoopState."""
    cfg: config_mod.Config
    run_dir: RunDir
    dist: dist_mod.Dist
    plan: RunPlan
    precision: str
    model: object
    optimizer: object
    state: object                    # tf.train.Checkpoint of model and optimizer
    lr: LR
    checkpoints: checkpoint.Checkpoints
    writers: writers_mod.Writers
    input: reader.Input
    train_step: object
    evaluate: Evaluator
    start: int                       # the step resumed after (0: a fresh run)
    fault: faultspec.Fault | None = None  # debug.fault
    mlperf: MLPerfHook | None = None
    staging_t0: float = 0.0          # when staging (or reading the share) began (MLPerf's staging_start)
    staged: "staging.Staged | None" = None  # data.stage_dir: what staging did


def build(cfg: config_mod.Config, rd: RunDir, dist: dist_mod.Dist, plan: RunPlan, out,
          resources: contextlib.ExitStack, ml: MLPerfHook | None = None,
          staged: "staging.Staged | None" = None) -> Trainer:
    """Model, optimizer, writers, resume point and input. Whatever must be closed is entered
    into `resources`. `ml`: run()'s MLPerf log (none: one that logs nothing). `staged`: the
    staging step's outcome, when data.stage_dir is set (plan's manifest reads the copies)."""
    import tensorflow as tf

    if ml is None:
        ml = MLPerfHook(config_mod.MLPerfConfig(), dist.rank, time.time())

    if cfg.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    tf.keras.utils.set_random_seed(cfg.train.seed)
    precision = _set_precision(cfg.train.precision, dist)
    writers = writers_mod.build(dist.is_root, rd, cfg.log, total_steps=plan.total,
                                steps_per_epoch=plan.steps_per_epoch, global_batch=plan.global_batch, stream=out)
    resources.callback(writers.close)
    m = plan.manifest
    with _said_by_rank0(dist):
        task = Task(cfg.train, cfg.data, m)
        model = models.build(cfg.model.name, m.shape, m.num_classes, target_shape=m.y_shape, args=cfg.model.args,
                             output_dtype="float32" if precision != "float32" else None)
    hosts = _write_config(cfg, rd, dist, plan, model, writers, precision)
    lr = LR.from_config(cfg.train, dist.size, plan.total, plan.steps_per_epoch, plan.global_batch, plan.update_batch)
    ml.hyperparameters(cfg, plan, hosts, lr)

    with _said_by_rank0(dist):
        opt = optimizers.build(cfg.train, lr.keras())
    if precision == "mixed_float16":
        # float16 gradients underflow without a loss scale; Keras adjusts it dynamically.
        opt = tf.keras.mixed_precision.LossScaleOptimizer(opt)
    # Create the optimizer's slots now, so they can be restored and broadcast before step 1.
    opt.build(model.trainable_variables)
    state = tf.train.Checkpoint(model=model, optimizer=opt)
    ckpts = checkpoint.for_rank(rd.checkpoints, cfg.checkpoint, dist.is_root)
    start = _resume(ckpts, state, model, opt, dist, rd, cfg, plan, writers.console)

    # This rank's share, opened after the process started (h5py is not fork-safe).
    staging_t0 = staged.t0 if staged is not None else time.time()
    inp = reader.Input(plan.manifest, plan.train, plan.val, cfg.data)
    writers.console.print(f"pipeline: input {inp.mode}")
    train_step = step_mod.make_train_step(model, opt, task.loss, dist, passes=plan.passes,
                                          compression=cfg.horovod.compression, jit_compile=cfg.train.jit_compile,
                                          loss_scale=precision == "mixed_float16", prepare_x=task.prepare_x,
                                          clip_global_norm=cfg.train.clip_global_norm)
    return Trainer(cfg, rd, dist, plan, precision, model, opt, state, lr, ckpts, writers, inp, train_step,
                   Evaluator(model, inp, cfg.train.batch_size, dist, task), start, faultspec.parse(cfg.debug.fault),
                   ml, staging_t0, staged)


@contextlib.contextmanager
def _said_by_rank0(dist):
    """For user errors every rank meets alike (a bad loss or metric name, a model that cannot
    be built or does not fit the targets): rank 0 says it, the others exit 2 quietly."""
    try:
        yield
    except UserError as e:
        raise UserError(str(e), quiet=e.quiet or not dist.is_root) from None


def _write_config(cfg, rd: RunDir, dist, plan: RunPlan, model, writers, precision: str) -> list[str]:
    """Rank 0 writes the resolved config with the run's facts (the model's FLOPs and every
    rank's peak among them, for MFU: pipeline/train/flops.py); every rank waits for the run
    directory to exist before opening its log in it."""
    got = dist.allgather_object((socket.gethostname(), flops_mod.rank_peak(dist.threads, precision)), name="hosts")
    hosts = [h for h, _ in got]
    model_flops = flops_mod.model_facts(model, plan.manifest.shape, cfg.train.batch_size) if dist.is_root else {}
    writers.config_file.write(
        cfg, ranks=dist.size, hosts=hosts, threads_per_rank=dist.threads, backend=dist.backend,
        global_batch=plan.global_batch, steps_per_epoch=plan.steps_per_epoch, total_steps=plan.total,
        dropped_train_samples=plan.train.dropped, model_params=model.count_params(),
        # What one step's allreduce moves: trainable parameters x bytes per element sent.
        gradient_bytes=sum(int(v.shape.num_elements()) for v in model.trainable_variables)
        * (2 if cfg.horovod.compression == "fp16" else 4),
        dataset=str(plan.manifest.dir.resolve()), versions=versions(), **model_flops,
        **flops_mod.run_peak([p for _, p in got]))
    dist.barrier()
    return hosts


def _resume(ckpts, state, model, opt, dist, rd: RunDir, cfg, plan: RunPlan, console) -> int:
    """Rank 0 picks the newest complete checkpoint and tells the others; every rank then holds
    rank 0's weights and optimizer state. Returns the step resumed after (0: fresh)."""
    ref, error = None, None
    try:  # a damaged checkpoint is set aside and the one before tried (pipeline/train/checkpoint.py)
        ref = ckpts.restore_newest(state, console.print)
    except UserError as e:
        error = str(e)
    start = dist.broadcast_object(error or (ref.step if ref else 0), name="resume_step")
    if isinstance(start, str):  # rank 0 found none intact: every rank stops, the line said once
        raise UserError(start, quiet=dist.rank != 0)
    dist.broadcast_variables(model.variables + opt.variables)
    if cfg.log.timeline:
        # Written by rank 0 with every rank's negotiation ticks; a resumed run gets its own file.
        dist.start_timeline(rd.timeline(start))
    console.print(f"pipeline: {dist.size} rank(s) x {dist.threads} thread(s) [{dist.backend}], "
                  f"global batch {plan.global_batch}, {plan.steps_per_epoch} steps/epoch, {plan.total} steps"
                  + (f", resuming after step {start} from {ref.path}" if ref else ""))
    if plan.train.dropped:
        console.print(f"pipeline: {plan.train.dropped} of {plan.train_samples} training samples are left out so "
                      f"every rank runs {plan.steps_per_epoch} steps per epoch")
    if plan.val is None:
        console.print(f"pipeline: {plan.manifest.dir} has no validation split; metrics.jsonl will stay empty")
    return start


# --- loop ---

@dataclass
class LoopState:
    """What the step loop changes, in one place."""
    step: int                          # the last finished step
    last_eval_step: int
    loss: float = float("nan")
    step_times: list = field(default_factory=list)
    rss_peak: float = 0.0
    last_end: int = 0                  # the previous step's end, in the graph clock's microseconds
    limit: int = 1                     # steps in the next call at most (the first traces: one)
    stopped_at: int | None = None      # the step a stop signal ended the run at
    target_reached_at: int | None = None  # the step a hook's target (mlperf.stop_at_target) ended the run at
    stopped_by: str | None = None
    signal_to_checkpoint: float | None = None
    first_signal: str | None = None    # "SIGUSR1 to rank 1": the stop signal every rank heard of first
    loop_s: float = 0.0
    step_log_s: float = 0.0
    flight_s: float = 0.0  # the flight recorder's part of step_log_s


def loop(t: Trainer, resources: contextlib.ExitStack, watchdog: Watchdog | None = None) -> LoopState:
    """Runs the steps in calls of up to train.steps_per_call steps (pipeline/train/step.py
    `compile_calls`); after each call, writes one step-log record per step from the times the
    graph took, then evaluates and checkpoints where due (a call always ends there). Every
    side concern hears of it through the hooks (pipeline/runtime/hooks.py). `watchdog`:
    run()'s, on its start-up timeout until the first call is done; else one of its own."""
    import tensorflow as tf

    plan = t.plan
    steplog, signals, stop_flag, hooks = _loop_resources(t, resources, watchdog)
    feed = feed_mod.open_feed(t.input, plan.update_batch, t.cfg.train.seed, t.start, plan.total,
                              t.dist.on_gpu, t.writers.console.print)
    resources.callback(feed.close)
    calls = step_mod.compile_calls(t.train_step, stop_flag, feed.batch_at, feed.signature,
                                   step_mod.graph_clock(t.cfg.train.deterministic))
    s = LoopState(step=t.start, last_eval_step=t.start)
    hooks.on_start(t.start)
    t_loop = time.perf_counter()
    s.last_end = step_mod.now_us()
    while s.step < plan.total:
        n = call_size(s.step, s.limit, lambda k: _call_ends_at(t, hooks, k))
        t_call = step_mod.now_us()
        hooks.on_phase("data", s.step + 1)
        first, n, inputs = feed.prepare(s.step, n)
        waited = step_mod.now_us() - t_call  # the host's part of the first step's data wait
        hooks.on_phase("allreduce", s.step + 1)
        hooks.on_call(s.step + 1, s.step + n)
        losses, begin, ready, done, stopped = calls(tf.constant(first, tf.int32), tf.constant(n, tf.int32), inputs)
        losses, times = losses.numpy(), (_us(begin), _us(ready), _us(done))
        hooks.on_call_done(s.step + len(losses))
        _log_steps(t, s, steplog, hooks, losses, *times, waited)
        s.limit = steps_in_a_call(t.cfg.train.steps_per_call, s.step_times[-len(losses):])
        epoch = plan.epoch_of(s.step)
        if s.step % plan.steps_per_epoch == 0 or s.step == plan.total:
            hooks.on_epoch_end(epoch)
        if bool(stopped):
            hooks.on_phase("stop", s.step)
            _stop_on_signal(t, s, s.step, epoch, signals)
            hooks.on_stop(s.step)
            break
        if _evaluate_and_save(t, s, hooks, epoch):
            break
    s.loop_s = time.perf_counter() - t_loop
    hooks.on_end(s)
    s.step_log_s = steplog.cost_s + s.flight_s  # the flight recorder's events are part of logging's cost
    s.stopped_by = signal_name(signals.signum)
    return s


def _loop_resources(t: Trainer, resources: contextlib.ExitStack, watchdog: Watchdog | None):
    """The step log (with its header and the rank's "running" summary), the hooks, and the stop
    flag that every step of a call reads, raised by a signal the moment it arrives."""
    import tensorflow as tf

    dist, plan = t.dist, t.plan
    rec = flight.current()
    steplog = resources.enter_context(StepLog(t.run_dir, dist.rank))
    steplog.header(rank=dist.rank, size=dist.size, local_rank=dist.local_rank, local_size=dist.local_size,
                   host=socket.gethostname(), pid=os.getpid(), start_step=t.start, precision=t.precision,
                   jit_compile=t.cfg.train.jit_compile, compression=t.cfg.horovod.compression,
                   backward_passes_per_step=plan.passes, batch_size=t.cfg.train.batch_size, threads=dist.threads,
                   backend=dist.backend, steps_per_call=t.cfg.train.steps_per_call,
                   fault=str(t.fault) if t.fault else None,
                   staging=_staging_header(t.staged))
    t.run_dir.ranks_dir.mkdir(exist_ok=True)
    atomic_write_text(t.run_dir.rank_file(dist.rank), json.dumps(
        {"rank": dist.rank, "pid": os.getpid(), "host": socket.gethostname(), "status": "running",
         "start_step": t.start}) + "\n")
    with tf.device("/CPU:0"):
        stop_flag = tf.Variable(0.0, trainable=False, name="stop_flag")
    if watchdog is None:
        watchdog = resources.enter_context(Watchdog(t.cfg.train.step_timeout_s, dist.rank, flight=rec))
    ml = t.mlperf or MLPerfHook(config_mod.MLPerfConfig(), dist.rank, time.time())
    ml.ready(plan.epoch_of, _staging_span(t), dist.barrier)
    writers = t.writers
    # The watchdog before the recorder: a signal bounds the stop before the post-mortem is written.
    # A GPU rank's device figures first: every later hook sees them in the records.
    hooks = Hooks([devstats.for_rank(dist.gpu if dist.on_gpu else None, writers.console.print),
                   FaultHook(t.fault, dist.rank, rec) if t.fault else None,
                   WatchdogHook(watchdog, t.cfg.train.step_timeout_s, t.cfg.train.stop_timeout_s), FlightHook(rec),
                   ml, writers.progress, writers.board,
                   profile.for_run(t.cfg.log.profile_steps, t.run_dir.path, dist.rank, writers.console.print)])
    signals = resources.enter_context(StopSignals(
        dist.rank, on_signal=lambda signum: (_raise_flag(stop_flag), hooks.on_signal(signum))))
    return steplog, signals, stop_flag, hooks


def _staging_header(staged: "staging.Staged | None") -> dict | None:
    """The step log header's account of staging: this host's copy, the wall time of the
    whole step (every host done) and the number of hosts."""
    if staged is None:
        return None
    return dict(staged.outcome, wall_s=round(staged.t1 - staged.t0, 3), hosts=staged.totals["hosts"])


def _staging_span(t: Trainer) -> tuple[float, float, dict] | None:
    """MLPerf's staging_start/stop: from the start of staging (or of reading the share) to the
    end of the read into memory, else to the end of the copy; None when neither happened."""
    in_memory = t.input.mode.startswith("in memory")
    if t.staged is not None:
        meta = {"what": t.input.mode, **{k: t.staged.totals[k] for k in ("bytes", "files", "copied", "reused")}}
        return t.staged.t0, time.time() if in_memory else t.staged.t1, meta
    return (t.staging_t0, time.time(), {"what": t.input.mode}) if in_memory else None


def _evaluate_and_save(t: Trainer, s: LoopState, hooks: Hooks, epoch: int) -> bool:
    """The evaluation and the checkpoint due after s.step; True when a hook ends the run here
    (a quality target met: checkpointed first)."""
    plan = t.plan
    evaluated, reason = {}, None
    if plan.evaluates_after(s.step):
        hooks.on_phase("eval", s.step)
        record = _evaluate(t, s, s.step, epoch)
        evaluated = {k: v for k, v in record.items() if is_metric(k)}
        # Every rank has the same figures (averaged over all), so all end here together.
        reason = hooks.on_eval(record)
    saving = t.checkpoints.due(s.step, plan.total, bool(evaluated)) or bool(reason)
    if saving:
        hooks.on_phase("checkpoint", s.step)
    ref = _save(t, s, epoch, evaluated, bool(reason)) if saving else None
    if ref is not None and (s.step == plan.total or reason):
        t.writers.console.print(f"checkpoint: {ref.path}")
    if reason:
        s.target_reached_at = s.step
        t.writers.console.print(reason)
        return True
    if evaluated or ref is not None:
        # An evaluation or a save is not part of the next step's time.
        s.last_end = step_mod.now_us()
    return False


def _save(t: Trainer, s: LoopState, epoch: int, evaluated: dict, force: bool):
    """Rank 0 writes the checkpoint due now and tells every rank whether it could: a failed
    write (a full disk) ends every rank with one line naming rank 0's failure."""
    failure = None
    try:
        ref = t.checkpoints.save_if_due(t.state, s.step, epoch, t.plan.total, evaluated, force=force)
    except checkpoint.CheckpointWriteError as e:
        ref, failure = None, str(e)
    failure = t.dist.broadcast_object(failure, name="checkpoint_written")
    if failure:
        raise checkpoint.CheckpointWriteError(failure if t.dist.rank == 0 else f"rank 0 could not write its checkpoint: "
                                                                     f"{failure}")
    return ref


# A call lasts about this long at most: the step log, the progress line and the watchdog hear
# from a rank at least this often, however slow its steps. Every call costs the host a few
# milliseconds between two steps (rank 0's more: the step log, the hooks, the dispatch), on
# every rank at the next allreduce: at 1 s, 400 ms ResNet50 steps ran two per call and paid
# 1.2% for it (docs/bench.md).
CALL_TARGET_S = 3.0


def steps_in_a_call(steps_per_call: int, recent_step_s: list) -> int:
    """train.steps_per_call, fewer where steps are slow (the median of the last call's steps):
    a call stays under about CALL_TARGET_S. Steps of more than half of it run one per call,
    where the per-call cost (a few ms here) is nothing beside them."""
    if not recent_step_s:
        return steps_per_call
    typical = sorted(recent_step_s)[len(recent_step_s) // 2]
    return max(1, min(steps_per_call, int(CALL_TARGET_S / max(typical, 1e-6))))


def call_size(step: int, limit: int, ends_at) -> int:
    """Steps in the next call after `step`: at most `limit`, ending at the first step k for
    which ends_at(k) holds."""
    for n in range(1, limit + 1):
        if ends_at(step + n):
            return n
    return limit


def _call_ends_at(t: Trainer, hooks: Hooks, k: int) -> bool:
    """Something other than a step happens after step k (the same answer on every rank, but
    for a hook's, such as debug.fault's, which splits the calls of its own rank only)."""
    plan = t.plan
    return k >= plan.total or k % plan.steps_per_epoch == 0 or \
        t.checkpoints.due(k, plan.total, plan.evaluates_after(k)) or hooks.ends_call_after(k)


def _log_steps(t: Trainer, s: LoopState, steplog: StepLog, hooks: Hooks, losses, begin, ready, done,
               waited: int) -> None:
    """One step-log record per step of a call, seen by the hooks first (which may add fields).
    Times are integer microseconds of the graph's clock (unix time): step_s = this step's end -
    the previous step's end; data_s = from the step's start until its batch was in hand (for a
    call's first step, with the host's wait for the batch before the call); compute_s = from
    then until the update was applied. So data_s + compute_s <= step_s."""
    plan, dist = t.plan, t.dist
    rss = rss_mb()  # once per call: the figure barely moves within one
    s.rss_peak = max(s.rss_peak, rss)
    records = []
    for j, loss in enumerate(losses.tolist()):
        step = s.step + 1 + j
        step_us = done[j] - s.last_end
        data_us = ready[j] - begin[j] + (waited if j == 0 else 0)
        s.last_end = done[j]
        s.step_times.append(step_us / 1e6)
        records.append(dict(step=step, epoch=plan.epoch_of(step), rank=dist.rank, size=dist.size,
                            time=done[j] / 1e6, step_s=step_us / 1e6, data_s=data_us / 1e6,
                            compute_s=(done[j] - ready[j]) / 1e6, samples=plan.update_batch, loss=loss,
                            lr=t.lr.at(step - 1), rss_mb=round(rss, 1)))
    hooks.on_steps(records)
    steplog.steps(records)
    s.step += len(records)
    s.loss = losses[-1].item() if len(records) else s.loss


def _us(t) -> list:
    return [round(x * 1e6) for x in t.numpy().tolist()]


def _raise_flag(flag) -> None:
    try:
        flag.assign(1.0)
    except Exception as e:  # noqa: BLE001 - a failure here must not kill the signal thread silently
        print(f"pipeline: could not raise the stop flag: {e}", file=sys.stderr, flush=True)


def _stop_on_signal(t: Trainer, s: LoopState, step: int, epoch: int, signals: StopSignals) -> None:
    """Every rank saw the same sum in this step: all stop here, rank 0 saves."""
    ref = t.checkpoints.save(t.state, step, epoch, {"stopped_by_signal": True})
    t.dist.barrier()  # no rank exits (and gets the job torn down) before the save is complete
    got = t.dist.allgather_object((signals.time, signal_name(signals.signum)), name="signal_times")
    first_signal, name, rank = min((when, name, rank) for rank, (when, name) in enumerate(got) if when)
    s.signal_to_checkpoint = time.time() - first_signal
    s.first_signal = f"{name} to rank {rank}"
    s.stopped_at = step
    if ref is not None:
        t.writers.console.print(f"stopped at step {step}: checkpoint {ref.path} complete "
                                f"{s.signal_to_checkpoint:.2f}s after the first signal; exit 75 (run again to resume)")


def _evaluate(t: Trainer, s: LoopState, step: int, epoch: int) -> dict:
    """Validation on every rank; rank 0 writes the record to metrics.jsonl and says it."""
    figures = t.evaluate()
    record = {"epoch": epoch, "step": step, "time": time.time(), **figures}
    t.writers.metrics.write(record)
    t.writers.console.print(f"epoch {epoch} step {step}: " + " ".join(
        f"{k} {v:.4f}" for k, v in figures.items() if is_metric(k)) + f" ({figures[VAL_COUNT]} samples)")
    s.last_eval_step = step
    return record


# --- summarize and finish ---

def summarize(t: Trainer, s: LoopState, t_start: float) -> dict:
    """ranks/rank-R.json: speed, logging cost, and a digest proving the replicas agree."""
    dist = t.dist
    end = s.stopped_at or s.target_reached_at or t.plan.total
    steps_run = end - t.start
    train_s = sum(s.step_times)
    warmup = measure.warmup_count(steps_run)  # graph tracing, allocator and input warm-up
    steady = s.step_times[warmup:]
    summary = {
        "rank": dist.rank, "size": dist.size, "host": socket.gethostname(), "threads": dist.threads,
        "pid": os.getpid(), "status": "stopped" if s.stopped_at else "finished",
        "start_step": t.start, "end_step": end, "steps_run": steps_run, "loop_s": round(s.loop_s, 3),
        "train_s": round(train_s, 3), "warmup_steps": warmup,
        "samples_per_s": round(len(steady) * t.plan.update_batch / sum(steady), 2) if steady else 0.0,
        "step_log_s": round(s.step_log_s, 4),
        "step_log_overhead": s.step_log_s / train_s if train_s else 0.0,
        "flight_recorder_s": round(s.flight_s, 5),
        "rss_mb_peak": round(s.rss_peak, 1), "last_eval_step": s.last_eval_step,
        "weights_sha256": checkpoint.variables_digest(t.model.variables + t.optimizer.variables),
        "wall_s": round(time.time() - t_start, 3),
        "stopped_by": s.stopped_by, "signal_to_checkpoint_s": s.signal_to_checkpoint,
        "target_reached_at_step": s.target_reached_at,
    }
    atomic_write_text(t.run_dir.rank_file(dist.rank), json.dumps(summary, indent=2) + "\n")
    return summary


def finish(t: Trainer, s: LoopState, summary: dict, watchdog: Watchdog | None = None) -> None:
    """The job's closing line on rank 0, and the finished model. The watchdog (if given) ends
    before the export: rank 0 alone writes the model, however long a large one takes."""
    console, steps_run = t.writers.console, summary["steps_run"]
    t.writers.progress.maybe_print(summary["end_step"], s.loss, force=steps_run > 0 and s.stopped_at is None)
    summaries = t.dist.allgather_object(summary, name="summaries")
    if steps_run:
        rates = ", ".join(f"rank {x['rank']} {x['samples_per_s']:.0f}" for x in summaries)
        overhead = max(x["step_log_overhead"] for x in summaries)
        console.print(f"done: {steps_run} steps in {s.loop_s:.1f}s; samples/s per rank "
                      f"(first {summary['warmup_steps']} steps left out): {rates}; "
                      f"step-log cost {overhead:.3%} of step time")
    else:
        console.print(f"done: {t.run_dir.path} was already trained to step {t.plan.total}; nothing to do")
    if watchdog is not None:
        watchdog.close()
    if s.stopped_at is None and steps_run:
        t.writers.export.save(t.model)  # the finished model, ready for serving or `pipeline export`


# --- helpers ---

def versions() -> dict:
    """Package versions of this process (config.json; `pipeline doctor` compares them across ranks)."""
    import h5py
    import numpy
    import tensorflow as tf

    from pipeline import stack

    v = {"python": platform.python_version(), "tensorflow": tf.__version__, "numpy": numpy.__version__,
         "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version,
         "keras": stack.loaded_keras_version(tf) or "-",
         # what `make env TF=...` asked for (docs/setup.md); "-" outside a venv it made
         "tf_stack": stack.request_of(stack.record_of())}
    try:
        import horovod

        v["horovod"] = horovod.__version__
    except ImportError:
        pass
    return v


def _set_precision(name: str, dist) -> str:
    """Sets Keras's global dtype policy; float16 needs a GPU, bfloat16 is slow without CPU support."""
    import tensorflow as tf

    if name == "float32":
        tf.keras.mixed_precision.set_global_policy("float32")  # also after another run in this process
        return name
    if name == "mixed_float16" and not tf.config.list_physical_devices("GPU"):
        raise UserError("train.precision=mixed_float16 needs a GPU (this rank sees none); on CPUs use "
                        "mixed_bfloat16", quiet=not dist.is_root)
    if name == "mixed_bfloat16" and not tf.config.list_physical_devices("GPU") and not _cpu_has_bf16():
        if dist.is_root:
            print("pipeline: warning: this CPU has no bfloat16 instructions (avx512_bf16/amx_bf16); "
                  "mixed_bfloat16 will be emulated and slower than float32", file=sys.stderr)
    tf.keras.mixed_precision.set_global_policy(name)
    return name


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16", " bf16"))


# --- the command line (pipeline/cli.py dispatches) ---

def run_arguments(p, what: str = "train") -> None:
    """--config, --run-dir and --set, as train takes them (doctor takes the same)."""
    p.add_argument("--config", help="YAML config (default: built-in defaults, see configs/default.yaml)"
                   if what == "train" else "YAML config, as for train")
    p.add_argument("--run-dir", required=what == "train",
                   help="where logs, metrics and checkpoints go; resumes if present" if what == "train"
                   else "the run directory train will use: writable, with room for checkpoints")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. train.batch_size=128" if what == "train"
                   else "override a config key, as for train")


def add_arguments(p) -> None:
    run_arguments(p)
    p.set_defaults(func=cli)


def cli(a) -> int:
    from pipeline.errors import EXIT_OK, EXIT_REQUEUE

    summary = run(config_mod.load(a.config, a.set or []), a.run_dir)
    return EXIT_REQUEUE if summary["status"] == "stopped" else EXIT_OK

"""One training run, top to bottom: check data, join ranks, plan, build, resume, step, save.

Per step each rank measures `data_s` (waiting for its batch) apart from `compute_s`
(forward, backward, allreduce and update, waited on to completion by reading the loss).
"""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

from . import checkpoint, config as config_mod, dist as dist_mod, export, models, schedule, step as step_mod
from .data import reader, sharding, shards
from .errors import UserError
from .fsutil import atomic_write_text
from .preempt import StopSignals, Watchdog
from .steplog import JsonLines, Nothing, Progress, StepLog, TensorBoard, rss_mb


def _check_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: run directory path exists and is not a directory")


def _versions() -> dict:
    import h5py
    import numpy
    import tensorflow as tf

    v = {"python": platform.python_version(), "tensorflow": tf.__version__, "numpy": numpy.__version__,
         "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version}
    try:
        import horovod

        v["horovod"] = horovod.__version__
    except ImportError:
        pass
    return v


def _source(manifest, split: str, plan, budget: int):
    """In memory when this rank's share fits the budget, else streamed from the shards."""
    need = reader.share_bytes(manifest, plan)
    if need <= budget:
        x, y = reader.read_share(manifest, split, plan)
        return reader.MemorySource(x, y), f"in memory ({need / 2**20:.0f} MiB per rank)"
    return reader.ShardSource(manifest, split), \
        f"streamed from the shards ({need / 2**20:.0f} MiB per rank > data.cache_mb)"


def _signal_name(signum) -> str | None:
    import signal

    return signal.Signals(signum).name if signum else None


def warmup_steps(steps_run: int) -> int:
    """Steps left out of a rank's speed figure: 10, or a fifth of a short run."""
    return min(10, steps_run // 5)


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


def run(cfg: config_mod.Config, run_dir: str | Path, out=sys.stdout) -> dict:
    run_dir = Path(run_dir)
    t_start = time.time()

    # --- Check everything a user can get wrong before any rank joins, reads or writes ---
    manifest = shards.load_manifest(cfg.data.dir)
    shards.check_exist(manifest)
    _check_run_dir(run_dir)
    train_counts = [s.num_samples for s in manifest.shards("train")]
    val_counts = [s.num_samples for s in manifest.shards("val")]

    # --- Join the job; pin threads before TensorFlow runs its first op ---
    if cfg.horovod.autotune:
        run_dir.mkdir(parents=True, exist_ok=True)  # Horovod opens its autotune log at init
    dist = dist_mod.init(cfg.train.threads, timeline=cfg.log.timeline, horovod_env=cfg.horovod.environment(run_dir))
    # Rank 0 alone opens every shard for the fast checks (no checksums) and tells the others:
    # hundreds of ranks each opening every shard would hammer a shared file system.
    problems = dist.broadcast_object(list(shards.verify(manifest, checksums=False)) if dist.is_root else None,
                                     name="data_problems")
    if problems:
        more = f" (and {len(problems) - 1} more; run: pipeline data verify {manifest.dir})" if len(problems) > 1 else ""
        raise UserError(problems[0] + more, quiet=not dist.is_root)
    import tensorflow as tf

    if cfg.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    tf.keras.utils.set_random_seed(cfg.train.seed)
    precision = _set_precision(cfg.train.precision, dist)
    say = Progress(0, 1, 0, cfg.log.progress_every_s, stream=out) if dist.is_root else Nothing()

    # --- The plan, from the manifest alone: identical step counts on every rank ---
    # One step is one update: k micro-batches of batch_size with gradient accumulation.
    passes = cfg.horovod.backward_passes_per_step
    update_batch = cfg.train.batch_size * passes
    plan = sharding.assign(train_counts, dist.rank, dist.size, update_batch)
    if plan.steps_per_epoch == 0:
        raise UserError(
            f"{manifest.dir}: {sum(train_counts)} training samples over {dist.size} ranks give each rank "
            f"{sum(train_counts) // dist.size}, fewer than train.batch_size={cfg.train.batch_size}"
            + (f" x horovod.backward_passes_per_step={passes}" if passes > 1 else ""))
    total = sharding.total_steps(plan.steps_per_epoch, cfg.train.epochs, cfg.train.max_steps)
    val_plan = sharding.assign(val_counts, dist.rank, dist.size, cfg.train.batch_size, drop_last=False) \
        if val_counts else None
    global_batch = update_batch * dist.size

    model = models.build(cfg.model.name, manifest.shape, manifest.num_classes,
                         output_dtype="float32" if precision != "float32" else None)

    # --- The run directory: rank 0 writes the resolved config; every rank its step log ---
    if dist.is_root:
        (run_dir / "steps").mkdir(parents=True, exist_ok=True)
    hosts = dist.allgather_object(socket.gethostname(), name="hosts")
    if dist.is_root:
        atomic_write_text(run_dir / "config.json", config_mod.dumps(
            cfg, ranks=dist.size, hosts=hosts, threads_per_rank=dist.threads, backend=dist.backend,
            global_batch=global_batch, steps_per_epoch=plan.steps_per_epoch, total_steps=total,
            dropped_train_samples=plan.dropped, model_params=model.count_params(),
            # What one step's allreduce moves: trainable parameters x bytes per element sent.
            gradient_bytes=sum(int(v.shape.num_elements()) for v in model.trainable_variables)
            * (2 if cfg.horovod.compression == "fp16" else 4), dataset=str(manifest.dir.resolve()), versions=_versions()))
    dist.barrier()  # the run directory exists before other ranks open their logs in it

    # --- Model, optimizer, checkpoint state ---
    lr_args = dict(base_lr=cfg.train.lr, size=dist.size, warmup_steps=cfg.train.warmup_steps, scale=cfg.train.scale_lr,
                   schedule=cfg.train.lr_schedule, total_steps=total, step_every=cfg.train.lr_step_every,
                   step_factor=cfg.train.lr_step_factor)
    lr = schedule.keras_schedule(**lr_args)
    opt = tf.keras.optimizers.Adam(lr) if cfg.train.optimizer == "adam" else tf.keras.optimizers.SGD(lr, momentum=0.9)
    if precision == "mixed_float16":
        # float16 gradients underflow without a loss scale; Keras adjusts it dynamically.
        opt = tf.keras.mixed_precision.LossScaleOptimizer(opt)
    # Create the optimizer's slots now, so they can be restored and broadcast before step 1.
    opt.build(model.trainable_variables)
    state = tf.train.Checkpoint(model=model, optimizer=opt)
    writer = checkpoint.CheckpointWriter(run_dir / "checkpoints", cfg.checkpoint.keep, enabled=dist.is_root,
                                         keep_best=cfg.checkpoint.keep_best)

    # --- Resume: rank 0 picks the newest complete checkpoint and tells the others ---
    ref = writer.latest()
    start = dist.broadcast_object(ref.step if ref else 0, name="resume_step")
    if ref is not None:
        state.read(ref.prefix).assert_existing_objects_matched()
    dist.broadcast_variables(model.variables + opt.variables)
    if cfg.log.timeline:
        # Written by rank 0 with every rank's negotiation ticks; a resumed run gets its own file.
        dist.start_timeline(run_dir / ("timeline.json" if start == 0 else f"timeline-from-{start}.json"))

    say.print(f"pipeline: {dist.size} rank(s) x {dist.threads} thread(s) [{dist.backend}], "
              f"global batch {global_batch}, {plan.steps_per_epoch} steps/epoch, {total} steps"
              + (f", resuming after step {start} from {ref.path}" if ref else ""))
    if plan.dropped:
        say.print(f"pipeline: {plan.dropped} of {sum(train_counts)} training samples are left out so every "
                  f"rank runs {plan.steps_per_epoch} steps per epoch")
    if not val_counts:
        say.print(f"pipeline: {manifest.dir} has no validation split; metrics.jsonl will stay empty")

    # --- Data: this rank's share, opened after the process started (h5py is not fork-safe) ---
    train_source, train_mode = _source(manifest, "train", plan, cfg.data.cache_mb * 2**20)
    val_source, _ = _source(manifest, "val", val_plan, cfg.data.cache_mb * 2**20 - reader.share_bytes(manifest, plan)) \
        if val_plan else (None, None)
    say.print(f"pipeline: input {train_mode}")
    block = reader.block_size(cfg.data.read_block, manifest.chunk_samples)
    blocks = reader.cut_blocks(plan, block)
    val_blocks = reader.cut_blocks(val_plan, block) if val_plan else []
    batches = reader.train_dataset(train_source, blocks, plan, update_batch, cfg.train.seed, start, total,
                                   cfg.data.shuffle_buffer, cfg.data.shuffle, cfg.data.prefetch)

    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    per_sample = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")

    train_step = step_mod.make_train_step(model, opt, loss_fn, dist, passes=passes,
                                          compression=cfg.horovod.compression, jit_compile=cfg.train.jit_compile,
                                          loss_scale=precision == "mixed_float16")

    @tf.function
    def eval_step(xb, yb):
        logits = model(reader.to_float(xb), training=False)
        hits = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), yb)
        return tf.reduce_sum(per_sample(yb, logits)), tf.reduce_sum(tf.cast(hits, tf.float32))

    def evaluate() -> tuple[float, float]:
        """Validation loss and accuracy over every rank's share, summed exactly across ranks."""
        sums = [0.0, 0.0, 0.0]
        if val_source is not None:
            for xb, yb in reader.eval_batches(val_source, val_blocks, cfg.train.batch_size):
                loss_sum, hits = eval_step(xb, yb)
                sums[0] += float(loss_sum)
                sums[1] += float(hits)
                sums[2] += len(yb)
        loss_sum, hits, n = dist.allreduce_sum(sums)
        return (loss_sum / n, hits / n) if n else (float("nan"), float("nan"))

    steplog = StepLog(run_dir, dist.rank)
    # A header record opens each process's part of the log: who wrote the steps and how.
    steplog.write({"kind": "header", "rank": dist.rank, "size": dist.size, "local_rank": dist.local_rank,
                   "local_size": dist.local_size, "host": socket.gethostname(), "pid": os.getpid(),
                   "start_step": start, "precision": precision, "jit_compile": cfg.train.jit_compile,
                   "compression": cfg.horovod.compression, "backward_passes_per_step": passes,
                   "batch_size": cfg.train.batch_size, "threads": dist.threads, "backend": dist.backend,
                   "time": time.time()})
    metrics = JsonLines(run_dir / "metrics.jsonl") if dist.is_root else Nothing()
    board = TensorBoard(run_dir / "tensorboard", cfg.log.tensorboard_every_steps, global_batch) \
        if dist.is_root and cfg.log.tensorboard_every_steps else Nothing()
    progress = Progress(total, plan.steps_per_epoch, global_batch, cfg.log.progress_every_s, start, out) \
        if dist.is_root else Nothing()

    # --- The step loop ---
    step_times = []
    rss_peak = 0.0
    last_eval_step = start
    loss = float("nan")
    stopped_at = None
    signal_to_checkpoint = None
    go, stop = tf.constant(0.0), tf.constant(1.0)
    signals = StopSignals(dist.rank)
    watchdog = Watchdog(cfg.train.step_timeout_s, dist.rank)
    (run_dir / "ranks").mkdir(exist_ok=True)
    atomic_write_text(run_dir / "ranks" / f"rank-{dist.rank}.json", json.dumps(
        {"rank": dist.rank, "pid": os.getpid(), "host": socket.gethostname(), "status": "running",
         "start_step": start}) + "\n")
    it = reader.batches(batches)
    t_loop = time.perf_counter()
    for step in range(start + 1, total + 1):
        epoch = (step - 1) // plan.steps_per_epoch + 1
        t0 = time.perf_counter()
        xb, yb = next(it)
        t1 = time.perf_counter()
        loss_t, stops = train_step(xb, yb, stop if signals.requested else go)
        loss = float(loss_t)  # reading the loss waits for the whole step
        t2 = time.perf_counter()
        watchdog.progress()
        rss = rss_mb()
        rss_peak = max(rss_peak, rss)
        rate = schedule.lr_at(step - 1, **lr_args)
        step_times.append(t2 - t0)
        steplog.write({"step": step, "epoch": epoch, "rank": dist.rank, "size": dist.size, "time": time.time(),
                       "step_s": t2 - t0, "data_s": t1 - t0, "compute_s": t2 - t1,
                       "samples": update_batch, "loss": loss, "lr": rate, "rss_mb": round(rss, 1)})
        board.step(step, loss, rate)
        progress.maybe_print(step, loss)

        if float(stops) > 0:
            # Every rank saw the same sum in this step: all stop here, rank 0 saves.
            ref = writer.save(state, step, epoch, {"stopped_by_signal": True})
            dist.barrier()  # no rank exits (and gets the job torn down) before the save is complete
            first_signal = min(t for t in dist.allgather_object(signals.time, name="signal_times") if t)
            signal_to_checkpoint = time.time() - first_signal
            stopped_at = step
            if ref is not None:
                say.print(f"stopped at step {step}: checkpoint {ref.path} complete {signal_to_checkpoint:.2f}s "
                          f"after the first signal; exit 75 (run again to resume)")
            break
        evaluated = {}
        if step % plan.steps_per_epoch == 0 or step == total:
            t_eval = time.perf_counter()
            dist.average_variables(model.non_trainable_variables)  # BatchNorm statistics, if any
            val_loss, val_acc = evaluate()
            record = {"epoch": epoch, "step": step, "time": time.time(), "val_loss": val_loss,
                      "val_accuracy": val_acc, "eval_s": round(time.perf_counter() - t_eval, 3)}
            metrics.write(record)
            board.write(record)
            say.print(f"epoch {epoch} step {step}: val_loss {val_loss:.4f} val_accuracy {val_acc:.4f}")
            last_eval_step = step
            evaluated = {"val_loss": val_loss, "val_accuracy": val_acc}
        if checkpoint.should_save(step, cfg.checkpoint.every_steps, total) or (evaluated and cfg.checkpoint.keep_best):
            ref = writer.save(state, step, epoch, evaluated)
            if ref is not None and step == total:
                say.print(f"checkpoint: {ref.path}")
    watchdog.close()
    signals.close()
    board.close()
    wall_loop = time.perf_counter() - t_loop
    steplog.close()
    end = stopped_at or total
    progress.maybe_print(end, loss, force=start < end and stopped_at is None)

    # --- Per-rank summary: speed, logging cost, and a digest proving the replicas agree ---
    steps_run = end - start
    train_s = sum(step_times)
    # Speed leaves out the first steps (graph tracing, allocator and pipeline warm-up).
    warmup = warmup_steps(steps_run)
    steady = step_times[warmup:]
    summary = {
        "rank": dist.rank, "size": dist.size, "host": socket.gethostname(), "threads": dist.threads,
        "pid": os.getpid(), "status": "stopped" if stopped_at else "finished",
        "start_step": start, "end_step": end, "steps_run": steps_run, "loop_s": round(wall_loop, 3),
        "train_s": round(train_s, 3),
        "warmup_steps": warmup,
        "samples_per_s": round(len(steady) * update_batch / sum(steady), 2) if steady else 0.0,
        "step_log_s": round(steplog.cost_s, 4),
        "step_log_overhead": steplog.cost_s / train_s if train_s else 0.0,
        "rss_mb_peak": round(rss_peak, 1), "last_eval_step": last_eval_step,
        "weights_sha256": checkpoint.variables_digest(model.variables + opt.variables),
        "wall_s": round(time.time() - t_start, 3),
        "stopped_by": _signal_name(signals.signum), "signal_to_checkpoint_s": signal_to_checkpoint,
    }
    atomic_write_text(run_dir / "ranks" / f"rank-{dist.rank}.json", json.dumps(summary, indent=2) + "\n")
    summaries = dist.allgather_object(summary, name="summaries")
    if steps_run:
        rates = ", ".join(f"rank {s['rank']} {s['samples_per_s']:.0f}" for s in summaries)
        overhead = max(s["step_log_overhead"] for s in summaries)
        say.print(f"done: {steps_run} steps in {wall_loop:.1f}s; samples/s per rank "
                  f"(first {warmup} steps left out): {rates}; "
                  f"step-log cost {overhead:.3%} of step time")
    else:
        say.print(f"done: {run_dir} was already trained to step {total}; nothing to do")
    if dist.is_root and stopped_at is None and steps_run:
        export.save_keras(model, run_dir)  # the finished model, ready for serving or `pipeline export`
    dist.stop_timeline()
    dist.shutdown()
    return summary

"""MLPerf HPC events from the training loop, as one of its hooks (pipeline/runtime/hooks.py).

The hook runs on every rank: each decides alike whether an evaluation met mlperf.target (the
figures are averaged over all ranks, so all end at the same evaluation), while only rank 0's
log writes (pipeline/mlperf/log.py `open_log`). It imports nothing of pipeline/train: the
trainer hands it plain values.
"""

from __future__ import annotations

from pipeline import target as target_mod
from pipeline.mlperf.log import ABORTED, SUCCESS, MLPerfLog, drop_page_cache, gpu_names, open_log, platform
from pipeline.runtime.hooks import Hook

__all__ = ["MLPerfHook", "drop_page_cache", "ABORTED", "SUCCESS"]


# train.optimizer as MLPerf HPC's closed rules spell it (mlperf-logging's hpc_3.0.0 rules:
# CosmoFlow's sgd, DeepCAM's Adam, AdamW or LAMB, OpenCatalyst's AdamW); a user's own as named.
OPT_NAMES = {"sgd": "sgd", "adam": "Adam", "adamw": "AdamW", "lamb": "LAMB", "lars": "LARS"}


def deepcam_keys(t, lr) -> list[tuple]:
    """The keys MLPerf HPC's closed DeepCAM rules ask for (hpc_3.0.0 closed_deepcam*.yaml), from
    the run's own settings: the optimizer's, the schedule's (multistep milestones in steps, or
    cosine annealing), and LAMB's."""
    out = [("batchnorm_group_size", 1),  # BatchNorm statistics are each rank's own while training
           ("opt_lr", lr.peak), ("opt_betas", list(t.betas)), ("opt_eps", t.epsilon),
           ("scheduler_type", {"multistep": "multistep", "cosine": "cosine_annealing"}.get(lr.schedule, lr.schedule)),
           ("scheduler_lr_warmup_steps", lr.warmup_steps), ("scheduler_lr_warmup_factor", lr.peak / t.lr)]
    if lr.schedule == "multistep":
        out += [("scheduler_milestones", list(lr.boundaries)),
                ("scheduler_decay_rate", lr.gamma if lr.gamma else (list(lr.decay_factors) or [1.0])[0])]
    elif lr.schedule == "cosine":
        out += [("scheduler_t_max", max(1, lr.total_steps - lr.warmup_steps)), ("scheduler_eta_min", 0.0)]
    if t.optimizer == "lamb":
        out += [("opt_bias_correction", True), ("opt_grad_averaging", True), ("opt_max_grad_norm", t.clip_global_norm)]
    return out


class MLPerfHook(Hook):
    """One attempt's events, in order, once each. `settings` is the config's mlperf section."""

    def __init__(self, settings, rank: int, t_start: float, log: MLPerfLog | None = None):
        self.settings = settings
        self.log = log if log is not None else open_log(settings, rank, t_start)  # init_start: the process's start
        self.status: str | None = None  # run_stop's, once logged
        self.run_started = False
        self.epoch_open: int | None = None
        self._metric, self._op, self._goal = target_mod.parse_mlperf(settings.target) if settings.enabled \
            else ("", "", 0.0)
        self.quality_key = "eval_error" if self._op == "<=" else "eval_accuracy"
        self.reached_at: int | None = None  # the first epoch whose evaluation met the target
        self._epoch_of = None
        self._ready = None

    def attach(self, run_dir) -> None:
        self.log.attach(run_dir)

    def close(self) -> None:
        self.log.close()

    # --- before the loop (called by the trainer's stages) ---

    def cache_cleared(self, files: int, dropped: bool) -> None:
        self.log.event("cache_clear", dropped, metadata={"files": files})

    def hyperparameters(self, cfg, plan, hosts: list[str], lr) -> None:
        """The run's settings as MLPerf HPC's keys, from the learning-rate rule the run uses
        (`lr`: pipeline/train/schedule.py's LR, every length in steps), never constants."""
        t = cfg.train
        spe = plan.steps_per_epoch
        peak = lr.peak
        boundaries, factor = [], 1.0
        if lr.schedule == "step":
            # lr_at decays at every multiple of lr_step_every, counted from step 0.
            boundaries = [k / spe for k in range(lr.step_every, plan.total, lr.step_every)]
            factor = lr.step_factor
        elif lr.schedule == "multistep":
            boundaries = [b / spe for b in lr.boundaries]
            factor = list(lr.decay_factors) if lr.decay_factors else lr.gamma
        # Built only where the log writes: describing the platform asks TensorFlow for its GPUs,
        # after joining the job (not before the rank's threads are set).
        self.log.events(lambda: (
            ("submission_platform", self.settings.platform or platform()),
            ("global_batch_size", plan.global_batch),
            ("gradient_accumulation_steps", plan.passes),
            ("gradient_accumulation_frequency", plan.passes),
            ("opt_name", OPT_NAMES.get(t.optimizer, t.optimizer)),
            ("opt_base_learning_rate", peak),
            ("opt_learning_rate_warmup_epochs", lr.warmup_steps / spe),
            ("opt_learning_rate_warmup_factor", peak / t.lr),
            ("opt_learning_rate_decay_schedule", lr.schedule),
            ("opt_learning_rate_decay_boundary_epochs", boundaries),
            ("opt_learning_rate_decay_factor", factor),
            ("opt_weight_decay", t.weight_decay),
            ("dropout", float(cfg.model.args.get("dropout", 0.0) or 0.0)),
            ("seed", t.seed),
            ("train_samples", plan.train_samples),
            ("eval_samples", sum(x.num_samples for x in plan.manifest.shards("val"))),
            ("number_of_nodes", len(set(hosts))),
            ("accelerators_per_node", len(gpu_names())),
            *(deepcam_keys(t, lr) if self.settings.benchmark == "deepcam" else ())))

    def ready(self, epoch_of, staged: tuple[float, float, dict] | None, barrier) -> None:
        """What the loop's start needs: the epoch of a step, the staging span (the copy to
        data.stage_dir and the read into memory: start, stop, metadata) and a barrier (the
        run's clock starts when every rank is ready)."""
        self._epoch_of = epoch_of
        self._ready = (staged, barrier)

    # --- the loop's hook ---

    def on_start(self, start_step: int) -> None:
        staged, barrier = self._ready or (None, None)
        if self.settings.enabled:
            if staged is not None:
                t0, t1, meta = staged
                self.log.start("staging_start", metadata=meta, t=t0)
                self.log.end("staging_stop", metadata=meta, t=t1)
            if barrier is not None:
                barrier()  # the run's clock starts when every rank is ready to step
        self.log.end("init_stop")
        self.log.start("run_start")
        self.run_started = True

    def on_phase(self, phase: str, step: int) -> None:
        if phase == "data" and self.epoch_open is None:
            self.epoch_open = self._epoch_of(step)
            self.log.start("epoch_start", metadata={"epoch_num": self.epoch_open})
        elif phase == "eval":
            self.log.start("eval_start", metadata={"epoch_num": self._epoch_of(step)})

    def on_epoch_end(self, epoch: int) -> None:
        self._epoch_stop()

    def _epoch_stop(self) -> None:
        if self.epoch_open is not None:
            self.log.end("epoch_stop", metadata={"epoch_num": self.epoch_open})
            self.epoch_open = None

    def on_eval(self, record: dict) -> str | None:
        """Logs the quality metric; ends the run when it meets mlperf.target and
        mlperf.stop_at_target asks for it."""
        epoch, value = record["epoch"], record.get(self._metric)
        if isinstance(value, (int, float)):
            self.log.event(self.quality_key, float(value), metadata={"epoch_num": epoch})
        self.log.end("eval_stop", metadata={"epoch_num": epoch})
        hit = bool(self.settings.enabled) and target_mod.reached(value, self._op, self._goal)
        if hit and self.reached_at is None:
            self.reached_at = epoch
        if hit and self.settings.stop_at_target:
            return (f"mlperf: {self.settings.target} reached at step {record['step']} (epoch {epoch}); "
                    f"the run ends here (mlperf.stop_at_target)")
        return None

    # --- after the loop ---

    def run_stop(self, status: str, why: str = "") -> None:
        """The end of the attempt, once: success when the target was reached, else aborted."""
        if self.status is not None or not self.run_started:
            return
        self.status = status
        self._epoch_stop()
        self.log.end("run_stop", metadata={"status": status, **({"reason": why} if why else {})})

    def status_of(self, state) -> tuple[str, str]:
        """run_stop's status for a finished loop: success once an evaluation met mlperf.target."""
        if state.stopped_at is not None:
            return ABORTED, f"stopped by {state.first_signal or 'a signal'} at step {state.stopped_at}"
        if self.reached_at is not None:
            return SUCCESS, ""
        return ABORTED, "the target was not reached"

"""One run, one config: a YAML file with one section per component, typed and validated.

Each section is a dataclass that owns its defaults and its checks; errors name the full
key (``train.batch_size must be > 0``). ``--set a.b=c`` overrides reject unknown keys and
values of the wrong type, as nanoGPT's configurator does, without executing anything.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import UserError
from pipeline.rundir import RUN_FACTS


class ConfigError(UserError):
    pass


@dataclass
class DataConfig:
    dir: str = "data/synth"
    shuffle: bool = True
    # Stacks of batches (about 1 MiB each) tf.data keeps ready ahead of the step loop; -1 lets
    # tf.data's autotuner pick (measured slower on few cores: 0.31-0.46 M vs 0.57 M samples/s).
    prefetch: int = 2
    # A rank whose share fits this budget reads it into memory once; larger shares stream.
    cache_mb: int = 4096
    # Samples per contiguous read (rounded down to whole HDF5 chunks).
    read_block: int = 4096
    # Samples shuffled together: a window of blocks read, then visited in random order.
    shuffle_buffer: int = 65536
    # What the model sees of x: none (uint8 scaled to [0, 1], others as stored) | log1p
    # (counts, as CosmoFlow) | standardize (per channel, statistics from `pipeline data stats`).
    transform: str = "none"
    # Where an indexed dataset's files are now ("" = where they were indexed): a staged copy
    # on node-local disk is used without indexing again.
    root: str = ""

    def validate(self) -> None:
        _require(self.dir != "", "data.dir must not be empty")
        _require(self.transform in TRANSFORMS,
                 f"data.transform must be one of {', '.join(TRANSFORMS)}, got {self.transform!r}")
        _require(self.prefetch == -1 or self.prefetch >= 1, "data.prefetch must be -1 (auto) or >= 1")
        _require(self.cache_mb >= 0, "data.cache_mb must be >= 0 (0: always stream from the shards)")
        _require(self.read_block >= 1, "data.read_block must be >= 1")
        _require(self.shuffle_buffer >= 1, "data.shuffle_buffer must be >= 1")


@dataclass
class ModelConfig:
    # A built-in name, keras.applications.NAME, or your own builder as path/to/file.py:function
    # or package.module:function, called as function(input_shape, target_shape, num_classes, **args).
    name: str = "cnn"
    args: dict = field(default_factory=dict)  # keyword arguments for the builder

    def validate(self) -> None:
        from pipeline.train.models import APPLICATIONS_PREFIX, MODELS, known

        _require(known(self.name), f"model.name must be one of {sorted(MODELS)}, {APPLICATIONS_PREFIX}NAME "
                                   f"(e.g. {APPLICATIONS_PREFIX}MobileNetV2) or path/to/file.py:function or "
                                   f"package.module:function, got {self.name!r}")
        _require(all(isinstance(k, str) for k in self.args), "model.args keys must be strings")


@dataclass
class TrainConfig:
    batch_size: int = 64  # per rank
    epochs: int = 2
    max_steps: int = 0  # > 0: stop at this global step whatever the epochs
    seed: int = 42
    deterministic: bool = False
    optimizer: str = "adam"
    lr: float = 0.001  # per-rank base rate; scaled by the number of ranks
    scale_lr: bool = True
    warmup_steps: int = 100
    lr_schedule: str = "constant"  # after warm-up: constant | cosine | step
    lr_step_every: int = 0         # step schedule: multiply by lr_step_factor every this many steps
    lr_step_factor: float = 0.1
    # float32 | mixed_float16 (GPUs; loss scaling) | mixed_bfloat16 (CPUs with bf16 support)
    precision: str = "float32"
    jit_compile: bool = False      # XLA-compile the training step
    # Threads per rank for TensorFlow's intra-op pool; 0 picks the CPUs this rank owns.
    threads: int = 0
    # A rank with no finished call of steps for this long exits (code 76) after writing its
    # post-mortem: its peer probably died or hangs (docs/troubleshooting.md).
    step_timeout_s: float = 300.0
    # The same from the process's start until its first call of steps is done: imports,
    # hvd.init, restore, the first broadcast and the first step's tracing (code 76).
    startup_timeout_s: float = 900.0
    # After a stop signal, the ranks must end their call at the same step within this long; a
    # rank whose peer is gone writes its post-mortem and exits 77 instead of waiting. Below
    # SLURM's default KillWait (30 s) so the post-mortem is written before SIGKILL.
    stop_timeout_s: float = 20.0
    # Training steps per call of the compiled step function at most (like Keras's
    # steps_per_execution): the host's per-call cost is paid once for this many steps. Fewer
    # where steps are slow (a call lasts about 1 s at most); a call never runs past an
    # evaluation, a checkpoint, the end of an epoch or the last step (docs/training.md).
    steps_per_call: int = 32
    # Any Keras loss by name; cross-entropies take the model's output as logits unless
    # from_logits is false (a model ending in softmax or sigmoid).
    loss: str = "sparse_categorical_crossentropy"
    from_logits: bool = True
    # Validation metrics besides the loss (and accuracy, for class targets): Keras metric
    # names, or mean_iou (per-pixel class ids). Each is written as val_<name>.
    metrics: list = field(default_factory=list)

    def validate(self) -> None:
        _require(self.batch_size > 0, "train.batch_size must be > 0")
        _require(self.epochs > 0, "train.epochs must be > 0")
        _require(self.max_steps >= 0, "train.max_steps must be >= 0 (0 means: run all epochs)")
        _require(self.optimizer in ("adam", "sgd"), f"train.optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        _require(self.lr > 0, "train.lr must be > 0")
        _require(self.warmup_steps >= 0, "train.warmup_steps must be >= 0")
        _require(self.lr_schedule in ("constant", "cosine", "step"),
                 f"train.lr_schedule must be 'constant', 'cosine' or 'step', got {self.lr_schedule!r}")
        _require(self.lr_schedule != "step" or self.lr_step_every > 0,
                 "train.lr_step_every must be > 0 with train.lr_schedule: step")
        _require(0 < self.lr_step_factor <= 1, "train.lr_step_factor must be in (0, 1]")
        _require(self.precision in PRECISIONS,
                 f"train.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        _require(self.threads >= 0, "train.threads must be >= 0 (0 means: the CPUs this rank owns)")
        _require(self.step_timeout_s >= 0, "train.step_timeout_s must be >= 0 (0: no watchdog)")
        _require(self.startup_timeout_s >= 0, "train.startup_timeout_s must be >= 0 (0: no start-up watchdog)")
        _require(self.stop_timeout_s >= 0, "train.stop_timeout_s must be >= 0 (0: wait for the stop)")
        _require(self.steps_per_call >= 1, "train.steps_per_call must be >= 1")
        _require(self.loss != "", "train.loss must name a Keras loss, e.g. mse")
        _require(all(isinstance(m, str) and m for m in self.metrics),
                 "train.metrics must be a list of metric names, e.g. [mae]")
        _require(len(set(self.metrics)) == len(self.metrics), "train.metrics names a metric twice")


@dataclass
class CheckpointConfig:
    every_steps: int = 200
    keep: int = 3
    # "" or a val_<name> of metrics.jsonl: also checkpoint after each evaluation and keep the
    # best one besides the last `keep`. Losses and errors are minimised, accuracy and IoU
    # maximised; keep_best_mode (min | max) says otherwise.
    keep_best: str = ""
    keep_best_mode: str = ""

    def validate(self) -> None:
        _require(self.every_steps >= 0, "checkpoint.every_steps must be >= 0 (0: only at the end)")
        _require(self.keep >= 1, "checkpoint.keep must be >= 1")
        _require(self.keep_best == "" or self.keep_best.startswith("val_"),
                 f"checkpoint.keep_best must be '' or a val_<name> of metrics.jsonl, got {self.keep_best!r}")
        _require(self.keep_best_mode in ("", "min", "max"),
                 f"checkpoint.keep_best_mode must be '', 'min' or 'max', got {self.keep_best_mode!r}")


PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
TRANSFORMS = ("none", "log1p", "standardize")


@dataclass
class HorovodConfig:
    """Horovod's knobs, set as its environment before hvd.init (a value already in the
    environment wins, so a cluster's site settings are not overridden silently)."""
    compression: str = "none"          # none | fp16: gradients cast to float16 for the allreduce
    backward_passes_per_step: int = 1  # gradient accumulation: micro-batches per update
    fusion_threshold_mb: float = 0.0   # 0: Horovod's default (128 MiB)
    cycle_time_ms: float = 0.0         # 0: Horovod's default
    autotune: bool = False             # Horovod's Bayesian autotuner; its log: RUN/autotune.csv

    def validate(self) -> None:
        _require(self.compression in ("none", "fp16"),
                 f"horovod.compression must be 'none' or 'fp16', got {self.compression!r}")
        _require(self.backward_passes_per_step >= 1, "horovod.backward_passes_per_step must be >= 1")
        _require(self.fusion_threshold_mb >= 0, "horovod.fusion_threshold_mb must be >= 0 (0: Horovod's default)")
        _require(self.cycle_time_ms >= 0, "horovod.cycle_time_ms must be >= 0 (0: Horovod's default)")

    def environment(self, run_dir) -> dict[str, str]:
        env = {}
        if self.fusion_threshold_mb:
            env["HOROVOD_FUSION_THRESHOLD"] = str(int(self.fusion_threshold_mb * 2**20))
        if self.cycle_time_ms:
            env["HOROVOD_CYCLE_TIME"] = str(self.cycle_time_ms)
        if self.autotune:
            env["HOROVOD_AUTOTUNE"] = "1"
            env["HOROVOD_AUTOTUNE_LOG"] = str(Path(run_dir) / "autotune.csv")
        return env


@dataclass
class LogConfig:
    progress_every_s: float = 5.0
    timeline: bool = False  # a Horovod timeline in the run directory (timeline.json), for analyze
    tensorboard_every_steps: int = 10  # rank 0's TensorBoard scalars under RUN/tensorboard; 0: off

    def validate(self) -> None:
        _require(self.progress_every_s > 0, "log.progress_every_s must be > 0")
        _require(self.tensorboard_every_steps >= 0, "log.tensorboard_every_steps must be >= 0 (0: off)")


@dataclass
class DebugConfig:
    # A fault on purpose, e.g. rank=1,step=20,phase=data,kind=hang (pipeline/runtime/fault.py,
    # docs/troubleshooting.md); "" (the default): none.
    fault: str = ""

    def validate(self) -> None:
        from pipeline.runtime.fault import parse

        try:
            parse(self.fault)
        except UserError as e:
            raise ConfigError(str(e)) from None


@dataclass
class MLPerfConfig:
    """MLPerf HPC logging (pipeline/mlperf/log.py, docs/mlperf.md): rank 0 writes RUN/mlperf.log."""
    enabled: bool = False
    benchmark: str = ""          # submission_benchmark: cosmoflow | deepcam | oc20 | openfold
    division: str = "open"       # closed | open
    org: str = ""                # submission_org: who ran it
    platform: str = ""           # submission_platform; "": the host's processor (and GPUs)
    status: str = "research"     # submission_status: onprem | cloud | preview | research
    # The quality target, METRIC<=X or METRIC>=X over a val_<name> of metrics.jsonl; logged
    # as eval_error (<=) or eval_accuracy (>=), and what run_stop's status success means.
    target: str = ""
    stop_at_target: bool = False  # end the run at the first evaluation that reaches the target

    def validate(self) -> None:
        if not self.enabled:
            return
        _require(self.benchmark in MLPERF_BENCHMARKS,
                 f"mlperf.benchmark must be one of {', '.join(MLPERF_BENCHMARKS)}, got {self.benchmark!r}")
        _require(self.division in ("closed", "open"), f"mlperf.division must be 'closed' or 'open', got {self.division!r}")
        _require(self.status in ("onprem", "cloud", "preview", "research"),
                 f"mlperf.status must be one of onprem, cloud, preview, research, got {self.status!r}")
        _require(self.org.strip() != "", "mlperf.org must name who ran it (submission_org), e.g. my-lab")
        _require(self.target != "", "mlperf.target must be set, e.g. val_mae<=0.124")
        from pipeline.mlperf.log import target

        try:
            target(self.target)
        except UserError as e:
            raise ConfigError(str(e)) from None


MLPERF_BENCHMARKS = ("cosmoflow", "deepcam", "oc20", "openfold")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    horovod: HorovodConfig = field(default_factory=HorovodConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    mlperf: MLPerfConfig = field(default_factory=MLPerfConfig)

    def validate(self) -> "Config":
        for f in fields(self):
            getattr(self, f.name).validate()
        known = {"val_loss", "val_accuracy"} | {f"val_{m}" for m in self.train.metrics}
        _require(self.checkpoint.keep_best in known | {""},
                 f"checkpoint.keep_best {self.checkpoint.keep_best!r} is not written by this run "
                 f"(it writes {', '.join(sorted(known))}; add the metric to train.metrics)")
        if self.mlperf.enabled:
            from pipeline.mlperf.log import target

            metric = target(self.mlperf.target)[0]
            _require(metric in known, f"mlperf.target's {metric} is not written by this run "
                                      f"(it writes {', '.join(sorted(known))}; add the metric to train.metrics)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_type(key: str, value: Any, expected: type) -> Any:
    """Returns value as `expected`, or raises naming the key; ints are accepted for floats."""
    if expected is list and isinstance(value, (list, tuple)):
        return list(value)
    if expected is dict and isinstance(value, dict):
        return dict(value)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, str):
        # YAML 1.1 reads `1e-3` (no dot) as a string; accept any float literal for float keys.
        try:
            return float(value)
        except ValueError:
            pass
    if expected is not bool and isinstance(value, bool):
        raise ConfigError(f"{key} must be {expected.__name__}, got bool {value!r}")
    if not isinstance(value, expected):
        raise ConfigError(f"{key} must be {expected.__name__}, got {type(value).__name__} {value!r}")
    return value


def _section_types(section_cls) -> dict[str, type]:
    hints = {"int": int, "float": float, "bool": bool, "str": str, "list": list, "dict": dict}
    return {f.name: hints[f.type] for f in fields(section_cls)}


def from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    """Builds a Config from nested dicts, rejecting unknown sections, keys and types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    cfg = Config()
    sections = {f.name: f for f in fields(Config)}
    for name, values in raw.items():
        if name in RUN_FACTS:
            continue  # a run's config.json: the facts it recorded are not settings
        if name not in sections:
            raise ConfigError(f"{source}: unknown section {name!r} (known: {', '.join(sections)})")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {name!r} must be a mapping")
        section = getattr(cfg, name)
        types = _section_types(type(section))
        for key, value in values.items():
            full = f"{name}.{key}"
            if key not in types:
                raise ConfigError(f"{source}: unknown key {full} (known in {name}: {', '.join(types)})")
            setattr(section, key, _check_type(full, value, types[key]))
    return cfg


def apply_override(cfg: Config, assignment: str) -> None:
    """Applies one ``section.key=value``; the value is parsed as YAML and type-checked."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.batch_size=128")
    key, text = assignment.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if len(parts) < 2 or not hasattr(cfg, parts[0]) or not dataclasses.is_dataclass(getattr(cfg, parts[0])):
        raise ConfigError(f"--set {key}: unknown key (keys look like train.batch_size)")
    section = getattr(cfg, parts[0])
    types = _section_types(type(section))
    if parts[1] not in types:
        raise ConfigError(f"--set {key}: unknown key (known in {parts[0]}: {', '.join(types)})")
    expected = types[parts[1]]
    if len(parts) > 2:
        # One entry of a mapping key: --set model.args.filters=8
        if expected is not dict:
            raise ConfigError(f"--set {key}: {parts[0]}.{parts[1]} is not a mapping")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: cannot parse {text!r}") from None
        target = getattr(section, parts[1])
        for name in parts[2:-1]:
            target = target.setdefault(name, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--set {key}: {name} is not a mapping")
        target[parts[-1]] = value
        return
    if expected is str:
        value: Any = text  # a path or name stays as typed, even if it looks like a number
    else:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: cannot parse {text!r}") from None
    setattr(section, parts[1], _check_type(key, value, expected))


def load(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Reads the YAML file (or the defaults when path is None), applies overrides, validates."""
    raw: Any = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            raw = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{p}: not valid YAML{where}") from None
    cfg = from_dict(raw, source)
    for assignment in overrides:
        apply_override(cfg, assignment)
    return cfg.validate()


def dumps(cfg: Config, **facts: Any) -> str:
    """config.json: the sections, then the run's facts (rundir.RUN_FACTS), which load() skips."""
    unknown = set(facts) - set(RUN_FACTS)
    if unknown:
        raise ValueError(f"not run facts the config loader knows to skip: {sorted(unknown)}")
    return json.dumps({**cfg.to_dict(), **facts}, indent=2, sort_keys=False) + "\n"

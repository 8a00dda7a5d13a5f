"""One run, one config: a YAML file with one section per component, typed and validated.

Each section is a dataclass whose fields carry their type (a `Literal` lists the choices, once),
their default, their help and their bounds (`setting(...)`); one generic check writes every
message with the full key (`train.batch_size must be > 0`), and what a section checks beyond
that sits in its own `validate`. ``--set a.b=c`` overrides reject unknown keys and values of
the wrong type, as nanoGPT's configurator does, without executing anything. The CLI's flags
that mirror a key take their default and help from here (`flag_default`, `flag_help`).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline import faultspec, target as target_mod
from pipeline.errors import UserError
from pipeline.rundir import RUN_FACTS


class ConfigError(UserError):
    pass


def setting(default, help: str, *, gt: float | None = None, ge: float | None = None, le: float | None = None,
            zero: str = "", factory=None):
    """A config field: its default, one line of help, and its bounds (gt: >, ge: >=, le: <=).
    `zero` says what 0 means where 0 is allowed below the other values (`0: off`)."""
    meta = {"help": help, "gt": gt, "ge": ge, "le": le, "zero": zero}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# Built-in model names (pipeline/train/models.py holds their builders and checks that the two
# agree), and the other forms model.name takes.
BUILTIN_MODELS = ("cnn", "mlp", "resnet20", "cosmoflow", "segnet")
APPLICATIONS_PREFIX = "keras.applications."


def is_user_builder(name: str) -> bool:
    """path/to/file.py:function or package.module:function."""
    path, sep, func = name.rpartition(":")
    return bool(sep and path and func.isidentifier())


BUILTIN_OPTIMIZERS = ("sgd", "adam", "adamw", "lamb", "lars")


def known_model(name: str) -> bool:
    return name in BUILTIN_MODELS or is_user_builder(name) or \
        (name.startswith(APPLICATIONS_PREFIX) and len(name) > len(APPLICATIONS_PREFIX))


@dataclass
class DataConfig:
    dir: str = setting("data/synth", "the dataset: a directory with manifest.json (shards or an index)")
    shuffle: bool = setting(True, "shuffle the training order every epoch")
    # -1 lets tf.data's autotuner pick (measured slower on few cores: 0.31-0.46 M vs 0.57 M samples/s).
    prefetch: int = setting(2, "stacks of batches (about 1 MiB each) tf.data keeps ready ahead of the step "
                               "loop; -1: tf.data's autotuner")
    cache_mb: int = setting(4096, "a rank whose share fits this budget reads it into memory once; larger "
                                  "shares stream", ge=0, zero="always stream from the shards")
    device_cache_mb: int = setting(2048, "on a GPU rank, an in-memory share up to this size lives in GPU memory "
                                         "(each batch gathered there); larger stays in host memory", ge=0,
                                   zero="always in host memory")
    read_block: int = setting(4096, "samples per contiguous read (rounded down to whole HDF5 chunks)", ge=1)
    shuffle_buffer: int = setting(65536, "samples shuffled together: a window of blocks read, then visited in "
                                         "random order", ge=1)
    transform: Literal["none", "log1p", "standardize"] = setting(
        "none", "what the model sees of x: none (uint8 scaled to [0, 1], others as stored), log1p (counts, as "
                "CosmoFlow), standardize (per channel, statistics from pipeline data stats)")
    root: str = setting("", "where an indexed dataset's files are now ('': where they were indexed): a staged "
                            "copy on node-local disk is used without indexing again")
    stage_dir: str = setting("", "node-local directory the run first copies each host's files to, then reads them "
                                 "from: {host}, {rank} and $VARS (e.g. $SLURM_TMPDIR/{host}) are filled in per rank; "
                                 "'': read the files where they are")

    def validate(self) -> None:
        _require(self.dir != "", "data.dir must not be empty")
        _require(self.prefetch == -1 or self.prefetch >= 1, "data.prefetch must be -1 (auto) or >= 1")


@dataclass
class ModelConfig:
    name: str = setting("cnn", f"a built-in ({', '.join(BUILTIN_MODELS)}), {APPLICATIONS_PREFIX}NAME, or "
                               "your own builder as path/to/file.py:function or package.module:function, called "
                               "as function(input_shape, target_shape, num_classes, **args)")
    args: dict = setting(None, "keyword arguments for the builder", factory=dict)

    def validate(self) -> None:
        _require(known_model(self.name), f"model.name must be one of {sorted(BUILTIN_MODELS)}, "
                                         f"{APPLICATIONS_PREFIX}NAME (e.g. {APPLICATIONS_PREFIX}MobileNetV2) or "
                                         f"path/to/file.py:function or package.module:function, got {self.name!r}")
        _require(all(isinstance(k, str) for k in self.args), "model.args keys must be strings")


@dataclass
class TrainConfig:
    batch_size: int = setting(64, "samples per rank per micro-batch", gt=0)
    epochs: int = setting(2, "passes over the training split", gt=0)
    max_steps: int = setting(0, "> 0: stop at this global step whatever the epochs", ge=0,
                             zero="run all epochs")
    seed: int = setting(42, "seeds the weights and the batch order")
    deterministic: bool = setting(False, "TensorFlow's op determinism")
    optimizer: str = setting("adam", f"{', '.join(BUILTIN_OPTIMIZERS)}, or your own as path/to/file.py:function "
                                     "or package.module:function, called as function(learning_rate, train) "
                                     "(docs/training.md)")
    momentum: float = setting(0.9, "sgd's and lars's momentum", ge=0, le=1)
    nesterov: bool = setting(False, "sgd: Nesterov momentum")
    weight_decay: float = setting(0.0, "decoupled weight decay (adamw, lamb and lars as their papers define it; "
                                       "sgd and adam: Keras's decoupled decay, w -= lr * weight_decay * w)", ge=0)
    betas: list[float] = setting(None, "adam, adamw and lamb: [beta_1, beta_2]", factory=lambda: [0.9, 0.999])
    epsilon: float = setting(1e-7, "adam, adamw and lamb: the denominator's epsilon", gt=0)
    lars_trust: float = setting(0.001, "lars: the trust coefficient eta", gt=0)
    clip_global_norm: float = setting(0.0, "clip the averaged gradient (after loss unscaling and the micro-batch "
                                           "average, the same on every rank) to this global norm", ge=0,
                                      zero="no clipping")
    lr: float = setting(0.001, "per-rank base rate; scaled by the number of ranks (scale_lr)", gt=0)
    scale_lr: bool = setting(True, "multiply lr by the number of ranks")
    lr_scaling: Literal["", "linear", "sqrt", "none"] = setting(
        "", "the peak rate: lr x (global batch / lr_base_batch), or its square root, or lr itself; '' (the "
            "default): scale_lr decides")
    lr_base_batch: int = setting(0, "lr_scaling: the global batch lr is given for", ge=0,
                                 zero="one rank's batch (x backward passes)")
    warmup_steps: int = setting(100, "steps of linear warm-up from lr to the peak rate", ge=0)
    warmup_epochs: float = setting(0.0, "warm-up in epochs instead (MLPerf's opt_learning_rate_warmup_epochs); "
                                        "set it or warmup_steps", ge=0, zero="use warmup_steps")
    warmup_factor: float = setting(0.0, "the peak rate as lr x this (MLPerf's warm-up factor), whatever "
                                        "scale_lr and lr_scaling say", ge=0, zero="from lr_scaling or scale_lr")
    lr_schedule: Literal["constant", "cosine", "step", "multistep", "polynomial"] = setting(
        "constant", "after warm-up")
    lr_step_every: int = setting(0, "step schedule: multiply by lr_step_factor every this many steps")
    lr_step_factor: float = setting(0.1, "step schedule's factor", gt=0, le=1)
    lr_boundaries: list[float] = setting(None, "multistep: where the rate decays, in lr_boundary_unit",
                                         factory=list)
    lr_boundary_unit: Literal["epochs", "steps"] = setting("epochs", "multistep: the unit of lr_boundaries")
    lr_decay_factors: list[float] = setting(None, "multistep: the multiplier of the peak rate from each boundary "
                                                  "on (CosmoFlow's form)", factory=list)
    lr_decay_gamma: float = setting(0.0, "multistep: the rate times gamma once more at each boundary (DeepCAM's "
                                         "form)", ge=0, zero="use lr_decay_factors")
    lr_power: float = setting(1.0, "polynomial: the power of the decay (1: linear)", gt=0)
    lr_end: float = setting(0.0, "polynomial: the rate at the last step", ge=0)
    precision: Literal["float32", "mixed_float16", "mixed_bfloat16"] = setting(
        "float32", "float32, mixed_float16 (GPUs; loss scaling) or mixed_bfloat16 (CPUs with bf16 support)")
    jit_compile: bool = setting(False, "XLA-compile the training step")
    threads: int = setting(0, "threads per rank for TensorFlow's intra-op pool", ge=0,
                           zero="the CPUs this rank owns")
    step_timeout_s: float = setting(300.0, "a rank with no finished call of steps for this long writes its "
                                           "post-mortem and exits 76: its peer probably died or hangs "
                                           "(docs/troubleshooting.md)", ge=0, zero="no watchdog")
    startup_timeout_s: float = setting(900.0, "the same from the process's start until its first call of steps "
                                              "is done: imports, hvd.init, restore, the first broadcast and the "
                                              "first step's tracing", ge=0, zero="no start-up watchdog")
    # Below SLURM's default KillWait (30 s) so the post-mortem is written before SIGKILL.
    stop_timeout_s: float = setting(20.0, "after a stop signal, the ranks must end their call at the same step "
                                          "within this long; else the rank writes its post-mortem and exits 77",
                                    ge=0, zero="wait for the stop")
    steps_per_call: int = setting(32, "training steps per call of the compiled step at most (like Keras's "
                                      "steps_per_execution); fewer where steps are slow (a call lasts about 1 s "
                                      "at most), never past an evaluation, a checkpoint, an epoch's end or the "
                                      "last step (docs/training.md)", ge=1)
    loss: str = setting("sparse_categorical_crossentropy", "any Keras loss by name")
    from_logits: bool = setting(True, "cross-entropies take the model's output as logits (false: a model "
                                      "ending in softmax or sigmoid)")
    metrics: list[str] = setting(None, "validation metrics besides the loss (and accuracy, for class targets): "
                                       "Keras metric names, or mean_iou; each is written as val_<name>",
                                 factory=list)

    def validate(self) -> None:
        _require(self.optimizer in BUILTIN_OPTIMIZERS or is_user_builder(self.optimizer),
                 f"train.optimizer must be one of {', '.join(BUILTIN_OPTIMIZERS)} or path/to/file.py:function or "
                 f"package.module:function, got {self.optimizer!r}")
        _require(len(self.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas),
                 f"train.betas must be [beta_1, beta_2], each in [0, 1), got {self.betas!r}")
        self.betas = [float(b) for b in self.betas]
        _require(not (self.warmup_epochs > 0 and self.warmup_steps not in (0, 100)),
                 "train.warmup_epochs and train.warmup_steps are both set: give one")
        if self.lr_schedule == "multistep":
            b = self.lr_boundaries
            _require(bool(b) and all(isinstance(x, (int, float)) and x > 0 for x in b) and list(b) == sorted(set(b)),
                     f"train.lr_boundaries must be increasing numbers > 0 with train.lr_schedule: multistep, got {b!r}")
            _require((len(self.lr_decay_factors) == len(b)) != (self.lr_decay_gamma > 0),
                     f"train.lr_schedule: multistep needs train.lr_decay_factors (one per boundary: {len(b)}) or "
                     f"train.lr_decay_gamma, not both")
            _require(all(isinstance(f, (int, float)) and f > 0 for f in self.lr_decay_factors),
                     "train.lr_decay_factors must be numbers > 0")
        self.lr_boundaries = [float(x) for x in self.lr_boundaries]
        self.lr_decay_factors = [float(x) for x in self.lr_decay_factors]
        _require(self.lr_schedule != "step" or self.lr_step_every > 0,
                 "train.lr_step_every must be > 0 with train.lr_schedule: step")
        _require(self.loss != "", "train.loss must name a Keras loss, e.g. mse")
        _require(all(isinstance(m, str) and m for m in self.metrics),
                 "train.metrics must be a list of metric names, e.g. [mae]")
        _require(len(set(self.metrics)) == len(self.metrics), "train.metrics names a metric twice")


@dataclass
class CheckpointConfig:
    every_steps: int = setting(200, "rank 0 saves every this many steps (and at the last)", ge=0,
                               zero="only at the end")
    keep: int = setting(3, "complete checkpoints kept", ge=1)
    keep_best: str = setting("", "'' or a val_<name> of metrics.jsonl: also checkpoint after each evaluation and "
                                 "keep the best one besides the last keep")
    keep_best_mode: Literal["", "min", "max"] = setting(
        "", "losses and errors are minimised, accuracy and IoU maximised ('': by the name); min or max says "
            "otherwise")

    def validate(self) -> None:
        _require(self.keep_best == "" or self.keep_best.startswith("val_"),
                 f"checkpoint.keep_best must be '' or a val_<name> of metrics.jsonl, got {self.keep_best!r}")


@dataclass
class HorovodConfig:
    """Horovod's knobs, set as its environment before hvd.init (a value already in the
    environment wins, so a cluster's site settings are not overridden silently)."""
    compression: Literal["none", "fp16"] = setting("none", "fp16: gradients cast to float16 for the allreduce")
    backward_passes_per_step: int = setting(1, "gradient accumulation: micro-batches per update", ge=1)
    fusion_threshold_mb: float = setting(0.0, "Horovod's fusion buffer", ge=0, zero="Horovod's default")
    cycle_time_ms: float = setting(0.0, "Horovod's cycle time", ge=0, zero="Horovod's default")
    autotune: bool = setting(False, "Horovod's Bayesian autotuner; its log: RUN/autotune.csv")

    def validate(self) -> None:
        pass

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
    progress_every_s: float = setting(5.0, "rank 0's progress line at most this often", gt=0)
    timeline: bool = setting(False, "a Horovod timeline in the run directory (timeline.json), for analyze")
    tensorboard_every_steps: int = setting(10, "rank 0's TensorBoard scalars under RUN/tensorboard", ge=0,
                                           zero="off")
    profile_steps: str = setting("", "A-B: a TensorFlow profiler trace of steps A..B on every rank, in "
                                     "RUN/profile/rank-R (TensorBoard's profile tab); '': none")

    def validate(self) -> None:
        profile_window(self.profile_steps)


def profile_window(text: str) -> tuple[int, int] | None:
    """log.profile_steps as (A, B), steps A..B inclusive, 1 <= A <= B; None for ''."""
    if not text:
        return None
    a, sep, b = str(text).partition("-")
    try:
        first, last = int(a), int(b)
    except ValueError:
        first = last = 0
    if not sep or not 1 <= first <= last:
        raise ConfigError(f"log.profile_steps must be A-B with 1 <= A <= B (steps A..B), got {text!r}")
    return first, last


@dataclass
class DebugConfig:
    fault: str = setting("", "a fault on purpose, e.g. rank=1,step=20,phase=data,kind=hang "
                             "(docs/troubleshooting.md); '': none")

    def validate(self) -> None:
        try:
            faultspec.parse(self.fault)
        except UserError as e:
            raise ConfigError(str(e)) from None


@dataclass
class MLPerfConfig:
    """MLPerf HPC logging (pipeline/mlperf/log.py, docs/mlperf.md): rank 0 writes RUN/mlperf.log."""
    enabled: bool = setting(False, "write RUN/mlperf.log")
    benchmark: Literal["", "cosmoflow", "deepcam", "oc20", "openfold"] = setting("", "submission_benchmark")
    division: Literal["open", "closed"] = setting("open", "submission_division")
    org: str = setting("", "submission_org: who ran it")
    platform: str = setting("", "submission_platform; '': the host's processor (and GPUs)")
    status: Literal["research", "onprem", "cloud", "preview"] = setting("research", "submission_status")
    target: str = setting("", "the quality target, METRIC<=X or METRIC>=X over a val_<name> of metrics.jsonl; "
                              "logged as eval_error (<=) or eval_accuracy (>=), and what run_stop's status "
                              "success means")
    stop_at_target: bool = setting(False, "end the run at the first evaluation that reaches the target")

    def validate(self) -> None:
        if not self.enabled:
            return
        _require(self.benchmark != "", f"mlperf.benchmark must be one of {', '.join(choices(MLPerfConfig, 'benchmark')[1:])}, got ''")
        _require(self.org.strip() != "", "mlperf.org must name who ran it (submission_org), e.g. my-lab")
        _require(self.target != "", "mlperf.target must be set, e.g. val_mae<=0.124")
        try:
            target_mod.parse_mlperf(self.target)
        except UserError as e:
            raise ConfigError(str(e)) from None


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
            section = getattr(self, f.name)
            check_fields(f.name, section)
            section.validate()
        known = {"val_loss", "val_accuracy"} | {f"val_{m}" for m in self.train.metrics}
        _require(self.checkpoint.keep_best in known | {""},
                 f"checkpoint.keep_best {self.checkpoint.keep_best!r} is not written by this run "
                 f"(it writes {', '.join(sorted(known))}; add the metric to train.metrics)")
        if self.mlperf.enabled:
            metric = target_mod.parse_mlperf(self.mlperf.target)[0]
            _require(metric in known, f"mlperf.target's {metric} is not written by this run "
                                      f"(it writes {', '.join(sorted(known))}; add the metric to train.metrics)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- the generic parts: types, choices and bounds from the fields ---

def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def hints(section_cls) -> dict[str, Any]:
    """Each field's type, resolved (the annotations are strings under `from __future__`)."""
    return typing.get_type_hints(section_cls)


def choices(section_cls, key: str) -> tuple | None:
    """A Literal field's allowed values, in the order written."""
    hint = hints(section_cls)[key]
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def check_fields(section: str, obj) -> None:
    """Choices and bounds of every field of one section; the message names the full key."""
    for f in fields(obj):
        key, value, m = f"{section}.{f.name}", getattr(obj, f.name), f.metadata
        allowed = choices(type(obj), f.name)
        if allowed is not None:
            _require(value in allowed, f"{key} must be one of {', '.join(repr(a) if a == '' else a for a in allowed)}"
                                       f", got {value!r}")
        if not m or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        zero = f" (0: {m['zero']})" if m["zero"] else ""
        if m["gt"] is not None and m["le"] is not None:
            _require(m["gt"] < value <= m["le"], f"{key} must be in ({_num(m['gt'])}, {_num(m['le'])}]")
        elif m["gt"] is not None:
            _require(value > m["gt"], f"{key} must be > {_num(m['gt'])}{zero}")
        if m["ge"] is not None:
            _require(value >= m["ge"], f"{key} must be >= {_num(m['ge'])}{zero}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _base_type(hint) -> type:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return type(typing.get_args(hint)[0])
    return origin or hint


def _coerce(key: str, value: Any, hint) -> Any:
    """Returns value as the field's type, or raises naming the key; ints are accepted for floats."""
    expected = _base_type(hint)
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


def _section(cfg: Config, name: str, where: str):
    """The section called `name`, or a ConfigError naming what is known."""
    if name not in {f.name for f in fields(Config)}:
        raise ConfigError(f"{where}unknown section {name!r} (known: {', '.join(f.name for f in fields(Config))})")
    return getattr(cfg, name)


def from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    """Builds a Config from nested dicts, rejecting unknown sections, keys and types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    cfg = Config()
    for name, values in raw.items():
        if name in RUN_FACTS:
            continue  # a run's config.json: the facts it recorded are not settings
        section = _section(cfg, name, f"{source}: ")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {name!r} must be a mapping")
        types = hints(type(section))
        for key, value in values.items():
            full = f"{name}.{key}"
            if key not in types:
                raise ConfigError(f"{source}: unknown key {full} (known in {name}: {', '.join(types)})")
            setattr(section, key, _coerce(full, value, types[key]))
    return cfg


def _parse_value(key: str, text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}: cannot parse {text!r}") from None


def apply_override(cfg: Config, assignment: str) -> None:
    """Applies one ``section.key=value``; the value is parsed as YAML and type-checked."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.batch_size=128")
    key, text = assignment.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if len(parts) < 2 or parts[0] not in {f.name for f in fields(Config)}:
        raise ConfigError(f"--set {key}: unknown key (keys look like train.batch_size)")
    section = getattr(cfg, parts[0])
    types = hints(type(section))
    if parts[1] not in types:
        raise ConfigError(f"--set {key}: unknown key (known in {parts[0]}: {', '.join(types)})")
    expected = _base_type(types[parts[1]])
    if len(parts) > 2:
        # One entry of a mapping key: --set model.args.filters=8
        if expected is not dict:
            raise ConfigError(f"--set {key}: {parts[0]}.{parts[1]} is not a mapping")
        value = _parse_value(key, text)
        target = getattr(section, parts[1])
        for name in parts[2:-1]:
            target = target.setdefault(name, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--set {key}: {name} is not a mapping")
        target[parts[-1]] = value
        return
    # A path or name stays as typed, even if it looks like a number.
    value = text if expected is str else _parse_value(key, text)
    setattr(section, parts[1], _coerce(key, value, types[parts[1]]))


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


# --- what the CLI takes from here ---

def _field(key: str):
    section, _, name = key.partition(".")
    cls = type(getattr(Config(), section))
    return cls, {f.name: f for f in fields(cls)}[name]


def flag_default(key: str):
    """The default of `section.key`, for a flag that mirrors it."""
    section, _, name = key.partition(".")
    return getattr(getattr(Config(), section), name)


def flag_help(key: str, extra: str = "") -> str:
    """The help of `section.key` with its default (and choices), for a flag that mirrors it;
    `%` doubled for argparse."""
    cls, f = _field(key)
    allowed = choices(cls, f.name)
    text = f.metadata["help"] + (f"; {extra}" if extra else "")
    text += f" (as {key}; default {flag_default(key)}" + (f"; one of {', '.join(map(str, allowed))}" if allowed else "") + ")"
    return text.replace("%", "%%")


def flag(parser, name: str, key: str) -> None:
    """A command-line flag that mirrors a config key: its type, default and help are the key's."""
    default = flag_default(key)
    parser.add_argument(name, type=type(default), default=default, help=flag_help(key))

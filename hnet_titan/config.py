"""Job configuration: typed dataclasses filled from defaults, then a TOML file, then the command line.

Precedence is CLI > TOML > defaults. ``--job.config_file PATH`` names the TOML file; its tables are
the sections of :class:`JobConfig` and its keys their fields::

    [training]
    steps = 1000
    seq_len = 2048

    [optimizer]
    lr_multipliers = [4.0, 2.0, 1.0]

Command-line overrides take the forms

* ``--section.field value`` and ``--section.field=value`` (use ``=`` for a value starting with ``--``;
  dashes in keys read as underscores);
* booleans: ``--section.flag`` (true), ``--section.no_flag`` (false), or ``--section.flag true|false``;
* lists: comma separated, ``--data.sources a.txt,b/``; ``--data.sources ""`` is the empty list.

Values are converted to each field's declared type; a ``Literal`` annotation lists a field's valid
choices. Every mistake a user can make raises :class:`ConfigError`, naming the key and what is valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Union

import torch

from hnet.ops import mamba_graphs

# The dtype names configs and command lines accept.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration mistake the user can fix; the message names the key and what is valid."""


@dataclass
class Job:
    config_file: str = ""  # TOML file to load before CLI overrides
    dump_folder: str = "./outputs"  # root for checkpoints, logs and metrics
    description: str = ""  # free text recorded with the run
    print_config: bool = False  # print the resolved config as TOML


@dataclass
class Model:
    flavor: str = "debug"  # a named flavor of hnet.config
    config_path: str = ""  # reference-format JSON; overrides flavor when set
    ssd_backend: Literal["auto", "torch", "triton"] = "auto"  # Mamba-2 SSD scan kernels
    conv_backend: Literal["auto", "torch", "cuda"] = "auto"  # causal depthwise conv kernels
    # attention kernels
    attn_backend: Literal["auto", "sdpa", "varlen", "flash_attn", "flash_attn_4", "flex"] = "auto"
    norm_backend: Literal["auto", "torch", "triton"] = "auto"  # RMSNorm kernels
    # On CUDA, Mamba2 layers of at most this many positions replay their forward and backward from CUDA
    # graphs (hnet.ops.mamba_graphs): inner stages, where the host would set the pace; 0 = never
    mamba_graph_max_positions: int = mamba_graphs.DEFAULT_MAX_POSITIONS


@dataclass
class Training:
    local_batch_size: int = 8  # rows per micro-batch
    seq_len: int = 1024  # bytes per row
    # Rows per optimizer step over all ranks; -1 = local_batch_size x data-parallel degree.
    # Gradient accumulation fills the rest.
    global_batch_size: int = -1
    steps: int = 200  # optimizer steps to train
    max_norm: float = 1.0  # gradient-norm clip; <= 0 disables
    seed: int = 0  # base random seed
    deterministic: bool = False  # deterministic algorithms (slower)
    # fp32 matmuls on CUDA (residual_proj; all of an fp32 model) on TF32 tensor cores; false: full fp32
    tf32: bool = True
    mixed_precision_param: Literal["float32", "bfloat16"] = "float32"  # compute dtype of parameters
    mixed_precision_reduce: Literal["float32", "bfloat16"] = "float32"  # gradient reduction dtype
    gc_freq: int = 50  # run Python GC every N steps


@dataclass
class Data:
    # Files, directories or globs; `hf:NAME` for a Hugging Face dataset;
    # empty = the Python standard library .py files.
    sources: list[str] = field(default_factory=list)
    text_field: str = "text"  # jsonl field / parquet column holding the text
    missing_field: Literal["skip", "error"] = "skip"  # what to do with records lacking text_field
    add_eos: bool = True  # append an end-of-sequence byte to each document
    num_workers: int = 0  # DataLoader worker processes
    val_fraction: float = 0.05  # held-out fraction by path hash when validation.sources is empty
    shuffle_files: bool = True  # shuffle file order each epoch


@dataclass
class Optimizer:
    name: str = "AdamW"  # optimizer class
    lr: float = 3e-3  # peak learning rate
    beta1: float = 0.9  # first-moment decay
    beta2: float = 0.95  # second-moment decay
    eps: float = 1e-8  # denominator epsilon
    weight_decay: float = 0.1  # decoupled weight decay
    implementation: Literal["auto", "fused", "foreach", "for-loop"] = "auto"  # torch kernel path
    # Learning-rate multiplier per hierarchy stage, outer first; "auto" derives them from the model.
    lr_multipliers: Literal["auto"] | list[float] = "auto"
    # Exempt from weight decay: parameters with a dotted name component matching one of these
    # fnmatch patterns (norm weights, biases incl. dt_bias, Mamba A_log and D, pad_dimension).
    no_weight_decay: list[str] = field(
        default_factory=lambda: ["*norm*", "*bias", "A_log", "D", "pad_dimension"]
    )


@dataclass
class LRScheduler:
    name: Literal["wsd", "cosine", "constant"] = "wsd"  # schedule after warmup
    warmup_fraction: float = 0.1  # share of training.steps spent warming up
    warmup_steps: int = -1  # >= 0 overrides warmup_fraction
    decay_fraction: float = 0.2  # share of training.steps spent decaying (wsd)
    decay_type: Literal["linear", "cosine", "sqrt", "inverse_sqrt"] = "inverse_sqrt"  # wsd decay shape
    min_lr_factor: float = 0.0  # final lr as a fraction of the peak


@dataclass
class Loss:
    ratio_targets: list[float] = field(default_factory=lambda: [6.0])  # target N per stage, outer first
    ratio_weight: float = 0.03  # alpha, weight of the ratio loss


@dataclass
class Checkpoint:
    enable: bool = False  # save and resume checkpoints
    folder: str = "checkpoint"  # under job.dump_folder
    interval: int = 500  # steps between saves
    async_mode: Literal["disabled", "async"] = "disabled"  # save in the background
    keep_latest_k: int = 0  # checkpoints to keep; 0 = keep all
    load_step: int = -1  # step to resume from; -1 = newest
    exclude_from_loading: list[str] = field(default_factory=list)  # state keys not to restore
    initial_load_path: str = ""  # DCP step folder whose model starts a run with no checkpoint of its own (also with enable off)
    last_save_model_only: bool = False  # final save holds only model weights
    export_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # dtype of the last-step model-only export (seed checkpoints stay float32)
    create_seed_checkpoint: bool = False  # write step-0 weights and exit


@dataclass
class Parallelism:
    data_parallel_shard_degree: int = -1  # FSDP shard group size; -1 = all remaining ranks
    data_parallel_replicate_degree: int = 1  # replica groups (HSDP / DDP)
    dp_mode: Literal["fsdp", "ddp"] = "fsdp"  # data-parallel wrapper
    # FSDP memory/speed trade; default: the root keeps its parameters, inner units reshard if sharded over > 1 rank
    fsdp_reshard_after_forward: Literal["default", "always", "never"] = "default"
    timeout_s: int = 600  # collective timeout: a rank waiting longer on the others fails


@dataclass
class ActivationCheckpoint:
    mode: Literal["none", "full", "every_n"] = "none"  # recompute activations in backward
    every_n: int = 2  # checkpoint every n-th block in every_n mode
    # Overrides mode per hierarchy stage, outer first; empty = mode everywhere.
    per_stage: list[Literal["none", "full", "every_n"]] = field(default_factory=list)
    # Networks of each stage that activation checkpointing applies to.
    networks: list[Literal["encoder", "main_network", "decoder"]] = field(
        default_factory=lambda: ["encoder", "main_network", "decoder"]
    )
    # Checkpoint a block's call only when its input is longer than this many times its network's
    # length at the target compression (loss.ratio_targets, local_batch_size x seq_len bytes); 0 = every
    # call. Inner lengths follow the router: an untrained one can keep several times its target, so
    # this spends recompute only on those batches (no recompute at the target, no out-of-memory before).
    when_longer_than: float = 0.0


@dataclass
class Compile:
    enable: bool = False  # torch.compile the model blocks
    dynamic: bool = True  # a size that changes becomes symbolic (lengths vary per batch); false: compile each anew


@dataclass
class Metrics:
    log_freq: int = 10  # steps between metric logs
    enable_tensorboard: bool = True  # write TensorBoard events
    save_jsonl: bool = True  # append metrics to a jsonl file
    enable_wandb: bool = False  # log to Weights & Biases
    peak_tflops: float = 0.0  # device peak for MFU; 0 = look up the device
    rank0_only: bool = True  # only rank 0 logs


@dataclass
class Profiling:
    enable: bool = False  # torch.profiler Chrome traces of chosen steps (hnet_titan.profiling)
    folder: str = "profile_traces"  # under job.dump_folder: iteration_{step}/rank{rank}_trace.json.gz
    freq: int = 100  # a window ends at every multiple of freq steps
    warmup: int = 2  # steps profiled before each window's recorded ones and dropped
    active: int = 1  # steps recorded per window
    record_shapes: bool = False  # operator input shapes in the trace
    with_stack: bool = False  # Python stacks in the trace (large)


@dataclass
class Validation:
    enable: bool = True  # run validation during training
    freq: int = 100  # steps between validations
    steps: int = 8  # batches per validation
    sources: list[str] = field(default_factory=list)  # held-out data; empty = data.val_fraction split


@dataclass
class FaultTolerance:
    enable: bool = False  # torchft replica-level fault tolerance
    replica_id: int = 0  # this replica group's id
    group_size: int = 1  # number of replica groups
    min_replica_size: int = 1  # replicas needed to make progress
    lighthouse: str = ""  # lighthouse address; empty = env TORCHFT_LIGHTHOUSE
    process_group: Literal["gloo", "nccl"] = "gloo"  # backend for cross-replica reduction
    process_group_timeout_ms: int = 10000  # collective timeout
    quorum_timeout_s: int = 60  # quorum wait timeout
    heartbeat_timeout_ms: int = 5000  # lighthouse heartbeat timeout


# Simple bounds, checked by JobConfig.validate(): key -> rule in _RULES.
_RULES = {
    ">= -1": lambda v: v >= -1,
    ">= 0": lambda v: v >= 0,
    ">= 1": lambda v: v >= 1,
    "-1 or >= 1": lambda v: v == -1 or v >= 1,
    "> 0": lambda v: v > 0,
    "in [0, 1]": lambda v: 0 <= v <= 1,
    "in [0, 1)": lambda v: 0 <= v < 1,
}
_BOUNDS = {
    "model.mamba_graph_max_positions": ">= 0",
    "training.local_batch_size": ">= 1",
    "training.seq_len": ">= 1",
    "training.global_batch_size": "-1 or >= 1",
    "training.steps": ">= 1",
    "training.gc_freq": ">= 1",
    "data.num_workers": ">= 0",
    "data.val_fraction": "in [0, 1)",
    "optimizer.lr": "> 0",
    "optimizer.beta1": "in [0, 1)",
    "optimizer.beta2": "in [0, 1)",
    "optimizer.eps": "> 0",
    "optimizer.weight_decay": ">= 0",
    "lr_scheduler.warmup_fraction": "in [0, 1]",
    "lr_scheduler.warmup_steps": ">= -1",
    "lr_scheduler.decay_fraction": "in [0, 1]",
    "lr_scheduler.min_lr_factor": "in [0, 1]",
    "loss.ratio_weight": ">= 0",
    "checkpoint.interval": ">= 1",
    "checkpoint.keep_latest_k": ">= 0",
    "checkpoint.load_step": ">= -1",
    "parallelism.data_parallel_shard_degree": "-1 or >= 1",
    "parallelism.data_parallel_replicate_degree": ">= 1",
    "parallelism.timeout_s": ">= 1",
    "activation_checkpoint.every_n": ">= 1",
    "activation_checkpoint.when_longer_than": ">= 0",
    "metrics.log_freq": ">= 1",
    "metrics.peak_tflops": ">= 0",
    "profiling.freq": ">= 1",
    "profiling.warmup": ">= 0",
    "profiling.active": ">= 1",
    "validation.freq": ">= 1",
    "validation.steps": ">= 1",
    "fault_tolerance.replica_id": ">= 0",
    "fault_tolerance.group_size": ">= 1",
    "fault_tolerance.min_replica_size": ">= 1",
    "fault_tolerance.process_group_timeout_ms": ">= 1",
    "fault_tolerance.quorum_timeout_s": ">= 1",
    "fault_tolerance.heartbeat_timeout_ms": ">= 1",
}


@dataclass
class JobConfig:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    training: Training = field(default_factory=Training)
    data: Data = field(default_factory=Data)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    loss: Loss = field(default_factory=Loss)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    parallelism: Parallelism = field(default_factory=Parallelism)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    metrics: Metrics = field(default_factory=Metrics)
    profiling: Profiling = field(default_factory=Profiling)
    validation: Validation = field(default_factory=Validation)
    fault_tolerance: FaultTolerance = field(default_factory=FaultTolerance)

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> JobConfig:
        """Defaults, then the TOML named by --job.config_file, then the other CLI overrides."""
        overrides = _parse_cli(sys.argv[1:] if argv is None else argv)
        cfg = cls()
        path = dict(overrides).get("job.config_file", "")
        if path:
            cfg._update(_load_toml_file(path))
        for key, value in overrides:
            cfg._set(key, value)
        cfg.validate()
        return cfg

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobConfig:
        """Defaults overridden by a {section: {field: value}} mapping, as TOML parses to."""
        cfg = cls()
        cfg._update(data)
        cfg.validate()
        return cfg

    @classmethod
    def from_toml_string(cls, text: str) -> JobConfig:
        return cls.from_dict(_parse_toml(text, "<string>"))

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The resolved config as TOML that from_toml_string reads back to an equal config."""
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            lines += [f"{name} = {_toml_value(value)}" for name, value in values.items()]
            lines.append("")
        return "\n".join(lines)

    def validate(self) -> None:
        """Check types, choices and cross-field rules; model-dependent checks live with the model."""
        for section, hints in _schema().items():
            for name, tp in hints.items():
                key = f"{section}.{name}"
                _coerce(key, tp, self._get(key))
        for key, rule in _BOUNDS.items():
            value = self._get(key)
            if not _RULES[rule](value):
                raise ConfigError(f"{key} must be {rule}, got {value!r}")

        t, sched = self.training, self.lr_scheduler
        if t.global_batch_size != -1 and t.global_batch_size % t.local_batch_size:
            raise ConfigError(
                f"training.global_batch_size ({t.global_batch_size}) must be a multiple of "
                f"training.local_batch_size ({t.local_batch_size})"
            )
        if sched.warmup_steps > t.steps:
            raise ConfigError(
                f"lr_scheduler.warmup_steps ({sched.warmup_steps}) exceeds training.steps ({t.steps})"
            )
        warmup = sched.warmup_steps / t.steps if sched.warmup_steps >= 0 else sched.warmup_fraction
        if sched.name == "wsd" and warmup + sched.decay_fraction > 1:
            raise ConfigError(
                f"lr_scheduler: warmup ({warmup:g} of training.steps) + decay_fraction "
                f"({sched.decay_fraction:g}) must be <= 1"
            )
        mults = self.optimizer.lr_multipliers
        if mults != "auto" and (not mults or any(not m > 0 for m in mults)):
            raise ConfigError(
                "optimizer.lr_multipliers must be 'auto' or a non-empty list of positive floats, "
                f"got {mults!r}"
            )
        if self.model.attn_backend == "flex" and self.compile.enable:
            raise ConfigError(
                "model.attn_backend 'flex' cannot run inside compiled blocks: with lengths that change every "
                "batch Inductor fails on the block mask's symbolic size (torch 2.11, docs/performance.md change "
                "10); use attn_backend 'auto' or 'varlen', or set compile.enable false"
            )
        targets = self.loss.ratio_targets
        if not targets or any(not n >= 1 for n in targets):
            raise ConfigError(f"loss.ratio_targets must be a non-empty list of values >= 1, got {targets!r}")
        prof = self.profiling
        if prof.warmup + prof.active > prof.freq:
            raise ConfigError(
                f"profiling.warmup ({prof.warmup}) + profiling.active ({prof.active}) must be <= "
                f"profiling.freq ({prof.freq}): each window's steps fit between two window ends"
            )
        ft = self.fault_tolerance
        if ft.replica_id >= ft.group_size:
            raise ConfigError(
                f"fault_tolerance.replica_id ({ft.replica_id}) must be < "
                f"fault_tolerance.group_size ({ft.group_size})"
            )

    def _get(self, key: str) -> Any:
        section, name = key.split(".")
        return getattr(getattr(self, section), name)

    def _set(self, key: str, value: Any) -> None:
        section, name = key.split(".")
        setattr(getattr(self, section), name, value)

    def _update(self, data: Mapping[str, Any]) -> None:
        for section, table in data.items():
            if section not in _schema():
                raise _unknown_key(section)
            if not isinstance(table, Mapping):
                raise ConfigError(f"{section}: expected a table of fields, got {table!r}")
            for name, value in table.items():
                key = f"{section}.{name}"
                self._set(key, _coerce(key, _field_type(key), value))


@functools.cache
def _schema() -> dict[str, dict[str, Any]]:
    """{section: {field: resolved type}}, read from the dataclass annotations."""
    return {
        section: typing.get_type_hints(cls) for section, cls in typing.get_type_hints(JobConfig).items()
    }


def _field_type(key: str) -> Any:
    section, _, name = key.partition(".")
    try:
        return _schema()[section][name]
    except KeyError:
        raise _unknown_key(key) from None


def _unknown_key(key: str) -> ConfigError:
    """Name the unknown section or key and suggest the closest valid ones."""
    schema = _schema()
    section, dot, name = key.partition(".")
    field_name = name if dot else section  # a bare --steps is a field name without its section
    elsewhere = [f"{s}.{field_name}" for s, fields in schema.items() if field_name in fields]
    if section not in schema:
        what, probe = "section", section
        close = difflib.get_close_matches(section, schema, n=3) or elsewhere
    else:
        what, probe = "key", key
        close = [f"{section}.{n}" for n in difflib.get_close_matches(name, schema[section], n=3)] or elsewhere
    if close:
        hint = "did you mean " + " or ".join(repr(c) for c in close) + "?"
    elif what == "section":
        hint = "valid sections: " + ", ".join(schema)
    else:
        hint = f"valid keys in [{section}]: " + ", ".join(schema[section])
    return ConfigError(f"unknown {what} {probe!r}; {hint}")


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    return tp.__name__


def _type_error(key: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check a Python/TOML value against a field type; returns it, with ints widened for floats."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if not isinstance(value, str):
            raise _type_error(key, tp, value)
        if value not in args:
            raise ConfigError(f"{key}: invalid choice {value!r}; valid choices: {', '.join(args)}")
        return value
    if origin in (Union, types.UnionType):
        for arm in args:
            try:
                return _coerce(key, arm, value)
            except ConfigError:
                pass
        raise _type_error(key, tp, value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, tp, value)
        return [_coerce(key, args[0], v) for v in value]
    if isinstance(value, bool) != (tp is bool):  # bool is an int subclass; keep them apart
        raise _type_error(key, tp, value)
    if tp is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, tp):
        raise _type_error(key, tp, value)
    return value


def _parse_text(key: str, tp: Any, text: str) -> Any:
    """Convert command-line text to a value of the field's type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        return [_parse_text(key, args[0], part.strip()) for part in text.split(",") if part.strip()]
    if origin in (Union, types.UnionType):
        for arm in args:
            try:
                return _coerce(key, arm, _parse_text(key, arm, text))
            except ConfigError:
                pass
        raise _type_error(key, tp, text)
    if tp is bool:
        if text.strip().lower() not in ("true", "false"):
            raise ConfigError(f"{key}: expected bool (true or false), got {text!r}")
        return text.strip().lower() == "true"
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise _type_error(key, tp, text) from None
    return text


def _parse_cli(argv: list[str]) -> list[tuple[str, Any]]:
    """Parse CLI overrides into (section.field, typed value) pairs, in order."""
    overrides = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.field value")
        key, eq, text = arg[2:].partition("=")
        key = key.replace("-", "_")
        section, _, name = key.partition(".")
        fields = _schema().get(section, {})
        if name.startswith("no_") and name not in fields and fields.get(name[3:]) is bool:
            positive = f"{section}.{name[3:]}"
            if eq:
                raise ConfigError(f"--{key} is a flag and takes no value; use --{positive}=VALUE instead")
            overrides.append((positive, False))
            continue
        tp = _field_type(key)
        if not eq:
            if i < len(argv) and not argv[i].startswith("--"):
                text = argv[i]
                i += 1
            elif tp is bool:
                overrides.append((key, True))
                continue
            else:
                raise ConfigError(f"{key}: missing value (expected {_type_name(tp)})")
        overrides.append((key, _coerce(key, tp, _parse_text(key, tp, text))))
    return overrides


def _parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"malformed TOML in {source}: {e}") from None


def _load_toml_file(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise ConfigError(f"job.config_file: cannot read {path!r}: {reason}") from None
    return _parse_toml(text, repr(path))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # float repr is valid TOML, inf and nan included
    if isinstance(value, str):
        escaped = (
            "\\" + c if c in '"\\' else f"\\u{ord(c):04x}" if c < " " or c == "\x7f" else c for c in value
        )
        return '"' + "".join(escaped) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")

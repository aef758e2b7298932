"""Configuration objects of the public API: what to train, how, and where.

Names, meanings and defaults follow the InstructLab Training library, so code written for it
runs with only the import line changed. Every object checks itself when it is built, from
Python keywords, a dict, or a YAML/JSON/TOML file (`load_config`), and every problem raises
one exception type, `ConfigError`, naming the field (dotted path), the value and what is
allowed. Objects stay mutable like InstructLab's; checks run at construction (and on
`msgspec.structs.replace`). Decoding with msgspec directly reports the same problems as
`msgspec.ValidationError` whose `__cause__` is the ConfigError.
"""

import difflib
import enum
import json
import math
import re
import types
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

import msgspec
import tomllib

from .errors import ConfigError

__all__ = [
    "ConfigError", "DistributedBackend", "ShardingStrategies", "QuantizeDataType",
    "TorchrunArgs", "DeepSpeedOptions", "FSDPOptions", "LoraOptions", "TrainingArgs",
    "DataProcessArgs", "RunConfig", "config_from_dict", "load_config",
]

def _describe(tp: Any) -> str:
    """A type annotation in words, for error messages."""
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return f"a {tp.__name__} or a mapping of its fields"
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    if origin is list:
        return f"a list (each {_describe(args[0])})"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


@cache
def _field_plan(cls: type) -> tuple:
    """Per field: (name, annotation, exact types needing no conversion, nested Struct type)."""
    plan = []
    for f in msgspec.structs.fields(cls):
        members = get_args(f.type) if get_origin(f.type) in (Union, types.UnionType) else (f.type,)
        exact = frozenset(m for m in members if isinstance(m, type) and get_origin(m) is None)
        sub = next((m for m in members
                    if isinstance(m, type) and issubclass(m, msgspec.Struct)), None)
        plan.append((f.name, f.type, exact, sub))
    return tuple(plan)


def _call_error(cls: type, args: tuple, kwargs: dict, exc: TypeError) -> ConfigError:
    """Turn msgspec's TypeError for a bad constructor call into a ConfigError."""
    fields = msgspec.structs.fields(cls)
    names = [f.name for f in fields]
    if args:
        return ConfigError(cls._root, (), f"{cls.__name__} takes keyword arguments only")
    for key, value in kwargs.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "allowed: " + ", ".join(names)
            return ConfigError(cls._root, (key,), f"unknown field; {hint}", value)
    for f in fields:
        if f.required and f.name not in kwargs:
            return ConfigError(cls._root, (f.name,), "missing required field")
    return ConfigError(cls._root, (), str(exc))


def _build(cls: type, data: Mapping) -> Any:
    bad = next((k for k in data if not isinstance(k, str)), None)
    if bad is not None:
        raise ConfigError(cls._root, (), "field names must be strings", bad)
    return cls(**data)


class _Meta(type(msgspec.Struct)):
    # msgspec forbids overriding __init__; catching here turns unknown, missing or
    # positional arguments into ConfigError for Python callers too.
    def __call__(cls, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except TypeError as exc:
            raise _call_error(cls, args, kwargs, exc) from None


class _Config(msgspec.Struct, metaclass=_Meta, kw_only=True, forbid_unknown_fields=True):
    _root: ClassVar[str] = ""

    def __post_init__(self) -> None:
        # msgspec does not type-check __init__ arguments: check each field against its
        # annotation (strict, so "4096" is not an int and True is not a number), convert
        # plain dicts into nested objects, then run the object's own range checks.
        for name, tp, exact, sub in _field_plan(type(self)):
            value = getattr(self, name)
            if type(value) in exact:
                continue
            if sub is not None and isinstance(value, Mapping):
                try:
                    new = _build(sub, value)
                except ConfigError as exc:
                    raise exc.nested(self._root, name) from None
            else:
                try:
                    new = msgspec.convert(value, tp, strict=True)
                except msgspec.ValidationError:
                    raise ConfigError(self._root, (name,), f"expected {_describe(tp)}",
                                      value) from None
            setattr(self, name, new)
        self._check()

    def validate(self) -> None:
        """Checks the object as it is now, nested objects included: these objects are
        mutable (clients set fields after building them), and `run_training` calls this so
        that a field changed since construction gets the same ConfigError."""
        for name, _, _, _ in _field_plan(type(self)):
            value = getattr(self, name)
            if isinstance(value, _Config):
                try:
                    value.validate()
                except ConfigError as exc:
                    raise exc.nested(self._root, name) from None
        self.__post_init__()

    def _check(self) -> None:
        pass

    def _need(self, ok: bool, name: str, allowed: str) -> None:
        if not ok:
            raise ConfigError(self._root, (name,), allowed, getattr(self, name))


def _positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


class DistributedBackend(str, enum.Enum):
    """How the model is spread over processes: PyTorch FSDP2, DeepSpeed ZeRO, or plain DDP
    (every rank holds the whole model; not in InstructLab, which has only the first two)."""
    FSDP = "fsdp"
    DEEPSPEED = "deepspeed"
    DDP = "ddp"


class ShardingStrategies(str, enum.Enum):
    """FSDP sharding: FULL_SHARD (ZeRO-3), HYBRID_SHARD (ZeRO-3 within a node, replicated
    across nodes), SHARD_GRAD_OP (ZeRO-2) and NO_SHARD (plain data parallel)."""
    FULL_SHARD = "FULL_SHARD"
    SHARD_GRAD_OP = "SHARD_GRAD_OP"
    NO_SHARD = "NO_SHARD"
    HYBRID_SHARD = "HYBRID_SHARD"


class QuantizeDataType(str, enum.Enum):
    """Data type of the frozen base weights under QLoRA; None (no quantization) is the other choice."""
    NF4 = "nf4"


class TorchrunArgs(_Config, kw_only=True):
    """How processes are launched (https://pytorch.org/docs/stable/elastic/run.html).
    InstructLab requires nproc_per_node, nnodes, node_rank and rdzv_id; here they default
    to a single process on one machine, so `TorchrunArgs()` works as its README shows."""
    _root: ClassVar[str] = "torchrun_args"

    nproc_per_node: int | Literal["gpu"] = 1
    nnodes: int = 1
    node_rank: int = 0
    """Processes per machine ("gpu": one per visible GPU), number of machines, and the rank
    of this machine in [0, nnodes)."""
    rdzv_id: int | str = 0
    rdzv_endpoint: str | None = None
    master_addr: str | None = None
    master_port: int | None = None
    """Rendezvous: either `rdzv_endpoint` ("host:port") or `master_addr`/`master_port`, not
    both; the same `rdzv_id` on every machine of one job."""

    def _check(self) -> None:
        self._need(self.nproc_per_node == "gpu" or self.nproc_per_node >= 1,
                   "nproc_per_node", "must be >= 1 or 'gpu'")
        self._need(self.nnodes >= 1, "nnodes", "must be >= 1")
        self._need(0 <= self.node_rank < self.nnodes, "node_rank",
                   f"must be in [0, nnodes) = [0, {self.nnodes})")
        self._need(self.rdzv_endpoint != "", "rdzv_endpoint", "must be 'host:port' or null")
        self._need(self.master_port is None or 1 <= self.master_port <= 65535,
                   "master_port", "must be in [1, 65535]")
        self._need(not (self.rdzv_endpoint and self.master_addr), "master_addr",
                   "give either rdzv_endpoint or master_addr/master_port, not both")


class DeepSpeedOptions(_Config, kw_only=True):
    """DeepSpeed ZeRO settings, used when distributed_backend is "deepspeed"."""
    _root: ClassVar[str] = "deepspeed_options"

    zero_stage: Literal[2, 3] = 2
    """ZeRO stage: 2 shards optimizer state and gradients; 3 also shards the parameters
    (less memory per process, more communication). Not in InstructLab, which runs stage 2."""

    cpu_offload_optimizer: bool = False
    cpu_offload_optimizer_ratio: float = 1.0
    cpu_offload_optimizer_pin_memory: bool = False
    """Keep optimizer state on the CPU; the fraction of parameters whose update runs there,
    in [0, 1]; and whether that memory is page-locked (faster copies, more host memory)."""
    save_samples: int | None = None
    """Save a DeepSpeed-format checkpoint every this many samples; None: never."""

    def _check(self) -> None:
        self._need(0.0 <= self.cpu_offload_optimizer_ratio <= 1.0,
                   "cpu_offload_optimizer_ratio", "must be between 0 and 1 (inclusive)")
        self._need(self.save_samples is None or self.save_samples >= 1, "save_samples",
                   "must be >= 1 or null")


class FSDPOptions(_Config, kw_only=True):
    """PyTorch FSDP settings, used when distributed_backend is "fsdp"."""
    _root: ClassVar[str] = "fsdp_options"

    cpu_offload_params: bool = False
    """Keep parameters on the CPU between uses (all or nothing)."""
    sharding_strategy: ShardingStrategies = ShardingStrategies.HYBRID_SHARD
    """FULL_SHARD, HYBRID_SHARD, SHARD_GRAD_OP or NO_SHARD (see ShardingStrategies)."""


class LoraOptions(_Config, kw_only=True):
    """Train low-rank adapters instead of all weights; QLoRA with quantize_data_type="nf4"."""
    _root: ClassVar[str] = "lora"

    rank: int = 4
    alpha: int = 32
    dropout: float = 0.1
    """Adapter rank r (0 means no LoRA, as InstructLab's CLI passes it), scaling alpha
    (updates are scaled by alpha / r), and dropout on the adapter input, in [0, 1)."""
    target_modules: list[str] | None = None
    """Names of the linear layers to adapt; None selects every projection layer ("*_proj")."""
    quantize_data_type: QuantizeDataType | None = None
    """None, or "nf4" to hold the frozen base weights in 4-bit NormalFloat (QLoRA)."""
    save_merged_model: bool = True
    """Checkpoints hold the adapter (in `adapter/`, for `peft.PeftModel.from_pretrained`) and
    the base model with the adapter merged in (loads with transformers alone); False saves
    the adapter only, at the checkpoint's top level. Not in InstructLab."""

    def _check(self) -> None:
        self._need(self.rank >= 0, "rank", "must be >= 1 (or 0 for no LoRA)")
        self._need(self.alpha >= 1, "alpha", "must be >= 1")
        self._need(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        self._need(self.target_modules is None or (
            len(self.target_modules) > 0 and all(self.target_modules)),
            "target_modules", "must be null or a non-empty list of non-empty names")


_LOGGERS = ("async", "tensorboard", "wandb", "mlflow")


class TrainingArgs(_Config, kw_only=True):
    """What to train, on what data, for how long, and where to write it."""
    _root: ClassVar[str] = "training_args"

    model_path: str
    data_path: str
    ckpt_output_dir: str
    data_output_dir: str
    """The model (a local Hugging Face model directory), the training data (messages-format
    JSONL), where checkpoints go, and where the processed (tokenized, masked) data goes: a
    directory of its own, apart from ckpt_output_dir (other files in it are left alone)."""
    chat_tmpl_path: str | None = None
    use_legacy_tmpl: bool = False
    """A chat template file to render conversations with; None uses the tokenizer's own.
    `use_legacy_tmpl` is accepted for compatibility and has no effect."""

    max_seq_len: int
    max_batch_len: int
    """Samples longer than max_seq_len tokens are dropped. max_batch_len is the most tokens
    one process holds in one micro-batch (>= max_seq_len); lower it on out-of-memory."""
    num_epochs: int = 1
    effective_batch_size: int
    """Passes over the data, and samples per optimizer step summed over all processes."""
    learning_rate: float
    warmup_steps: int = 0
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Peak learning rate, reached linearly from 0 over warmup_steps optimizer steps, then
    following lr_scheduler (cosine decay, linear decay, or constant)."""
    adamw_weight_decay: float = 0.0
    adamw_betas: tuple[float, float] = (0.9, 0.95)
    adamw_eps: float = 1e-8
    """AdamW weight decay, (beta1, beta2) each in [0, 1), and epsilon."""
    random_seed: int = 42
    """Seed of every random generator (data order, dropout, initialization)."""

    save_samples: int = 0
    checkpoint_at_epoch: bool = True
    keep_last_checkpoint_only: bool = False
    """Save a Hugging Face checkpoint every save_samples samples (<= 0: off) and at each epoch
    end; keep_last_checkpoint_only overwrites one "last_epoch" directory."""
    accelerate_full_state_at_epoch: bool = True
    full_state_every_steps: int = 0
    full_state_keep_last: int = 2
    """Save the full training state (weights, optimizer, schedule, data position, random
    generators) at each epoch end and every full_state_every_steps optimizer steps (<= 0:
    off), into ckpt_output_dir/full_state; a run started again resumes from the newest one
    that verifies, exactly. A stop signal (SIGTERM, SIGUSR1) also saves it. The newest
    full_state_keep_last are kept (>= 1): with 2, a damaged newest one falls back to the one
    before it. Not in InstructLab."""

    distributed_backend: DistributedBackend = DistributedBackend.FSDP
    fsdp_options: FSDPOptions = msgspec.field(default_factory=FSDPOptions)
    deepspeed_options: DeepSpeedOptions = msgspec.field(default_factory=DeepSpeedOptions)
    """The backend, "fsdp" (FSDP2), "deepspeed" (ZeRO) or "ddp", and the settings of each
    (objects or mappings); see the README's Backends section."""
    lora: LoraOptions | None = None
    """LoRA/QLoRA settings; None (or rank 0, turned into None) trains all weights."""
    disable_flash_attn: bool = False
    gradient_checkpointing: bool = True
    use_liger: bool = False
    """Use SDPA instead of flash-attention (older GPUs); recompute activations in the backward
    pass to save memory; `use_liger` is accepted for compatibility and has no effect."""
    trust_remote_code: bool = False
    """Allow model_path to run its own Python code (custom architectures); off by default."""

    process_data: bool = True
    data_process_num_cpu_procs: int = 16
    """Tokenize data_path into data_output_dir inside run_training (reused when the output
    already matches), with this many worker processes (capped by the available CPUs)."""
    mock_data: bool = False
    mock_data_len: int = 0
    """Train on random tokens instead of data_path, for debugging; sample length (0: max_seq_len)."""
    allow_longer_samples: bool = False
    """With process_data=False, train a dataset's samples longer than max_seq_len instead of
    refusing the dataset (they must still fit max_batch_len). Not in InstructLab."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    logger_type: str = "async"
    tensorboard_log_dir: str | None = None
    wandb_project: str | None = None
    wandb_entity: str | None = None
    wandb_run_name: str | None = None
    mlflow_tracking_uri: str | None = None
    mlflow_experiment_name: str | None = None
    mlflow_run_name: str | None = None
    """Console log level; metric sinks as a comma-separated list of async (JSONL file),
    tensorboard, wandb, mlflow; and their settings (None: the sink's default)."""

    is_padding_free: bool = False
    use_dolomite: bool = False
    """Accepted for compatibility with InstructLab and ignored: batches are always padding-free."""

    def _check(self) -> None:
        for name in ("model_path", "ckpt_output_dir", "data_output_dir") + (
                () if self.mock_data else ("data_path",)):
            self._need(getattr(self, name) != "", name, "must be a non-empty path")
        self._need(self.max_seq_len >= 1, "max_seq_len", "must be >= 1")
        self._need(self.max_batch_len >= self.max_seq_len, "max_batch_len",
                   f"must be >= max_seq_len ({self.max_seq_len})")
        self._need(self.num_epochs >= 1, "num_epochs", "must be >= 1")
        self._need(self.effective_batch_size >= 1, "effective_batch_size", "must be >= 1")
        self._need(_positive(self.learning_rate), "learning_rate", "must be a finite number > 0")
        self._need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        self._need(math.isfinite(self.adamw_weight_decay) and self.adamw_weight_decay >= 0,
                   "adamw_weight_decay", "must be a finite number >= 0")
        self._need(all(0.0 <= b < 1.0 for b in self.adamw_betas), "adamw_betas",
                   "each beta must be in [0, 1)")
        self._need(_positive(self.adamw_eps), "adamw_eps", "must be a finite number > 0")
        self._need(self.random_seed >= 0, "random_seed", "must be >= 0")
        self._need(self.mock_data_len >= 0, "mock_data_len", "must be >= 0")
        self._need(self.full_state_keep_last >= 1, "full_state_keep_last", "must be >= 1")
        self._need(self.data_process_num_cpu_procs >= 1, "data_process_num_cpu_procs",
                   "must be >= 1")
        sinks = [s.strip() for s in self.logger_type.split(",")]
        self._need(all(s in _LOGGERS for s in sinks), "logger_type",
                   "must be a comma-separated list of " + ", ".join(_LOGGERS))
        if self.lora is not None and self.lora.rank == 0:
            self.lora = None  # InstructLab's CLI says "no LoRA" with rank 0


class DataProcessArgs(_Config, kw_only=True):
    """Turning a messages-format JSONL file into training-ready token shards (`data_process.main`)."""
    _root: ClassVar[str] = "data_process_args"

    data_path: str
    data_output_path: str
    model_path: str
    chat_tmpl_path: str | None = None
    """Input JSONL, output directory, the model whose tokenizer is used, and an optional chat
    template file (None: the tokenizer's own)."""
    max_seq_len: int
    min_seq_len: int = 0
    """Samples longer than max_seq_len or shorter than min_seq_len tokens (0: no minimum) are
    dropped and counted by reason."""
    num_cpu_procs: int = 16
    """Worker processes for tokenization; the effective count is capped by the available CPUs."""
    skip_invalid_lines: bool = False
    overwrite: bool = False
    """Skip and report malformed input lines instead of failing; re-process even when matching
    output already exists."""

    def _check(self) -> None:
        for name in ("data_path", "data_output_path", "model_path"):
            self._need(getattr(self, name) != "", name, "must be a non-empty path")
        self._need(self.max_seq_len >= 1, "max_seq_len", "must be >= 1")
        self._need(0 <= self.min_seq_len < self.max_seq_len, "min_seq_len",
                   f"must be >= 0 and < max_seq_len ({self.max_seq_len})")
        self._need(self.num_cpu_procs >= 1, "num_cpu_procs", "must be >= 1")


class RunConfig(_Config, kw_only=True):
    """A whole run in one file: the training arguments and how to launch them."""
    _root: ClassVar[str] = ""

    training_args: TrainingArgs
    torchrun_args: TorchrunArgs = msgspec.field(default_factory=TorchrunArgs)


def config_from_dict(data: Any, into: type | None = None, source: str | None = None) -> Any:
    """Build `into` (default: RunConfig when the mapping has a training_args or torchrun_args
    key, else TrainingArgs) from a mapping of plain values; raises ConfigError."""
    try:
        if not isinstance(data, Mapping):
            raise ConfigError("", (), "the top level must be a mapping of field names to "
                              f"values, got {type(data).__name__}")
        if into is None:
            into = RunConfig if {"training_args", "torchrun_args"} & set(data) else TrainingArgs
        return _build(into, data)
    except ConfigError as exc:
        raise (exc.from_source(source) if source else exc) from None


# YAML 1.1 reads 2e-6 (no dot) as a string; configs write learning rates that way.
_YAML_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_FORMATS = {".yaml": "YAML", ".yml": "YAML", ".json": "JSON", ".toml": "TOML"}


def _parse(kind: str, text: str) -> Any:
    if kind == "JSON":
        return json.loads(text)
    if kind == "TOML":
        return tomllib.loads(text)
    import yaml  # only YAML users need PyYAML

    class Loader(yaml.SafeLoader):  # safe_load's loader, plus exponent-only floats
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML_FLOAT, list("-+0123456789"))
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass


def load_config(path: str | Path, into: type | None = None) -> Any:
    """Read a YAML (.yaml/.yml), JSON or TOML file into TrainingArgs, or into a RunConfig when
    its top level has training_args/torchrun_args keys (or into `into`, e.g. DataProcessArgs).
    Every problem raises ConfigError naming the file and the field."""
    path = Path(path)
    kind = _FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ConfigError("", (), f"unknown config file type {path.suffix!r}; expected one of "
                          + ", ".join(_FORMATS), source=str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("", (), "no such config file", source=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("", (), f"cannot read: {exc}", source=str(path)) from None
    try:
        data = _parse(kind, text)
    except ImportError:
        raise ConfigError("", (), "reading YAML needs PyYAML (pip install pyyaml)",
                          source=str(path)) from None
    except Exception as exc:  # each parser has its own error type; all mean "bad file"
        raise ConfigError("", (), f"invalid {kind}: {exc}", source=str(path)) from None
    return config_from_dict(data, into=into, source=str(path))

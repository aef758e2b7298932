"""Configuration objects of the public API: what to train, how, and where.

Names, meanings and defaults follow the InstructLab Training library (0.16), so code written
for it runs with only the import line changed; config_base.py says how these objects build
and check themselves (as pydantic models do), config_files.py how they load from files.
Fields that InstructLab does not have say so in their description.
"""

import enum
import math
from typing import Any, ClassVar, Literal

import msgspec

from .config_base import ConfigModel
from .errors import ConfigError

__all__ = [
    "ConfigError", "DistributedBackend", "ShardingStrategies", "QuantizeDataType", "DeepSpeedOffloadStrategy",
    "TorchrunArgs", "DeepSpeedOptions", "FSDPOptions", "LoraOptions", "PretrainingConfig", "TrainingArgs",
    "DataProcessArgs", "RunConfig",
]


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


class QuantizeDataType(enum.Enum):
    """Data type of the frozen base weights under QLoRA: NF4 (4-bit NormalFloat), or NONE."""
    NF4 = "nf4"
    NONE = None


class DeepSpeedOffloadStrategy(enum.Enum):
    """Where DeepSpeed offloads optimizer state (InstructLab's name; `cpu_offload_optimizer`
    of DeepSpeedOptions is the setting that acts)."""
    CPU = "cpu"
    NONE = None


class TorchrunArgs(ConfigModel, kw_only=True):
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

    def _check_on_build(self) -> None:
        self._need(not (self.rdzv_endpoint and self.master_addr), "master_addr",
                   "give either rdzv_endpoint or master_addr/master_port, not both")

    def _check(self) -> None:
        self._need(self.nproc_per_node == "gpu" or self.nproc_per_node >= 1,
                   "nproc_per_node", "must be >= 1 or 'gpu'")
        self._need(self.nnodes >= 1, "nnodes", "must be >= 1")
        self._need(0 <= self.node_rank < self.nnodes, "node_rank",
                   f"must be in [0, nnodes) = [0, {self.nnodes})")
        self._need(self.rdzv_endpoint != "", "rdzv_endpoint", "must be 'host:port' or null")
        self._need(self.master_port is None or 1 <= self.master_port <= 65535,
                   "master_port", "must be in [1, 65535]")
        self._check_on_build()


class DeepSpeedOptions(ConfigModel, kw_only=True):
    """DeepSpeed ZeRO settings, used when distributed_backend is "deepspeed"."""
    _root: ClassVar[str] = "deepspeed_options"

    zero_stage: Literal[2, 3] = 2
    """ZeRO stage: 2 shards optimizer state and gradients; 3 also shards the parameters
    (less memory per process, more communication). Not in InstructLab, which runs stage 2."""

    cpu_offload_optimizer: bool | None = False
    cpu_offload_optimizer_ratio: float = 1.0
    cpu_offload_optimizer_pin_memory: bool | None = False
    """Keep optimizer state on the CPU; the fraction of parameters whose update runs there,
    in [0, 1]; and whether that memory is page-locked (faster copies, more host memory)."""
    save_samples: int | None = None
    """Save a DeepSpeed-format checkpoint every this many samples; None: never."""

    def _check(self) -> None:
        self._need(0.0 <= self.cpu_offload_optimizer_ratio <= 1.0,
                   "cpu_offload_optimizer_ratio", "must be between 0 and 1 (inclusive)")
        self._need(self.save_samples is None or self.save_samples >= 1, "save_samples",
                   "must be >= 1 or null")


class FSDPOptions(ConfigModel, kw_only=True):
    """PyTorch FSDP settings, used when distributed_backend is "fsdp"."""
    _root: ClassVar[str] = "fsdp_options"

    cpu_offload_params: bool | None = False
    """Keep parameters on the CPU between uses (all or nothing)."""
    sharding_strategy: ShardingStrategies = ShardingStrategies.HYBRID_SHARD
    """FULL_SHARD, HYBRID_SHARD, SHARD_GRAD_OP or NO_SHARD (see ShardingStrategies)."""


class LoraOptions(ConfigModel, kw_only=True):
    """Train low-rank adapters instead of all weights; QLoRA with quantize_data_type="nf4"."""
    _root: ClassVar[str] = "lora"

    rank: int = 4
    alpha: int = 32
    dropout: float = 0.1
    """Adapter rank r (0 means no LoRA, as InstructLab's CLI passes it), scaling alpha
    (updates are scaled by alpha / r), and dropout on the adapter input, in [0, 1)."""
    target_modules: list[str] | None = None
    """Names of the linear layers to adapt; None selects every projection layer ("*_proj")."""
    quantize_data_type: Any = QuantizeDataType.NONE
    """QuantizeDataType.NONE (or None), or "nf4" (QuantizeDataType.NF4) to hold the frozen
    base weights in 4-bit NormalFloat (QLoRA). Kept as InstructLab keeps it: the value
    ("nf4", None) when given, the NONE member by default; `quantization` reads it."""
    save_merged_model: bool = True
    """Checkpoints hold the adapter (in `adapter/`, for `peft.PeftModel.from_pretrained`) and
    the base model with the adapter merged in (loads with transformers alone); False saves
    the adapter only, at the checkpoint's top level. Not in InstructLab."""

    def _quantize_value(self, value: Any) -> Any:
        if value is QuantizeDataType.NONE:
            return value  # the default, as InstructLab leaves it
        try:
            return QuantizeDataType(value.value if isinstance(value, QuantizeDataType) else value).value
        except ValueError:
            raise ConfigError(self._root, ("quantize_data_type",), "expected 'nf4' or None", value) from None

    _converters: ClassVar[dict] = {"quantize_data_type": _quantize_value}

    @property
    def quantization(self) -> QuantizeDataType | None:
        """QuantizeDataType.NF4 under QLoRA, else None, whatever form the field holds."""
        value = self.quantize_data_type
        value = value.value if isinstance(value, QuantizeDataType) else value
        return QuantizeDataType.NF4 if value == QuantizeDataType.NF4.value else None

    @property
    def enabled(self) -> bool:
        """Rank 0 means no LoRA (InstructLab's CLI always passes a LoraOptions)."""
        return self.rank > 0

    def _check(self) -> None:
        self._need(self.rank >= 0, "rank", "must be >= 1 (or 0 for no LoRA)")
        self._quantize_value(self.quantize_data_type)
        self._need(self.alpha >= 1, "alpha", "must be >= 1")
        self._need(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        self._need(self.target_modules is None or (
            len(self.target_modules) > 0 and all(self.target_modules)),
            "target_modules", "must be null or a non-empty list of non-empty names")


class PretrainingConfig(ConfigModel, kw_only=True):
    """Continual pretraining on raw documents (`TrainingArgs.pretraining_config`)."""
    _root: ClassVar[str] = "pretraining_config"

    block_size: int
    """Tokens per training block: documents are cut into blocks of this many tokens."""
    document_column_name: str = "document"
    """The key of each JSONL line that holds the document's text."""

    def _check(self) -> None:
        self._need(self.block_size >= 1, "block_size", "must be >= 1")
        self._need(self.document_column_name != "", "document_column_name", "must be a non-empty key")


_LOGGERS = ("async", "tensorboard", "wandb", "mlflow")


class TrainingArgs(ConfigModel, kw_only=True):
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
    """A chat template to render conversations with: a Jinja file, or an InstructLab
    template module (.py with SPECIAL_TOKENS and CHAT_TEMPLATE, read without running it);
    None uses the tokenizer's own. `use_legacy_tmpl` selects InstructLab's legacy Granite
    template module instead of either, as InstructLab does."""

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
    deterministic: bool = False
    """Deterministic GPU kernels, so that a run repeats, and a resumed run continues, bit for
    bit: torch's deterministic algorithms (a warning names any op that has none), a fixed
    cuBLAS workspace, no cuDNN autotuning, and flash-attention's deterministic backward
    (otherwise it accumulates with atomics, in a different order every time). Costs some
    speed (flash-attention's backward most). CPU runs are deterministic without it. Not in
    InstructLab."""

    save_samples: int = 0
    checkpoint_at_epoch: bool = True
    keep_last_checkpoint_only: bool | None = False
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
    """LoRA/QLoRA settings; None (or rank 0) trains all weights."""
    disable_flash_attn: bool | None = False
    gradient_checkpointing: bool = True
    use_liger: bool = False
    """Use SDPA instead of flash-attention (older GPUs); recompute activations in the backward
    pass to save memory. `use_liger`: Liger's Triton kernels and fused linear cross-entropy
    (CUDA only, the `cuda` extra; refused before launch where they cannot run)."""
    trust_remote_code: bool = False
    """Allow model_path to run its own Python code (custom architectures); off by default."""
    freeze_router: bool | None = None
    """Mixture-of-experts models: keep the router weights fixed. None: as InstructLab does,
    frozen for GPT-OSS and GraniteMoeHybrid, trained for the others. Not in InstructLab."""

    process_data: bool | None = True
    data_process_num_cpu_procs: int = 16
    """Tokenize data_path into data_output_dir inside run_training (reused when the output
    already matches), with this many worker processes (capped by the available CPUs)."""
    mock_data: bool | None = False
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

    pretraining_config: PretrainingConfig | None = None
    """Continual pretraining on {"document": text} lines instead of conversations."""
    validation_split: float = 0.0
    validation_frequency: int | None = None
    """The fraction of samples held out for a validation loss, in [0, 1), computed every
    validation_frequency optimizer steps (required when validation_split > 0)."""
    on_demand_checkpointing: bool = False
    """Save the full state and stop when a checkpoint is requested (InstructLab's trigger
    file in /dev/shm, or its signals)."""
    callbacks: list | None = None
    """TrainerCallback instances called at the points of the training loop they name."""

    _dump_excludes: ClassVar[frozenset] = frozenset({"callbacks"})

    def _check_on_build(self) -> None:
        self._need(0.0 <= self.validation_split < 1.0, "validation_split", "must be in [0, 1)")
        self._need(self.validation_split == 0.0 or (self.validation_frequency or 0) > 0, "validation_frequency",
                   "must be given and > 0 when validation_split > 0")

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
        self._check_on_build()


class DataProcessArgs(ConfigModel, kw_only=True):
    """Turning a messages-format JSONL file into training-ready token shards (`data_process.main`)."""
    _root: ClassVar[str] = "data_process_args"

    data_path: str
    data_output_path: str
    model_path: str
    chat_tmpl_path: str | None = None
    """Input JSONL, output directory, the model whose tokenizer is used, and an optional chat
    template file (None: the tokenizer's own)."""
    max_seq_len: int
    min_seq_len: int | None = None
    """Which samples are kept, by their number of tokens: None (InstructLab's rule, and what
    data_process.main and run_training use) keeps 20 <= tokens < max_seq_len; a number keeps
    min_seq_len <= tokens <= max_seq_len (instructpack-preprocess's rule, 0 by default).
    Others are dropped and counted by reason. Not in InstructLab."""
    num_cpu_procs: int = 16
    """Worker processes for tokenization; the effective count is capped by the available CPUs."""
    skip_invalid_lines: bool = False
    overwrite: bool = False
    """Skip and report malformed input lines instead of failing; re-process even when matching
    output already exists."""
    pretraining: PretrainingConfig | None = None
    """The lines are documents for continual pretraining, cut into blocks of block_size
    tokens (max_seq_len and chat_tmpl_path then play no part). Not in InstructLab."""

    def _check(self) -> None:
        for name in ("data_path", "data_output_path", "model_path"):
            self._need(getattr(self, name) != "", name, "must be a non-empty path")
        self._need(self.max_seq_len >= 1, "max_seq_len", "must be >= 1")
        self._need(self.min_seq_len is None or 0 <= self.min_seq_len < self.max_seq_len, "min_seq_len",
                   f"must be null, or >= 0 and < max_seq_len ({self.max_seq_len})")
        self._need(self.num_cpu_procs >= 1, "num_cpu_procs", "must be >= 1")


class RunConfig(ConfigModel, kw_only=True):
    """A whole run in one file: the training arguments and how to launch them."""
    _root: ClassVar[str] = ""

    training_args: TrainingArgs
    torchrun_args: TorchrunArgs = msgspec.field(default_factory=TorchrunArgs)

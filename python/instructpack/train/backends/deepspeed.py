"""DeepSpeed ZeRO (stage 2 or 3) as a `Backend` (see base.py). `import deepspeed` happens
only when a DeepSpeedBackend is built (`import_deepspeed`).

The training math is the one of the DDP/FSDP backends, step for step:
- The optimizer is `build_optimizer`'s torch AdamW (weight decay on matrices only), given to
  `deepspeed.initialize` as the client optimizer. ZeRO wraps that very object, so the
  learning rate the caller's scheduler writes into `backend.optimizer.param_groups` is the
  one the update uses (the ZeRO wrapper keeps the same group dicts and only swaps their
  "params" for its fp32 partitions).
- One optimizer step per step of the plan, whatever its number of micro-batches: `sync(last)`
  sets DeepSpeed's gradient-accumulation boundary by hand (`set_gradient_accumulation_boundary`),
  so DeepSpeed's own micro-step counter never decides when to step, and `backward` passes
  `scale_wrt_gas=False`, so DeepSpeed does not divide the loss by its
  `gradient_accumulation_steps` either (the loss is already divided by the step's target
  count). `gradient_accumulation_steps` in the config then only feeds DeepSpeed's sample
  bookkeeping (train_batch_size); `step()` refuses to run off the boundary, where DeepSpeed
  would silently skip the update.
- DeepSpeed averages gradients over ranks like DDP; `grad_scale` (the world size) undoes it.
- Clipping is DeepSpeed's (`gradient_clipping`, same formula as `clip_grad_norm_`);
  `step()` returns the global gradient norm before clipping.
- bf16 with fp32 master weights in the ZeRO optimizer on CUDA; plain fp32 on the CPU
  (train/precision.py).

Optimizer offload (`cpu_offload_optimizer`) keeps the fp32 master weights and AdamW state
in host memory and runs the update there. On CUDA the update runs in DeepSpeedCPUAdam (in
AdamW mode, built from the same parameter groups and hyper-parameters): ZeRO-Offload is
designed around it, it is several times faster than torch's AdamW on the CPU, and ZeRO-3's
partial offload (`cpu_offload_optimizer_ratio` < 1) requires it; its C++ op is compiled on
first use (about a minute, then cached by torch), and if it cannot be built the backend
falls back to torch AdamW with a warning. On a CPU-only machine the update runs on the CPU
anyway, so torch AdamW is kept ("zero_force_ds_cpu_optimizer": false lets ZeRO-Offload take
a client optimizer): no compilation (DeepSpeedCPUAdam takes minutes to build there) and the
exact same math as the other backends. The ratio is only honoured by ZeRO-3 with
DeepSpeedCPUAdam; elsewhere everything is offloaded (ratio 1) and a warning says so.

No JIT builds. This DeepSpeed is installed without pre-compiled ops, and any op it loads is
compiled on the spot. The one a CPU run would hit is the shared-memory all-reduce kernel
(`deepspeed_shm_comm`, ~150 s on every start): `deepspeed.comm`'s TorchBackend builds it
whenever `deepspeed.ops.__compatible_ops__` says the op is compatible. That kernel serves only
`inference_all_reduce` (tensor-parallel inference); training collectives go through
torch.distributed (gloo on CPU, nccl on CUDA). So before DeepSpeed creates its comm backend
we mark the op incompatible in that dict, which DeepSpeed probes once per process and keeps
as a module attribute precisely so that edits to it persist; TorchBackend then skips it as
it does on any platform where the op cannot be built. Nothing else is compiled: the client
optimizer replaces FusedAdam/CPUAdam (except DeepSpeedCPUAdam under offload on CUDA, above),
no NVMe swapping (async_io) and no quantized communication are configured. (oneCCL's op is
only built when oneccl_bindings_for_pytorch is installed, which this project does not use.)

DeepSpeed needs a process group even for one process: outside torchrun the backend joins
a one-process group (`distributed.ensure_process_group`).

Resuming reads DeepSpeed's checkpoint files, which are pickles, with `torch.load(...,
weights_only=True)`: DeepSpeed's own reader unpickles them whole (weights_only=False), and a
pickle can run any code, so a tampered checkpoint directory would run code on every rank.
The weights-only unpickler builds tensors, containers and numbers, plus the few DeepSpeed
classes its ZeRO checkpoints hold (`_checkpoint_classes`), and refuses anything else.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ...config import TrainingArgs
from ..distributed import World, barrier, ensure_process_group
from ..optim import MAX_GRAD_NORM, build_optimizer
from ..precision import Precision, decide_precision
from .base import Backend

log = logging.getLogger(__name__)

# DeepSpeed ops that would be JIT-compiled at start-up and that training does not need.
_SKIPPED_OPS = ("deepspeed_shm_comm",)
BUCKET_ELEMENTS = 200_000_000  # ZeRO's gradient reduce and all-gather buckets on CUDA


def deepspeed_config(args: TrainingArgs, device_type: str, *, gradient_accumulation_steps: int = 1,
                     max_grad_norm: float = MAX_GRAD_NORM, ds_cpu_adam: bool | None = None,
                     precision: Precision | None = None,
                     overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The DeepSpeed config dict for `args` on a "cuda" or "cpu" device.

    `gradient_accumulation_steps`: the planner's micro-batch count (bookkeeping only, see the
    module docstring). `ds_cpu_adam`: whether the offloaded update runs in DeepSpeedCPUAdam
    (default: on CUDA with offload). `overrides` are merged in last, key by key (nested dicts
    recursively), for DeepSpeed settings TrainingArgs does not cover."""
    if gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
    precision = precision or decide_precision(args, torch.device(device_type))
    options = args.deepspeed_options
    offload = options.cpu_offload_optimizer
    if ds_cpu_adam is None:
        ds_cpu_adam = offload and device_type == "cuda"
    zero: dict[str, Any] = {"stage": options.zero_stage}
    if device_type == "cuda":
        # Reduce-scatter each bucket while the backward goes on (ZeRO-3 overlaps by default,
        # ZeRO-2 does not), in buckets of 2e8 elements (0.8 GB in fp32) instead of 5e8 (2 GB,
        # with a second one while overlapping): the peak stays what FSDP2's per-layer reduce needs.
        zero.update(overlap_comm=True, reduce_bucket_size=BUCKET_ELEMENTS, allgather_bucket_size=BUCKET_ELEMENTS)
    if offload:
        # The partial ratio exists only in ZeRO-3 and only with DeepSpeedCPUAdam (its "backup"
        # optimizer handles the part left on the GPU).
        ratio = options.cpu_offload_optimizer_ratio if options.zero_stage == 3 and ds_cpu_adam else 1.0
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": options.cpu_offload_optimizer_pin_memory,
                                     "ratio": ratio}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,  # one packed micro-batch per backward
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "gradient_clipping": float(max_grad_norm),
        "bf16": {"enabled": precision.compute == torch.bfloat16},
        "fp16": {"enabled": False},
        # Reduce gradients in fp32 as FSDP2 does; by default DeepSpeed communicates in the
        # model's dtype (bf16), rounding every partial sum.
        "communication_data_type": "fp32",
        # And accumulate them over micro-batches in fp32, as FSDP2 and DDP do over fp32 master
        # weights; DeepSpeed's default adds bf16 gradients in bf16 (8 bits of mantissa).
        "data_types": {"grad_accum_dtype": "fp32"},
        "zero_optimization": zero,
        # Offload with a client optimizer that is not DeepSpeedCPUAdam (torch AdamW on CPU).
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": None,  # the training loop logs
        "wall_clock_breakdown": False,
    }
    return _merge(config, overrides or {})


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def import_deepspeed():
    """`import deepspeed` without its start-up JIT builds (see the module docstring)."""
    import deepspeed
    import deepspeed.ops

    compatible = deepspeed.ops.__compatible_ops__  # probed once per process (~0.1 s), then cached
    for name in _SKIPPED_OPS:
        compatible[name] = False
    return deepspeed


@contextlib.contextmanager
def partitioned_at_load(args: TrainingArgs, device: torch.device, precision: Precision) -> Iterator[None]:
    """ZeRO-3: a model built inside the block (transformers' `from_pretrained` or
    `from_config`) is partitioned as it is created (`deepspeed.zero.Init`, which transformers
    enters while an HfDeepSpeedConfig of stage 3 is alive), each weight loaded through a
    gather and re-partitioned: no process ever holds the whole model, in host memory or on
    its GPU, so ZeRO-3 trains models larger than one GPU. `deepspeed.initialize` later takes
    the partitioned parameters as they are (and partitions any made after the block, such
    as LoRA adapters). The setting is withdrawn at the end of the block: a model loaded
    later in the process (merging LoRA for export) loads whole."""
    import_deepspeed()
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    ensure_process_group(World(0, 0, 1, device))  # the torchrun group where there is one
    if device.type == "cuda":
        torch.cuda.set_device(device)  # zero.Init places each partition on the current device
    # Only the partitioning and dtype settings matter here; accumulation is known later.
    config = HfDeepSpeedConfig(deepspeed_config(args, device.type, precision=precision))
    linear = torch.nn.functional.linear
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del config
        # zero.Init also swaps torch's F.linear for its own autograd function, for good
        # ("This will persist unless manually reset"). The load leaves nothing behind: the
        # ZeRO-3 engine installs it again itself when `deepspeed.initialize` builds it.
        torch.nn.functional.linear = linear


class DeepSpeedBackend(Backend):
    """DeepSpeed ZeRO stage 2 (optimizer state and gradients sharded) or 3 (parameters too).

    `module` is the DeepSpeed engine (forward runs on it); `model` the model it wraps;
    `optimizer` the client AdamW that ZeRO steps (schedulers go on it); `engine` the
    `DeepSpeedEngine` itself."""
    name = "DeepSpeed"

    def __init__(self, model: torch.nn.Module, world: World, args: TrainingArgs, precision: Precision | None = None,
                 *, gradient_accumulation_steps: int = 1, max_grad_norm: float = MAX_GRAD_NORM,
                 config_overrides: dict[str, Any] | None = None):
        deepspeed = import_deepspeed()
        ensure_process_group(world)
        precision = precision or decide_precision(args, world.device)
        options = args.deepspeed_options
        device_type = world.device.type
        # ZeRO-Offload steps the fp32 masters on the CPU: no fused GPU kernel there.
        optimizer = build_optimizer(model, args, fused=False if options.cpu_offload_optimizer else None)
        ds_cpu_adam = options.cpu_offload_optimizer and device_type == "cuda"
        if ds_cpu_adam:
            try:
                optimizer = _cpu_adam(optimizer, args)
            except RuntimeError as exc:  # the cpu_adam op cannot be compiled here
                log.warning("DeepSpeedCPUAdam is unavailable (%s); the offloaded update runs in torch AdamW", exc)
                ds_cpu_adam = False
        if (options.cpu_offload_optimizer and options.cpu_offload_optimizer_ratio < 1.0
                and not (options.zero_stage == 3 and ds_cpu_adam)):
            log.warning("cpu_offload_optimizer_ratio < 1 needs ZeRO stage 3 with DeepSpeedCPUAdam (CUDA); "
                        "the whole optimizer is offloaded")
        self.config = deepspeed_config(args, device_type, gradient_accumulation_steps=gradient_accumulation_steps,
                                       max_grad_norm=max_grad_norm, ds_cpu_adam=ds_cpu_adam, precision=precision,
                                       overrides=config_overrides)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config)
        self.engine = engine
        self.stage = options.zero_stage
        self.max_grad_norm = float(self.config["gradient_clipping"])
        dtype = "bf16 (fp32 master weights)" if self.config["bf16"]["enabled"] else "fp32"
        offload = ""
        if options.cpu_offload_optimizer:
            ratio = self.config["zero_optimization"]["offload_optimizer"]["ratio"]
            offload = (f", optimizer offloaded to the CPU ({type(optimizer).__name__}"
                       f"{f', ratio {ratio:g}' if ratio < 1 else ''}"
                       f"{', pinned' if options.cpu_offload_optimizer_pin_memory else ''})")
        log.info("DeepSpeed %s ZeRO stage %d on %d process%s, %s%s", deepspeed.__version__, self.stage,
                 world.world_size, "" if world.world_size == 1 else "es", dtype, offload)
        super().__init__(model, optimizer, world, engine, precision)

    @contextlib.contextmanager
    def sync(self, last: bool) -> Iterator[None]:
        # ZeRO reduces (stage 2: reduce-scatters) gradients in every backward; the boundary
        # decides whether this backward completes the step's gradients.
        self.engine.set_gradient_accumulation_boundary(last)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, max_grad_norm: float) -> float:
        if max_grad_norm != self.max_grad_norm:
            raise ValueError(f"DeepSpeed clips to its configured gradient_clipping={self.max_grad_norm}, "
                             f"not {max_grad_norm}; pass max_grad_norm to DeepSpeedBackend")
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeedBackend.step() without sync(last=True) around the last backward: "
                               "DeepSpeed would skip the update")
        self._sync_backup_lr()
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def _sync_backup_lr(self) -> None:
        # ZeRO-3 partial offload steps the part left on the GPU with a "backup" torch AdamW
        # whose first group is a copy made at start-up, so scheduler updates would not reach it.
        backup = getattr(self.engine.optimizer, "backup_optimizer", None)
        if backup is not None:
            for mine, theirs in zip(self.optimizer.param_groups, backup.param_groups):
                theirs["lr"] = mine["lr"]

    def gather_weights(self) -> dict[str, torch.Tensor] | None:
        """Rank 0: every weight under the model's own state-dict keys, on the CPU, in the
        training dtype (ZeRO-3 gathers the 16-bit weights, one module at a time); None
        elsewhere. A collective under ZeRO-3."""
        if self.stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = self.model.state_dict() if self.world.is_main else None
        if not self.world.is_main:
            return None
        return _detached_cpu_copy(state)

    def save_weights_and_optimizer(self, directory: str | Path, client_state: dict | None = None) -> None:
        """A DeepSpeed checkpoint (sharded weights, optimizer and engine state, under a
        `global_step<N>` tag with a `latest` file) in `directory`; older tags there are
        removed once it is written (keep_last_checkpoint_only reuses one directory). Frozen
        weights (a LoRA base) are left out: they reload from model_path. `client_state` may
        hold tensors, containers, numbers and strings (what `load_weights_and_optimizer` reads back). A
        collective."""
        directory = Path(directory)
        self.engine.save_checkpoint(str(directory), client_state=client_state or {},
                                    exclude_frozen_parameters=self._has_frozen)
        if self.world.is_main:
            latest = (directory / "latest").read_text().strip()
            for old in directory.iterdir():
                if old.is_dir() and old.name != latest:
                    shutil.rmtree(old, ignore_errors=True)
        barrier(self.world)

    def load_weights_and_optimizer(self, directory: str | Path) -> dict | None:
        """Load the latest checkpoint `save_weights_and_optimizer` wrote in `directory` (same
        world size); returns its client_state. Every file is read weights-only: one holding
        other objects raises pickle.UnpicklingError. A collective."""
        # Every checkpoint file DeepSpeed reads goes through its checkpoint engine's load.
        self.engine.checkpoint_engine.load = _load_weights_only
        path, client_state = self.engine.load_checkpoint(str(directory), load_module_strict=not self._has_frozen)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory}")
        return client_state

    @property
    def _has_frozen(self) -> bool:
        return any(not p.requires_grad for p in self.model.parameters())


def _checkpoint_classes() -> list[type]:
    """The classes DeepSpeed pickles into ZeRO-2 and ZeRO-3 checkpoints (also with optimizer
    offload, and with LoRA's frozen base left out), found by saving each kind and listing
    `torch.serialization.get_unsafe_globals_in_checkpoint`. The weights-only unpickler may
    call an allowed class with arguments from the file and then set attributes on the result,
    so each must build nothing but inert data whatever the arguments: LossScaler's `__init__`
    and fragment_address's dataclass `__init__` only store the values given (neither defines
    `__new__`, `__setstate__` or `__reduce__`), and calling the Enum looks a member up by value."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [
        LossScaler,  # the ZeRO optimizer's static loss scale (1 in bf16/fp32): stores cur_scale, dynamic
        ZeroStageEnum,  # an int Enum: calling it looks a member up by value
        fragment_address,  # a dataclass of two ints (numel, start): ZeRO-2's parameter slice mappings
    ]


def _load_weights_only(path: str, map_location: Any = None) -> Any:
    """DeepSpeed's `CheckpointEngine.load`, with weights_only=True (see the module docstring)."""
    classes = _checkpoint_classes()
    try:
        with torch.serialization.safe_globals(classes):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's own message advises weights_only=False, which is what this refuses to do.
        raise pickle.UnpicklingError(
            f"{path}: refusing to load this DeepSpeed checkpoint file: it holds objects other than tensors, "
            f"containers, numbers and DeepSpeed's {', '.join(c.__name__ for c in classes)}, and unpickling them "
            f"could run code. Resume only from checkpoints written by instructpack's DeepSpeed backend "
            f"(same DeepSpeed version). {_unpickler_reason(exc)}") from None


def _unpickler_reason(exc: Exception) -> str:
    # torch wraps the reason (the first unsupported global) in advice to use weights_only=False.
    advice = ("Weights only load failed", "Check the documentation")
    return " ".join(line for line in str(exc).splitlines() if line.strip() and not line.startswith(advice))


def _cpu_adam(optimizer: torch.optim.Optimizer, args: TrainingArgs) -> torch.optim.Optimizer:
    """DeepSpeedCPUAdam in AdamW mode with `optimizer`'s groups (weight decay on matrices only)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
    return DeepSpeedCPUAdam(groups, lr=args.learning_rate, betas=args.adamw_betas, eps=args.adamw_eps,
                            weight_decay=args.adamw_weight_decay, adamw_mode=True)


def _detached_cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Own CPU copies, so the result shares no memory with live (possibly flattened or
    gathered) training buffers; tensors that shared memory (tied weights) stay one tensor."""
    copies: dict[tuple, torch.Tensor] = {}
    out = {}
    for key, t in state.items():
        t = t.detach()
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if ident not in copies:
            copies[ident] = t.to("cpu", copy=True).contiguous()
        out[key] = copies[ident]
    return out

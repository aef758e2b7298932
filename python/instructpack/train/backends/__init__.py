"""How the model is spread over processes: one small class per backend (base.py says what a
backend answers), chosen by `build_backend`.

- base.py: `Backend`, also the single process: the model as it is, nothing to reduce.
- ddp.py: DDP, every rank holds the whole model.
- fsdp.py: FSDP2 (`fully_shard`), the FSDPOptions sharding strategies.
- deepspeed.py: DeepSpeed ZeRO stage 2 or 3, with optional optimizer offload.
"""

from __future__ import annotations

import torch

from ...config import DistributedBackend, TrainingArgs
from ..distributed import World
from ..optim import build_optimizer
from ..precision import Precision, decide_precision
from .base import Backend
from .ddp import DDPBackend
from .deepspeed import DeepSpeedBackend
from .fsdp import FSDPBackend

__all__ = ["Backend", "DDPBackend", "DeepSpeedBackend", "FSDPBackend", "build_backend"]


def build_backend(model: torch.nn.Module, args: TrainingArgs, world: World, micro_batches: int = 1,
                  precision: Precision | None = None) -> Backend:
    """The backend `args.distributed_backend` names. Under "ddp" one process trains the
    model as it is; FSDP2 and DeepSpeed wrap even one process (mixed precision, offload).
    `micro_batches`: the most micro-batches a step of the plan has (DeepSpeed's gradient
    accumulation steps, for its bookkeeping). `precision`: the run's (default: decided
    from args and the device, as the worker does)."""
    precision = precision or decide_precision(args, world.device)
    backend = args.distributed_backend
    if backend == DistributedBackend.DEEPSPEED:
        return DeepSpeedBackend(model, world, args, precision, gradient_accumulation_steps=micro_batches)
    if backend == DistributedBackend.FSDP:
        return FSDPBackend(model, world, args, precision)
    if world.distributed:
        return DDPBackend(model, world, args, precision)
    return Backend(model, build_optimizer(model, args), world, precision=precision)

"""DDP: every rank holds the whole model; gradients are all-reduced once per step."""

from __future__ import annotations

import contextlib

import torch

from ...config import TrainingArgs
from ..distributed import World
from ..optim import build_optimizer
from ..precision import Precision, decide_precision
from .base import Backend


class DDPBackend(Backend):
    name = "DDP"

    def __init__(self, model: torch.nn.Module, world: World, args: TrainingArgs, precision: Precision | None = None):
        precision = precision or decide_precision(args, world.device)
        device_ids = [world.device] if world.device.type == "cuda" else None
        # The gradients are views into DDP's reduction buckets: no second copy of them.
        module = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)
        super().__init__(model, build_optimizer(model, args), world, module, precision)

    def sync(self, last: bool):
        return contextlib.nullcontext() if last else self.module.no_sync()

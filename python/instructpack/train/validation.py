"""The validation loss: the mean cross-entropy per target token over the whole held-out set
(data/validation.py), summed over every rank's share before dividing, so it equals one
process computing it alone on the same weights (InstructLab divides once more by the
number of ranks). Dropout is off while it runs; nothing is trained."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import TrainingArgs
from ..data.loader import StepLoader
from ..data.sampler import MultipackSampler
from ..data.shards import TokenDataset
from .backends import Backend
from .distributed import World, all_reduce
from .step import stand_in, summed_loss


@dataclass(frozen=True)
class ValidationResult:
    loss: float  # mean per target token, all ranks
    targets: int
    samples: int


class Validation:
    """The held-out samples, planned once over the ranks as one step of micro-batches."""

    def __init__(self, args: TrainingArgs, world: World, dataset: TokenDataset, sample_ids: np.ndarray):
        self.sampler = MultipackSampler(dataset.lengths, effective_batch_size=len(sample_ids),
                                        max_batch_len=args.max_batch_len, world_size=world.world_size,
                                        rank=world.rank, seed=args.random_seed, subset=sample_ids,
                                        target_counts=dataset.target_counts)
        self.loader = StepLoader(dataset, self.sampler)
        self.world = world

    def run(self, backend: Backend) -> ValidationResult:
        self.sampler.epoch, self.sampler.step = 0, 0  # the same single step every time
        (step,) = list(self.loader)
        module = backend.module
        module.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.world.device)
        samples = 0
        try:
            with torch.no_grad():
                for mb in step.micro_batches:
                    mb = stand_in(mb, self.world.device) if mb.empty else mb.to(self.world.device)
                    with backend.autocast():
                        loss_sum += summed_loss(module, mb).double()
                    samples += mb.num_samples
        finally:
            module.train()
        total, total_samples = all_reduce([loss_sum.item(), float(samples)], self.world)
        return ValidationResult(loss=total / max(step.targets, 1), targets=step.targets, samples=int(total_samples))

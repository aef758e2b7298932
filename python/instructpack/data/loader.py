"""The training data loader: a torch DataLoader over multipack plan entries, grouped into
optimizer steps.

`PackedDataset` is map-style: its keys are the `MicroBatchRef`s that `MultipackSampler`
yields, so any DataLoader settings work (num_workers 0 or more, pinned memory, fork or
spawn workers). A spawned worker receives the dataset's path and maps the shards itself.
`StepLoader` groups the micro-batches of each step and moves the sampler's position as
steps are handed out, so `sampler.state_dict()` saved after a step resumes right after it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .collate import MicroBatch, collate_packed, collate_padded
from .sampler import MicroBatchRef, MultipackSampler
from .shards import TokenDataset


class PackedDataset(torch.utils.data.Dataset):
    def __init__(self, dataset: TokenDataset, padded: bool = False, pad_token_id: int = 0):
        self.dataset = dataset
        self.padded = padded
        self.pad_token_id = pad_token_id

    def __getitem__(self, ref: MicroBatchRef) -> MicroBatch:
        if self.padded:
            return collate_padded(self.dataset, ref, self.pad_token_id)
        return collate_packed(self.dataset, ref)


@dataclass
class Step:
    """This rank's micro-batches of one optimizer step."""
    epoch: int
    step: int
    micro_batches: list[MicroBatch]

    @property
    def targets(self) -> int:
        """Target tokens of the whole step over all ranks: the loss denominator."""
        return self.micro_batches[0].step_targets


def _as_is(micro_batch: MicroBatch) -> MicroBatch:
    return micro_batch


class StepLoader:
    """Iterating yields the rest of the sampler's current epoch, one `Step` at a time."""

    def __init__(self, dataset: TokenDataset, sampler: MultipackSampler, *, num_workers: int = 0,
                 pin_memory: bool = False, multiprocessing_context: str | None = None, pad_token_id: int = 0):
        # pad_token_id (padded plans only) just has to be a valid embedding row: padded
        # positions are masked out of attention and carry no target.
        if sampler.target_counts is None:  # the step's loss denominator comes from the dataset
            sampler.target_counts = dataset.target_counts
        self.sampler = sampler
        # Each pass over a DataLoader draws a seed for its workers from the generator it is
        # given, else from torch's global one: that draw would shift the dropout stream of
        # a resumed run, whose pass starts mid-epoch, after its random state was restored.
        # The plan is seeded already and the collators are deterministic.
        self.loader = torch.utils.data.DataLoader(
            PackedDataset(dataset, padded=sampler.padded, pad_token_id=pad_token_id),
            batch_size=None, sampler=sampler, collate_fn=_as_is, num_workers=num_workers, pin_memory=pin_memory,
            multiprocessing_context=multiprocessing_context if num_workers else None,
            generator=torch.Generator().manual_seed(sampler.seed))

    def __len__(self) -> int:
        """Steps left in the current epoch."""
        return self.sampler.steps_per_epoch - self.sampler.step

    def __iter__(self) -> Iterator[Step]:
        pending: list[MicroBatch] = []
        for micro_batch in self.loader:
            pending.append(micro_batch)
            if micro_batch.last_in_step:
                self.sampler.advance(micro_batch.epoch, micro_batch.step)
                yield Step(micro_batch.epoch, micro_batch.step, pending)
                pending = []


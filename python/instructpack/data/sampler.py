"""Multipack sampling: which samples each rank runs in each micro-batch of each optimizer step.

The C++ planner (csrc/packing.cpp) lays out a whole epoch in one call; this module checks
the settings, looks plan entries up in O(1), reports how good a plan is, and keeps the
(epoch, step) position that a checkpoint stores, so resuming needs no replay.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .. import kernels
from ..errors import PlanError

log = logging.getLogger(__name__)


def check_plan_settings(lengths: np.ndarray, *, effective_batch_size: int, max_batch_len: int,
                        world_size: int) -> None:
    """Raises PlanError, naming the setting and the fix, unless the planner can lay out
    steps of `effective_batch_size` of these samples over `world_size` ranks with at most
    `max_batch_len` tokens per micro-batch. Cheap (O(samples)): the launcher checks before
    any worker starts, and every sampler again."""
    n = len(lengths)
    if n == 0:
        raise PlanError("the dataset has no samples: check the preprocessing summary (every sample may have "
                        "been dropped as too long or without trained tokens)")
    if effective_batch_size < world_size:
        raise PlanError(f"effective_batch_size ({effective_batch_size}) is smaller than the world size "
                        f"({world_size}): every rank needs at least one sample per step; raise "
                        f"effective_batch_size to at least {world_size} or use fewer processes")
    if max_batch_len < 1:
        raise PlanError(f"max_batch_len must be at least 1, got {max_batch_len}")
    longest = int(np.argmax(lengths))
    if lengths[longest] > max_batch_len:
        raise PlanError(f"sample {longest} has {lengths[longest]} tokens, more than max_batch_len "
                        f"({max_batch_len}): raise max_batch_len to at least {lengths[longest]}, or "
                        f"preprocess with max_seq_len <= {max_batch_len} so longer samples are dropped")


@dataclass(frozen=True)
class PlanStats:
    micro_batches: int  # per rank, summed over the epoch's steps
    lower_bound: int  # sum over steps of ceil(step_tokens / (world_size * max_batch_len))
    efficiency: float  # tokens / (world_size * max_batch_len * micro_batches)
    imbalance: float  # epoch time of the busiest rank in each micro-batch over a perfectly level split, minus 1
    worst_step_imbalance: float  # the largest (busiest rank / mean rank) - 1 of any one step

    def summary(self) -> str:
        over = self.micro_batches / self.lower_bound - 1
        return (f"{self.micro_batches} micro-batches per rank (lower bound {self.lower_bound}, +{over:.2%}), "
                f"fill {self.efficiency:.1%}, rank imbalance {self.imbalance:.2%} "
                f"(worst step {self.worst_step_imbalance:.2%})")


@dataclass(frozen=True)
class MicroBatchRef:
    """One micro-batch of one rank: what a data-loader worker needs to build its tensors."""
    epoch: int
    step: int
    index: int  # position within the step on this rank
    count: int  # micro-batches per rank in this step (the same on every rank)
    sample_ids: np.ndarray
    step_targets: int  # trained target tokens in the whole step, all ranks: the loss denominator

    @property
    def last_in_step(self) -> bool:
        return self.index == self.count - 1


class EpochPlan:
    """One epoch's plan as flat arrays. Bins are one rank's micro-batches; a step's bins are
    rank-major, so rank r's micro-batch j of step s is bin `step_bin_begin[s] + r * m + j`."""

    def __init__(self, epoch: int, world_size: int, max_batch_len: int, sample_ids: np.ndarray,
                 bin_begin: np.ndarray, step_bin_begin: np.ndarray, lower_bound: np.ndarray):
        self.epoch = epoch
        self.world_size = world_size
        self.max_batch_len = max_batch_len
        self.sample_ids = sample_ids
        self.bin_begin = bin_begin
        self.step_bin_begin = step_bin_begin
        self.lower_bound = lower_bound
        self.micro_batches_per_step = np.diff(step_bin_begin) // world_size

    @property
    def num_steps(self) -> int:
        return len(self.lower_bound)

    def micro_batches(self, step: int) -> int:
        """Micro-batches every rank runs in `step`."""
        return int(self.micro_batches_per_step[step])

    def micro_batch(self, step: int, rank: int, index: int) -> np.ndarray:
        """Sample ids of rank `rank`'s micro-batch `index` in `step` (possibly empty)."""
        m = self.micro_batches(step)
        if not (0 <= rank < self.world_size and 0 <= index < m):
            raise IndexError(f"rank {rank}, micro-batch {index} out of range "
                             f"(world size {self.world_size}, {m} micro-batches in step {step})")
        b = int(self.step_bin_begin[step]) + rank * m + index
        return self.sample_ids[self.bin_begin[b]:self.bin_begin[b + 1]]

    def step_samples(self, step: int) -> np.ndarray:
        """All samples of `step`, over every rank."""
        first, last = self.step_bin_begin[step], self.step_bin_begin[step + 1]
        return self.sample_ids[self.bin_begin[first]:self.bin_begin[last]]

    def bin_tokens(self, lengths: np.ndarray) -> np.ndarray:
        ends = np.zeros(len(self.sample_ids) + 1, np.int64)
        np.cumsum(lengths[self.sample_ids], out=ends[1:])
        return ends[self.bin_begin[1:]] - ends[self.bin_begin[:-1]]

    def stats(self, lengths: np.ndarray) -> PlanStats:
        W = self.world_size
        tokens = self.bin_tokens(lengths)
        m = self.micro_batches_per_step
        step_of_bin = np.repeat(np.arange(self.num_steps), m * W)
        within = np.arange(len(tokens)) - self.step_bin_begin[:-1][step_of_bin]
        rank_of_bin = within // m[step_of_bin]
        position = within % m[step_of_bin]
        # Ranks wait for each other at every micro-batch (FSDP gathers per layer), so the
        # cost of a step is the sum over positions of the busiest rank's tokens.
        slowest = np.zeros(int(m.sum()), np.int64)
        np.maximum.at(slowest, np.repeat(np.cumsum(m) - m, m * W) + position, tokens)
        rank_tokens = np.bincount(step_of_bin * W + rank_of_bin, weights=tokens,
                                  minlength=self.num_steps * W).reshape(self.num_steps, W)
        mean_rank = rank_tokens.mean(axis=1)
        total = int(tokens.sum())
        return PlanStats(
            micro_batches=int(m.sum()),
            lower_bound=int(self.lower_bound.sum()),
            efficiency=total / (W * self.max_batch_len * int(m.sum())),
            imbalance=float(slowest.sum() * W / total - 1) if total else 0.0,
            worst_step_imbalance=float(np.max(rank_tokens.max(axis=1) / np.maximum(mean_rank, 1e-9)) - 1),
        )


class MultipackSampler:
    """Plans epochs for `world_size` ranks and yields rank `rank`'s micro-batches.

    The epoch is a seeded permutation cut into steps of exactly `effective_batch_size`
    samples; the last step of an epoch keeps the remainder (fewer samples, never dropped,
    never repeated). Iterating yields `MicroBatchRef`s from the current (epoch, step) to the
    end of that epoch; `advance()` moves the position when a step has been consumed.
    """

    def __init__(self, lengths: np.ndarray, *, effective_batch_size: int, max_batch_len: int, world_size: int = 1,
                 rank: int = 0, seed: int = 42, padded: bool = False, target_counts: np.ndarray | None = None,
                 subset: np.ndarray | None = None):
        """`subset`: plan only these samples (ids into `lengths`, which plans and micro-batches
        then name): the training samples when some are held out for validation."""
        self.lengths = np.ascontiguousarray(lengths, dtype=np.int64)
        self.subset = None if subset is None else np.ascontiguousarray(subset, dtype=np.int64)
        self._planned = self.lengths if self.subset is None else self.lengths[self.subset]
        self.target_counts = None if target_counts is None else np.asarray(target_counts, dtype=np.int64)
        self.effective_batch_size = effective_batch_size
        self.max_batch_len = max_batch_len
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.padded = padded
        self._check_settings()
        self.epoch = 0
        self.step = 0
        self._plans: dict[int, EpochPlan] = {}

    def _check_settings(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise PlanError(f"rank {self.rank} is not in a world of {self.world_size} processes")
        check_plan_settings(self._planned, effective_batch_size=self.effective_batch_size,
                            max_batch_len=self.max_batch_len, world_size=self.world_size)
        if self.target_counts is not None and len(self.target_counts) != len(self.lengths):
            raise PlanError(f"target_counts has {len(self.target_counts)} entries for {len(self.lengths)} samples")

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in every epoch, known before any planning."""
        return -(-len(self._planned) // self.effective_batch_size)

    def plan(self, epoch: int) -> EpochPlan:
        if epoch not in self._plans:
            sample_ids, *layout = kernels.plan_epoch(self._planned, self.effective_batch_size, self.max_batch_len,
                                                     self.world_size, self.seed, epoch, self.padded)
            if self.subset is not None:
                sample_ids = self.subset[sample_ids]
            plan = EpochPlan(epoch, self.world_size, self.max_batch_len, sample_ids, *layout)
            self._plans = {epoch: plan}  # keep one epoch: a plan of 1M samples is ~10 MB
            if log.isEnabledFor(logging.INFO):  # the stats cost ~10 ms per million samples
                log.info("epoch %d: %d steps, %s", epoch, plan.num_steps, plan.stats(self.lengths).summary())
        return self._plans[epoch]

    def step_targets(self, plan: EpochPlan, step: int) -> int:
        """Trained target tokens of the whole step (all ranks), or -1 without target counts."""
        if self.target_counts is None:
            return -1
        return int(self.target_counts[plan.step_samples(step)].sum())

    def __len__(self) -> int:
        """Micro-batches left in the current epoch for this rank."""
        plan = self.plan(self.epoch)
        return int(plan.micro_batches_per_step[self.step:].sum())

    def __iter__(self) -> Iterator[MicroBatchRef]:
        epoch, plan = self.epoch, self.plan(self.epoch)
        for step in range(self.step, plan.num_steps):
            count, targets = plan.micro_batches(step), self.step_targets(plan, step)
            for index in range(count):
                yield MicroBatchRef(epoch, step, index, count, plan.micro_batch(step, self.rank, index), targets)

    def advance(self, epoch: int, step: int) -> None:
        """Marks (epoch, step) as consumed: the position moves to the step after it."""
        self.epoch, self.step = (epoch, step + 1) if step + 1 < self.steps_per_epoch else (epoch + 1, 0)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "num_samples": len(self._planned),
                "effective_batch_size": self.effective_batch_size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        # Step contents depend only on the samples, the batch size and the seed (not on the
        # world size or max_batch_len), so only those must match here. (A training run also
        # keeps its world size when it resumes: its full state holds one part per rank.)
        for key in ("num_samples", "effective_batch_size", "seed"):
            ours = len(self._planned) if key == "num_samples" else getattr(self, key)
            if state[key] != ours:
                raise PlanError(f"cannot resume: the checkpoint was planned with {key}={state[key]}, this run has "
                                f"{ours}; resume with the same dataset, effective_batch_size and random_seed")
        if not 0 <= state["step"] < self.steps_per_epoch:
            raise PlanError(f"cannot resume at step {state['step']}: an epoch has {self.steps_per_epoch} steps")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

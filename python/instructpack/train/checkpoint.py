"""Hugging Face checkpoints: when to write them and how to write them atomically.

Each one is a directory that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load as it is: safetensors weights in the training dtype,
config, generation config, and the tokenizer with the chat template the data was rendered
with. It is written to a temporary sibling and renamed into place, so a crash never leaves
a directory that looks complete.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import TrainingArgs
from .distributed import World, barrier

log = logging.getLogger(__name__)

HF_FORMAT = "hf_format"
LAST = "last_epoch"


@dataclass(frozen=True)
class CheckpointSchedule:
    """`save_samples` becomes a whole number of steps (at least one), so a checkpoint always
    happens: with 64 samples per step, save_samples=100 saves every 2 steps (128 samples)."""
    every_steps: int | None  # None: no sample-based checkpoints
    at_epoch_end: bool

    @classmethod
    def from_args(cls, args: TrainingArgs) -> "CheckpointSchedule":
        every = max(1, round(args.save_samples / args.effective_batch_size)) if args.save_samples > 0 else None
        return cls(every, args.checkpoint_at_epoch)

    def due(self, global_step: int, epoch_end: bool, last_step: bool) -> bool:
        """After optimizer step `global_step` (1-based). The end of training always saves."""
        return (last_step or (epoch_end and self.at_epoch_end)
                or (self.every_steps is not None and global_step % self.every_steps == 0))


def checkpoint_dir(ckpt_output_dir: str | Path, total_samples: int, keep_last_only: bool) -> Path:
    name = LAST if keep_last_only else f"samples_{total_samples}"
    return Path(ckpt_output_dir) / HF_FORMAT / name


def save_hf_checkpoint(model: torch.nn.Module, tokenizer, directory: Path, world: World) -> None:
    """Called on every rank (sharded backends gather weights collectively); rank 0 writes."""
    state = model.state_dict()
    if world.is_main:
        tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            config = model.config
            use_cache, config.use_cache = config.use_cache, True  # trained without; generate with
            try:
                model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            finally:
                config.use_cache = use_cache
            tokenizer.save_pretrained(tmp)
            _replace(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("saved checkpoint %s", directory)
    barrier(world)


def _replace(tmp: Path, target: Path) -> None:
    """Rename tmp to target; an existing target (last_epoch) is moved aside first and
    removed only after the new one is in place."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)

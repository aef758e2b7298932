"""When checkpoints are due, and where they go in ckpt_output_dir:
- `hf_format/samples_<N>` (or `hf_format/last_epoch`): Hugging Face checkpoints (hf.py);
- `deepspeed/...`: DeepSpeed-native checkpoints (deepspeed_options.save_samples);
- `full_state/step_<N>`: the full training state for resuming (full_state.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...config import DistributedBackend, TrainingArgs

HF_FORMAT = "hf_format"
DEEPSPEED_FORMAT = "deepspeed"  # DeepSpeed-native checkpoints (deepspeed_options.save_samples)
LAST = "last_epoch"


@dataclass(frozen=True)
class CheckpointSchedule:
    """`save_samples` becomes a whole number of steps (at least one), so a checkpoint always
    happens: with 64 samples per step, save_samples=100 saves every 2 steps (128 samples)."""
    every_steps: int | None  # None: no sample-based checkpoints
    at_epoch_end: bool
    at_last_step: bool = True

    @classmethod
    def from_args(cls, args: TrainingArgs) -> CheckpointSchedule:
        return cls.every(args.save_samples, args.effective_batch_size, at_epoch_end=args.checkpoint_at_epoch)

    @classmethod
    def deepspeed_native(cls, args: TrainingArgs) -> CheckpointSchedule | None:
        """DeepSpeed-native checkpoints every deepspeed_options.save_samples; None when off."""
        save_samples = args.deepspeed_options.save_samples
        if args.distributed_backend != DistributedBackend.DEEPSPEED or not save_samples:
            return None
        return cls.every(save_samples, args.effective_batch_size, at_epoch_end=False)

    @classmethod
    def full_state(cls, args: TrainingArgs) -> CheckpointSchedule:
        """Full training state: at epoch ends (accelerate_full_state_at_epoch) and every
        full_state_every_steps steps; the end of training is an epoch end."""
        every = args.full_state_every_steps if args.full_state_every_steps > 0 else None
        return cls(every, at_epoch_end=args.accelerate_full_state_at_epoch, at_last_step=False)

    @classmethod
    def every(cls, save_samples: int | None, effective_batch_size: int, *, at_epoch_end: bool) -> CheckpointSchedule:
        steps = max(1, round(save_samples / effective_batch_size)) if save_samples and save_samples > 0 else None
        return cls(steps, at_epoch_end)

    def due(self, global_step: int, epoch_end: bool, last_step: bool) -> bool:
        """After optimizer step `global_step` (1-based)."""
        return ((last_step and self.at_last_step) or (epoch_end and self.at_epoch_end)
                or (self.every_steps is not None and global_step % self.every_steps == 0))


def checkpoint_dir(ckpt_output_dir: str | Path, total_samples: int, keep_last_only: bool,
                   kind: str = HF_FORMAT) -> Path:
    name = LAST if keep_last_only else f"samples_{total_samples}"
    return Path(ckpt_output_dir) / kind / name

"""DeepSpeed-native checkpoints (`deepspeed_options.save_samples`): DeepSpeed's own format,
for tools that read it; instructpack resumes from full-state checkpoints (full_state.py)."""

from __future__ import annotations

from pathlib import Path

from ..backends import Backend
from ..distributed import World
from .collective import write_collectively


def save_native_checkpoint(backend: Backend, directory: Path, world: World) -> None:
    """Every rank writes its part (DeepSpeed's save has barriers of its own); a rank that
    fails raises at once and its exit ends the job."""
    write_collectively(lambda: backend.save_weights_and_optimizer(directory), world, directory,
                       kept="earlier checkpoints are intact")

"""Writing a checkpoint from several processes so that a failure anywhere is a failure
everywhere: every rank raises CheckpointError together, instead of some waiting forever in
the next collective while one has given up."""

from __future__ import annotations

from pathlib import Path

from ...errors import CheckpointError
from ..distributed import World, all_reduce


def write_collectively(work, world: World, target: Path, *, main_only: bool = False, kept: str = "") -> None:
    """Runs `work` (on rank 0 only if main_only), then lets every rank know whether it
    failed, so that all raise CheckpointError together instead of some waiting forever in
    the next collective. `kept` says what is still intact.

    Work on every rank may hold collectives of its own (DeepSpeed's save has barriers): a
    rank that fails in it cannot know which collective the others wait in, so it raises at
    once; its exit ends the job (torchrun stops the others) and the launcher names it."""
    error = None
    if not main_only or world.is_main:
        try:
            work()
        except Exception as e:  # disk full, permissions, quota (torch.save says RuntimeError)
            if not main_only:
                raise _write_error(target, e, kept) from e
            error = e
    (failed,) = all_reduce([float(error is not None)], world, op="max")
    if failed:
        raise _write_error(target, error, kept) from error


def _write_error(target: Path, error: Exception | None, kept: str) -> CheckpointError:
    cause = f"{error}" if error is not None else "rank 0 could not write it"
    return CheckpointError(f"could not write {target}: {cause}; {kept}. Free space on that disk or point "
                           "ckpt_output_dir at a writable one, then run again")

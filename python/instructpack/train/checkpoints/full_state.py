"""Full-state checkpoints: everything a run needs to continue exactly where it stopped.

`ckpt_output_dir/full_state/step_<N>/` holds, after optimizer step N:
- `model/`: the trained weights and the optimizer state, as the backend keeps them (one
  file per rank for sharded backends, DeepSpeed's own files under DeepSpeed);
- `rng_rank<R>.pt`: the random generators of rank R (torch, CUDA, numpy, Python), so
  dropout continues the same stream;
- `trainer_state.json`: progress (step, samples, tokens, elapsed time), the planner
  position (epoch, step), the LR schedule, and the fingerprint of what the run trains
  (identity.py reads it and decides whether a run may resume);
- `COMPLETE`, written last.

Writing is atomic: every rank writes into `.step_<N>.tmp`, rank 0 fsyncs it, renames it
into place and then writes the mark. A directory without the mark (a crash, a full disk) is
never resumed from, and the previous checkpoint is removed only after the new one is
complete. Resuming costs the same whatever the step: nothing is replayed, the sampler jumps
to its saved position.

Every file is loaded with `torch.load(weights_only=True)` or as JSON: a checkpoint
directory cannot make the library run code.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...errors import CheckpointError, ResumeError
from ...fileio import fsync_dir, fsync_tree, write_synced
from ..distributed import World, all_reduce, barrier
from .collective import write_collectively
from .identity import (
    COMPLETE,
    MODEL_STATE,
    TRAINER_STATE,
    DatasetSummary,
    Progress,
    TrainerState,
    check_fingerprint,
    encode_trainer_state,
    read_trainer_state,
)
from .resumable import (
    complete_checkpoints,
    fallback_advice,
    full_state_root,
    latest_checkpoint,
    record_of,
    select_checkpoint,
    step_of,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ writing

def save_full_state(ckpt_output_dir: str | Path, backend, scheduler, sampler, progress: Progress,
                    fingerprint: dict[str, str], world: World, *, dataset: DatasetSummary | None = None,
                    keep_last: int = 2) -> Path:
    """Writes `full_state/step_<N>` atomically (a collective: every rank calls it), then
    removes all but the newest `keep_last` complete ones. Raises CheckpointError on every
    rank if any rank failed to write."""
    root = full_state_root(ckpt_output_dir)
    final = root / f"step_{progress.step}"
    tmp = root / f".step_{progress.step}.tmp"

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.iterdir():  # left by a crash or a full disk: never resumed from
            ours = (stale.name.startswith(".step_") and stale.name.endswith(".tmp")) or step_of(stale) is not None
            if ours and stale.is_dir() and not (stale / COMPLETE).is_file():
                shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()

    def write_rank_files() -> None:
        backend.save_weights_and_optimizer(tmp / MODEL_STATE)
        _save_rng(tmp / f"rng_rank{world.rank:05d}.pt")

    def finish() -> None:
        state = TrainerState(time=time.time(), progress=progress, sampler=sampler.state_dict(),
                             scheduler=scheduler.state_dict(), fingerprint=fingerprint, dataset=dataset)
        write_synced(tmp / TRAINER_STATE, encode_trainer_state(state))
        fsync_tree(tmp)
        files = record_of(tmp)  # read back from the page cache: every file's size and checksum
        os.replace(tmp, final)
        fsync_dir(root)
        write_synced(final / COMPLETE, json.dumps({"step": progress.step, "files": files}) + "\n")
        fsync_dir(final)

    previous = latest_checkpoint(ckpt_output_dir)
    kept = (f"the previous full state, {previous}, is intact (a run started again resumes from it)" if previous
            else "there is no earlier full state (a run started again starts from the beginning)")
    try:
        write_collectively(prepare, world, final, main_only=True, kept=kept)
        write_collectively(write_rank_files, world, final, kept=kept)
        write_collectively(finish, world, final, main_only=True, kept=kept)
    except CheckpointError:
        if world.is_main:  # half-written: free the space again
            shutil.rmtree(tmp, ignore_errors=True)
            if not (final / COMPLETE).is_file():
                shutil.rmtree(final, ignore_errors=True)
        raise
    if world.is_main:
        for old in complete_checkpoints(ckpt_output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("saved full training state %s", final)
    barrier(world)
    return final


def check_shared(ckpt_output_dir: str | Path, world: World) -> None:
    """Every rank writes its part of a full-state checkpoint into one directory, so all of
    them must see the same ckpt_output_dir (a filesystem every machine shares). Checked
    once at the start: rank 0 leaves a token there, every rank reads it."""
    if not world.distributed:
        return
    root = full_state_root(ckpt_output_dir)
    token = random.SystemRandom().randrange(1, 2**40) if world.is_main else 0
    probe = root / ".shared"
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_text(str(token))
    (token,) = all_reduce([float(token)], world)  # rank 0's token, once it is written
    try:
        seen = probe.read_text() == str(int(token))
    except OSError:
        seen = False
    (missing,) = all_reduce([float(not seen)], world, op="max")
    if world.is_main:
        probe.unlink(missing_ok=True)
    if missing:
        who = "another rank" if seen else f"rank {world.rank}"
        raise ResumeError(f"{root} is not the same directory on every machine ({who} cannot see the files rank 0 "
                          "writes there): full-state checkpoints hold every rank's part, so ckpt_output_dir must be "
                          "on a filesystem that all machines share")


# ------------------------------------------------------------------ random generators

def _save_rng(path: Path) -> None:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    with open(path, "wb") as f:
        torch.save(state, f)


def _load_rng(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------ resuming

@dataclass(frozen=True)
class LauncherChoice:
    """The full state the launcher verified and chose to resume; None: a fresh start."""
    checkpoint: str | None


def resume(ckpt_output_dir: str | Path, backend, scheduler, sampler, fingerprint: dict[str, str],
           world: World, *, dataset: DatasetSummary | None = None, choice: LauncherChoice | None = None
           ) -> tuple[Progress, Path | None]:
    """Loads the newest complete full-state checkpoint that verifies (resumable.py) into the
    backend, the schedule, the sampler and this rank's random generators; a fresh Progress
    when there is none. Every rank must see the same checkpoint (ckpt_output_dir on a shared
    filesystem). With the launcher's `choice`, that one (already verified) is loaded, and a
    checkpoint directory changed since is refused; without, rank 0 chooses and verifies."""
    check_shared(ckpt_output_dir, world)
    if world.is_main and choice is None:
        select_checkpoint(ckpt_output_dir)  # sets damaged newer ones aside
    barrier(world)
    checkpoint = latest_checkpoint(ckpt_output_dir)
    if choice is not None and str(checkpoint) != str(choice.checkpoint):
        raise ResumeError(f"the newest full state in {full_state_root(ckpt_output_dir)} is "
                          f"{checkpoint or 'none'}, not {choice.checkpoint or 'none'} as when the launcher checked: "
                          "another run writes into this ckpt_output_dir")
    state = read_trainer_state(checkpoint) if checkpoint is not None else None
    if state is not None:
        check_fingerprint(state.fingerprint, fingerprint, checkpoint, saved_dataset=state.dataset,
                          our_dataset=dataset)
    step = step_of(checkpoint) if checkpoint is not None else -1
    highest, lowest = all_reduce([step, -step], world, op="max")
    if highest != -lowest:
        raise ResumeError(f"the ranks see different full-state checkpoints in {full_state_root(ckpt_output_dir)} "
                          "(this rank: " + (str(checkpoint) if checkpoint else "none") + "); ckpt_output_dir must "
                          "be one directory that every machine shares")
    if checkpoint is None:
        return Progress.start(), None
    try:
        backend.load_weights_and_optimizer(checkpoint / MODEL_STATE)  # DeepSpeed returns its client state: unused
        scheduler.load_state_dict(state.scheduler)
        sampler.load_state_dict(state.sampler)
        _load_rng(checkpoint / f"rng_rank{world.rank:05d}.pt")
    except (OSError, RuntimeError, KeyError, TypeError) as e:  # what the checksums cannot see (or were not kept)
        raise ResumeError(f"{checkpoint} is damaged ({type(e).__name__}: {e}); {fallback_advice(checkpoint)}") from e
    progress = state.progress
    log.info("resumed from %s: step %d, %d samples seen, epoch %d step %d next", checkpoint, progress.step,
             progress.samples, sampler.epoch, sampler.step)
    return progress, checkpoint

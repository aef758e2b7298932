"""Which full-state checkpoint a run resumes: the complete ones in `ckpt_output_dir/full_state`,
the checksums every one records of its files, and the newest that verifies.

A checkpoint is complete when its `COMPLETE` mark exists; the mark, written last, holds the
size and checksum (csrc's checksum64, several GB/s) of every other file. Resuming verifies
them all: a file changed in any byte is named. When the newest checkpoint is damaged and
an older complete one is kept (`full_state_keep_last`, default 2), the run falls back to
that one and sets the damaged one aside as `step_<N>.damaged` (kept for inspection, never
resumed); when none is, the error says so. No torch here: the launcher chooses before any
worker starts.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
from pathlib import Path

from ... import kernels
from ...errors import ResumeError
from ...fileio import lies_inside
from .identity import COMPLETE, FULL_STATE, TrainerState, read_trainer_state

log = logging.getLogger(__name__)

DAMAGED_SUFFIX = ".damaged"


def full_state_root(ckpt_output_dir: str | Path) -> Path:
    return Path(ckpt_output_dir) / FULL_STATE


def step_of(directory: Path) -> int | None:
    name = directory.name
    return int(name[5:]) if name.startswith("step_") and name[5:].isdigit() else None


def complete_checkpoints(ckpt_output_dir: str | Path) -> list[Path]:
    """Complete full-state checkpoints, oldest first (not verified)."""
    root = full_state_root(ckpt_output_dir)
    if not root.is_dir():
        return []
    found = [(step_of(d), d) for d in root.iterdir() if d.is_dir() and (d / COMPLETE).is_file()]
    return [d for step, d in sorted((s, d) for s, d in found if s is not None)]


def latest_checkpoint(ckpt_output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(ckpt_output_dir)
    return found[-1] if found else None


# ------------------------------------------------------------------ checksums

def file_checksum(path: Path) -> str:
    size = path.stat().st_size
    if size == 0:
        return f"{kernels.checksum64(b''):016x}"
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return f"{kernels.checksum64(data):016x}"


def record_of(directory: Path, skip: set[str] = frozenset()) -> dict[str, list]:
    """Relative path -> [size, checksum] of every file under `directory` (but `skip`)."""
    record = {}
    for folder, _, names in os.walk(directory):
        for name in names:
            path = Path(folder) / name
            relative = str(path.relative_to(directory))
            if relative not in skip:
                record[relative] = [path.stat().st_size, file_checksum(path)]
    return record


def verify(checkpoint: Path) -> None:
    """Raises ResumeError naming the first file that is missing, cut short or changed."""
    try:
        mark = json.loads((checkpoint / COMPLETE).read_text())
        files = mark.get("files")
        if files is None:  # written by instructpack 0.1.0, before checksums were recorded
            log.warning("%s records no checksums (an older instructpack wrote it): resumed unverified", checkpoint)
            return
        entries = sorted((str(name), int(size), str(checksum)) for name, (size, checksum) in files.items())
    except (OSError, ValueError, AttributeError, TypeError) as e:
        raise ResumeError(f"{checkpoint / COMPLETE}: unreadable ({e}); the checkpoint is damaged") from None
    for name, size, checksum in entries:
        path = checkpoint / name
        if not lies_inside(path, checkpoint):
            raise ResumeError(f"{checkpoint / COMPLETE} names {name!r}, outside the checkpoint; it is damaged")
        if not path.is_file():
            raise ResumeError(f"{checkpoint} is damaged: {name} is missing")
        if path.stat().st_size != size:
            raise ResumeError(f"{checkpoint} is damaged: {name} holds {path.stat().st_size} bytes, {size} were "
                              "written (cut short or replaced)")
        if file_checksum(path) != checksum:
            raise ResumeError(f"{checkpoint} is damaged: {name} changed since it was written (checksum "
                              f"{file_checksum(path)}, {checksum} when written)")


# ------------------------------------------------------------------ choosing

def select_checkpoint(ckpt_output_dir: str | Path, *, verify_files: bool = True) -> tuple[Path | None,
                                                                                        TrainerState | None]:
    """The newest complete checkpoint that verifies, and its trainer state; (None, None) if
    there is none. Newer damaged ones are set aside (renamed step_<N>.damaged) with a
    warning; if every complete one is damaged, ResumeError names the newest's fault."""
    candidates = complete_checkpoints(ckpt_output_dir)
    first_error = None
    for checkpoint in reversed(candidates):
        try:
            if verify_files:
                verify(checkpoint)
            state = read_trainer_state(checkpoint)
        except ResumeError as e:
            first_error = first_error or e
            older = [c for c in candidates if c != checkpoint and step_of(c) < step_of(checkpoint)]
            if older:
                aside = checkpoint.with_name(checkpoint.name + DAMAGED_SUFFIX)
                os.replace(checkpoint, aside)
                log.warning("%s; set aside as %s, resuming from the one before it, %s", e, aside, older[-1])
            continue
        return checkpoint, state
    if first_error is not None:
        root = full_state_root(ckpt_output_dir)
        raise ResumeError(f"{first_error}; no earlier complete full state is kept in {root} to fall back to: "
                          f"start fresh by moving {root} away, or use another ckpt_output_dir") from None
    return None, None


def fallback_advice(checkpoint: Path) -> str:
    """What to do about a checkpoint found damaged while loading it, naming only what exists."""
    root = checkpoint.parent
    older = [c for c in complete_checkpoints(root.parent) if step_of(c) < step_of(checkpoint)]
    if older:
        return f"move it away to resume from {older[-1]}, or start fresh by moving {root} away"
    return f"no earlier full state is kept to fall back to: start fresh by moving {root} away"

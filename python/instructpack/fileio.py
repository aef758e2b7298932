"""Durable, atomic writes, shared by datasets and checkpoints: a directory is written
aside, fsync'd, and renamed into place, so a crash never leaves one that looks complete.
No torch here: preprocessing uses it too."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def write_synced(path: Path, text: str) -> None:
    """Writes `text` to `path` and waits until it is on the disk."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Makes the entries of directory `path` (new names, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root`, whoever wrote them."""
    for directory, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(directory))


def replace_directory(tmp: Path, target: Path) -> None:
    """Renames the finished directory `tmp` to `target`. An existing `target` is moved aside
    first and removed only after the new one is in place, so there is always one whole."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

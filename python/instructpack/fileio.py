"""Durable, atomic writes, shared by datasets, checkpoints, metrics and the launcher's
status files: a file or a directory is written aside, fsync'd, and renamed into place, so a
crash never leaves one that looks complete. No torch here: preprocessing uses it too."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

_TMP = ".tmp-"  # in the names of what is written aside: .<target>.tmp-<pid>-<random>


def lies_inside(path: Path, directory: Path) -> bool:
    """`path` is `directory` or somewhere below it (links resolved)."""
    path, directory = Path(path).resolve(), Path(directory).resolve()
    return path == directory or directory in path.parents


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


def _aside(target: Path) -> Path:
    return target.parent / f".{target.name}{_TMP}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def replace_file(path: Path, data: bytes) -> None:
    """Replaces (or creates) the file `path` with `data`: a reader sees the old contents or
    the new ones, never a part."""
    tmp = _aside(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


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


@contextlib.contextmanager
def directory_written_aside(target: Path) -> Iterator[Path]:
    """Yields a new, empty directory beside `target` to write into. When the block ends
    normally, it replaces `target` (`replace_directory`); when it raises, it is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _aside(target)
    tmp.mkdir()
    try:
        yield tmp
        replace_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temporaries(target: Path) -> None:
    """What `directory_written_aside` and `replace_file` left beside `target` in processes
    that were killed (their process is gone)."""
    for tmp in target.parent.glob(f".{target.name}{_TMP}*"):
        try:
            pid = int(tmp.name.rsplit(_TMP, 1)[1].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        except (ValueError, PermissionError):
            pass

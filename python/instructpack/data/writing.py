"""Putting a dataset into its directory: beside whatever else is there, never touching it,
and atomically.

The directory is never renamed or replaced (it may be a mount point, or hold the user's
other files). A new dataset's shards get names of their own generation,
`shard-<generation>-00000.bin`, ..., so they never collide with the previous dataset's
shards or with anyone else's files; `manifest.json` is replaced last and atomically, and
that is the commit: until then readers see the previous dataset whole, after it the new
one whole. Only then are the previous dataset's shards (those its manifest lists) removed.

A process killed while writing leaves a journal, `.instructpack-writing-<generation>`
(its pid and host inside), next to the shards it was writing. The next write into the
directory removes, for each journal whose process is gone, the files of that generation
and the journal: exactly what the dead process wrote, nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

from ..errors import DatasetError, PathExistsError
from ..fileio import fsync_dir, replace_file
from .manifest import MANIFEST, Manifest, encode_manifest, read_manifest

JOURNAL_PREFIX = ".instructpack-writing-"


class DatasetWrite:
    """One dataset being written into `directory` (see the module docstring)."""

    def __init__(self, directory: Path, generation: str):
        self.directory = directory
        self.generation = generation
        self.journal = directory / f"{JOURNAL_PREFIX}{generation}"

    def shard_name(self, index: int) -> str:
        return f"shard-{self.generation}-{index:05d}.bin"

    def commit(self, manifest: Manifest) -> None:
        """Makes `manifest` (listing this write's shards) the directory's dataset, then
        removes the shards of the dataset it replaces."""
        previous = existing_manifest(self.directory)
        replace_file(self.directory / MANIFEST, encode_manifest(manifest))
        kept = {s.file for s in manifest.shards}
        for old in previous.shards if previous is not None else []:
            if old.file not in kept:
                (self.directory / old.file).unlink(missing_ok=True)
        self.journal.unlink(missing_ok=True)
        fsync_dir(self.directory)

    def abandon(self) -> None:
        _remove_generation(self.directory, self.generation)


@contextlib.contextmanager
def dataset_write(directory: str | Path) -> Iterator[DatasetWrite]:
    """A new dataset for `directory`; call `commit(manifest)` on it inside the block. If the
    block raises (or never commits), everything this write put there is removed again. The
    caller holds the directory's preprocessing lock (preprocess.py), so no other write is
    under way in it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    remove_abandoned_writes(directory)
    write = DatasetWrite(directory, uuid.uuid4().hex[:12])
    replace_file(write.journal, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
    try:
        yield write
    finally:
        if write.journal.exists():  # not committed
            write.abandon()


def existing_manifest(directory: Path) -> Manifest | None:
    """The dataset already in `directory`, if any. A manifest.json that is not one of ours
    is refused: replacing it would destroy someone else's file."""
    if not (directory / MANIFEST).is_file():
        return None
    try:
        return read_manifest(directory)
    except DatasetError as e:
        raise PathExistsError("", ("data_output_path",), f"holds a {MANIFEST} that instructpack cannot read as its "
                              f"own ({e}); it is not replaced: choose another directory, or remove that file if "
                              "it is a damaged instructpack dataset", str(directory)) from None


def remove_abandoned_writes(directory: Path) -> None:
    """What writes that were killed left in `directory` (their process is gone)."""
    host = socket.gethostname()
    for journal in directory.glob(f"{JOURNAL_PREFIX}*"):
        try:
            owner = json.loads(journal.read_text())
            if owner.get("host") != host:
                continue  # another machine's write: it may still run; its own next write cleans it
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            _remove_generation(directory, journal.name[len(JOURNAL_PREFIX):])
        except (OSError, ValueError, KeyError, TypeError, PermissionError):
            continue


def _remove_generation(directory: Path, generation: str) -> None:
    # shard-<generation>-*: the shards and the C++ writer's side files (.mask, .index).
    for path in directory.glob(f"shard-{generation}-*"):
        path.unlink(missing_ok=True)
    (directory / f"{JOURNAL_PREFIX}{generation}").unlink(missing_ok=True)

"""Who works in a directory: advisory locks (flock) on a lock file inside it, holding a note
of the holder (host, pid, start time, what it is doing) for messages.

The kernel drops a process's locks when it dies, however it dies, so a lock left by a run
that was killed never blocks the next one; the note may stay behind, but it is only read
while the lock is held. On NFS, Linux implements flock with the server's byte-range locks,
so the lock holds across machines that share the directory. No torch here: the launcher
and the preprocessing command take these locks.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import DirectoryInUseError

log = logging.getLogger(__name__)

POLL_S = 0.5


def holder_note(what: str, **extra) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "what": what, **extra}


def describe(note: dict | None) -> str:
    if not note:
        return "another process"
    return (f"{note.get('what', 'a process')} (host {note.get('host')}, pid {note.get('pid')}, "
            f"started {note.get('started')})")


def read_note(path: Path) -> dict | None:
    try:
        note = json.loads(path.read_text())
        return note if isinstance(note, dict) else None
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def exclusive(path: Path, note: dict, *, wait_s: float = 0.0, waiting: str = "") -> Iterator[None]:
    """Holds an exclusive lock on `path` (created if needed) for the block, with `note` in it,
    and removes the lock file when the block ends (the directory keeps only what the work
    left there). If another process holds it: wait up to `wait_s` seconds (logging `waiting`
    once), then raise DirectoryInUseError naming the holder. Where the filesystem has no
    locks (ENOLCK), a warning says the protection is off, and the block runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, wait_s, waiting)
    if fd is None:
        yield
        return
    try:
        os.pwrite(fd, (json.dumps(note) + "\n").encode(), 0)
        yield
    finally:
        # Removed while still held: a process waiting on this file finds it gone once it gets
        # the lock, and starts again on a new one (_acquire), so no two ever hold it at once.
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def held_by(path: Path) -> dict | None:
    """The note of whoever holds the lock on `path` now, or None if nobody does."""
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while anyone holds it, shared or not
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return read_note(path) or {}
        return None  # no locks on this filesystem: nobody can be said to hold it
    else:
        return None
    finally:
        os.close(fd)


def _acquire(path: Path, wait_s: float, waiting: str) -> int | None:
    """A descriptor of `path` holding its exclusive lock; None where the filesystem does not
    lock at all."""
    deadline = time.monotonic() + wait_s
    said = False
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)  # the last holder may have removed it, empty
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno == errno.ENOLCK:
                log.warning("%s: this filesystem does not support locks; nothing keeps two processes from "
                            "writing here at once", path)
                return None
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.ESTALE):
                raise
        else:
            if _same_file(fd, path):
                os.ftruncate(fd, 0)
                return fd
            os.close(fd)  # the holder removed it as we got it: start again on the new one
            continue
        holder = read_note(path)
        if time.monotonic() >= deadline:
            raise DirectoryInUseError(path.parent, describe(holder), waited_s=wait_s)
        if not said and waiting:
            log.warning("%s: waiting for %s", waiting, describe(holder))
            said = True
        time.sleep(POLL_S)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def hold_shared_until_exit(path: Path) -> None:
    """A shared lock on `path`, held until this process ends (its descriptor stays open)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError as e:
        os.close(fd)
        if e.errno != errno.ENOLCK:
            raise

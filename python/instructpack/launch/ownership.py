"""One run per ckpt_output_dir (locks.py does the locking).

- The launcher of a one-machine job, or of node 0 of a job on several, holds
  `ckpt_output_dir/.instructpack-run.lock` from its checks to its end; a second run is
  refused before any work, naming the first (host, pid, start time).
- The launcher of node k > 0 holds `.instructpack-run-node<k>.lock` (two node-k launchers
  conflict) and waits until node 0's launcher holds the run lock for the same job (the
  same rendezvous), as all machines of one job share the directory.
- Every worker holds a shared lock on `.instructpack-workers.lock` (`-node<k>` on node k)
  while it lives: a launcher refuses to start while workers of an earlier run on its
  machine (that outlived their launcher) still hold it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from .. import locks
from ..config import TorchrunArgs
from ..errors import ConfigError, DirectoryInUseError
from ..train.job import workers_lock

RUN_LOCK = ".instructpack-run.lock"
NODE0_WAIT_S = 900.0  # as long as torchrun waits for the nodes of a job to join
WORKERS_EXIT_WAIT_S = 10.0  # workers whose launcher died are being killed: give them a moment


def job_identity(t: TorchrunArgs) -> str:
    """What the launchers of one job on several machines have in common."""
    endpoint = t.rdzv_endpoint or f"{t.master_addr}:{t.master_port or 29500}"
    return f"{endpoint} rdzv_id={t.rdzv_id}"


@contextlib.contextmanager
def own_output_dir(ckpt_output_dir: Path, t: TorchrunArgs) -> Iterator[None]:
    """Held for the whole run_training call."""
    job = job_identity(t) if t.nnodes > 1 else None
    note = locks.holder_note("run_training", job=job, node_rank=t.node_rank)
    if t.node_rank == 0:
        with locks.exclusive(ckpt_output_dir / RUN_LOCK, note):
            _no_workers_left(ckpt_output_dir, 0)
            yield
        return
    with locks.exclusive(ckpt_output_dir / f".instructpack-run-node{t.node_rank}.lock", note):
        _wait_for_node0(ckpt_output_dir, job)
        _no_workers_left(ckpt_output_dir, t.node_rank)
        yield


def _no_workers_left(ckpt_output_dir: Path, node_rank: int) -> None:
    path = ckpt_output_dir / workers_lock(node_rank)
    deadline = time.monotonic() + WORKERS_EXIT_WAIT_S
    while locks.held_by(path) is not None:
        if time.monotonic() >= deadline:
            raise DirectoryInUseError(ckpt_output_dir, f"worker processes of an earlier run that are still alive "
                                      f"(`fuser {path}` lists them)", waited_s=WORKERS_EXIT_WAIT_S)
        time.sleep(locks.POLL_S)


def _wait_for_node0(ckpt_output_dir: Path, job: str) -> None:
    path = ckpt_output_dir / RUN_LOCK
    deadline = time.monotonic() + NODE0_WAIT_S
    while True:
        holder = locks.held_by(path)
        if holder is not None and holder.get("job") == job:
            return
        if holder is not None and holder.get("job") != job:
            raise DirectoryInUseError(ckpt_output_dir, f"another job: {locks.describe(holder)}, job "
                                      f"{holder.get('job')}, not this one ({job})")
        if time.monotonic() >= deadline:
            raise ConfigError("training_args", ("ckpt_output_dir",), f"node 0 of this job ({job}) has not taken "
                              f"this directory after {NODE0_WAIT_S:.0f} s: start node 0 too, and give every machine "
                              "the same ckpt_output_dir, on a filesystem they share", str(ckpt_output_dir))
        time.sleep(locks.POLL_S)

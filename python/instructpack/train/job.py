"""Everything the launcher (launch/, the user's process) and its workers (under torchrun) say
to each other: files, each a typed document, and the names they go by. The launcher
writes the job and may write a stop request; a worker writes how it failed, and rank 0 how
a requested stop ended. No torch here.

- `ckpt_output_dir/job.json` (JobConfig; `job-node<k>.json` on node k > 0): what to train;
  torchrun runs
  `python -m instructpack.train.worker job.json STATUS_DIR` (the status directory is given
  on the command line too, so that a worker that cannot even read the job can say why).
- In the job's private status directory:
  - `STOP`: the launcher got SIGTERM or SIGUSR1 and asks every worker to stop after the
    current step; its text says what the launcher received.
  - `rank<N>.json` (FailureRecord): rank N raised; the launcher reports the first one.
  - `stopped.json` (StopRecord): the run stopped on request, after which step, with its
    full state where.
- `ckpt_output_dir/.instructpack-workers.lock` (`-node<k>` on node k > 0): every worker holds
  a shared lock on it while it lives, so the launcher of a later run on that machine can
  tell that workers of this one survive.
"""

from __future__ import annotations

import os
import signal
import time
import traceback
from pathlib import Path

import msgspec

from ..config import TrainingArgs
from ..fileio import replace_file

STOP_FILE = "STOP"
STOPPED_FILE = "stopped.json"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # ask a run to save its state and stop
# With on_demand_checkpointing, every signal a scheduler or Kubernetes may send before its
# SIGKILL asks the same (InstructLab's set), and so does InstructLab's trigger file:
# /dev/shm/$CHECKPOINT_TRIGGER_FILENAME (default checkpoint_requested), written by the
# user's tooling on any node.
ON_DEMAND_SIGNALS = STOP_SIGNALS + (signal.SIGINT, signal.SIGUSR2, signal.SIGXCPU, signal.SIGHUP)
TRIGGER_DIR = Path("/dev/shm")


def stop_signals(args: TrainingArgs) -> tuple[signal.Signals, ...]:
    return ON_DEMAND_SIGNALS if args.on_demand_checkpointing else STOP_SIGNALS


def checkpoint_trigger() -> Path:
    return TRIGGER_DIR / os.environ.get("CHECKPOINT_TRIGGER_FILENAME", "checkpoint_requested")


def job_file(node_rank: int) -> str:
    """In ckpt_output_dir: one per machine of the job (they may share the directory)."""
    return "job.json" if node_rank == 0 else f"job-node{node_rank}.json"


def workers_lock(node_rank: int) -> str:
    """In ckpt_output_dir: every worker of that machine holds it (shared) while it lives."""
    return ".instructpack-workers.lock" if node_rank == 0 else f".instructpack-workers-node{node_rank}.lock"


class JobConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    training_args: TrainingArgs
    dataset_path: str  # the preprocessed (or mock) dataset the workers read
    # The dataset the launcher checked (checkpoints.identity.dataset_identity): a worker that
    # finds another one there refuses to start. "": not checked (a job built by hand).
    dataset_identity: str = ""
    status_dir: str  # the launcher's private directory for STOP, rank<N>.json and stopped.json
    # The full state the launcher verified and chose to resume (None: a fresh start), when
    # `resume_checked`; otherwise the workers choose (and verify) themselves.
    resume_from: str | None = None
    resume_checked: bool = False
    node_rank: int = 0  # the machine this job file is for
    progress_bar: bool = False  # the launcher's console is a terminal
    # TrainingArgs.callbacks, pickled by the launcher (callbacks.pack_callbacks); the job's
    # training_args hold None there.
    callbacks: str | None = None
    # When the launcher started (time.time() on this machine): a checkpoint trigger file
    # older than that was left by another run and asks nothing of this one.
    started_at: float = 0.0


class FailureRecord(msgspec.Struct, kw_only=True):
    rank: int
    time: float  # when it failed (time.time()): the earliest is the first failure
    error: str  # "Type: message"
    traceback: str


class StopRecord(msgspec.Struct, kw_only=True):
    step: int  # the last optimizer step done
    reason: str  # e.g. "SIGTERM to the launcher", "SIGUSR1 to rank 1"
    checkpoint: str | None  # the full state saved at that step


def write_job(path: Path, job: JobConfig) -> Path:
    replace_file(path, msgspec.json.format(msgspec.json.encode(job)))
    return path


def read_job(path: str | Path) -> JobConfig:
    try:
        job = msgspec.json.decode(Path(path).read_bytes(), type=JobConfig)
    except msgspec.ValidationError as e:  # a bad setting: the ConfigError that says which and why
        raise (e.__cause__ if e.__cause__ is not None else e) from None
    job.training_args.validate()  # ranges and relations: a job file edited by hand is checked too
    return job


def write_failure(status_dir: str | Path, rank: int, exc: BaseException) -> None:
    record = FailureRecord(rank=rank, time=time.time(), error=f"{type(exc).__name__}: {exc}",
                           traceback="".join(traceback.format_exception(exc)))
    try:
        replace_file(Path(status_dir) / f"rank{rank}.json", msgspec.json.encode(record))
    except OSError:
        pass  # the traceback still reaches the log through stderr


def read_failures(status_dir: str | Path) -> dict[int, FailureRecord]:
    """The failures ranks recorded, by rank; unreadable records are left out."""
    records = {}
    for path in Path(status_dir).glob("rank*.json"):
        try:
            record = msgspec.json.decode(path.read_bytes(), type=FailureRecord)
        except (OSError, msgspec.DecodeError):
            continue
        records[record.rank] = record
    return records


def write_stopped(status_dir: str | Path, record: StopRecord) -> None:
    replace_file(Path(status_dir) / STOPPED_FILE, msgspec.json.encode(record))


def read_stopped(status_dir: str | Path) -> StopRecord | None:
    path = Path(status_dir) / STOPPED_FILE
    if not path.is_file():
        return None
    return msgspec.json.decode(path.read_bytes(), type=StopRecord)


def stop_file(status_dir: str | Path) -> Path:
    return Path(status_dir) / STOP_FILE


def request_stop(status_dir: str | Path, reason: str) -> None:
    """The launcher's stop request; workers see it after their current step."""
    replace_file(stop_file(status_dir), f"{reason}\n".encode())


def stop_requested(status_dir: str | Path) -> str | None:
    """The reason of the launcher's stop request, if it made one."""
    try:
        return stop_file(status_dir).read_text().strip() or "a stop request"
    except FileNotFoundError:
        return None

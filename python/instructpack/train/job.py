"""What the launcher hands each worker: one JSON file, written and read with msgspec."""

from __future__ import annotations

import signal
from pathlib import Path

import msgspec

from ..config import TrainingArgs

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # ask a run to save its state and stop
STOP_FILE = "STOP"  # the launcher's stop request to its workers
STOPPED_FILE = "stopped.json"  # rank 0, after a stop request: step, reason, checkpoint


class JobConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    training_args: TrainingArgs
    dataset_path: str  # the preprocessed (or mock) dataset the workers read
    status_dir: str  # launcher <-> workers: rank<N>.json (a failure), STOP (a stop request), stopped.json
    progress_bar: bool = False  # the launcher's console is a terminal


def write_job(path: Path, job: JobConfig) -> Path:
    path.write_bytes(msgspec.json.format(msgspec.json.encode(job)))
    return path


def read_job(path: str | Path) -> JobConfig:
    return msgspec.json.decode(Path(path).read_bytes(), type=JobConfig)

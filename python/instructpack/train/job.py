"""What the launcher hands each worker: one JSON file, written and read with msgspec."""

from __future__ import annotations

from pathlib import Path

import msgspec

from ..config import TrainingArgs


class JobConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    training_args: TrainingArgs
    dataset_path: str  # the preprocessed (or mock) dataset the workers read
    failure_dir: str  # a worker that fails writes rank<N>.json here for the launcher
    progress_bar: bool = False  # the launcher's console is a terminal


def write_job(path: Path, job: JobConfig) -> Path:
    path.write_bytes(msgspec.json.format(msgspec.json.encode(job)))
    return path


def read_job(path: str | Path) -> JobConfig:
    return msgspec.json.decode(Path(path).read_bytes(), type=JobConfig)

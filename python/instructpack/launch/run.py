"""`run_training(torchrun_args, training_args)`: check, prepare the data, then run the workers
under torchrun and report how they ended.

The workers' output goes to the console and to `ckpt_output_dir/training.log`. A failed run
raises `TrainingError` naming the rank that failed first, its exit code, its error and the
last lines of the log; a run stopped on request raises `TrainingStopped` (launch/torchrun.py
says how signals act).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from ..config import TorchrunArgs, TrainingArgs, config_from_dict
from ..data.manifest import read_manifest
from ..train.checkpoints.identity import check_resumable, run_fingerprint
from ..train.job import JOB_FILE, JobConfig, write_job
from .checks import check_before_launch
from .dataset import prepare_dataset
from .diagnosis import diagnose
from .torchrun import run_logged, stop_requests, stopped, torchrun_command, worker_env

LOG_FILE = "training.log"


def run_training(torchrun_args: TorchrunArgs | Mapping | None = None,
                 training_args: TrainingArgs | Mapping | None = None, *,
                 torch_args: TorchrunArgs | Mapping | None = None,
                 train_args: TrainingArgs | Mapping | None = None) -> None:
    """Fine-tunes `training_args.model_path`; `torch_args`/`train_args` are accepted as the
    InstructLab README also uses those names."""
    torchrun_args = _one_of(torchrun_args, torch_args, "torchrun_args", "torch_args", TorchrunArgs)
    training_args = _one_of(training_args, train_args, "training_args", "train_args", TrainingArgs)
    if training_args is None:
        raise TypeError("run_training() needs training_args (a TrainingArgs)")
    torchrun_args = torchrun_args or TorchrunArgs()
    world_size = check_before_launch(torchrun_args, training_args)

    out = Path(training_args.ckpt_output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset_path = prepare_dataset(training_args, world_size=world_size)
    # A run that cannot resume the newest full state is refused before any worker starts.
    check_resumable(out, run_fingerprint(training_args, read_manifest(dataset_path), world_size))
    status_dir = Path(tempfile.mkdtemp(prefix=".run-", dir=out))
    job = write_job(out / JOB_FILE, JobConfig(training_args=training_args, dataset_path=str(dataset_path),
                                              status_dir=str(status_dir), progress_bar=sys.stderr.isatty()))
    log_path = out / LOG_FILE
    try:
        with stop_requests(status_dir):
            exit_code, tail = run_logged(torchrun_command(torchrun_args, job), worker_env(torchrun_args), log_path)
        if exit_code != 0:
            raise diagnose(exit_code, status_dir, tail, log_path)
        stop = stopped(status_dir)
        if stop is not None:
            raise stop
    finally:
        shutil.rmtree(status_dir, ignore_errors=True)


def _one_of(value, alias, name: str, alias_name: str, cls: type):
    if value is not None and alias is not None:
        raise TypeError(f"run_training() got both {name} and {alias_name}; pass one")
    value = value if value is not None else alias
    if isinstance(value, Mapping):
        return config_from_dict(dict(value), into=cls)
    if value is not None and not isinstance(value, cls):
        raise TypeError(f"{name} must be a {cls.__name__} (or a mapping of its fields), got {type(value).__name__}")
    return value

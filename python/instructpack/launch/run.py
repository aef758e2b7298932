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
import time
from collections.abc import Mapping
from pathlib import Path

from ..callbacks import pack_callbacks
from ..config import TorchrunArgs, TrainingArgs
from ..config_base import build
from ..data.manifest import read_manifest
from ..train.checkpoints.identity import DatasetSummary, check_fingerprint, run_fingerprint
from ..train.checkpoints.resumable import select_checkpoint
from ..train.job import JobConfig, job_file, stop_signals, write_job
from .checks import check_before_launch
from .dataset import prepare_dataset
from .diagnosis import diagnose
from .ownership import own_output_dir
from .settings import effective_settings
from .torchrun import run_logged, stop_requests, stopped, torchrun_command, worker_env


def log_file(node_rank: int) -> str:
    """In ckpt_output_dir: one per machine of the job (they may share the directory)."""
    return "training.log" if node_rank == 0 else f"training-node{node_rank}.log"


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
    # Checked and read as InstructLab reads them, into copies: the caller's objects stay as they are.
    torchrun_args, training_args = effective_settings(torchrun_args or TorchrunArgs(), training_args)
    world_size = check_before_launch(torchrun_args, training_args)
    # The callbacks travel pickled beside the settings (callbacks.py): refused now if they cannot.
    callbacks = pack_callbacks(training_args.callbacks)
    training_args.callbacks = None
    out = Path(training_args.ckpt_output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with own_output_dir(out, torchrun_args):  # one run per ckpt_output_dir (ownership.py)
        _run(torchrun_args, training_args, world_size, out, callbacks)


def _run(torchrun_args: TorchrunArgs, training_args: TrainingArgs, world_size: int, out: Path,
         callbacks: str | None = None) -> None:
    """The run itself, in the output directory this launcher owns: resume checks, the
    dataset, the job file, then torchrun until it ends."""
    # A run that cannot resume the newest full state that verifies is refused before
    # anything is written: first by the settings and the model, then (dataset.py) by the
    # data it would preprocess, then by the dataset it has.
    checkpoint, state = select_checkpoint(out)
    if checkpoint is not None:
        check_fingerprint(state.fingerprint, run_fingerprint(training_args, None, world_size), checkpoint)
    dataset_path = prepare_dataset(training_args, world_size=world_size, resuming=(checkpoint, state))
    manifest = read_manifest(dataset_path)
    dataset = DatasetSummary.of(dataset_path, manifest)
    if checkpoint is not None:
        check_fingerprint(state.fingerprint, run_fingerprint(training_args, manifest, world_size), checkpoint,
                          saved_dataset=state.dataset, our_dataset=dataset)
    status_dir = Path(tempfile.mkdtemp(prefix=".run-", dir=out))
    job = write_job(out / job_file(torchrun_args.node_rank), JobConfig(
        training_args=training_args, dataset_path=str(dataset_path), dataset_identity=dataset.identity,
        status_dir=str(status_dir), resume_from=str(checkpoint) if checkpoint else None, resume_checked=True,
        node_rank=torchrun_args.node_rank, progress_bar=sys.stderr.isatty(), callbacks=callbacks,
        started_at=time.time()))
    log_path = out / log_file(torchrun_args.node_rank)
    try:
        with stop_requests(status_dir, stop_signals(training_args)):
            exit_code, tail = run_logged(torchrun_command(torchrun_args, job, status_dir), worker_env(torchrun_args),
                                         log_path)
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
        return build(cls, value)
    if value is not None and not isinstance(value, cls):
        raise TypeError(f"{name} must be a {cls.__name__} (or a mapping of its fields), got {type(value).__name__}")
    return value

"""`python -m instructpack.train.worker JOB.json`: one training process, started by torchrun.

Sets up logging, the process group, seeds, data, tokenizer and model, then runs the loop.
A failure is written to the job's status directory (rank, error, traceback) before the
process exits, so the launcher can say which rank failed and why. A stop request (SIGTERM,
SIGUSR1, or the launcher's stop file) ends the run after the current step with the full
state saved; rank 0 then writes `stopped.json` there and every rank exits with status 0.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

from ..callbacks import unpack_callbacks
from ..config import DistributedBackend
from ..data.shards import load_dataset
from ..errors import DatasetError
from ..lifetime import die_with_parent
from ..locks import hold_shared_until_exit
from .checkpoints.full_state import LauncherChoice
from .checkpoints.identity import dataset_identity
from .distributed import World, init_distributed, shutdown
from .job import (
    JobConfig,
    StopRecord,
    checkpoint_trigger,
    read_job,
    stop_signals,
    workers_lock,
    write_failure,
    write_stopped,
)
from .loop import TrainResult, train
from .model.load import load_model, load_tokenizer
from .precision import decide_precision
from .preemption import StopRequest

log = logging.getLogger("instructpack.train")


def setup_logging(level: str, rank: int) -> None:
    # Rank 0 speaks at the configured level; the others only warn, so the log reads once.
    logging.basicConfig(level=level if rank == 0 else "WARNING", stream=sys.stderr, force=True,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def make_deterministic() -> None:
    """What TrainingArgs.deterministic asks for; before any CUDA work (cuBLAS reads its
    workspace setting when it creates its handle)."""
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # cuBLAS' documented condition for reproducible results
    os.environ["FLASH_ATTENTION_DETERMINISTIC"] = "1"  # read by transformers' flash-attention path at each call
    torch.use_deterministic_algorithms(True, warn_only=True)  # torch's own kernels, varlen attention included
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def run(job: JobConfig, world: World, stop: StopRequest | None = None) -> TrainResult:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its per-save "Writing model shards" bars clutter the log
    args = job.training_args
    seed_everything(args.random_seed)
    precision = decide_precision(args, world.device)
    dataset = load_dataset(job.dataset_path)
    if job.dataset_identity and dataset_identity(dataset.manifest) != job.dataset_identity:
        raise DatasetError(f"{dataset.path}: the dataset changed after the launcher checked it (another "
                           "preprocessing wrote into this directory while the job started); the workers train "
                           "only what was checked: run the job again")
    tokenizer = load_tokenizer(args)
    vocab = dataset.manifest.tokenizer.vocab_size
    # FSDP2 over several processes: rank 0 reads the weights and sends each rank its shards
    # (backends.FSDPBackend); the others build the model on the meta device, so a machine
    # holds one copy of the model in memory rather than one per process.
    on_meta = args.distributed_backend == DistributedBackend.FSDP and world.distributed and not world.is_main
    model = load_model(args, world.device, vocab_size=max(vocab, len(tokenizer)), weights=not on_meta,
                       precision=precision)
    choice = LauncherChoice(job.resume_from) if job.resume_checked else None
    return train(args, world, model, tokenizer, dataset, progress_bar=job.progress_bar, stop=stop,
                 precision=precision, resume_choice=choice, callbacks=unpack_callbacks(job.callbacks))


def main(argv: list[str] | None = None) -> int:
    """argv: the job file, and the status directory (where a failure is recorded even when
    the job file cannot be read)."""
    argv = sys.argv[1:] if argv is None else argv
    die_with_parent()  # no worker outlives its torchrun or its launcher (lifetime.py)
    rank = int(os.environ.get("RANK", 0))
    status_dir = argv[1] if len(argv) > 1 else None
    try:
        job = read_job(argv[0])
        status_dir = job.status_dir
        hold_shared_until_exit(Path(job.training_args.ckpt_output_dir) / workers_lock(job.node_rank))
        setup_logging(job.training_args.log_level, rank)
        args = job.training_args
        stop = StopRequest(job.status_dir, trigger=checkpoint_trigger() if args.on_demand_checkpointing else None,
                           since=job.started_at).install(stop_signals(args))  # first: a signal may come at any time
        if args.deterministic:
            make_deterministic()
        world = init_distributed()
        if world.device.type == "cpu":  # what DeepSpeed would pick, without its warning that it guessed
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        result = run(job, world, stop)
        if result.stopped_by is not None and world.is_main:
            write_stopped(job.status_dir, StopRecord(step=result.progress.step, reason=result.stopped_by,
                                                     checkpoint=str(result.checkpoint)))
        # The model, its DDP reducer and their pending gloo work must go before the process
        # group: destroyed after it, in the exit of the interpreter, gloo's destructor waits
        # for a thread that waits for the GIL the destructor holds.
        del result
        gc.collect()
    except BaseException as exc:
        if status_dir is not None:
            write_failure(status_dir, rank, exc)
        raise
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

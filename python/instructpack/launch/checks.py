"""Checks `run_training` makes before any work: the settings that only make sense together,
the model directory, and the metrics sinks. Each problem is a ConfigError (or a
MissingSinkError) that names the field and the fix; nothing has been written yet."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ..config import DistributedBackend, TorchrunArgs, TrainingArgs
from ..errors import ConfigError, PathNotFoundError
from ..train.metrics import check_sinks
from .model_dir import check_model_dir


def world_size(t: TorchrunArgs) -> int:
    """Processes in the whole job; nproc_per_node="gpu" counts this machine's GPUs."""
    per_node = t.nproc_per_node if isinstance(t.nproc_per_node, int) else visible_gpus()
    return t.nnodes * per_node


def visible_gpus() -> int:
    """CUDA devices torch would see, asked of a child process: importing torch here would
    load CUDA into the caller's process (and cost seconds) for one number."""
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                         capture_output=True, text=True, check=False)
    try:
        return int(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return 0


def check_before_launch(t: TorchrunArgs, args: TrainingArgs) -> int:
    """Everything that can be refused from the settings alone; returns the world size."""
    check_model_dir(args.model_path, trust_remote_code=args.trust_remote_code)  # names the file and the fix
    if args.lora is not None and args.lora.quantize_data_type is not None \
            and args.distributed_backend != DistributedBackend.DDP:
        raise ConfigError("training_args", ("distributed_backend",),
                          f"QLoRA (lora.quantize_data_type={args.lora.quantize_data_type.value!r}) keeps the base "
                          "weights in bitsandbytes 4-bit tensors, which FSDP2 and DeepSpeed cannot shard here; set "
                          "distributed_backend to 'ddp'", args.distributed_backend.value)
    if t.nnodes > 1 and not (t.rdzv_endpoint or t.master_addr):
        raise ConfigError("torchrun_args", ("rdzv_endpoint",), "a job on several machines needs rdzv_endpoint "
                          "('host:port' of node 0) or master_addr/master_port", t.rdzv_endpoint)
    world = world_size(t)
    if world == 0:
        raise ConfigError("torchrun_args", ("nproc_per_node",), "'gpu' means one process per GPU, and "
                          "no CUDA GPU is visible; give a number of processes", t.nproc_per_node)
    if args.effective_batch_size < world:
        raise ConfigError("training_args", ("effective_batch_size",),
                          f"must be at least the number of processes ({world}): every process needs a sample "
                          "in every step", args.effective_batch_size)
    check_sinks(args)  # a missing tensorboard/wandb/mlflow package fails now, not in every worker
    if not args.mock_data and not args.process_data and not Path(args.data_output_dir).is_dir():
        raise PathNotFoundError("training_args", ("data_output_dir",), "process_data is false, so this must be an "
                                "already preprocessed dataset directory; it does not exist", args.data_output_dir)
    return world

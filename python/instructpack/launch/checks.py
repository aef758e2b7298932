"""Checks `run_training` makes before any work: the settings that only make sense together,
the model directory, and the metrics sinks. Each problem is a ConfigError (or a
MissingSinkError) that names the field and the fix; nothing has been written yet."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from ..config import DistributedBackend, TorchrunArgs, TrainingArgs
from ..errors import ConfigError, MissingPackageError, PathExistsError, PathNotFoundError
from ..fileio import lies_inside
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
    """Everything that can be refused from the settings alone (already validated and read by
    settings.effective_settings); returns the world size."""
    check_paths(args)
    check_model_dir(args.model_path, trust_remote_code=args.trust_remote_code)  # names the file and the fix
    check_qlora_backend(args)
    if args.use_liger:
        check_liger(args)
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
    return world


def check_liger(args: TrainingArgs) -> None:
    """Liger's kernels are Triton kernels for CUDA GPUs, in the `cuda` extra."""
    if importlib.util.find_spec("liger_kernel") is None:
        raise MissingPackageError("use_liger=True needs the liger-kernel package, which is not installed here: "
                                  "pip install 'instructpack[cuda]' (or liger-kernel), or set use_liger=False")
    if visible_gpus() == 0:
        raise ConfigError("training_args", ("use_liger",), "Liger's kernels run on CUDA GPUs and none is visible "
                          "here; set use_liger=False", True)
    if args.lora is not None:
        raise ConfigError("training_args", ("use_liger",), "Liger's kernels and LoRA adapters together are not "
                          "supported (as in InstructLab): set use_liger=False, or train without lora", True)


def check_qlora_backend(args: TrainingArgs) -> None:
    """QLoRA keeps the frozen base weights in bitsandbytes 4-bit tensors. Backends that only
    replicate them (DDP) or shard just gradients and optimizer state (DeepSpeed ZeRO-2,
    InstructLab's combination) train them; FSDP2 and ZeRO-3 would shard the packed 4-bit
    bytes themselves, which bitsandbytes cannot compute with."""
    if args.lora is None or args.lora.quantization is None:
        return
    qlora = f"QLoRA (lora.quantize_data_type={args.lora.quantization.value!r})"
    fix = "set distributed_backend to 'deepspeed' (zero_stage 2) or 'ddp'"
    if args.distributed_backend == DistributedBackend.FSDP:
        raise ConfigError("training_args", ("distributed_backend",), f"{qlora} keeps the frozen weights in "
                          f"bitsandbytes 4-bit tensors, which FSDP2 cannot shard; {fix}", "fsdp")
    if args.distributed_backend == DistributedBackend.DEEPSPEED and args.deepspeed_options.zero_stage == 3:
        raise ConfigError("training_args", ("deepspeed_options", "zero_stage"), f"{qlora} keeps the frozen weights "
                          f"in bitsandbytes 4-bit tensors, which ZeRO-3 cannot partition; {fix}", 3)


def check_paths(args: TrainingArgs) -> None:
    """Directories that can be written as asked, without one run's output destroying another's."""
    ckpt, data_out = Path(args.ckpt_output_dir), Path(args.data_output_dir)
    for field, path in (("ckpt_output_dir", ckpt), ("data_output_dir", data_out)):
        if path.exists() and not path.is_dir():
            raise PathExistsError("training_args", (field,), "is a file; give a directory", str(path))
    if overlaps(ckpt, data_out):
        raise ConfigError("training_args", ("data_output_dir",), f"equals, contains or lies inside ckpt_output_dir "
                          f"({args.ckpt_output_dir}): checkpoints and the dataset each need a directory of their "
                          "own; give them separate ones", args.data_output_dir)
    if args.mock_data:
        return
    if args.process_data:
        if lies_inside(Path(args.data_path), data_out):
            raise ConfigError("training_args", ("data_path",), f"lies inside data_output_dir ({args.data_output_dir}),"
                              " where the dataset is written: keep the input outside it", args.data_path)
    elif not data_out.is_dir():
        raise PathNotFoundError("training_args", ("data_output_dir",), "process_data is false, so this must be an "
                                "already preprocessed dataset directory; it does not exist", args.data_output_dir)


def overlaps(a: Path, b: Path) -> bool:
    return lies_inside(a, b) or lies_inside(b, a)

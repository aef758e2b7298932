"""The numeric precision of a run, decided once (`decide_precision`) and passed down to the
model loader, the backend and the checkpoint writer.

On the CPU everything is fp32: bf16 matmuls there are slow and inexact. On GPUs the
matmuls run in bf16 while the optimizer steps fp32 master weights, because AdamW's updates
are often below bf16's resolution (8 bits of mantissa) and would be rounded away:
- FSDP2 and DDP keep the weights in fp32; FSDP2 casts them to bf16 per layer (its mixed
  precision policy), DDP and one process run the forward under bf16 autocast;
- DeepSpeed is given a bf16 model and keeps its own fp32 masters (its `bf16` setting);
- a LoRA base is frozen, so it has no masters to keep: it stays bf16 under DDP, and the
  forward runs under bf16 autocast there too, so the fp32 adapters compute in bf16 and
  save bf16 inputs for their backward (without autocast peft casts every adapted input to
  fp32 and keeps that copy: GBs per layer at 16k tokens of an 8B model); FSDP2 shards the
  base in fp32 like any other weight.
Gradients are reduced across ranks in fp32 by every backend. Hugging Face checkpoints are
written in the compute dtype (bf16 on GPUs: half the size of the fp32 masters).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import DistributedBackend, TrainingArgs


@dataclass(frozen=True)
class Precision:
    weights: torch.dtype  # what the model's parameters are loaded and kept in
    compute: torch.dtype  # what the matmuls run in (also QLoRA's dequantized compute)
    autocast: bool  # the forward runs under autocast(compute): fp32 weights or fp32 LoRA adapters no backend casts
    reduce: torch.dtype = torch.float32  # gradients across ranks

    @property
    def checkpoint(self) -> torch.dtype:
        """The dtype of the weights in a Hugging Face checkpoint."""
        return self.compute

    @property
    def mixed(self) -> bool:
        """Weights kept in a wider dtype than the matmuls use."""
        return self.weights != self.compute


def compute_dtype(device: torch.device) -> torch.dtype:
    """What matmuls run in on this device."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def decide_precision(args: TrainingArgs, device: torch.device) -> Precision:
    compute = compute_dtype(device)
    if compute == torch.float32:
        return Precision(weights=compute, compute=compute, autocast=False)
    backend = args.distributed_backend
    if backend == DistributedBackend.DEEPSPEED:
        return Precision(weights=compute, compute=compute, autocast=False)
    if args.lora is not None and backend != DistributedBackend.FSDP:
        return Precision(weights=compute, compute=compute, autocast=True)
    # fp32 masters: FSDP2 casts per layer itself; DDP (and one process) need autocast.
    return Precision(weights=torch.float32, compute=compute, autocast=backend == DistributedBackend.DDP)

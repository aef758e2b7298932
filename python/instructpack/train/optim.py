"""AdamW, gradient clipping and the learning-rate schedule: linear warmup, then constant,
cosine or linear decay."""

from __future__ import annotations

import math

import torch

from ..config import TrainingArgs

MAX_GRAD_NORM = 1.0  # every step clips the whole model's gradient norm to this (as InstructLab does)


def build_optimizer(model: torch.nn.Module, args: TrainingArgs, fused: bool | None = None) -> torch.optim.AdamW:
    """Weight decay applies to matrices only: decaying norm scales and biases towards zero
    hurts and is not what decay is for (as in the HF Trainer and nanoGPT). `fused`: AdamW's
    fused kernel (default: when every trained parameter is on a GPU; `implementation`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    # A ZeRO-3 partitioned parameter holds an empty tensor; ds_shape is the weight's shape.
    matrix = [len(getattr(p, "ds_shape", p.shape)) >= 2 for p in params]
    groups = [{"params": [p for p, m in zip(params, matrix) if m], "weight_decay": args.adamw_weight_decay},
              {"params": [p for p, m in zip(params, matrix) if not m], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=args.learning_rate, betas=args.adamw_betas,
                             eps=args.adamw_eps, **implementation(params, fused))


def implementation(params: list[torch.Tensor], fused: bool | None = None) -> dict[str, bool]:
    """AdamW's fused kernel (one launch per step for all parameters) when every parameter
    is on a GPU; elsewhere (the CPU, FSDP2's CPU offload) the multi-tensor foreach one."""
    if fused if fused is not None else params and all(p.is_cuda for p in params):
        return {"fused": True}
    return {"foreach": True}


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based).

    Warmup reaches the peak at the last warmup step (step w-1 uses 1.0; step 0 uses 1/w,
    never 0, so no step is wasted). Decay then runs over the remaining steps without
    reaching 0 on the last one, which would also waste it."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"lr_scheduler must be 'cosine', 'linear' or 'constant', got {kind!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, args: TrainingArgs,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, args.warmup_steps, args.lr_scheduler))

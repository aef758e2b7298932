"""Liger kernels (`use_liger=True`, the `cuda` extra): Triton kernels for RMSNorm, RoPE,
SwiGLU and, most of all, the fused linear cross-entropy, which computes the loss from the
final hidden states chunk by chunk, so the fp32 logits (tokens x vocabulary, a step's
largest activation) are never held whole. CUDA only; the launcher refuses the setting
before launch where Liger is not installed or no CUDA GPU is visible (checks.py).

With Liger, the model computes the loss in its own forward (Liger replaces it), called
with the packed row's next-token targets (`shift_labels`) and `num_items_in_batch=1`, which
makes it the summed cross-entropy over the targets: the same quantity as step.summed_loss
computes without it. InstructLab turns the fused loss off (its loss needs the logits);
here it is on.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

FUSED_LOSS = "_instructpack_liger_fused_loss"  # set on the transformers model when it applies


def apply_liger(model: torch.nn.Module) -> torch.nn.Module:
    """Liger's kernels on `model` (a transformers model, before LoRA and the backend wrap it)."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=True, cross_entropy=False)
    setattr(model, FUSED_LOSS, True)
    log.info("Liger kernels applied to %s (fused linear cross-entropy)", type(model).__name__)
    return model


def has_fused_loss(model: torch.nn.Module) -> bool:
    return getattr(model, FUSED_LOSS, False)

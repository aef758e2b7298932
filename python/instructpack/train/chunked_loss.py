"""The summed cross-entropy of the output layer computed chunk by chunk: the fp32 logits of
only `chunk` target tokens exist at a time (at a 152k vocabulary, 40k targets would need
24 GB at once, before their gradient).

The forward pass also computes the gradients (each chunk's logits are made, used for the
loss and its gradient, and freed), so the backward only scales them: the same three
matrix products as the plain path, none of its tokens x vocabulary tensors. The model's own
transformation of its logits (a scale, Gemma's soft-capping) is `finish`, applied to each
chunk inside autograd, so any differentiable one is exact.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# Logits per chunk: 128 MiB in fp32, whatever the vocabulary (256 tokens at 128k). A
# micro-batch with fewer target logits than this is computed in one piece, as before.
CHUNK_LOGITS = int(os.environ.get("INSTRUCTPACK_LOSS_CHUNK_LOGITS", 1 << 25))


def default_chunk(vocab_size: int) -> int:
    """Tokens per chunk: about CHUNK_LOGITS logits."""
    return max(1, CHUNK_LOGITS // max(vocab_size, 1))


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                chunk: int, finish: Callable[[torch.Tensor], torch.Tensor] | None):
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and bias.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        w = weight.detach().requires_grad_(weight.requires_grad)
        b = bias.detach().requires_grad_(bias.requires_grad) if bias is not None else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk].detach().requires_grad_(hidden.requires_grad)
            with torch.enable_grad():
                logits = F.linear(h, w, b)
                if finish is not None:
                    logits = finish(logits)
                loss = F.cross_entropy(logits.float(), labels[start:start + chunk], ignore_index=IGNORE_INDEX,
                                       reduction="sum")
            inputs = [t for t in (h, w, b) if t is not None and t.requires_grad]
            if inputs:
                grads = iter(torch.autograd.grad(loss, inputs))
                if h.requires_grad:
                    grad_hidden[start:start + chunk] = next(grads)
                if w.requires_grad:
                    grad_weight += next(grads)
                if b is not None and b.requires_grad:
                    grad_bias += next(grads)
            total += loss.detach()
            del logits, loss  # this chunk's logits go before the next one's are made
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight, grad_bias) if g is not None))
        ctx.has = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        saved = iter(ctx.saved_tensors)
        out = []
        for has, dtype in zip(ctx.has, ctx.dtypes):
            out.append((next(saved) * grad_output).to(dtype) if has else None)
        return out[0], out[1], out[2], None, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                                 bias: torch.Tensor | None = None, chunk: int | None = None,
                                 finish: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """sum over rows of cross_entropy(finish(hidden @ weight.T + bias), labels) in fp32,
    labels -100 ignored; `hidden` [N, H], `labels` [N]; `chunk` tokens at a time (default:
    default_chunk of the vocabulary)."""
    chunk = default_chunk(weight.shape[0]) if chunk is None else chunk
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, labels, chunk, finish)


def logit_finish(config) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What the model does to its output layer's logits (transformers' forward, by config):
    Granite divides by `logits_scaling`, Cohere multiplies by `logit_scale`, Gemma 2/3
    soft-cap with `final_logit_softcapping`. Whether this is all a model does is checked
    once on its own logits (`OutputLayerLoss.check`)."""
    scale = getattr(config, "logits_scaling", None)
    multiply = getattr(config, "logit_scale", None)
    cap = getattr(config, "final_logit_softcapping", None)
    steps = []
    if isinstance(scale, (int, float)) and scale not in (0, 1):
        steps.append(lambda z, s=float(scale): z / s)
    if isinstance(multiply, (int, float)) and multiply != 1:
        steps.append(lambda z, m=float(multiply): z * m)
    if isinstance(cap, (int, float)) and cap:
        steps.append(lambda z, c=float(cap): torch.tanh(z / c) * c)
    if not steps:
        return None

    def finish(z: torch.Tensor) -> torch.Tensor:
        for step in steps:
            z = step(z)
        return z
    return finish

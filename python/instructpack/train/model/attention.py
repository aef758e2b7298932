"""Packed-row attention without flash-attention: SDPA run on each sample of the row.

transformers runs a packed row under "sdpa" by building a block-diagonal T x T mask, so
attention costs T^2 in time and memory (T = tokens in the row) although only sum(l_i^2)
of it is needed, and SDPA cannot use its fused causal kernels with an explicit mask. For
8 samples of 1,000 tokens that is 8x the necessary work. "sdpa_packed" instead gives the
row to torch's own variable-length flash attention (`torch.nn.attention.varlen`, torch >=
2.10) in one call on CUDA in half precision, and elsewhere cuts the row at the sample
boundaries and runs causal SDPA on each sample. Anything else (batches of several rows, padding
masks, decoding with a KV cache) goes to transformers' own sdpa and mask unchanged.

Registered with transformers' attention interfaces on import; the mask function returns
no mask at all, because the boundaries come from the position ids.
"""

from __future__ import annotations

import inspect
import sys
import weakref

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

NAME = "sdpa_packed"


_BOUNDS: list = [None, None]  # (weak reference to the tensor they came from, the bounds)


def _once_per_pass(source: torch.Tensor, find) -> list[int]:
    """`find(source)`, found once per forward pass (one host-device sync), not once per
    layer: every layer gets the same tensor, recognised by identity while it lives."""
    ref, bounds = _BOUNDS
    if ref is not None and ref() is source:
        return bounds
    bounds = find(source)
    _BOUNDS[:] = [weakref.ref(source), bounds]
    return bounds


def sample_bounds(position_ids: torch.Tensor) -> list[int]:
    """Start offsets of the samples in a [1, T] packed row, plus T: positions restart at 0."""
    def find(positions: torch.Tensor) -> list[int]:
        starts = torch.nonzero(positions[0] == 0).flatten().tolist()
        if not starts or starts[0] != 0:
            starts = [0, *starts]
        return [*starts, positions.shape[1]]

    return _once_per_pass(position_ids, find)


def row_bounds(kwargs: dict, length: int) -> list[int]:
    """The sample bounds of a packed row as Python ints: from transformers' `cu_seq_lens_q`
    where the step passed it (MicroBatch.model_inputs; a CPU tensor costs no sync), else
    found from the position ids; one sample without either."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        return _once_per_pass(cu, torch.Tensor.tolist)
    position_ids = kwargs.get("position_ids")
    return [0, length] if position_ids is None else sample_bounds(position_ids)


def varlen_attention():
    """torch's own variable-length (flash) attention, torch >= 2.10; None where it is absent."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _use_varlen(query: torch.Tensor, dropout: float) -> bool:
    """On CUDA in half precision, without dropout (its kernel has none), when torch has it."""
    return query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and dropout == 0.0 \
        and varlen_attention() is not None


def varlen_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kwargs: dict,
                   scaling: float | None, window: int | None) -> torch.Tensor | None:
    """The packed row [1, heads, T, dim] through torch's varlen attention, one call for all
    samples; [1, T, heads, dim], or None where this torch cannot express the layer (a
    sliding window before the window_size argument). The bounds are the step's
    `cu_seq_lens_q` and `max_length_q`, already on the device (no sync at all); without
    them (a forward pass of its own) they are found from the position ids once per pass."""
    varlen = varlen_attention()
    params = inspect.signature(varlen).parameters
    options = {"scale": scaling}
    if "window_size" in params:
        # (left, 0) is causal with `left` earlier keys; transformers' window counts the query itself.
        options["window_size"] = (window - 1 if window else -1, 0)
    elif "is_causal" in params and not window:
        options["is_causal"] = True
    else:
        return None
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, dim]
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            options["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    cu, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None or longest is None:
        bounds = row_bounds(kwargs, query.shape[2])
        cu = torch.tensor(bounds, dtype=torch.int32, device=query.device)
        longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    out = varlen(q, k, v, cu, cu, int(longest), int(longest), **options)
    return out[None]


def packed_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        **kwargs) -> tuple[torch.Tensor, None]:
    if not _takes_over(query.shape[0], query.shape[2], key.shape[2], attention_mask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    gqa = key.shape[1] != query.shape[1]  # grouped-query attention: fewer key/value heads
    window = kwargs.get("sliding_window")
    if _use_varlen(query, dropout):  # CUDA without flash-attn: one kernel call for the whole row
        out = varlen_forward(query, key, value, kwargs, scaling, window)
        if out is not None:
            return out.contiguous(), None
    bounds = row_bounds(kwargs, query.shape[2])
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        # A sliding-window layer (Mistral, some Qwen2 layers) needs a banded mask, but only
        # for a sample longer than its window; shorter ones are plain causal.
        mask = _sliding_causal_mask(b - a, window, query.device) if window and b - a > window else None
        parts.append(F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b],
                                                    attn_mask=mask, dropout_p=dropout, scale=scaling,
                                                    is_causal=mask is None, enable_gqa=gqa))
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return out.transpose(1, 2).contiguous(), None


def _sliding_causal_mask(length: int, window: int, device: torch.device) -> torch.Tensor:
    """True where query i may attend key j: j <= i and i - j < window (transformers' convention)."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    return (j <= i) & (i - j < window)


def _takes_over(batch_size: int, q_length: int, kv_length: int, attention_mask) -> bool:
    """One row without padding and without a KV cache (a training forward pass). Batches,
    padding masks and cached decoding keep transformers' own sdpa path and mask."""
    return batch_size == 1 and q_length == kv_length and attention_mask is None


def _packed_sdpa_mask(batch_size: int, q_length: int, kv_length: int, *args,
                      attention_mask: torch.Tensor | None = None, **kwargs):
    if _takes_over(batch_size, q_length, kv_length, attention_mask):
        return None  # the forward reads the sample boundaries from the position ids
    return sdpa_mask(batch_size, q_length, kv_length, *args, attention_mask=attention_mask, **kwargs)


EAGER_NAME = "eager_packed"


def packed_eager_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         **kwargs) -> tuple[torch.Tensor, None]:
    """For models whose attention SDPA cannot express (GPT-OSS's attention sinks): the
    model's own eager attention, run on each sample of the packed row with its causal (or
    sliding-window) mask."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    if not _takes_over(query.shape[0], query.shape[2], key.shape[2], attention_mask):
        return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    bounds = row_bounds(kwargs, query.shape[2])
    for name in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(name, None)  # the bounds are known; the model's eager function needs none of them
    window = kwargs.get("sliding_window")
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        allowed = _sliding_causal_mask(b - a, window or b - a, query.device)
        additive = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
        additive = additive.masked_fill(~allowed, torch.finfo(query.dtype).min)[None, None]
        out, _ = eager(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], additive, dropout=dropout,
                       scaling=scaling, **kwargs)
        parts.append(out)
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)), None


def _packed_eager_mask(batch_size: int, q_length: int, kv_length: int, *args,
                       attention_mask: torch.Tensor | None = None, **kwargs):
    if _takes_over(batch_size, q_length, kv_length, attention_mask):
        return None
    return eager_mask(batch_size, q_length, kv_length, *args, attention_mask=attention_mask, **kwargs)


def name_for(model_class: type) -> str:
    """The packed attention for `model_class`: SDPA per sample, or its own eager attention
    per sample where it does not support SDPA."""
    return NAME if getattr(model_class, "_supports_sdpa", True) else EAGER_NAME


AttentionInterface.register(NAME, packed_sdpa_forward)
AttentionMaskInterface.register(NAME, _packed_sdpa_mask)
AttentionInterface.register(EAGER_NAME, packed_eager_forward)
AttentionMaskInterface.register(EAGER_NAME, _packed_eager_mask)

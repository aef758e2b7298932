"""Packed-row attention without flash-attention: SDPA run on each sample of the row.

transformers runs a packed row under "sdpa" by building a block-diagonal T x T mask, so
attention costs T^2 in time and memory (T = tokens in the row) although only sum(l_i^2)
of it is needed, and SDPA cannot use its fused causal kernels with an explicit mask. For
8 samples of 1,000 tokens that is 8x the necessary work. "sdpa_packed" instead cuts the
row at the sample boundaries and runs causal SDPA on each sample: the varlen idea of
flash-attention, with the stock kernel. Rows without packing (one sample, or padded
batches with a mask) go to transformers' own sdpa unchanged.

Registered with transformers' attention interfaces on import; the mask function returns
no mask at all, because the boundaries come from the position ids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sdpa_packed"


def sample_bounds(position_ids: torch.Tensor) -> list[int]:
    """Start offsets of the samples in a [1, T] packed row, plus T: positions restart at 0."""
    starts = torch.nonzero(position_ids[0] == 0).flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    return [*starts, position_ids.shape[1]]


def packed_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        **kwargs) -> tuple[torch.Tensor, None]:
    position_ids = kwargs.get("position_ids")
    if attention_mask is not None or position_ids is None or query.shape[0] != 1 or kwargs.get("softcap"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    bounds = kwargs.get("sample_bounds") or sample_bounds(position_ids)
    gqa = key.shape[1] != query.shape[1]  # grouped-query attention: fewer key/value heads
    window = kwargs.get("sliding_window")
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


def _packed_sdpa_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    # Padded batches (a 2-D mask) keep the regular sdpa mask; packed rows need none.
    if attention_mask is not None:
        return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)
    return None


AttentionInterface.register(NAME, packed_sdpa_forward)
AttentionMaskInterface.register(NAME, _packed_sdpa_mask)

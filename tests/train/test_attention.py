"""The "sdpa_packed" attention implementation against transformers' own "sdpa": a packed
row [1, T] (position ids restarting at 0 at each sample, no attention mask, use_cache=False)
must give the logits of "sdpa" on the same row, each sample the logits it gets alone, and
the same parameter gradients as the per-sample runs summed; padded batches fall back to
"sdpa"; and the two helpers, sample_bounds and _sliding_causal_mask, against hand-written
expectations."""

from __future__ import annotations

import pytest
import torch

from instructpack.train.model import attention
from instructpack.train.model.attention import NAME, _sliding_causal_mask, sample_bounds

VOCAB = 300
WINDOW = 8  # Mistral's sliding window: some samples below it, one equal, some well above
LENGTHS = [13, 5, 1, 8, 20, 3]
ATOL = 1e-5
GRAD_RTOL = 1e-4


def _config(kind: str):
    from transformers import GraniteConfig, LlamaConfig, MistralConfig, Qwen3Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "qwen3":
        return Qwen3Config(head_dim=16, **common)
    if kind == "mistral":
        return MistralConfig(sliding_window=WINDOW, **common)
    if kind == "granite":
        # Non-default multipliers, so Granite's attention scaling really differs from 1/sqrt(d).
        return GraniteConfig(attention_multiplier=0.2, embedding_multiplier=3.0, residual_multiplier=0.5,
                             logits_scaling=2.0, **common)
    raise AssertionError(kind)


def _models(kind: str):
    """The same weights under "sdpa_packed" and under "sdpa"."""
    from transformers import AutoModelForCausalLM

    # A config object each: from_config stores the attention implementation on it.
    torch.manual_seed(0)
    packed = AutoModelForCausalLM.from_config(_config(kind), attn_implementation=NAME, dtype=torch.float32).eval()
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(_config(kind), attn_implementation="sdpa", dtype=torch.float32).eval()
    ref.load_state_dict(packed.state_dict())
    assert packed.config._attn_implementation == NAME
    assert ref.config._attn_implementation == "sdpa"
    if kind == "mistral":
        assert packed.config.sliding_window == WINDOW
    return packed, ref


def _packed_row(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (1, sum(lengths)), generator=g)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).view(1, -1)
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return input_ids, position_ids, bounds


def _no_fallback(monkeypatch):
    """Makes the fallback to transformers' sdpa fail, so a packed row provably runs per sample."""
    def boom(*a, **k):
        raise AssertionError("packed row fell back to transformers' sdpa")
    monkeypatch.setattr(attention, "sdpa_attention_forward", boom)


@pytest.mark.parametrize("kind", ["llama", "qwen3", "mistral", "granite"])
def test_packed_row_matches_sdpa_and_each_sample_alone(kind, monkeypatch):
    packed, ref = _models(kind)
    input_ids, position_ids, bounds = _packed_row(LENGTHS)
    weights = torch.randn(1, input_ids.shape[1], VOCAB, generator=torch.Generator().manual_seed(2))

    # sdpa_packed on the packed row: logits and gradients of a fixed scalar loss.
    with monkeypatch.context() as m:
        _no_fallback(m)
        out = packed(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        (out * weights).sum().backward()
    packed_logits = out.detach()
    packed_grads = {n: p.grad.clone() for n, p in packed.named_parameters()}

    # transformers' sdpa on the same packed row (it builds a block-diagonal mask itself).
    with torch.no_grad():
        sdpa_logits = ref(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    torch.testing.assert_close(packed_logits, sdpa_logits, atol=ATOL, rtol=0)

    # Each sample alone through sdpa, no packing; gradients summed over the samples.
    ref.zero_grad()
    for a, b in zip(bounds[:-1], bounds[1:]):
        alone = ref(input_ids=input_ids[:, a:b], use_cache=False).logits
        (alone * weights[:, a:b]).sum().backward()
        torch.testing.assert_close(packed_logits[:, a:b], alone.detach(), atol=ATOL, rtol=0,
                                   msg=lambda s, a=a, b=b: f"sample [{a}, {b}): {s}")
    for name, p in ref.named_parameters():
        scale = p.grad.abs().max().item()
        torch.testing.assert_close(packed_grads[name], p.grad, rtol=GRAD_RTOL, atol=GRAD_RTOL * scale * 1e-2,
                                   msg=lambda s, name=name: f"{name}: {s}")
        assert scale > 0, name  # every parameter takes part, so the comparison is not vacuous


def test_packing_is_observable():
    """Control: on this row, letting samples see each other (one causal sequence) changes the
    logits well beyond the tolerance, so the tests above would catch cross-sample leakage."""
    _, ref = _models("llama")
    input_ids, position_ids, bounds = _packed_row(LENGTHS)
    with torch.no_grad():
        isolated = ref(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        leaky = ref(input_ids=input_ids, position_ids=position_ids, attention_mask=torch.ones_like(input_ids),
                    use_cache=False).logits
    a, b = bounds[1], bounds[2]
    assert (isolated[:, a:b] - leaky[:, a:b]).abs().max() > 1e-3


def test_mistral_window_is_observable():
    """Control: for a sample longer than the window, full causal attention differs from the
    sliding window, so the Mistral case above checks the banded mask."""
    from transformers import AutoModelForCausalLM

    _, ref = _models("mistral")
    cfg = _config("mistral")
    cfg.sliding_window = None
    no_window = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32).eval()
    no_window.load_state_dict(ref.state_dict())
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (ref(input_ids=ids, use_cache=False).logits - no_window(input_ids=ids, use_cache=False).logits).abs()
    assert diff[:, :WINDOW].max() < ATOL  # identical while the window covers everything
    assert diff[:, WINDOW:].max() > 1e-3


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_padded_batch_falls_back_to_sdpa(kind, monkeypatch):
    packed, ref = _models(kind)
    lengths = [17, 6]
    T = max(lengths)
    g = torch.Generator().manual_seed(4)
    input_ids = torch.randint(1, VOCAB, (2, T), generator=g)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        input_ids[i, n:] = 0  # right padding

    calls = []
    original = attention.sdpa_attention_forward

    def spy(*a, **k):
        calls.append(1)
        return original(*a, **k)

    monkeypatch.setattr(attention, "sdpa_attention_forward", spy)
    with torch.no_grad():
        got = packed(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
    assert len(calls) == packed.config.num_hidden_layers  # every layer took the fallback
    with torch.no_grad():
        want = ref(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
    for i, n in enumerate(lengths):
        torch.testing.assert_close(got[i, :n], want[i, :n], atol=ATOL, rtol=0)
        with torch.no_grad():
            alone = ref(input_ids=input_ids[i:i + 1, :n], use_cache=False).logits[0]
        torch.testing.assert_close(got[i, :n], alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("positions, expected", [
    ([0, 1, 2, 3, 4], [0, 5]),                      # a single sample
    ([0], [0, 1]),                                   # a single one-token sample
    ([0, 0, 0], [0, 1, 2, 3]),                       # samples of length 1
    ([0, 1, 0, 0, 1, 2, 0], [0, 2, 3, 6, 7]),        # mixed, ending with a one-token sample
    ([3, 4, 0, 1, 2], [0, 2, 5]),                    # first position not 0: 0 is prepended
    ([5, 6, 7], [0, 3]),                             # no 0 at all: one sample
])
def test_sample_bounds(positions, expected):
    assert sample_bounds(torch.tensor([positions])) == expected


@pytest.mark.parametrize("length, window", [(1, 1), (5, 1), (6, 3), (10, 4), (4, 4), (3, 8)])
def test_sliding_causal_mask(length, window):
    expected = [[j <= i and i - j < window for j in range(length)] for i in range(length)]
    got = _sliding_causal_mask(length, window, torch.device("cpu"))
    assert got.dtype == torch.bool and got.shape == (length, length)
    assert got.tolist() == expected


def test_sliding_causal_mask_hand_written():
    # Window 2: each query sees itself and the one before it.
    assert _sliding_causal_mask(4, 2, torch.device("cpu")).int().tolist() == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [0, 1, 1, 0],
        [0, 0, 1, 1],
    ]


# --- Everything that is not one unpadded row without a cache goes to transformers' sdpa ---

def test_unpacked_batch_without_mask_keeps_sliding_window():
    packed, ref = _models("mistral")
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = packed(input_ids=ids, use_cache=False).logits
        want = ref(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_packed_batch_of_two_rows_matches_sdpa():
    packed, ref = _models("llama")
    lengths = [12, 8]
    ids = torch.randint(0, VOCAB, (2, sum(lengths)), generator=torch.Generator().manual_seed(6))
    pos = torch.cat([torch.arange(n) for n in lengths]).view(1, -1).repeat(2, 1)
    with torch.no_grad():
        got = packed(input_ids=ids, position_ids=pos, use_cache=False).logits
        want = ref(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_decode_step_with_cache_matches_full_forward():
    packed, ref = _models("llama")
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = ref(input_ids=ids, use_cache=False).logits[0, -1]
        prefill = packed(input_ids=ids[:, :-1], use_cache=True)
        got = packed(input_ids=ids[:, -1:], cache=prefill.cache, use_cache=True).logits[0, -1]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def _fake_varlen(calls, with_window: bool):
    """torch's varlen_attn, computed here per sample with SDPA (the real one needs CUDA),
    recording what it was given; with or without the window_size argument (torch versions)."""
    import torch.nn.functional as F

    def attend(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window=(-1, 0), enable_gqa=False, causal=True):
        calls.append({"cu": cu_q.tolist(), "cu_k": cu_k.tolist(), "max": (max_q, max_k), "window": window,
                      "dtype": cu_q.dtype, "gqa": enable_gqa, "shape": tuple(q.shape)})
        out = []
        for a, b in zip(cu_q.tolist()[:-1], cu_q.tolist()[1:]):
            qs, ks, vs = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))
            n = b - a
            i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
            allowed = (j <= i) & ((i - j <= window[0]) if window[0] >= 0 else True)
            out.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, scale=scale,
                                                      enable_gqa=enable_gqa)[0].transpose(0, 1))
        return torch.cat(out)

    if with_window:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1), enable_gqa=False):
            return attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window=window_size,
                          enable_gqa=enable_gqa)
    else:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, scale=None):
            assert is_causal
            return attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale)
    return varlen_attn


@pytest.mark.parametrize("kind", ["llama", "mistral", "granite"])
@pytest.mark.parametrize("with_window", [True, False])
def test_torch_varlen_attention_on_cuda_gets_the_row_in_one_call(kind, with_window, monkeypatch):
    """Where CUDA has no flash-attn, the packed row goes to torch's varlen attention in one
    call: cu_seqlens are the sample bounds (int32), max the longest sample, the causal (and
    sliding) window as its window_size; logits equal the per-sample SDPA path. A torch
    without window_size keeps per-sample SDPA for sliding layers."""
    packed, _ = _models(kind)
    input_ids, position_ids, bounds = _packed_row(LENGTHS)
    with torch.no_grad():
        expected = packed(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    calls = []
    monkeypatch.setattr(attention, "_use_varlen", lambda query, dropout: True)
    monkeypatch.setattr(attention, "varlen_attention", lambda: _fake_varlen(calls, with_window))
    with torch.no_grad():
        got = packed(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=ATOL)
    if kind == "mistral" and not with_window:
        assert calls == []  # a sliding window this torch cannot express: the SDPA path
        return
    assert len(calls) == 2  # one per layer, not one per sample
    for call in calls:
        assert call["cu"] == call["cu_k"] == bounds and call["dtype"] == torch.int32
        assert call["max"] == (max(LENGTHS), max(LENGTHS)) and call["shape"] == (sum(LENGTHS), 4, 16)
        if with_window:
            assert call["window"] == ((WINDOW - 1, 0) if kind == "mistral" else (-1, 0)) and call["gqa"]


def test_flash_attention_2_only_where_its_kernels_load(monkeypatch, caplog):
    """A flash_attn package that transformers rejects (FA4 alone) or whose CUDA extension
    does not import (built for another torch) falls back to torch's varlen attention, and
    the log says why; only a working FA2 is chosen. CUDA is given as the device here: the
    choice itself runs nothing on it."""
    import importlib.machinery
    import sys
    import types

    import transformers.utils

    from instructpack.train.model import load

    cuda = torch.device("cuda")
    found = importlib.machinery.ModuleSpec("flash_attn", None)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: found if name == "flash_attn"
                        else real_find_spec(name, *a))
    monkeypatch.setattr(load, "_WARNED", set())

    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)  # FA4 only, say
    with caplog.at_level("WARNING"):
        assert load.choose_attention(cuda, disable_flash_attn=False) == NAME
    assert "flash-attn is installed but not used: transformers does not find a usable flash-attn 2" in caplog.text

    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    monkeypatch.delitem(sys.modules, "flash_attn_2_cuda", raising=False)
    broken = types.ModuleType("flash_attn_2_cuda")
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: (_ for _ in ()).throw(
        ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c10") if name == "flash_attn_2_cuda" else None))
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert load.choose_attention(cuda, disable_flash_attn=False) == NAME
    assert "its CUDA kernels do not load (ImportError: flash_attn_2_cuda.so: undefined symbol" in caplog.text

    monkeypatch.setattr(importlib, "import_module", lambda name, *a: broken)  # FA2 that loads
    assert load.choose_attention(cuda, disable_flash_attn=False) == "flash_attention_2"
    assert load.choose_attention(cuda, disable_flash_attn=True) == NAME
    assert load.choose_attention(torch.device("cpu"), disable_flash_attn=False) == NAME


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_the_step_passes_the_collated_bounds_so_no_layer_derives_them(kind, monkeypatch):
    """forward_loss hands the collator's cu_seqlens and max_seqlen to the attention as
    transformers' variable-length keywords: the varlen kernel gets that very tensor and the
    longest sample as a Python int, the per-sample path reads them without looking at the
    position ids, and the loss is the one of the bounds found from the positions."""
    from instructpack.data.collate import MicroBatch
    from instructpack.train.step import forward_loss, takes_varlen

    packed, ref = _models(kind)
    assert takes_varlen(packed) and not takes_varlen(ref)
    input_ids, position_ids, bounds = _packed_row(LENGTHS)
    labels = torch.roll(input_ids, -1, 1)
    labels[0, torch.tensor(bounds[1:]) - 1] = -100
    keep = (labels[0] != -100).nonzero().squeeze(1)
    mb = MicroBatch(input_ids=input_ids, position_ids=position_ids, shift_labels=labels,
                    cu_seqlens=torch.tensor(bounds, dtype=torch.int32), max_seqlen=max(LENGTHS), attention_mask=None,
                    target_positions=keep, num_samples=len(LENGTHS), num_tokens=sum(LENGTHS), num_targets=len(keep),
                    step_targets=len(keep), epoch=0, step=0, index=0, count=1)
    inputs = mb.model_inputs(varlen=True)
    assert inputs["cu_seq_lens_q"] is mb.cu_seqlens and inputs["max_length_k"] == max(LENGTHS)
    assert "cu_seq_lens_q" not in mb.model_inputs()
    with torch.no_grad():
        expected = forward_loss(ref, mb).summed  # transformers' sdpa, block-diagonal mask from the positions

    with torch.no_grad():
        forward_loss(packed, mb)  # the step's one-time output-layer check: forward passes of its own

    def no_positions(*a):
        raise AssertionError("the bounds were derived from the position ids")

    monkeypatch.setattr(attention, "sample_bounds", no_positions)
    with torch.no_grad():
        per_sample = forward_loss(packed, mb).summed
    calls = []
    monkeypatch.setattr(attention, "_use_varlen", lambda query, dropout: True)
    monkeypatch.setattr(attention, "varlen_attention", lambda: _fake_varlen(calls, with_window=True))
    with torch.no_grad():
        varlen = forward_loss(packed, mb).summed
    torch.testing.assert_close(per_sample, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(varlen, expected, rtol=1e-5, atol=1e-4)
    assert len(calls) == 2 and all(c["cu"] == bounds and c["max"] == (max(LENGTHS),) * 2 for c in calls)
    assert all(type(c["max"][0]) is int for c in calls)

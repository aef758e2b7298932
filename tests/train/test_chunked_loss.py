"""The chunked linear cross-entropy against the plain one (all logits at once): loss and
gradients equal in fp32 to 1e-6 relative (of each tensor's norm: a matrix product of a
different row count sums in another order, so a near-zero element may differ by a few
ulps of the larger ones), with a bias, a logit scale, soft-capping, tied weights, frozen
weights, ignored labels and chunks that do not divide the rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from instructpack.train.chunked_loss import chunked_linear_cross_entropy


def _plain(hidden, weight, labels, bias=None, finish=None):
    logits = F.linear(hidden, weight, bias)
    if finish is not None:
        logits = finish(logits)
    return F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


FINISHES = {
    "none": None,
    "granite-scaling": lambda z: z / 8.0,
    "gemma-softcap": lambda z: torch.tanh(z / 30.0) * 30.0,
}


@pytest.mark.parametrize("finish", list(FINISHES))
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_equals_the_plain_loss_and_gradients(finish, chunk, with_bias):
    torch.manual_seed(chunk)
    n, h, v = 53, 16, 301
    hidden = (torch.randn(n, h) * 3).requires_grad_()
    weight = torch.randn(v, h).requires_grad_()
    bias = torch.randn(v).requires_grad_() if with_bias else None
    labels = torch.randint(0, v, (n,))
    labels[::5] = -100
    expected = _plain(hidden, weight, labels, bias, FINISHES[finish])
    grads = torch.autograd.grad(expected * 1.7, [t for t in (hidden, weight, bias) if t is not None])
    got = chunked_linear_cross_entropy(hidden, weight, labels, bias=bias, chunk=chunk, finish=FINISHES[finish])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    ours = torch.autograd.grad(got * 1.7, [t for t in (hidden, weight, bias) if t is not None])
    for a, b in zip(ours, grads):
        assert relative_error(a, b) <= 1e-6


def test_tied_and_frozen_weights():
    torch.manual_seed(0)
    embed = torch.nn.Embedding(97, 12)
    ids = torch.randint(0, 97, (40,))
    labels = torch.randint(0, 97, (40,))
    for frozen in (False, True):
        embed.weight.requires_grad_(not frozen)
        embed.zero_grad()
        hidden = embed(ids) * 2 if not frozen else (embed(ids) * 2).detach().requires_grad_()
        chunked_linear_cross_entropy(hidden, embed.weight, labels, chunk=9).backward()
        ours = (embed.weight.grad.clone() if not frozen else None, None if not frozen else hidden.grad.clone())
        embed.zero_grad()
        hidden = embed(ids) * 2 if not frozen else hidden.detach().requires_grad_()
        _plain(hidden, embed.weight, labels).backward()
        if frozen:
            assert embed.weight.grad is None
            assert relative_error(ours[1], hidden.grad) <= 1e-6
        else:  # the output layer and the embedding share the weight: both gradients add up
            assert relative_error(ours[0], embed.weight.grad) <= 1e-6


def test_bf16_within_the_plain_paths_own_noise():
    torch.manual_seed(1)
    hidden = torch.randn(64, 32).bfloat16().requires_grad_()
    weight = torch.randn(500, 32).bfloat16().requires_grad_()
    labels = torch.randint(0, 500, (64,))
    exact = _plain(hidden.float(), weight.float(), labels)
    plain = _plain(hidden, weight, labels)
    got = chunked_linear_cross_entropy(hidden, weight, labels, chunk=16)
    assert abs(got.item() - exact.item()) <= 2 * abs(plain.item() - exact.item()) + 1e-3 * exact.item()
    got.backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dirs):
    from instructpack.demo.example import build_tiny_model

    root = tmp_path_factory.mktemp("heads")
    configs = {"llama": {}, "granite": {"logits_scaling": 4.0}, "gemma2": {"final_logit_softcapping": 5.0},
               "cohere": {"logit_scale": 0.5}}
    return {arch: build_tiny_model(root / arch, tokenizer_dirs["chatml"], architecture=arch, **extra)
            for arch, extra in configs.items()}


def _micro_batch(seed: int):
    from instructpack.data.collate import MicroBatch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 300, (1, 48), generator=g)
    labels = torch.randint(0, 300, (1, 48), generator=g)
    labels[0, :12] = -100
    positions = torch.cat([torch.arange(20), torch.arange(28)])[None]  # two samples in the row
    labels[0, 19] = -100
    keep = torch.nonzero(labels[0] != -100).flatten()
    return MicroBatch(input_ids=ids, position_ids=positions, shift_labels=labels,
                      cu_seqlens=torch.tensor([0, 20, 48], dtype=torch.int32), max_seqlen=28, attention_mask=None,
                      target_positions=keep, num_samples=2, num_tokens=48, num_targets=len(keep), step_targets=-1,
                      epoch=0, step=0, index=0, count=1)


def _loss_and_grads(model, mb):
    from instructpack.train.step import forward_loss

    model.zero_grad()
    loss = forward_loss(model, mb).summed
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "granite", "gemma2", "cohere"])
def test_the_training_step_loss_is_chunked_and_equals_the_plain_one(arch, models, monkeypatch):
    """Through the model: tied embeddings (these tiny models tie them), Granite's logit
    scale, Gemma's soft-capping, Cohere's logit scale."""
    from transformers import AutoModelForCausalLM

    from instructpack.train import chunked_loss, step
    from instructpack.train.model.attention import name_for

    monkeypatch.setattr(chunked_loss, "CHUNK_LOGITS", 1000)  # 3 tokens a chunk at this vocabulary
    cls = type(AutoModelForCausalLM.from_pretrained(models[arch], attn_implementation="eager"))
    model = AutoModelForCausalLM.from_pretrained(models[arch], dtype=torch.float32,
                                                 attn_implementation=name_for(cls))
    mb = _micro_batch(3)
    chunked, chunked_grads = _loss_and_grads(model, mb)
    assert step._CHUNKED[model] is True
    step._CHUNKED[model] = False  # the plain path: every target's logits at once
    plain, plain_grads = _loss_and_grads(model, mb)
    assert chunked == pytest.approx(plain, rel=1e-6)
    assert chunked_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        assert relative_error(chunked_grads[name], plain_grads[name]) <= 1e-5, name


def test_a_model_whose_logits_are_transformed_otherwise_keeps_the_plain_loss(models, monkeypatch):
    from transformers import AutoModelForCausalLM

    from instructpack.train import chunked_loss, step

    monkeypatch.setattr(chunked_loss, "CHUNK_LOGITS", 1000)
    monkeypatch.setattr(step, "logit_finish", lambda config: None)  # as if Granite's scale were unknown
    model = AutoModelForCausalLM.from_pretrained(models["granite"], dtype=torch.float32)
    mb = _micro_batch(4)
    loss, _ = _loss_and_grads(model, mb)
    assert step._CHUNKED[model] is False
    logits = model(**mb.model_inputs(), use_cache=False).logits[0, mb.target_positions]
    expected = F.cross_entropy(logits.float(), mb.shift_labels[0, mb.target_positions], reduction="sum")
    assert loss == pytest.approx(expected.item(), rel=1e-6)


def test_the_check_draws_no_random_numbers_and_accepts_a_model_with_dropout(models):
    """The one-time check runs two forward passes: they must leave the dropout stream as it
    was (a resumed run draws what a run never stopped draws) and see the same dropout."""
    from transformers import AutoModelForCausalLM

    from instructpack.train import step

    model = AutoModelForCausalLM.from_pretrained(models["llama"], dtype=torch.float32, attention_dropout=0.3)
    model.train()
    before = torch.get_rng_state()
    assert step._chunks_output_layer(model, _micro_batch(5)) is True
    assert torch.equal(torch.get_rng_state(), before)

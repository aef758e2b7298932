"""One optimizer step (train/step.py) against an independent reference: each sample run
alone through the model, cross-entropy summed over its trained tokens, divided by the
step's total. SGD with lr 1 and no clipping makes the weight change equal -gradient."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from instructpack.data.collate import IGNORE_INDEX, collate_packed, collate_padded
from instructpack.data.loader import Step, StepLoader
from instructpack.data.sampler import MultipackSampler
from instructpack.demo.example import build_tiny_model, generate_conversations, generate_fact_conversations
from instructpack.train.backends import Backend
from instructpack.train.model.attention import NAME as PACKED_SDPA
from instructpack.train.step import run_step, summed_loss

from support.samples import preprocess


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dirs):
    root = tmp_path_factory.mktemp("step")
    model_dir = build_tiny_model(root / "model", tokenizer_dirs["chatml"])
    samples = list(generate_fact_conversations(12, seed=1)) + list(generate_conversations(12, seed=2, median_words=15))
    result = preprocess(root, model_dir, samples)
    from instructpack import load_dataset
    return model_dir, load_dataset(result.output_path)


def fresh_model(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=PACKED_SDPA)
    model.config.use_cache = False
    return model.train()


def one_step(dataset, *, max_batch_len: int) -> tuple[Step, np.ndarray]:
    """The first step of a plan holding every sample, and the ids of its samples."""
    sampler = MultipackSampler(dataset.lengths, effective_batch_size=len(dataset), max_batch_len=max_batch_len,
                               seed=3)
    return next(iter(StepLoader(dataset, sampler))), sampler.plan(0).step_samples(0)


def reference(model, dataset, sample_ids) -> tuple[float, dict[str, torch.Tensor]]:
    """Mean cross-entropy over all trained tokens of the samples, each sample run alone
    (no packing), with labels shifted the textbook way; and its gradient."""
    model.zero_grad()
    total_targets = 0
    losses = []
    for i in sample_ids:
        s = dataset[int(i)]
        ids = torch.as_tensor(s["input_ids"]).long()[None]
        labels = torch.as_tensor(s["labels"]).long()[None]
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
        target = labels[0, 1:]
        losses.append(torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum"))
        total_targets += int((target != IGNORE_INDEX).sum())
    loss = torch.stack(losses).sum() / total_targets
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return loss.item(), grads


@pytest.mark.parametrize("split", [False, True])
def test_step_loss_and_update_equal_per_sample_reference(setup, split):
    model_dir, dataset = setup
    # split: micro-batches only as long as the longest sample, so the step needs several
    max_batch_len = int(dataset.lengths.max()) if split else 4096
    step, ids = one_step(dataset, max_batch_len=max_batch_len)
    assert sorted(ids) == list(range(len(dataset)))
    if split:
        assert len(step.micro_batches) >= 4  # the same step, split many ways
    else:
        assert len(step.micro_batches) == 1
    model = fresh_model(model_dir)
    ref_loss, ref_grads = reference(model, dataset, ids)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    result = run_step(Backend(model, optimizer), step, None, device=torch.device("cpu"), max_grad_norm=math.inf)

    assert result.targets == step.targets == int(dataset.target_counts[ids].sum())
    assert result.loss_sum / result.targets == pytest.approx(ref_loss, rel=1e-5)
    ref_norm = torch.sqrt(sum((g ** 2).sum() for g in ref_grads.values())).item()
    assert result.grad_norm == pytest.approx(ref_norm, rel=1e-4)
    for name, p in model.named_parameters():
        torch.testing.assert_close(before[name] - p.detach(), ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_empty_micro_batch_changes_nothing(setup):
    """A rank with no samples left in a micro-batch runs a stand-in with zero loss: the
    update is the same as without it."""
    model_dir, dataset = setup
    step, _ = one_step(dataset, max_batch_len=4096)
    first = step.micro_batches[0]
    empty = type(first)(**{**first.__dict__, "input_ids": first.input_ids[:, :0], "position_ids":
                           first.position_ids[:, :0], "shift_labels": first.shift_labels[:, :0],
                           "cu_seqlens": first.cu_seqlens[:1], "max_seqlen": 0, "num_samples": 0,
                           "num_tokens": 0, "num_targets": 0, "index": 1, "count": 2})
    with_empty = Step(step.epoch, step.step, [type(first)(**{**first.__dict__, "count": 2}), empty])
    assert empty.empty
    updated = []
    for s in (step, with_empty):
        model = fresh_model(model_dir)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        result = run_step(Backend(model, optimizer), s, None, device=torch.device("cpu"), max_grad_norm=math.inf)
        updated.append((result, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (a, wa), (b, wb) = updated
    assert b.micro_batches == 2 and b.samples == a.samples and b.targets == a.targets
    assert b.loss_sum == pytest.approx(a.loss_sum, rel=1e-6)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-7, msg=name)


def test_grad_scale_multiplies_the_gradient(setup):
    """DDP averages gradients over ranks; grad_scale=world_size turns that back into the
    sum the step-wide denominator expects."""
    model_dir, dataset = setup
    step, _ = one_step(dataset, max_batch_len=4096)
    deltas = []
    for scale in (1.0, 3.0):
        model = fresh_model(model_dir)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        backend = Backend(model, torch.optim.SGD(model.parameters(), lr=1.0))
        backend.grad_scale = scale
        run_step(backend, step, None, device=torch.device("cpu"), max_grad_norm=math.inf)
        deltas.append({n: before[n] - p.detach() for n, p in model.named_parameters()})
    for name in deltas[0]:
        # atol: a weight near 1 (norm scales) stores its change to fp32 resolution, ~1.2e-7
        torch.testing.assert_close(deltas[1][name], 3.0 * deltas[0][name], rtol=1e-5, atol=1e-6)


def test_clipping_bounds_the_update(setup):
    model_dir, dataset = setup
    step, _ = one_step(dataset, max_batch_len=4096)
    model = fresh_model(model_dir)
    before = [p.detach().clone() for p in model.parameters()]
    result = run_step(Backend(model, torch.optim.SGD(model.parameters(), lr=1.0)), step, None,
                      device=torch.device("cpu"), max_grad_norm=0.5)
    assert result.grad_norm > 0.5  # reported before clipping
    moved = torch.sqrt(sum(((b - p.detach()) ** 2).sum() for b, p in zip(before, model.parameters())))
    assert moved.item() == pytest.approx(0.5, rel=1e-3)


def test_padded_rows_give_the_packed_loss(setup):
    """The same micro-batch packed (logits at target positions only) and padded (a boolean
    mask of target positions) gives the same summed loss as the full logits."""
    model_dir, dataset = setup
    step, _ = one_step(dataset, max_batch_len=4096)
    sampler = MultipackSampler(dataset.lengths, effective_batch_size=len(dataset), max_batch_len=4096, seed=3)
    ref = next(iter(sampler))
    packed, padded = collate_packed(dataset, ref), collate_padded(dataset, ref, pad_token_id=0)
    model = fresh_model(model_dir).eval()
    with torch.no_grad():
        full_logits = model(**packed.model_inputs(), use_cache=False).logits[0]
        full = torch.nn.functional.cross_entropy(full_logits, packed.shift_labels[0], reduction="sum").item()
        assert packed.target_positions.numel() == packed.num_targets < packed.num_tokens
        assert summed_loss(model, packed).item() == pytest.approx(full, rel=1e-5)
        assert summed_loss(model, padded).item() == pytest.approx(full, rel=1e-5)

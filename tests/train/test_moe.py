"""Mixture-of-experts models, built tiny from config (Qwen3-MoE, Mixtral, GraniteMoe,
GPT-OSS): packed logits equal each sample alone; the loss is transformers' own (mean
cross-entropy plus the model's coefficient times the router loss); over a step the router
loss is the mean over micro-batches, whatever their number; routers freeze as InstructLab
freezes them; the router load is counted."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from instructpack import TrainingArgs, load_dataset
from instructpack.data.collate import collate_packed
from instructpack.data.loader import StepLoader
from instructpack.data.sampler import MicroBatchRef, MultipackSampler
from instructpack.demo.example import build_tiny_model, generate_fact_conversations
from instructpack.train.backends import Backend
from instructpack.train.model import moe
from instructpack.train.model.load import load_model
from instructpack.train.step import forward_loss, run_step

from support.samples import preprocess

EXPERTS = {"num_local_experts": 4, "num_experts_per_tok": 2}
ARCHITECTURES = {
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 1,
                  "router_aux_loss_coef": 0.01},
    "mixtral": {**EXPERTS, "router_aux_loss_coef": 0.02},
    "granitemoe": {**EXPERTS, "router_aux_loss_coef": 0.01},
    "gpt_oss": {**EXPERTS, "router_aux_loss_coef": 0.9, "sliding_window": 8,
                "layer_types": ["sliding_attention", "full_attention"]},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dirs):
    root = tmp_path_factory.mktemp("moe")
    built = {arch: build_tiny_model(root / arch, tokenizer_dirs["chatml"], architecture=arch, **config)
             for arch, config in ARCHITECTURES.items()}
    samples = list(generate_fact_conversations(12, seed=1))
    dataset = load_dataset(preprocess(root, tokenizer_dirs["chatml"], samples).output_path)
    return built, dataset


def _args(model_dir, **kw) -> TrainingArgs:
    return TrainingArgs(model_path=str(model_dir), data_path="unused.jsonl", ckpt_output_dir="unused",
                        data_output_dir="unused-data", max_seq_len=512, max_batch_len=4096, effective_batch_size=12,
                        learning_rate=1e-3, distributed_backend="ddp", gradient_checkpointing=False, **kw)


def _step(dataset, max_batch_len: int):
    sampler = MultipackSampler(dataset.lengths, effective_batch_size=len(dataset), max_batch_len=max_batch_len,
                               seed=3)
    return next(iter(StepLoader(dataset, sampler)))


def _reference_model(model_dir):
    """transformers' own model, with its own eager attention, run on one sample at a time."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_packed_logits_equal_each_sample_alone(arch, models):
    built, dataset = models
    model = load_model(_args(built[arch]), torch.device("cpu")).eval()
    reference = _reference_model(built[arch])
    mb = _step(dataset, 4096).micro_batches[0]
    bounds = mb.cu_seqlens.tolist()
    assert len(bounds) > 3
    with torch.no_grad():
        packed = model(**mb.model_inputs(), use_cache=False).logits[0]
        for a, b in zip(bounds[:-1], bounds[1:]):
            alone = reference(input_ids=mb.input_ids[:, a:b], use_cache=False).logits[0]
            torch.testing.assert_close(packed[a:b], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_the_loss_of_one_sample_is_transformers_own(arch, models):
    built, dataset = models
    model = load_model(_args(built[arch]), torch.device("cpu")).eval()
    reference = _reference_model(built[arch])
    ids = np.array([4])
    mb = collate_packed(dataset, MicroBatchRef(0, 0, 0, 1, ids, int(dataset.target_counts[4])))
    with torch.no_grad():
        out = forward_loss(model, mb, router=True)
        ours = out.summed / mb.num_targets + moe.aux_coefficient(model.config) * out.router_aux
        labels = torch.as_tensor(dataset[4]["labels"]).long()[None]
        theirs = reference(input_ids=mb.input_ids, labels=labels, output_router_logits=True, use_cache=False)
    assert theirs.aux_loss is not None and moe.aux_coefficient(model.config) > 0
    assert ours.item() == pytest.approx(theirs.loss.item(), rel=1e-5)
    tokens = mb.num_tokens * moe.experts_per_token(model.config)
    assert out.expert_counts.sum(dim=1).tolist() == [tokens] * model.config.num_hidden_layers


@pytest.mark.parametrize("split", [False, True])
def test_the_router_loss_of_a_step_is_the_mean_over_its_micro_batches(split, models):
    """The step's gradient is that of mean cross-entropy + coefficient x (mean over the
    micro-batches of their router loss): its weight does not grow with their number."""
    built, dataset = models
    step = _step(dataset, int(dataset.lengths.max()) if split else 4096)
    assert (len(step.micro_batches) >= 3) is split
    args = _args(built["mixtral"])
    model = load_model(args, torch.device("cpu"))
    twin = copy.deepcopy(model)
    coef = moe.aux_coefficient(model.config)

    twin.zero_grad()
    summed, aux = 0.0, []
    for mb in step.micro_batches:
        out = forward_loss(twin, mb, router=True)
        summed = summed + out.summed
        aux.append(out.router_aux)
    expected = summed / step.targets + coef * torch.stack(aux).mean()
    expected.backward()
    expected_grads = {n: p.grad.clone() for n, p in twin.named_parameters() if p.grad is not None}

    result = run_step(Backend(model, torch.optim.SGD(model.parameters(), lr=0.0)), step, None,
                      device=torch.device("cpu"), max_grad_norm=math.inf)
    assert result.router_aux_loss == pytest.approx(coef * torch.stack(aux).mean().item(), rel=1e-5)
    norm = torch.sqrt(sum((g ** 2).sum() for g in expected_grads.values())).item()
    assert result.grad_norm == pytest.approx(norm, rel=1e-4)
    assert moe.max_expert_load(result.expert_counts) >= 1.0


@pytest.mark.parametrize("arch, frozen_by_default", [("gpt_oss", True), ("mixtral", False), ("qwen3_moe", False)])
def test_routers_freeze_as_instructlab_freezes_them(arch, frozen_by_default, models):
    built, dataset = models
    for setting, frozen in ((None, frozen_by_default), (True, True), (False, False)):
        model = load_model(_args(built[arch], freeze_router=setting), torch.device("cpu"))
        routers = {n: p for n, p in model.named_parameters() if moe._ROUTER_PARAMETER.search(n)}
        assert routers and all(p.requires_grad is not frozen for p in routers.values()), (arch, setting)
        others = [p for n, p in model.named_parameters() if n not in routers]
        assert all(p.requires_grad for p in others)
    model = load_model(_args(built[arch], freeze_router=True), torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    run_step(Backend(model, torch.optim.SGD(trainable, lr=1.0)), _step(dataset, 4096), None,
             device=torch.device("cpu"), max_grad_norm=math.inf)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and not any(moe._ROUTER_PARAMETER.search(n) for n in changed)

"""AdamW parameter groups and the learning-rate schedule against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from instructpack import TrainingArgs
from instructpack.train.optim import build_optimizer, build_scheduler, lr_factor


def _args(**kw) -> TrainingArgs:
    base = dict(model_path="m", data_path="d.jsonl", ckpt_output_dir="ckpt", data_output_dir="data",
                max_seq_len=64, max_batch_len=128, effective_batch_size=8, learning_rate=3e-4)
    base.update(kw)
    return TrainingArgs(**base)


# --- lr_factor -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_warmup_is_linear_and_reaches_peak_on_its_last_step(kind):
    w = 4
    assert [lr_factor(s, 20, w, kind) for s in range(w)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_factor(0, 20, w, kind) == pytest.approx(1 / w)  # never 0
    assert lr_factor(w - 1, 20, w, kind) == 1.0


def test_constant_after_warmup():
    assert [lr_factor(s, 10, 2, "constant") for s in range(2, 12)] == [1.0] * 10


def test_linear_decay_hand_computed():
    # total 10, warmup 2: 8 decay steps, progress (s - 2) / 8.
    got = [lr_factor(s, 10, 2, "linear") for s in range(2, 10)]
    assert got == pytest.approx([1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])


def test_cosine_decay_hand_computed():
    assert lr_factor(2, 10, 2, "cosine") == pytest.approx(1.0)
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)  # half way: cos(pi/2) = 0
    assert lr_factor(7, 10, 2, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 8)))
    assert lr_factor(4, 10, 2, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(9, 10, 2, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("total, warmup", [(10, 2), (10, 0), (1, 0), (5, 4), (100, 10)])
def test_last_step_is_never_zero_and_decay_is_monotone(kind, total, warmup):
    factors = [lr_factor(s, total, warmup, kind) for s in range(total)]
    assert factors[-1] > 0
    assert all(0 < f <= 1 for f in factors)
    after = factors[warmup:]
    assert all(a >= b for a, b in zip(after, after[1:]))


def test_warmup_zero_starts_at_peak():
    for kind in ("constant", "linear", "cosine"):
        assert lr_factor(0, 10, 0, kind) == 1.0
    assert lr_factor(5, 10, 0, "linear") == pytest.approx(0.5)
    assert lr_factor(9, 10, 0, "linear") == pytest.approx(0.1)
    assert lr_factor(5, 10, 0, "cosine") == pytest.approx(0.5)


def test_invalid_kind_raises():
    with pytest.raises(ValueError, match="lr_scheduler"):
        lr_factor(5, 10, 2, "exponential")


# --- build_scheduler ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind, warmup", [("cosine", 2), ("linear", 3), ("constant", 4), ("cosine", 0)])
def test_scheduler_sets_peak_times_factor(kind, warmup):
    peak, total = 2e-3, 10
    args = _args(learning_rate=peak, warmup_steps=warmup, lr_scheduler=kind)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = build_optimizer(model, args)
    sched = build_scheduler(opt, args, total)
    x = torch.randn(5, 4)
    for k in range(total):
        # Optimizer step k runs with the lr the schedule gives step k.
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(peak * lr_factor(k, total, warmup, kind), rel=1e-12)
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
        sched.step()


# --- build_optimizer ----------------------------------------------------------------------------

class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 6)
        self.lin = torch.nn.Linear(6, 6)
        self.norm = torch.nn.LayerNorm(6)
        self.conv = torch.nn.Conv1d(6, 2, 3)
        self.frozen = torch.nn.Linear(6, 6)
        self.frozen.requires_grad_(False)
        self.scale = torch.nn.Parameter(torch.ones(6))
        self.frozen_bias = torch.nn.Parameter(torch.zeros(6), requires_grad=False)


def _ids(params):
    return {id(p) for p in params}


def test_optimizer_groups_decay_matrices_only():
    net = _Net()
    args = _args(learning_rate=1e-3, adamw_weight_decay=0.1, adamw_betas=(0.8, 0.99), adamw_eps=1e-6)
    opt = build_optimizer(net, args)
    assert isinstance(opt, torch.optim.AdamW)
    assert len(opt.param_groups) == 2
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert _ids(decay["params"]) == _ids([net.emb.weight, net.lin.weight, net.conv.weight])
    assert _ids(no_decay["params"]) == _ids([net.lin.bias, net.norm.weight, net.norm.bias, net.conv.bias, net.scale])
    for g in opt.param_groups:
        assert g["lr"] == 1e-3 and tuple(g["betas"]) == (0.8, 0.99) and g["eps"] == 1e-6
    # Frozen parameters are in no group.
    frozen = _ids([net.frozen.weight, net.frozen.bias, net.frozen_bias])
    assert not frozen & _ids(p for g in opt.param_groups for p in g["params"])


def test_optimizer_defaults_from_args():
    opt = build_optimizer(torch.nn.Linear(3, 2), _args())
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0]
    for g in opt.param_groups:
        assert g["lr"] == 3e-4 and tuple(g["betas"]) == (0.9, 0.95) and g["eps"] == 1e-8


def test_optimizer_without_1d_params_has_one_group():
    net = torch.nn.Linear(3, 2, bias=False)
    opt = build_optimizer(net, _args(adamw_weight_decay=0.05))
    assert len(opt.param_groups) == 1
    assert opt.param_groups[0]["weight_decay"] == 0.05
    assert _ids(opt.param_groups[0]["params"]) == {id(net.weight)}


def test_weight_decay_applies_only_to_the_matrix():
    """One step with zero gradients: AdamW's update is then decay alone, p <- p * (1 - lr * wd),
    on the matrix; the bias must not move."""
    net = torch.nn.Linear(3, 2)
    w0, b0 = net.weight.detach().clone(), net.bias.detach().clone()
    opt = build_optimizer(net, _args(learning_rate=0.1, adamw_weight_decay=0.5))
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(net.weight.detach(), w0 * (1 - 0.1 * 0.5))
    torch.testing.assert_close(net.bias.detach(), b0)


def test_fused_adamw_on_gpus_only_and_it_steps_as_the_foreach_one():
    import types

    from instructpack.train.optim import implementation

    on_gpu = types.SimpleNamespace(is_cuda=True)
    assert implementation([on_gpu, on_gpu]) == {"fused": True}
    assert implementation([on_gpu, torch.zeros(1)]) == {"foreach": True}  # FSDP2 CPU offload, mixed
    assert implementation([torch.zeros(1)]) == {"foreach": True}
    assert implementation([on_gpu], fused=False) == {"foreach": True}  # ZeRO-Offload steps on the CPU
    # The same update (torch's fused AdamW also runs on the CPU): weight decay groups included.
    nets = []
    for fused in (False, True):
        torch.manual_seed(0)
        net = _Net()
        opt = build_optimizer(net, _args(learning_rate=1e-2, adamw_weight_decay=0.1), fused=fused)
        assert opt.defaults.get("fused") is (True if fused else None)
        for _ in range(3):
            sum(p.square().sum() for p in net.parameters() if p.requires_grad).backward()
            opt.step()
            opt.zero_grad()
        nets.append(net)
    for a, b in zip(*(n.parameters() for n in nets)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

"""Backend choices that need no second process: FSDP2's mesh per sharding strategy, the
precision policy (load dtype and autocast) per device and backend, and FSDP2 on one
process outside torchrun taking the same step as the plain model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from instructpack import TrainingArgs
from instructpack.config import ShardingStrategies as S
from instructpack.data.collate import MicroBatch
from instructpack.data.loader import Step
from instructpack.train.backends import Backend, FSDPBackend
from instructpack.train.backends.fsdp import mesh_shape
from instructpack.train.distributed import World
from instructpack.train.optim import build_optimizer
from instructpack.train.precision import decide_precision
from instructpack.train.step import run_step

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def args(**kw) -> TrainingArgs:
    base = dict(model_path="m", data_path="d", ckpt_output_dir="c", data_output_dir="o", max_seq_len=8,
                max_batch_len=8, effective_batch_size=8, learning_rate=1e-2)
    return TrainingArgs(**{**base, **kw})


@pytest.mark.parametrize("strategy, world, per_node, shape", [
    (S.FULL_SHARD, 16, 8, (16,)), (S.SHARD_GRAD_OP, 16, 8, (16,)),
    (S.HYBRID_SHARD, 16, 8, (2, 8)),  # replicated across 2 nodes, sharded over each node's 8
    (S.HYBRID_SHARD, 8, 8, (1, 8)),  # one node: the same as FULL_SHARD
    (S.NO_SHARD, 16, 8, (16, 1)),  # replicated everywhere
])
def test_mesh_per_sharding_strategy(strategy, world, per_node, shape):
    assert mesh_shape(strategy, world, per_node) == shape


@pytest.mark.parametrize("settings, device, loaded, autocast", [
    ({}, CPU, torch.float32, None),
    ({"distributed_backend": "ddp"}, CPU, torch.float32, None),
    # GPUs: fp32 master weights for full fine-tunes, bf16 compute by FSDP2's policy or autocast
    ({}, CUDA, torch.float32, None),
    ({"distributed_backend": "ddp"}, CUDA, torch.float32, torch.bfloat16),
    ({"distributed_backend": "deepspeed"}, CUDA, torch.bfloat16, None),  # DeepSpeed keeps the masters
    # frozen base in bf16; autocast so that peft keeps no fp32 copies of the adapted inputs
    ({"distributed_backend": "ddp", "lora": {"rank": 8}}, CUDA, torch.bfloat16, torch.bfloat16),
    ({"distributed_backend": "deepspeed", "lora": {"rank": 8}}, CUDA, torch.bfloat16, None),
    ({"lora": {"rank": 8}}, CUDA, torch.float32, None),  # FSDP2 shards it like any weight
])
def test_precision_policy(settings, device, loaded, autocast):
    precision = decide_precision(args(**settings), device)
    assert precision.weights == loaded and (precision.compute if precision.autocast else None) == autocast


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, use_cache=False)
    return LlamaForCausalLM(config)


def packed_step(lengths: list[int], micro_batches: int) -> Step:
    """`micro_batches` copies of one packed row of samples with every token a target."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (1, sum(lengths)), generator=g)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    labels = ids.clone()
    starts = torch.tensor([0] + lengths).cumsum(0)
    labels[0, :-1] = ids[0, 1:]
    labels[0, starts[1:] - 1] = -100  # no target across a sample boundary
    keep = (labels[0] != -100).nonzero().squeeze(1)
    mbs = [MicroBatch(input_ids=ids, position_ids=positions, shift_labels=labels,
                      cu_seqlens=starts.to(torch.int32), max_seqlen=max(lengths), attention_mask=None,
                      target_positions=keep, num_samples=len(lengths), num_tokens=sum(lengths),
                      num_targets=len(keep), step_targets=len(keep) * micro_batches, epoch=0, step=0,
                      index=i, count=micro_batches) for i in range(micro_batches)]
    return Step(0, 0, mbs)


def test_fsdp_on_one_process_outside_torchrun_takes_the_plain_step():
    step = packed_step([5, 9, 3], micro_batches=2)
    plain = tiny_model()
    expected = run_step(Backend(plain, build_optimizer(plain, args())), step, None, device=CPU,
                        max_grad_norm=math.inf)
    try:
        sharded = tiny_model()
        backend = FSDPBackend(sharded, World(0, 0, 1, CPU), args())  # joins a 1-process group
        assert dist.is_initialized() and type(sharded).__name__.startswith("FSDP")
        got = run_step(backend, step, None, device=CPU, max_grad_norm=math.inf)
        assert got.loss_sum == pytest.approx(expected.loss_sum, rel=1e-6)
        assert got.grad_norm == pytest.approx(expected.grad_norm, rel=1e-5)
        full = backend.gather_weights()
        for name, value in plain.state_dict().items():
            torch.testing.assert_close(full[name], value, rtol=1e-5, atol=1e-6, msg=name)
    finally:
        dist.destroy_process_group()


def test_model_on_the_meta_device_for_ranks_that_receive_their_shards(tmp_path, tokenizer_dirs):
    """FSDP2 ranks other than 0 build the model without reading its weights: the same
    parameter names and shapes as rank 0's, adapters and grown embeddings included."""
    from instructpack.demo.example import build_tiny_model
    from instructpack.train.model.load import load_model

    model_dir = build_tiny_model(tmp_path / "m", tokenizer_dirs["chatml"])
    a = args(model_path=str(model_dir), lora={"rank": 4})
    rows = load_model(a, CPU).get_input_embeddings().num_embeddings
    real = load_model(a, CPU, vocab_size=rows + 5)
    meta = load_model(a, CPU, vocab_size=rows + 5, weights=False)
    assert all(p.is_meta for p in meta.parameters())
    assert [(n, p.shape, p.requires_grad) for n, p in meta.named_parameters()] == \
        [(n, p.shape, p.requires_grad) for n, p in real.named_parameters()]
    assert meta.get_input_embeddings().num_embeddings == rows + 8  # grown to a multiple of 8


def test_ddp_gradients_are_views_into_its_buckets_and_the_step_is_the_plain_one():
    """DDP with gradient_as_bucket_view: each gradient lives in DDP's reduction bucket (no
    second copy), and the step equals the plain model's."""
    from instructpack.train.backends import DDPBackend
    from instructpack.train.distributed import ensure_process_group

    step = packed_step([5, 9, 3], micro_batches=2)
    plain = tiny_model()
    expected = run_step(Backend(plain, build_optimizer(plain, args())), step, None, device=CPU,
                        max_grad_norm=math.inf)
    world = World(0, 0, 1, CPU)
    ensure_process_group(world)
    try:
        model = tiny_model()
        backend = DDPBackend(model, world, args())
        assert backend.module.gradient_as_bucket_view
        with backend.sync(last=True):
            backend.backward(backend.module(input_ids=step.micro_batches[0].input_ids, use_cache=False)
                             .logits.float().sum())
        storages = {p.grad.untyped_storage().data_ptr() for p in model.parameters()}
        assert len(storages) < sum(1 for _ in model.parameters())  # gradients share bucket storage
        backend.optimizer.zero_grad(set_to_none=True)
        got = run_step(backend, step, None, device=CPU, max_grad_norm=math.inf)
        assert got.loss_sum == pytest.approx(expected.loss_sum, rel=1e-6)
        assert got.grad_norm == pytest.approx(expected.grad_norm, rel=1e-5)
    finally:
        dist.destroy_process_group()

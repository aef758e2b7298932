"""The DeepSpeed backend: its config builder and its native checkpoints read weights-only,
in this process (fast), and training runs compared with a plain single-process reference of
the same math (slow: one torchrun launch with two processes on the CPU, plus one
single-process run).

Run as a script, this file is the worker those tests launch:
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/test_deepspeed_backend.py OUT.json
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from instructpack.config import TrainingArgs

REL_TOL = 1e-4
# Micro-batches per rank in each step: varies, and differs from the configured
# gradient_accumulation_steps (2), which must neither decide when to step nor scale the loss.
COUNTS = (3, 2, 3)
GAS = 2
CONFIGS = {  # name: (deepspeed_options, LoRA?)
    "zero2": ({"zero_stage": 2}, False),
    "zero3": ({"zero_stage": 3}, False),
    "zero2_offload": ({"zero_stage": 2, "cpu_offload_optimizer": True}, False),
    # LoRA: frozen base weights partitioned too, adapter-only optimizer, peft state-dict keys.
    "zero3_offload_lora": ({"zero_stage": 3, "cpu_offload_optimizer": True}, True),
}
# Tiny parameters would all stay whole under ZeRO-3 (below the persistence threshold);
# partition every one of them, so gathering is really exercised.
OVERRIDES = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}


def training_args(**deepspeed_options) -> TrainingArgs:
    return TrainingArgs(model_path="unused", data_path="unused", ckpt_output_dir="unused", data_output_dir="unused",
                        max_seq_len=64, max_batch_len=64, effective_batch_size=8, learning_rate=2e-3,
                        warmup_steps=2, lr_scheduler="cosine", adamw_weight_decay=0.1,
                        distributed_backend="deepspeed", deepspeed_options=deepspeed_options)


# ---------------------------------------------------------------- config builder (fast)

def config(device="cpu", **kw):
    from instructpack.train.backends.deepspeed import deepspeed_config
    gas = kw.pop("gradient_accumulation_steps", 1)
    return deepspeed_config(training_args(**kw), device, gradient_accumulation_steps=gas)


def test_config_defaults_to_stage_2_fp32_on_cpu():
    c = config()
    assert c["zero_optimization"] == {"stage": 2}  # gloo: nothing to overlap with
    assert c["data_types"] == {"grad_accum_dtype": "fp32"}
    assert c["gradient_clipping"] == 1.0
    assert c["bf16"] == {"enabled": False} and c["fp16"] == {"enabled": False}
    assert c["gradient_accumulation_steps"] == 1 and c["train_micro_batch_size_per_gpu"] == 1
    assert "optimizer" not in c and "scheduler" not in c  # the client AdamW and the caller's schedule


def test_config_stage_3_bf16_on_cuda_and_gas():
    c = config("cuda", zero_stage=3, gradient_accumulation_steps=5)
    assert c["zero_optimization"]["stage"] == 3
    assert c["bf16"] == {"enabled": True}
    assert c["communication_data_type"] == "fp32"  # gradients reduced in fp32, as under FSDP2
    assert c["data_types"] == {"grad_accum_dtype": "fp32"}  # and accumulated in fp32, as under FSDP2 and DDP
    # Reduction overlaps the backward, in buckets far below DeepSpeed's 5e8-element default.
    zero = c["zero_optimization"]
    assert zero["overlap_comm"] is True and zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 2e8
    assert c["gradient_accumulation_steps"] == 5


def test_config_offload():
    c = config("cpu", cpu_offload_optimizer=True, cpu_offload_optimizer_pin_memory=True)
    assert c["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True, "ratio": 1.0}
    assert c["zero_force_ds_cpu_optimizer"] is False  # torch AdamW steps the offloaded state on CPU
    # The partial ratio only exists in ZeRO-3 with DeepSpeedCPUAdam (CUDA).
    c = config("cuda", zero_stage=3, cpu_offload_optimizer=True, cpu_offload_optimizer_ratio=0.25)
    assert c["zero_optimization"]["offload_optimizer"]["ratio"] == 0.25
    for device, stage in (("cuda", 2), ("cpu", 3)):
        c = config(device, zero_stage=stage, cpu_offload_optimizer=True, cpu_offload_optimizer_ratio=0.25)
        assert c["zero_optimization"]["offload_optimizer"]["ratio"] == 1.0
    assert "offload_optimizer" not in config("cuda", cpu_offload_optimizer_ratio=0.5)["zero_optimization"]


def test_config_clipping_and_overrides():
    from instructpack.train.backends.deepspeed import deepspeed_config
    c = deepspeed_config(training_args(zero_stage=3), "cpu", max_grad_norm=0.5, overrides=OVERRIDES)
    assert c["gradient_clipping"] == 0.5
    assert c["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0}
    with pytest.raises(ValueError):
        deepspeed_config(training_args(), "cpu", gradient_accumulation_steps=0)


# ---------------------------------------------------------------- native checkpoints, one process (fast)

@pytest.fixture
def one_process(monkeypatch):
    """The CPU world of one process outside torchrun; the process group the backend joins
    and the environment variables DeepSpeed reads are undone afterwards."""
    import torch
    import torch.distributed as dist

    from instructpack.train.distributed import World

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # read when DeepSpeed first picks its accelerator
    for var, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        monkeypatch.setenv(var, value)
    from deepspeed.accelerator import get_accelerator
    if get_accelerator().device_name() != "cpu":
        pytest.skip(f"DeepSpeed already runs on {get_accelerator().device_name()} in this process")
    joined = not dist.is_initialized()
    yield World(0, 0, 1, torch.device("cpu"))
    if joined:
        from instructpack.train.distributed import shutdown
        shutdown()  # also drops DeepSpeed's cached groups: the next test's engine starts clean


def _one_process_backend(name: str, world, seed: int = 0):
    from instructpack.train.backends.deepspeed import DeepSpeedBackend

    options, lora = CONFIGS[name]
    # Under LoRA the frozen base is always seed 0's (it is not in the checkpoint); `seed` picks the adapters.
    model = _tiny_model(lora, seed=0, adapter_seed=seed) if lora else _tiny_model(lora, seed=seed)
    return DeepSpeedBackend(model, world, training_args(**options), config_overrides=OVERRIDES)


def _train(backend, seeds) -> None:
    import torch

    for seed in seeds:
        ids = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(seed))
        with backend.sync(last=True):
            backend.backward(_loss(backend.module, ids, ids) / 15)
        backend.step(max_grad_norm=1.0)


def _adam_state(backend) -> list:
    """AdamW's per-parameter state (step, moments) for ZeRO's fp32 partitions, in order."""
    # ZeRO-3 puts its partitions in AdamW's parameter groups only for the length of a step.
    partitions = getattr(backend.engine.optimizer, "fp32_partitioned_groups_flat", None)
    if partitions is None:
        partitions = [p for g in backend.optimizer.param_groups for p in g["params"]]
    return [backend.optimizer.state[p] for p in partitions if backend.optimizer.state.get(p)]


def _assert_same(a, b) -> None:
    import torch

    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("name", CONFIGS)
def test_native_checkpoint_round_trip_reads_weights_only(name, one_process, tmp_path):
    """save_weights_and_optimizer, then a fresh, differently initialised backend's
    load_weights_and_optimizer (which reads with weights_only=True): same weights, same
    AdamW state, the client state back, and the next step identical."""
    import torch

    trained = _one_process_backend(name, one_process)
    _train(trained, seeds=(1, 2))
    client = {"note": name, "samples": 24, "nested": {"rng": torch.arange(3)}}
    trained.save_weights_and_optimizer(tmp_path / "native", client_state=client)

    fresh = _one_process_backend(name, one_process, seed=7)
    before = fresh.gather_weights()
    assert any(not torch.equal(before[k], v) for k, v in trained.gather_weights().items())
    assert _adam_state(fresh) == []  # nothing to compare yet: the state must come from the file
    restored = fresh.load_weights_and_optimizer(tmp_path / "native")

    _assert_same({k: restored[k] for k in client}, client)
    _assert_same(fresh.gather_weights(), trained.gather_weights())
    state = _adam_state(trained)
    assert state and all(s["exp_avg_sq"].abs().sum() > 0 for s in state)
    _assert_same(_adam_state(fresh), state)
    # One more step on each: equal only if moments and step counts (bias correction) were restored.
    _train(trained, seeds=(3,))
    _train(fresh, seeds=(3,))
    _assert_same(fresh.gather_weights(), trained.gather_weights())


def test_zero3_partitions_the_model_as_it_loads(one_process, tmp_path):
    """Under ZeRO-3 load_model builds the model inside deepspeed.zero.Init: every weight is
    a partitioned parameter as soon as it exists (no process holds the whole model), the
    loaded values are the checkpoint's (gathered back), weight decay still goes to the
    matrices (their ds_shape), the backend trains it, and a model loaded afterwards in the
    same process loads whole."""
    import torch
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters
    from safetensors.torch import load_file

    from instructpack.train.backends.deepspeed import DeepSpeedBackend
    from instructpack.train.model.load import load_model
    from instructpack.train.optim import build_optimizer

    _tiny_model(False, seed=3).save_pretrained(tmp_path / "model")
    args = msgspec_replace(training_args(zero_stage=3), model_path=str(tmp_path / "model"),
                           gradient_checkpointing=False)
    linear = torch.nn.functional.linear
    model = load_model(args, one_process.device)
    assert is_partitioned(model)
    assert torch.nn.functional.linear is linear  # zero.Init's replacement of F.linear did not outlive the load
    params = dict(model.named_parameters())
    assert all(p.numel() == 0 and p.ds_numel > 0 for p in params.values())  # the whole tensor lives nowhere
    saved = load_file(tmp_path / "model" / "model.safetensors")
    with GatheredParameters(list(params.values())):
        for name, p in params.items():
            if name in saved:
                assert torch.equal(p.data, saved[name]), name
    decay, no_decay = build_optimizer(model, args).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    # 2 layers of 7 projections and the (tied) embeddings; 2 norms per layer and the final one.
    assert len(decay["params"]) == 2 * 7 + 1 and len(no_decay["params"]) == 2 * 2 + 1
    assert all(len(p.ds_shape) == 2 for p in decay["params"]) and all(len(p.ds_shape) == 1 for p in no_decay["params"])
    backend = DeepSpeedBackend(model, one_process, args, config_overrides=OVERRIDES)
    _train(backend, seeds=(1,))
    after = backend.gather_weights()
    assert any(not torch.equal(after[k], v) for k, v in saved.items() if k in after)  # it trained
    whole = load_model(msgspec_replace(args, distributed_backend="ddp"), one_process.device)
    assert not is_partitioned(whole)


def is_partitioned(model) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def msgspec_replace(args, **changes):
    import msgspec
    return msgspec.structs.replace(args, **changes)


class _Payload:
    """Unpickling it runs code: it appends to `marker` (exec of a line of Python)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'a').write('ran')",)


@pytest.mark.parametrize("poisoned", ["model_states.pt", "optim_states.pt"])
def test_native_checkpoint_with_a_malicious_pickle_is_refused(poisoned, one_process, tmp_path):
    import pickle

    import torch

    backend = _one_process_backend("zero2", one_process)
    backend.save_weights_and_optimizer(tmp_path / "native", client_state={"note": "x"})
    (target,) = (tmp_path / "native").glob(f"*/*{poisoned}")
    marker = tmp_path / "marker"
    state = torch.load(target, weights_only=False)  # our own file, just written
    state["extra"] = _Payload(marker)
    torch.save(state, target)
    torch.load(target, weights_only=False)  # the control: a plain unpickle runs the payload
    assert marker.read_text() == "ran"
    marker.unlink()

    with pytest.raises(pickle.UnpicklingError, match=rf"{target.name}: refusing to load .* could run code"):
        _one_process_backend("zero2", one_process, seed=7).load_weights_and_optimizer(tmp_path / "native")
    assert not marker.exists()


# ---------------------------------------------------------------- training runs (slow)

def _run(cmd: list[str], out: Path) -> dict:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-10000:]
    result = json.loads(out.read_text())
    result["_seconds"] = seconds
    result["_log"] = proc.stdout + proc.stderr
    return result


def _check(name: str, r: dict) -> None:
    def rel(a, b):
        return abs(a - b) / max(abs(b), 1e-12)

    for key in ("losses", "grad_norms", "lrs"):
        got, want = r[key], r["ref_" + key]
        assert len(got) == len(want) == len(COUNTS), (name, key, got, want)
        assert all(rel(a, b) <= REL_TOL for a, b in zip(got, want)), (name, key, got, want)
    assert r["keys_match"], (name, r["key_problems"])
    assert r["weights_rel_err"] <= REL_TOL, (name, r["weights_rel_err"], r["worst_weight"])
    assert r["tied_shared"], name
    assert r["moved"], name  # the weights did change
    assert r["reload_rel_err"] == 0.0, (name, r["reload_rel_err"])
    assert r["client_state"] == {"note": name}
    assert r["loaded_ops"] == [[]] * r["world_size"], (name, r["loaded_ops"])  # nothing JIT-compiled


@pytest.mark.slow
def test_two_processes_match_reference(tmp_path):
    """ZeRO-2, ZeRO-3, ZeRO-2 with optimizer offload and ZeRO-3 with offload and LoRA, in one
    torchrun launch: per-step loss, gradient norm and lr, final weights (gather_weights), a
    native checkpoint round trip, and no compiled DeepSpeed op."""
    out = tmp_path / "out.json"
    result = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   __file__, str(out), ",".join(CONFIGS)], out)
    print(f"two-process run: {result['_seconds']:.1f} s; engine start-up (s): {result['startup']}; "
          f"per configuration (s): {result['seconds']}")
    for name in CONFIGS:
        _check(name, result[name])
        assert result["startup"][name] < 30, result["startup"]  # seconds, no compilation


@pytest.mark.slow
def test_single_process(tmp_path):
    """Without torchrun: the backend joins a one-process group by itself."""
    out = tmp_path / "out.json"
    result = _run([sys.executable, __file__, str(out), "zero2"], out)
    print(f"single-process run: {result['_seconds']:.1f} s")
    _check("zero2", result["zero2"])
    assert "ZeRO stage 2 on 1 process, fp32" in result["_log"]


# ---------------------------------------------------------------- the worker

def _tiny_model(lora: bool, seed: int = 0, adapter_seed: int | None = None):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, attn_implementation="eager")
    model = LlamaForCausalLM(cfg)
    if lora:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj", "down_proj"]))
        g = torch.Generator().manual_seed(seed if adapter_seed is None else adapter_seed)
        with torch.no_grad():  # B starts at zero; make the adapter count from the first step
            for n, p in model.named_parameters():
                if "lora_B" in n or (adapter_seed is not None and "lora_A" in n):
                    p.normal_(0, 0.02, generator=g)
    return model


def _plan(world_size: int):
    """Per step: [rank][micro-batch] -> (input_ids, labels), and the step's target count."""
    import torch

    g = torch.Generator().manual_seed(1234)
    steps = []
    for s, count in enumerate(COUNTS):
        per_rank, targets = [], 0
        for r in range(world_size):
            mbs = []
            for i in range(count):
                n = int(torch.randint(6, 24, (1,), generator=g))
                ids = torch.randint(0, 96, (1, n), generator=g)
                labels = ids.clone()
                labels[:, : int(torch.randint(1, n // 2, (1,), generator=g))] = -100  # a "prompt"
                if s == 1 and i == 0 and r == world_size - 1:
                    labels[:] = -100  # a micro-batch with nothing to learn
                targets += int((labels[:, 1:] != -100).sum())
                mbs.append((ids, labels))
            per_rank.append(mbs)
        steps.append((per_rank, targets))
    return steps


def _loss(module, ids, labels):
    import torch.nn.functional as F
    logits = module(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=-100, reduction="sum")


def _key(state: dict, suffix: str):
    (key,) = [k for k in state if k.endswith(suffix)]
    return state[key]


def _reference(lora: bool, steps, args):
    """One process, every rank's micro-batches: sum of losses / step targets, AdamW, clip 1."""
    import torch

    from instructpack.train.optim import build_optimizer, build_scheduler

    model = _tiny_model(lora)
    opt = build_optimizer(model, args)
    sched = build_scheduler(opt, args, total_steps=len(steps))
    losses, norms, lrs = [], [], []
    for per_rank, targets in steps:
        total = 0.0
        for mbs in per_rank:
            for ids, labels in mbs:
                loss = _loss(model, ids, labels)
                (loss / targets).backward()
                total += loss.item()
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total / targets)
        norms.append(float(norm))
    return model.state_dict(), losses, norms, lrs


def _worker(out: str, names: list[str]) -> None:
    """Trains each configuration in `names`; rank 0 compares with the reference and writes
    the findings to `out` (native checkpoints go next to it)."""
    import logging

    import torch
    import torch.distributed as dist

    from instructpack.train.backends.deepspeed import DeepSpeedBackend
    from instructpack.train.distributed import init_distributed, shutdown
    from instructpack.train.optim import build_scheduler

    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    world = init_distributed()
    steps = _plan(world.world_size)
    results = {"startup": {}, "seconds": {}}
    for name in names:
        options, lora = CONFIGS[name]
        args = training_args(**options)
        start = time.perf_counter()
        backend = DeepSpeedBackend(_tiny_model(lora), world, args, gradient_accumulation_steps=GAS,
                                   config_overrides=OVERRIDES)
        results["startup"][name] = round(time.perf_counter() - start, 2)
        sched = build_scheduler(backend.optimizer, args, total_steps=len(steps))
        losses, norms, lrs = [], [], []
        for per_rank, targets in steps:
            mbs = per_rank[world.rank]
            loss_sum = torch.zeros((), dtype=torch.float64)
            for i, (ids, labels) in enumerate(mbs):
                with backend.sync(last=i == len(mbs) - 1):
                    loss = _loss(backend.module, ids, labels)
                    backend.backward(loss * (backend.grad_scale / targets))
                loss_sum += loss.detach().double()
            lrs.append(backend.lr)
            norms.append(backend.step(max_grad_norm=1.0))
            sched.step()
            if world.distributed:
                dist.all_reduce(loss_sum)
            losses.append(loss_sum.item() / targets)
        state = backend.gather_weights()
        directory = Path(out).parent / f"native_{name}"
        backend.save_weights_and_optimizer(directory, client_state={"note": name})

        # A fresh model, differently initialised, then the native checkpoint. Under LoRA the
        # checkpoint leaves out the frozen base, which reloads from the model as it was.
        fresh = _tiny_model(lora, seed=0, adapter_seed=7) if lora else _tiny_model(lora, seed=7)
        again = DeepSpeedBackend(fresh, world, args, gradient_accumulation_steps=GAS, config_overrides=OVERRIDES)
        client_state = again.load_weights_and_optimizer(directory)
        reloaded = again.gather_weights()
        from deepspeed.ops.op_builder.builder import OpBuilder
        loaded_ops = [None] * world.world_size
        if world.distributed:
            dist.all_gather_object(loaded_ops, sorted(OpBuilder._loaded_ops))
        else:
            loaded_ops = [sorted(OpBuilder._loaded_ops)]
        if world.is_main:
            ref_state, ref_losses, ref_norms, ref_lrs = _reference(lora, steps, args)
            initial = _tiny_model(lora).state_dict()
            key_problems = sorted(set(state) ^ set(ref_state))
            errors = {k: ((state[k].float() - v.float()).norm() / v.float().norm().clamp_min(1e-12)).item()
                      for k, v in ref_state.items() if k in state}
            worst = max(errors, key=errors.get)
            results[name] = {
                "world_size": world.world_size,
                "losses": losses, "ref_losses": ref_losses,
                "grad_norms": norms, "ref_grad_norms": ref_norms,
                "lrs": lrs, "ref_lrs": ref_lrs,
                "keys_match": not key_problems, "key_problems": key_problems[:10],
                "weights_rel_err": errors[worst], "worst_weight": worst,
                "tied_shared": _key(state, "embed_tokens.weight") is _key(state, "lm_head.weight"),
                "moved": any(not torch.equal(state[k], initial[k]) for k, p in
                             backend.model.named_parameters() if p.requires_grad and k in state),
                "reload_rel_err": max(((reloaded[k] - state[k]).abs().max().item() for k in state), default=math.inf),
                "client_state": {k: v for k, v in (client_state or {}).items() if k == "note"},
                "loaded_ops": loaded_ops,
                "dtypes": sorted({str(v.dtype) for v in state.values()}),
                "devices": sorted({str(v.device) for v in state.values()}),
            }
        if world.distributed:
            dist.barrier()
        results["seconds"][name] = round(time.perf_counter() - start, 2)
    if world.is_main:
        Path(out).write_text(json.dumps(results, indent=1))
    shutdown()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2].split(","))

"""`python -m benchmarks train --backend ddp fsdp deepspeed [--lora]`: the same model and
data trained through `run_training` once per backend, side by side.

Each backend is one whole `run_training` (torchrun, one process per CPU core pair here, per
GPU on CUDA), so its numbers are what a user gets: tokens/s is the median over the timed
steps of the run's own metrics.jsonl (the first steps are warm-up: allocator, first
collectives), and peak memory is the largest per-process, per-step peak of the run (CUDA:
memory allocated by torch; CPU: the process's peak resident set during the step, VmHWM,
which includes about 0.5 GiB of imported libraries). On CPU the workers run with
MALLOC_MMAP_THRESHOLD_=65536: glibc then maps every large tensor on its own and returns it
on free, so the resident set follows live tensors; by default glibc raises that threshold
after the first large free, and memory freed while loading the model stays resident. The
first step's loss is printed too: every backend does the same math, so it must agree.
Ratios are against the first backend named, run in the same invocation.

CPU: a Llama from config, 4 layers, hidden 768, intermediate 2,048, vocabulary 8,000,
40.6M parameters (fp32 weights 162 MB; AdamW state twice that), untied output layer, 2
processes, effective batch 8 of synthetic samples 64-512 tokens long (mean ~290),
max_batch_len 1,024, 8 steps (3 warm-up), gradient checkpointing off. FSDP: FULL_SHARD.
DeepSpeed: ZeRO-2. --lora: rank 16 adapters on every projection. --quick: 4 steps, 2 warm-up.
CUDA (written, not run here): TinyLlama-1.1B's shape, bf16, one process per GPU, ebs 64,
max_batch_len 8,192, gradient checkpointing on.

Measured on 2 cores (no GPU), full runs, one after the other:

    backend     tokens/s  peak MiB   speed vs ddp  memory vs ddp
    ddp              595     1,366          1.00x          1.00x
    fsdp             445     1,012          0.75x          0.74x
    deepspeed        529     1,221          0.89x          0.89x
    --lora:
    ddp              826       807          1.00x          1.00x
    fsdp             581       818          0.70x          1.01x
    deepspeed        829       827          1.00x          1.03x

Sharding saves memory as expected (FULL_SHARD holds half of the weights, gradients and
AdamW state per process; ZeRO-2 shards gradients and AdamW state) and costs speed here:
with 2 processes on 2 cores, gloo's all-gathers and reduce-scatters run on the same cores as
the matmuls and nothing overlaps. Under LoRA the optimizer state is tiny, so there is little
to shard.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
from dataclasses import dataclass, replace

import numpy as np

from ._util import OUTPUT, cache_key, fmt, llama_config, median

HERE = OUTPUT / "backends"
SEED = 0
BACKENDS = ("ddp", "fsdp", "deepspeed")


@dataclass(frozen=True)
class Setup:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    samples: int  # synthetic samples, lengths uniform in [shortest, longest]
    shortest: int
    longest: int
    effective_batch_size: int
    max_batch_len: int
    steps: int
    warmup_steps: int  # not timed
    gradient_checkpointing: bool


CPU = Setup(layers=4, hidden=768, intermediate=2048, heads=12, vocab=8000, samples=128, shortest=64, longest=512,
            effective_batch_size=8, max_batch_len=1024, steps=8, warmup_steps=3, gradient_checkpointing=False)
CPU_QUICK = replace(CPU, steps=4, warmup_steps=2)
GPU = Setup(layers=22, hidden=2048, intermediate=5632, heads=32, vocab=32000, samples=1024, shortest=256,
            longest=4096, effective_batch_size=64, max_batch_len=8192, steps=12, warmup_steps=4,
            gradient_checkpointing=True)
GPU_QUICK = replace(GPU, steps=6, warmup_steps=2)


def build_inputs(setup: Setup):
    """A saved model directory and a synthetic dataset, made once and cached."""
    import torch
    from transformers import AutoModelForCausalLM

    from instructpack.data.synthetic import write_synthetic_dataset
    from instructpack.demo.example import build_tokenizer

    key = cache_key({"setup": setup.__dict__}, __file__)
    model_dir, data_dir = HERE / f"model-{key}", HERE / f"data-{key}"
    if not (model_dir / "config.json").is_file():
        config = llama_config(layers=setup.layers, hidden=setup.hidden, intermediate=setup.intermediate,
                              heads=setup.heads, kv_heads=setup.heads, vocab=setup.vocab,
                              max_positions=setup.max_batch_len)
        torch.manual_seed(SEED)
        AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
        # Workers load a tokenizer with the model; the data is synthetic token ids, so a small one does.
        build_tokenizer(model_dir, template="chatml", vocab_size=600, corpus_words=20_000)
    if not (data_dir / "manifest.json").is_file():
        lengths = np.random.default_rng(SEED).integers(setup.shortest, setup.longest + 1, setup.samples)
        write_synthetic_dataset(data_dir, lengths, setup.vocab, seed=SEED, trained="runs")
    return model_dir, data_dir


def run_backend(backend: str, setup: Setup, model_dir, data_dir, nproc: int, lora: bool) -> dict:
    from instructpack import TorchrunArgs, TrainingArgs, run_training
    from instructpack.train.metrics import read_metrics

    out = HERE / f"run-{backend}{'-lora' if lora else ''}"
    shutil.rmtree(out, ignore_errors=True)
    args = TrainingArgs(
        model_path=str(model_dir), data_path="-", data_output_dir=str(data_dir), process_data=False,
        ckpt_output_dir=str(out), max_seq_len=setup.longest, max_batch_len=setup.max_batch_len,
        effective_batch_size=setup.effective_batch_size, learning_rate=1e-4 if not lora else 1e-3,
        num_epochs=1, checkpoint_at_epoch=False, distributed_backend=backend,
        fsdp_options={"sharding_strategy": "FULL_SHARD"}, gradient_checkpointing=setup.gradient_checkpointing,
        lora={"rank": 16, "alpha": 32, "dropout": 0.0} if lora else None, log_level="WARNING")
    with contextlib.redirect_stdout(io.StringIO()):  # the workers' log goes to out/training.log
        run_training(TorchrunArgs(nproc_per_node=nproc), args)
    records = read_metrics(out)[: setup.steps]
    timed = records[setup.warmup_steps:]
    return {"tokens_per_s": median([r["tokens_per_s"] for r in timed]),
            "step_s": median([r["step_time_s"] for r in timed]),
            "peak_mib": max(r["peak_memory_mib"] for r in records), "loss": records[0]["loss"]}


def run(ns: argparse.Namespace) -> int:
    import torch

    cuda = torch.cuda.is_available()
    setup = (GPU_QUICK if ns.quick else GPU) if cuda else (CPU_QUICK if ns.quick else CPU)
    nproc = torch.cuda.device_count() if cuda else 2
    backends = [b for name in ns.backend for b in name.split(",") if b]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        raise SystemExit(f"--backend: unknown {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    # Only the timed steps are needed: a dataset of exactly that many steps.
    setup = replace(setup, samples=min(setup.samples, setup.effective_batch_size * setup.steps))
    model_dir, data_dir = build_inputs(setup)
    if not cuda:
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # see the module docstring
    print(f"{'CUDA' if cuda else 'CPU'}: Llama {setup.layers} layers, hidden {setup.hidden}, vocabulary {setup.vocab}"
          f"{', LoRA rank 16' if ns.lora else ''}; {nproc} processes, ebs {setup.effective_batch_size}, "
          f"max_batch_len {setup.max_batch_len}, {setup.steps} steps ({setup.warmup_steps} warm-up)", flush=True)
    results = {}
    for backend in backends:
        results[backend] = run_backend(backend, setup, model_dir, data_dir, nproc, ns.lora)
        print(f"  {backend}: done", flush=True)
    base = results[backends[0]]
    print(f"\n{'backend':<10} {'tokens/s':>9} {'s/step':>7} {'peak MiB':>9} {'loss 1st':>9} "
          f"{'speed vs ' + backends[0]:>16} {'memory vs ' + backends[0]:>17}")
    for backend, r in results.items():
        print(f"{backend:<10} {fmt(r['tokens_per_s']):>9} {r['step_s']:7.2f} {fmt(r['peak_mib']):>9} "
              f"{r['loss']:9.4f} {r['tokens_per_s'] / base['tokens_per_s']:15.2f}x "
              f"{r['peak_mib'] / base['peak_mib']:16.2f}x")
    print("tokens/s, s/step: medians of the timed steps; peak MiB: the largest process peak (CPU: resident set, "
          "libraries included)")
    return 0

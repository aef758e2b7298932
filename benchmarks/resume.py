"""`python -m benchmarks resume`: what a full-state checkpoint costs, and what resuming costs
at an early and a late position, against replaying the data up to that position.

One process, the 40.6M-parameter Llama of `benchmarks train --backend` (fp32, AdamW):
- saving: the Hugging Face checkpoint (weights only) against the full state (weights,
  AdamW moments, schedule, position, random state), seconds and bytes;
- loading the full state into a fresh model and optimizer (`state.resume`);
- reaching the first batch after the resume point, on a 1M-sample synthetic dataset
  (64 samples per step, 15,625 steps per epoch), at step 10 and at step 15,000. Our
  resume moves the sampler to the saved position; the baseline is the replay other
  trainers do (iterating the data loader through the steps already done, collating each
  batch). The ratio late/early shows that our cost does not grow with the position.

Measured on 2 cores (no GPU), two runs (the page cache makes the saves noisy):

    HF checkpoint save            0.26-0.42 s   162.5 MB
    full-state save               0.95-0.98 s   487.3 MB   (2.3-3.6x the HF save, 3.0x the bytes)
    full-state load (resume)      0.63-0.77 s
    first batch after step 10:    ours 0.03 s, replay 0.02-0.03 s
    first batch after step 15000: ours 0.03 s (0.96-1.04x step 10), replay 0.8 s (30-32x step 10)

The full state is three times the weights (fp32 weights plus AdamW's two moments), so it
costs about three HF checkpoints on the disk. Replaying is cheap per step here (C++
collation, no model), so a trainer that replays through its data loader pays at least this
much on resume; one that runs its forward passes pays far more.
"""

from __future__ import annotations

import argparse
import shutil
import time

import numpy as np

from ._util import OUTPUT, fmt

HERE = OUTPUT / "resume"


def _size_mb(path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def _first_batch_after(dataset, step: int, replay: bool) -> float:
    """Seconds from a fresh sampler to the first batch after `step` steps."""
    from instructpack.data.loader import StepLoader
    from instructpack.data.sampler import MultipackSampler

    start = time.perf_counter()
    sampler = MultipackSampler(dataset.lengths, effective_batch_size=64, max_batch_len=4096, seed=1,
                               target_counts=dataset.target_counts)
    if not replay:
        sampler.load_state_dict(dict(sampler.state_dict(), step=step))
    loader = iter(StepLoader(dataset, sampler))
    if replay:
        for _ in range(step):
            next(loader)
    next(loader)
    return time.perf_counter() - start


def run(ns: argparse.Namespace) -> int:
    import torch

    from instructpack.config import TrainingArgs
    from instructpack.data.sampler import MultipackSampler
    from instructpack.data.shards import load_dataset
    from instructpack.data.synthetic import write_synthetic_dataset
    from instructpack.train.backends import Backend
    from instructpack.train.checkpoints.full_state import resume, save_full_state
    from instructpack.train.checkpoints.hf import save_hf_checkpoint
    from instructpack.train.checkpoints.identity import Progress
    from instructpack.train.distributed import World
    from instructpack.train.model.load import load_model, load_tokenizer
    from instructpack.train.optim import build_optimizer, build_scheduler

    from .backends import CPU, build_inputs

    world = World(0, 0, 1, torch.device("cpu"))
    model_dir, _ = build_inputs(CPU)
    args = TrainingArgs(model_path=str(model_dir), data_path="-", ckpt_output_dir=str(HERE), data_output_dir="-",
                        max_seq_len=512, max_batch_len=1024, effective_batch_size=8, learning_rate=1e-4,
                        gradient_checkpointing=False)

    def fresh():
        model = load_model(args, world.device)
        backend = Backend(model, build_optimizer(model, args), world)
        return backend, build_scheduler(backend.optimizer, args, total_steps=100)

    shutil.rmtree(HERE, ignore_errors=True)
    backend, scheduler = fresh()
    ids = torch.randint(0, CPU.vocab, (1, 256))
    backend.backward(backend.module(input_ids=ids, labels=ids, use_cache=False).loss)  # AdamW state exists
    backend.step(1.0)
    scheduler.step()
    sampler = MultipackSampler(np.full(64, 256), effective_batch_size=8, max_batch_len=1024)
    sampler.advance(0, 0)

    start = time.perf_counter()
    save_hf_checkpoint(backend, load_tokenizer(args), HERE / "hf", world)
    hf_s = time.perf_counter() - start
    start = time.perf_counter()
    saved = save_full_state(HERE, backend, scheduler, sampler, Progress(1, 8, 2048, 1.0), {"bench": "1"}, world)
    full_s = time.perf_counter() - start
    restored, restored_scheduler = fresh()
    start = time.perf_counter()
    resume(HERE, restored, restored_scheduler, MultipackSampler(np.full(64, 256), effective_batch_size=8,
                                                                max_batch_len=1024), {"bench": "1"}, world)
    load_s = time.perf_counter() - start
    hf_mb, full_mb = _size_mb(HERE / "hf"), _size_mb(saved)

    data = HERE / "data-1m"
    lengths = np.random.default_rng(0).integers(16, 113, 1_000_000)
    write_synthetic_dataset(data, lengths, CPU.vocab, seed=0, trained="runs")
    dataset = load_dataset(data)
    late = 1_000 if ns.quick else 15_000
    ours = {k: _first_batch_after(dataset, k, replay=False) for k in (10, late)}
    replay = {k: _first_batch_after(dataset, k, replay=True) for k in (10, late)}

    print(f"HF checkpoint save          {fmt(hf_s, 2):>6} s  {fmt(hf_mb, 1):>7} MB")
    print(f"full-state save             {fmt(full_s, 2):>6} s  {fmt(full_mb, 1):>7} MB   "
          f"({full_s / hf_s:.1f}x the HF save, {full_mb / hf_mb:.1f}x the bytes)")
    print(f"full-state load (resume)    {fmt(load_s, 2):>6} s")
    print(f"first batch after step 10:    ours {ours[10]:.2f} s, replay {replay[10]:.2f} s")
    print(f"first batch after step {late}: ours {ours[late]:.2f} s ({ours[late] / ours[10]:.2f}x step 10), "
          f"replay {replay[late]:.1f} s ({replay[late] / replay[10]:.0f}x step 10)")
    shutil.rmtree(HERE, ignore_errors=True)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("resume", help="full-state checkpoint cost, and resume cost against replaying the data")
    p.add_argument("--quick", action="store_true", help="late position at step 1,000 instead of 15,000")
    p.set_defaults(run=run)

"""`python -m benchmarks load`: gathering micro-batches from memory-mapped shards into
tensors, on one core, against a memory-speed floor run in the same process.

The dataset is synthetic but shaped like chat data: 100,000 samples with heavy-tailed
lengths (mean about 570 tokens, up to 4,096), uint16 tokens and trained-token masks in
runs (prompts and answers alternate). One epoch is planned for 8 ranks, ebs 3,840 and
max_batch_len 8,192, and every micro-batch of every rank is loaded once per pass:

(a) floor:   for each micro-batch, NumPy widens the same number of contiguous uint16 tokens
             into three new int64 arrays (ids, labels, positions): memory traffic only.
(b) gather:  the C++ gather (kernels.gather) into NumPy arrays.
(c) collate: collate_packed, the loader's whole path: gather, torch tensors, counts.

Shards are read once before timing, so the page cache and the maps are warm, as in a
training run after its first steps. Passes alternate a, b, c; medians are reported.
Target: (c) >= 200M tokens/s.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ._util import OUTPUT, cache_key, fmt, median
from .pack import lengths as heavy_tailed_lengths

SAMPLES, QUICK_SAMPLES = 100_000, 20_000
WORLD, BATCH, MAX_BATCH_LEN = 8, 3840, 8192
VOCAB = 32_000
TARGET_TOKENS_PER_S = 200e6
PASSES = 5
HERE = OUTPUT / "load"


def dataset(n: int):
    """A synthetic preprocessed dataset of n samples, written once and cached."""
    from instructpack.data import synthetic
    from instructpack.data.shards import load_dataset

    out = HERE / f"ds-{n}-{cache_key({'n': n, 'vocab': VOCAB}, __file__, synthetic.__file__)}"
    if (out / "manifest.json").is_file():
        return load_dataset(out)
    return synthetic.write_synthetic_dataset(out, heavy_tailed_lengths(n, seed=1), VOCAB, seed=0, trained="runs")


def run(ns: argparse.Namespace) -> int:
    from instructpack import kernels
    from instructpack.data.collate import collate_packed
    from instructpack.data.sampler import MultipackSampler

    ds = dataset(QUICK_SAMPLES if ns.quick else SAMPLES)
    sampler = MultipackSampler(ds.lengths, effective_batch_size=BATCH, max_batch_len=MAX_BATCH_LEN, world_size=WORLD,
                               target_counts=ds.target_counts)
    plan = sampler.plan(0)
    refs = []
    for rank in range(WORLD):
        sampler.rank = rank
        refs += list(sampler)
    sizes = [int(ds.lengths[r.sample_ids].sum()) for r in refs]
    total = sum(sizes)
    flat = ds.shards.shard(0).tokens  # the floor reads contiguous tokens of the first shard
    window = len(flat) - MAX_BATCH_LEN

    def floor():
        at = 0
        for size in sizes:
            src = flat[at:at + size]
            for _ in range(3):
                np.empty(size, np.int64)[:] = src
            at = (at + size) % window

    def gather():
        for r in refs:
            kernels.gather(ds.shards, r.sample_ids, True)

    def collate():
        for r in refs:
            collate_packed(ds, r)

    gather()  # warm the page cache and the maps
    times = {"floor": [], "gather": [], "collate": []}
    for _ in range(PASSES):
        for name, fn in (("floor", floor), ("gather", gather), ("collate", collate)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    print(f"{fmt(len(ds))} samples, {fmt(total)} tokens in {fmt(len(refs))} micro-batches "
          f"(8 ranks x {plan.num_steps} steps, mean {total / len(refs):,.0f} tokens); one core, {PASSES} passes")
    rate = {name: total / median(t) for name, t in times.items()}
    for name, label in (("floor", "(a) floor, NumPy widening"), ("gather", "(b) C++ gather"),
                        ("collate", "(c) collate_packed (tensors)")):
        print(f"  {label:30} {rate[name] / 1e6:8.0f} M tokens/s  {median(times[name]) * 1e3:8.1f} ms/pass  "
              f"{rate[name] / rate['floor']:5.2f}x floor")
    per_mb = median(times["collate"]) / len(refs) * 1e6
    print(f"  collate per micro-batch: {per_mb:.1f} us")
    ok = rate["collate"] >= TARGET_TOKENS_PER_S
    print(f"target: (c) >= {TARGET_TOKENS_PER_S / 1e6:.0f}M tokens/s: {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


def add_parser(sub) -> None:
    p = sub.add_parser("load", help="micro-batch gather throughput from shards into tensors",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"{QUICK_SAMPLES:,} samples")
    p.set_defaults(run=run)

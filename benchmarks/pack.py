"""`python -m benchmarks pack`: planning one epoch with the C++ multipack planner against its
numba twin (plan_epoch of tests/support/kernels_ref.py, the tests' oracle: the same
algorithm), side by side in this process.

Lengths are heavy-tailed like chat data (log-normal, mean about 570 tokens, clipped to
16..4,096). For 100,000 and 1,000,000 samples it plans every combination of world size
1 and 8, effective_batch_size 128 and 3,840 and max_batch_len 8,192 and 60,000, and prints
the plan time of both, the micro-batches per rank against the sum of per-step lower bounds
ceil(step_tokens / (world_size * max_batch_len)), the fill and the rank imbalance. The two
plans must be identical.

The first plan in a fresh process is timed separately for both (C++: import and first call;
numba: import, JIT or on-disk cache load, first call).
Targets: C++ plan of 100,000 samples < 50 ms and of 1,000,000 < 0.5 s, first call included;
micro-batches within 1 % of the lower bound when effective_batch_size >= 3,840.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ._util import fmt, median, run_child

MEAN_LENGTH, SIGMA, SHORTEST, LONGEST = 570, 1.0, 16, 4096
SIZES, QUICK_SIZES = (100_000, 1_000_000), (100_000,)
WORLD_SIZES, BATCH_SIZES, MAX_BATCH_LENS = (1, 8), (128, 3840), (8192, 60_000)
TARGET_S = {100_000: 0.05, 1_000_000: 0.5}
TARGET_OVER, TARGET_OVER_MIN_BATCH = 0.01, 3840
SEED = 42


def lengths(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # A log-normal with sigma 1 has mean exp(mu + 1/2); clipping barely moves it.
    raw = rng.lognormal(np.log(MEAN_LENGTH) - SIGMA**2 / 2, SIGMA, n)
    return np.clip(raw, SHORTEST, LONGEST).astype(np.int64)


def reference():
    """The tests' numba twin, imported by the name the tests give it (`support.kernels_ref`):
    numba's on-disk cache is keyed by the file and records the module name, so a second name
    for the same file would find cache entries it cannot load."""
    tests = str(Path(__file__).resolve().parents[1] / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from support import kernels_ref

    return kernels_ref


def first_plan(payload: dict) -> dict:
    """Runs in a fresh process: import + first plan, as a training run starts."""
    start = time.perf_counter()
    if payload["impl"] == "cpp":
        from instructpack import kernels as impl
    else:
        impl = reference()
    lens = lengths(payload["n"])
    start_plan = time.perf_counter()
    impl.plan_epoch(lens, 3840, 8192, 8, SEED, 0)
    end = time.perf_counter()
    return {"import_s": start_plan - start, "plan_s": end - start_plan}


def _time(fn, repeats: int) -> tuple[float, tuple]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return median(times), result


def run(ns: argparse.Namespace) -> int:
    from instructpack import kernels
    from instructpack.data.sampler import EpochPlan

    kernels_ref = reference()

    sizes = QUICK_SIZES if ns.quick else SIZES
    failures = []
    print("first plan in a fresh process (import, then a plan of 100,000 samples, ebs 3840, 8 ranks, 8192):")
    with tempfile.TemporaryDirectory() as empty_cache:
        for label, impl, env in [("C++", "cpp", None), ("numba, JIT", "numba", {"NUMBA_CACHE_DIR": empty_cache}),
                                 ("numba, cached", "numba", {"NUMBA_CACHE_DIR": empty_cache})]:
            r = run_child("benchmarks.pack:first_plan", {"impl": impl, "n": 100_000}, env=env)
            print(f"  {label:14} import {r['import_s'] * 1e3:7.1f} ms   first plan {r['plan_s'] * 1e3:8.1f} ms")
            if impl == "cpp" and r["plan_s"] > TARGET_S[100_000]:
                failures.append(f"first C++ plan in a fresh process took {r['plan_s'] * 1e3:.0f} ms")
    kernels_ref.plan_epoch(lengths(1000), 128, 8192, 8, SEED, 0)  # JIT (or cache load) before timing

    header = (f"{'samples':>9} {'ranks':>5} {'ebs':>5} {'max_len':>7} | {'C++ ms':>8} {'numba ms':>8} {'speedup':>7} | "
              f"{'micro-b.':>8} {'bound':>8} {'over':>6} {'fill':>6} {'imbal.':>6}")
    print("\n" + header + "\n" + "-" * len(header))
    for n in sizes:
        lens = lengths(n)
        repeats = 5 if n <= 100_000 else 3
        for world, batch, cap in itertools.product(WORLD_SIZES, BATCH_SIZES, MAX_BATCH_LENS):
            args = (lens, batch, cap, world, SEED, 0)
            cpp_s, cpp = _time(lambda args=args: kernels.plan_epoch(*args), repeats)
            numba_s, twin = _time(lambda args=args: kernels_ref.plan_epoch(*args), repeats)
            if not all(np.array_equal(a, b) for a, b in zip(cpp, twin)):
                failures.append(f"{n} samples, {world} ranks, ebs {batch}, {cap}: C++ and numba plans differ")
            stats = EpochPlan(0, world, cap, *cpp).stats(lens)
            over = stats.micro_batches / stats.lower_bound - 1
            print(f"{fmt(n):>9} {world:>5} {batch:>5} {cap:>7} | {cpp_s * 1e3:8.1f} {numba_s * 1e3:8.1f} "
                  f"{numba_s / cpp_s:6.2f}x | {stats.micro_batches:>8} {stats.lower_bound:>8} {over:6.2%} "
                  f"{stats.efficiency:6.1%} {stats.imbalance:6.2%}")
            if cpp_s > TARGET_S[n]:
                failures.append(f"{n} samples, {world} ranks, ebs {batch}, {cap}: plan {cpp_s * 1e3:.0f} ms > "
                                f"{TARGET_S[n] * 1e3:.0f} ms")
            if batch >= TARGET_OVER_MIN_BATCH and over > TARGET_OVER:
                failures.append(f"{n} samples, {world} ranks, ebs {batch}, {cap}: {over:.2%} above the lower bound")
    print("\ntargets: C++ plan < 50 ms (100k) and < 0.5 s (1M); micro-batches within 1 % of the lower bound "
          "at ebs >= 3840")
    for f in failures:
        print("  FAIL", f)
    print("  all met" if not failures else f"  {len(failures)} missed")
    return 1 if failures else 0


def add_parser(sub) -> None:
    p = sub.add_parser("pack", help="multipack planning time and quality, C++ against its numba twin",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="100,000 samples only")
    p.set_defaults(run=run)

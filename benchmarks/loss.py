"""`python -m benchmarks loss`: the output layer's loss, forward and backward, computed
chunk by chunk (train/chunked_loss.py) against all target logits at once (the plain path),
at a Llama-3 vocabulary (128,256), in the same run: peak memory of the loss (each variant in
a fresh process, its peak resident memory above what its inputs take) and time (median of 3).
Targets: peak memory <= 0.5x, time <= 1.1x of the plain path's.
"""

from __future__ import annotations

import argparse
import time

from ._util import median, run_child

VOCAB, HIDDEN = 128_256, 256
TARGET_MEMORY, TARGET_TIME = 0.5, 1.1


def _vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def measure(payload: dict) -> dict:
    """In a fresh process: one variant's loss and gradients, its peak memory and time."""
    import torch
    import torch.nn.functional as F

    from instructpack.train.chunked_loss import chunked_linear_cross_entropy

    torch.manual_seed(0)
    n = payload["tokens"]
    hidden = torch.randn(n, HIDDEN, requires_grad=True)
    weight = (torch.randn(VOCAB, HIDDEN) * 0.02).requires_grad_()
    labels = torch.randint(0, VOCAB, (n,))
    hidden.grad = torch.zeros_like(hidden)  # the gradients' own memory is the inputs', not the loss's
    weight.grad = torch.zeros_like(weight)

    def loss():
        if payload["variant"] == "chunked":
            return chunked_linear_cross_entropy(hidden, weight, labels)
        logits = F.linear(hidden, weight)
        return F.cross_entropy(logits.float(), labels, reduction="sum")

    before = _vm_hwm_mib()
    times, value = [], None
    for _ in range(3):
        start = time.perf_counter()
        out = loss()
        out.backward()
        times.append(time.perf_counter() - start)
        value = out.item()
    return {"peak_mib": _vm_hwm_mib() - before, "time_s": median(times), "loss": value,
            "grad_norm": float(weight.grad.norm())}


def add_parser(sub) -> None:
    p = sub.add_parser("loss", help=__doc__.splitlines()[0], description=__doc__)
    p.add_argument("--tokens", type=int, default=4096, help="target tokens in the micro-batch")
    p.add_argument("--quick", action="store_true", help="fewer tokens (2,048)")
    p.set_defaults(run=run)


def run(ns: argparse.Namespace) -> int:
    tokens = 2048 if ns.quick else ns.tokens
    results = {v: run_child("benchmarks.loss:measure", {"variant": v, "tokens": tokens})
               for v in ("plain", "chunked")}
    plain, chunked = results["plain"], results["chunked"]
    print(f"output layer loss, {tokens:,} target tokens x {VOCAB:,} vocabulary, hidden {HIDDEN}, fp32, "
          "forward+backward")
    for name, r in results.items():
        print(f"  {name:8} peak {r['peak_mib']:8.0f} MiB   time {r['time_s'] * 1e3:8.0f} ms   loss {r['loss']:.6f}")
    memory, speed = chunked["peak_mib"] / max(plain["peak_mib"], 1.0), chunked["time_s"] / plain["time_s"]
    same = abs(chunked["loss"] - plain["loss"]) <= 1e-6 * abs(plain["loss"])
    print(f"  chunked / plain: peak memory {memory:.2f}x (target <= {TARGET_MEMORY}x), "
          f"time {speed:.2f}x (target <= {TARGET_TIME}x), same loss: {same}")
    ok = memory <= TARGET_MEMORY and speed <= TARGET_TIME and same
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1

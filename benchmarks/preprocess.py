"""`python -m benchmarks preprocess`: preprocessing throughput against its floor, and memory
against input size.

(a) floor:    render every conversation (ChatRenderer.render, main thread) and tokenize all
              texts with the Rust tokenizer's encode_batch (its own thread pool): the least
              any preprocessing must do. File reading is not timed.
(b) pipeline: data_process.main to shards (2 worker processes, max_seq_len 8192).

Each run is a fresh subprocess, a and b alternating, medians reported: a parent that has
used the Rust thread pool would disable it in forked children, and on a small noisy machine
only runs made side by side compare. Targets: (b)/(a) time <= 1.3, (b) >= 350,000 tokens/s,
and the peak RSS of (b) on 10x the samples <= 1.2x (the pipeline streams).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from ._util import OUTPUT, cache_key, fmt, median, peak_rss_mib, run_child

# Heavy-tailed sample lengths: with this tokenizer, 20k rendered samples span 20 to ~6,000
# tokens (p1 ~30, p50 ~400, p99 ~3,200, mean ~630).
GENERATOR = {"max_turns": 4, "median_words": 40.0, "sigma": 1.7, "max_words": 2200}
TOKENIZER = {"template": "chatml", "vocab_size": 32_000, "corpus_words": 4_000_000, "seed": 0}
SEED = 0
MAX_SEQ_LEN = 8192
NUM_PROCS = 2
SAMPLES, QUICK_SAMPLES, SCALE_FACTOR = 20_000, 2_000, 10
TARGET_RATIO, TARGET_TOKENS_PER_S, TARGET_RSS_RATIO = 1.3, 350_000, 1.2
HERE = OUTPUT / "preprocess"


def _examples_source() -> Path:
    from instructpack.demo import example

    return Path(example.__file__)


def tokenizer_dir() -> Path:
    """The benchmark tokenizer (byte-level BPE, 32k vocabulary), built once and cached."""
    from instructpack.demo.example import build_tokenizer

    out = HERE / f"tokenizer-{cache_key(TOKENIZER, _examples_source())}"
    if not (out / "tokenizer.json").is_file():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        build_tokenizer(tmp, **TOKENIZER)
        tmp.rename(out)  # whole or absent: an interrupted build is never reused
    return out


def dataset(n: int) -> Path:
    """n generated conversations as JSONL, cached by size, parameters and generator code."""
    import msgspec

    from instructpack.demo.example import generate_conversations

    params = {"n": n, "seed": SEED, **GENERATOR}
    path = HERE / f"chat-{n}-{cache_key(params, _examples_source())}.jsonl"
    if not path.is_file():
        start = time.perf_counter()
        encoder = msgspec.json.Encoder()
        tmp = path.with_suffix(".tmp")
        batch: list = []
        with open(tmp, "wb") as f:
            for sample in generate_conversations(n, seed=SEED, **GENERATOR):
                batch.append(sample)
                if len(batch) == 10_000:
                    f.write(encoder.encode_lines(batch))
                    batch.clear()
            f.write(encoder.encode_lines(batch))
        tmp.rename(path)
        print(f"generated {n:,} conversations in {time.perf_counter() - start:.1f} s -> {path}", flush=True)
    return path


# ---- measurements, each run in a fresh subprocess (see _util.run_child) ----

def measure_floor(p: dict) -> dict:
    import msgspec
    import numpy as np
    from tokenizers import Tokenizer

    from instructpack.data.chat import ChatRenderer, load_tokenizer_files

    files = load_tokenizer_files(p["model"])
    renderer = ChatRenderer(files.chat_template, files.special_tokens)
    tokenizer = Tokenizer.from_file(str(files.tokenizer_json))
    with open(p["data"], "rb") as f:
        conversations = [msgspec.json.decode(line)["messages"] for line in f]
    start = time.perf_counter()
    texts = [renderer.render(messages) for messages in conversations]
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    seconds = time.perf_counter() - start
    lengths = np.array([len(e.ids) for e in encodings])
    q = np.percentile(lengths, [1, 50, 99])
    return {"seconds": seconds, "samples": len(texts), "tokens": int(lengths.sum()), "min": int(lengths.min()),
            "p1": int(q[0]), "p50": int(q[1]), "p99": int(q[2]), "max": int(lengths.max()),
            "over_max_seq_len": int((lengths > MAX_SEQ_LEN).sum()), **peak_rss_mib()}


def measure_pipeline(p: dict) -> dict:
    from instructpack import DataProcessArgs, data_process

    args = DataProcessArgs(data_path=p["data"], data_output_path=p["out"], model_path=p["model"],
                           max_seq_len=MAX_SEQ_LEN, num_cpu_procs=NUM_PROCS, overwrite=True)
    start = time.perf_counter()
    result = data_process.main(args, progress=False)
    seconds = time.perf_counter() - start
    c = result.manifest.counts
    return {"seconds": seconds, "samples": c.samples, "tokens": c.tokens, "dropped": sum(c.dropped.values()),
            **peak_rss_mib()}


# ---- the benchmark ----

def run(ns: argparse.Namespace) -> int:
    n = QUICK_SAMPLES if ns.quick else SAMPLES
    repeats = ns.repeats or (1 if ns.quick else 3)
    scale = ns.scale if ns.scale is not None else not ns.quick
    model = str(tokenizer_dir())
    data = str(dataset(n))
    big = str(dataset(n * SCALE_FACTOR)) if scale else None

    floors, pipes = [], []
    for i in range(repeats):  # alternating, so drift on the machine hits both sides alike
        floors.append(run_child("benchmarks.preprocess:measure_floor", {"data": data, "model": model}))
        pipes.append(run_child("benchmarks.preprocess:measure_pipeline",
                               {"data": data, "model": model, "out": str(HERE / f"shards-{n}")}))
        print(f"  run {i + 1}/{repeats}: (a) {floors[-1]['seconds']:.2f} s  (b) {pipes[-1]['seconds']:.2f} s",
              flush=True)
    a, b = floors[0], pipes[0]
    ta, tb = median(f["seconds"] for f in floors), median(p["seconds"] for p in pipes)
    tokens = a["tokens"]  # all rendered samples; (b) keeps those that fit max_seq_len

    def rss(runs):
        return median(r["rss_main_mib"] for r in runs), median(r["rss_child_mib"] for r in runs)

    print(f"\npreprocess benchmark: {n:,} conversations, tokenizer vocab {TOKENIZER['vocab_size']:,}, "
          f"{NUM_PROCS} procs, medians of {repeats} alternating runs")
    print(f"sample tokens: min {a['min']}, p1 {a['p1']}, p50 {a['p50']}, p99 {a['p99']}, max {a['max']}; "
          f"{tokens:,} tokens total; > max_seq_len {MAX_SEQ_LEN}: {a['over_max_seq_len']}")
    print(f"{'':34}{'time s':>8}{'samples/s':>11}{'tokens/s':>12}   peak RSS MiB (main + largest child)")
    for label, t, runs in (("(a) floor: render + encode_batch", ta, floors),
                           ("(b) data_process.main", tb, pipes)):
        m, c = rss(runs)
        print(f"{label:34}{t:8.2f}{fmt(n / t):>11}{fmt(tokens / t):>12}   "
              f"{m:.0f} + {c:.0f} = {m + c:.0f}")
    def times(runs):
        return " ".join(f"{r['seconds']:.2f}" for r in runs)

    print(f"(b) kept {b['samples']:,} samples / {b['tokens']:,} tokens, dropped {b['dropped']}; "
          f"runs s: (a) {times(floors)}, (b) {times(pipes)}")

    ratio = tb / ta
    tokens_per_s = tokens / tb
    targets = [(f"(b)/(a) time ratio <= {TARGET_RATIO}", ratio <= TARGET_RATIO, f"{ratio:.2f}"),
               (f"(b) tokens/s >= {TARGET_TOKENS_PER_S:,}", tokens_per_s >= TARGET_TOKENS_PER_S,
                fmt(tokens_per_s))]
    if big is not None:
        out = HERE / f"shards-{n * SCALE_FACTOR}"
        s = run_child("benchmarks.preprocess:measure_pipeline", {"data": big, "model": model, "out": str(out)})
        shutil.rmtree(out, ignore_errors=True)  # hundreds of MB, only measured
        m, c = rss(pipes)
        sm, sc = s["rss_main_mib"], s["rss_child_mib"]
        rss_ratio = (sm + sc) / (m + c)
        print(f"scale: {n * SCALE_FACTOR:,} samples ({s['tokens']:,} tokens) in {s['seconds']:.1f} s "
              f"({fmt(s['tokens'] / s['seconds'])} tokens/s); peak RSS {sm:.0f} + {sc:.0f} = {sm + sc:.0f} MiB "
              f"vs {m + c:.0f} MiB at {n:,} (main x{sm / m:.2f}, child x{sc / c:.2f})")
        targets.append((f"peak RSS {SCALE_FACTOR}x samples / 1x <= {TARGET_RSS_RATIO}",
                        rss_ratio <= TARGET_RSS_RATIO, f"{rss_ratio:.2f}"))
    print()
    for name, ok, value in targets:
        print(f"target {name:34}: {'PASS' if ok else 'FAIL'} ({value})")
    return 0  # a report: a missed target is not an error


def add_parser(sub) -> None:
    p = sub.add_parser("preprocess", help="preprocessing throughput vs. its floor, and memory scaling",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_SAMPLES:,} samples, one run, no scaling run (smoke test)")
    p.add_argument("--repeats", type=int, default=None, help="alternating (a)/(b) runs (default 3; 1 with --quick)")
    p.add_argument("--scale", action=argparse.BooleanOptionalAction, default=None,
                   help=f"also preprocess {SCALE_FACTOR}x the samples and compare peak RSS "
                        "(default: on unless --quick)")
    p.set_defaults(run=run)

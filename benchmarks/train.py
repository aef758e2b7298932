"""`python -m benchmarks train`: trained tokens per second through `run_step`, the training
loop's own optimizer step (forward and backward of every micro-batch, clipping, AdamW), with
packed rows against padded rows, in one process.

The samples are synthetic, shaped like chat data: heavy-tailed lengths (pack.lengths: mean
about 570 tokens, up to 4,096, capped at max_batch_len) and trained tokens in runs (prompts
and answers alternate, about half of the tokens trained). The first step of the epoch is
trained three ways:

(a) packed:  the padding-free plan (padded=False) as StepLoader yields it: one row per
             micro-batch, positions restarting at each sample, no attention mask.
(b) padded, same micro-batches: exactly (a)'s micro-batches, each padded to its longest
             sample (collate_padded of each of (a)'s refs): what padding a packed plan costs.
(c) padded, padding-aware plan: padded=True, so longest x count of each micro-batch fits
             max_batch_len and similar lengths share a micro-batch: the strong padded baseline.

Every timed run starts from the same initial weights (seeded once, reloaded) with a fresh
AdamW, so the variants do the same math (the first step's mean loss is printed and must
agree). Runs alternate a, b, c after one untimed warm-up per variant. Reported per variant:
trained target tokens per second (targets / wall time through run_step, median of the
runs), seconds per step, positions processed (padding included), padding fraction,
micro-batches, attention scores computed, model FLOPs/s; then packed/(b) and packed/(c).
Target: packed >= 1.5x (b). (c) is reported, not a target: when p of its positions are
padding, packing cannot save much more than 1/(1-p) of the work (1.12x below).

CPU (the default here): a Llama from config, 4 layers, hidden 256, intermediate 688, 4 heads,
a vocabulary of 8,000 (not 32,000: at hidden 256 a 32,000-row output layer is 72 % of the
matmul parameters, against 6 % in a 1.1B Llama, and doubles the run), 7.3M parameters, fp32,
gradient checkpointing off (it would add the same recomputation to every variant; memory is
not short). One step of ebs 64 (29,438 tokens in 8 micro-batches of at most 4,096), 3 runs
per variant, warm-up one micro-batch each: about 2.7 minutes on 2 idle cores. --quick: ebs
16, max_batch_len 2,048, 2 runs, about 20 s.

Attention: --attn, by default what training picks (train.model.load.choose_attention:
"sdpa_packed", SDPA run per sample, on CPU; flash_attention_2 on CUDA when installed).
Under transformers' stock "sdpa" (and "eager") a packed row gets
a T x T block-diagonal mask: attention costs T^2 instead of sum(l_i^2), 3.8x here, and SDPA
loses its causal fast path. Measured on 2 idle cores, default settings, targets/s:

    --attn        (a) packed   (b)   (c)    packed/(b)   packed/(c)
    sdpa_packed        2,307   555  1,973        4.16x        1.17x
    sdpa               1,039   563  1,992        1.85x        0.52x

(The loss needs logits only where there is a target; run_step asks transformers for those
positions alone, in packed and in padded rows alike. Before that, packed ran at 1,773-1,888.)

With stock sdpa, packing is slower than padding with a padding-aware plan; eager is slower
still (its packed step took 3.6x sdpa_packed's at ebs 32). This tiny model exaggerates it: per
layer, full attention over T tokens costs about T / (6 x hidden) of the matmuls, 2.7 at T =
4,096 and hidden 256 against about 0.4 in TinyLlama's shape.

Noise: this machine is shared. While other processes run, wall times grow up to 3x, unevenly
between variants (the spread column shows it), and even the ratios move: compare idle runs.

Every variant trains as the library does in one process: run_step over a Backend with the
run's precision (train/precision.py) and the library's AdamW (build_optimizer).

CUDA (written, not run here): fp32 master weights under bf16 autocast, fused AdamW,
TinyLlama-1.1B's shape (22 layers, hidden 2,048,
intermediate 5,632, 32 query and 4 key/value heads, vocabulary 32,000), gradient checkpointing
on (without it (b), whose padded micro-batches can hold 100,000+ positions, needs well over
100 GB), ebs 128, max_batch_len 16,384, 2 steps per run, 3 runs, a whole warm-up step; a
variant that runs out of memory is reported as such. Also MFU = model FLOPs / time /
--peak-tflops (default 989, H100/H200 SXM dense bf16). Model FLOPs as in PaLM (appendix B):
6 x (parameters - input embedding - output layer) x real tokens + 6 x output layer x
trained tokens (logits are computed only there) + 12 x layers x hidden x sum(l_i^2), no
halving for the causal mask, padding and recomputation not counted: the same useful work for
all three variants. A variant that runs out of memory frees what it held before the next one.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import time
from dataclasses import dataclass, replace

import numpy as np

from ._util import OUTPUT, cache_key, fmt, llama_config, median
from .pack import lengths as heavy_tailed_lengths

HERE = OUTPUT / "train"
SEED = 0  # model weights, dataset tokens and the plan's permutation
PAD_TOKEN_ID = 0
TARGET_RATIO = 1.5
PEAK_TFLOPS = 989.0  # H100 / H200 SXM dense bf16


@dataclass(frozen=True)
class Setup:
    # the model: a Llama built from its config
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    gradient_checkpointing: bool
    # the plan and the measurement
    effective_batch_size: int
    max_batch_len: int
    steps: int  # optimizer steps timed per run (the first steps of the epoch)
    repeats: int  # timed runs per variant, alternating a, b, c
    warmup_micro_batches: int  # untimed: one step of this many micro-batches per variant (0: a whole step)


# CPU: see the module docstring for the choices (vocabulary 8,000; one step of ebs 64 per run).
CPU = Setup(layers=4, hidden=256, intermediate=688, heads=4, kv_heads=4, vocab=8000, gradient_checkpointing=False,
            effective_batch_size=64, max_batch_len=4096, steps=1, repeats=3, warmup_micro_batches=1)
CPU_QUICK = replace(CPU, effective_batch_size=16, max_batch_len=2048, repeats=2)
# CUDA: TinyLlama-1.1B's shape, bf16, gradient checkpointing on (a padded copy of a 16,384-token
# micro-batch can hold 100,000+ positions: without it, (b) would need well over 100 GB).
GPU = Setup(layers=22, hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=32000, gradient_checkpointing=True,
            effective_batch_size=128, max_batch_len=16384, steps=2, repeats=3, warmup_micro_batches=0)
GPU_QUICK = replace(GPU, steps=1, repeats=2)


def dataset(n: int, vocab: int, longest: int):
    """n samples with heavy-tailed lengths (pack.lengths, capped at `longest` so every sample
    fits a micro-batch), trained tokens in runs; written once and cached."""
    from instructpack.data import synthetic
    from instructpack.data.shards import load_dataset

    params = {"n": n, "vocab": vocab, "longest": longest}
    out = HERE / f"ds-{n}-{cache_key(params, __file__, synthetic.__file__)}"
    if (out / "manifest.json").is_file():
        return load_dataset(out)
    lengths = np.minimum(heavy_tailed_lengths(n, seed=1), longest)
    return synthetic.write_synthetic_dataset(out, lengths, vocab, seed=SEED, trained="runs")


def build_model(setup: Setup, attn: str, device, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    from instructpack.train.model.layers import enable_activation_checkpointing

    config = llama_config(layers=setup.layers, hidden=setup.hidden, intermediate=setup.intermediate,
                          heads=setup.heads, kv_heads=setup.kv_heads, vocab=setup.vocab,
                          max_positions=setup.max_batch_len, use_cache=False)
    torch.manual_seed(SEED)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    if setup.gradient_checkpointing:
        enable_activation_checkpointing(model)  # as training enables it
    return model.train()


def plan_variants(ds, setup: Setup) -> dict:
    """The first `setup.steps` steps of the epoch, three ways: (a) packed rows of the packed
    plan and (c) padded rows of the padding-aware plan, both from StepLoader as training gets
    them; (b) the packed plan's very micro-batches, padded (collate_padded of each of its refs)."""
    from instructpack.data.collate import collate_padded
    from instructpack.data.loader import Step, StepLoader
    from instructpack.data.sampler import MultipackSampler

    def sampler(padded: bool) -> MultipackSampler:
        return MultipackSampler(ds.lengths, effective_batch_size=setup.effective_batch_size,
                                max_batch_len=setup.max_batch_len, seed=SEED, padded=padded,
                                target_counts=ds.target_counts)

    packed = list(itertools.islice(StepLoader(ds, sampler(False), pad_token_id=PAD_TOKEN_ID), setup.steps))
    aware = list(itertools.islice(StepLoader(ds, sampler(True), pad_token_id=PAD_TOKEN_ID), setup.steps))
    by_step: dict[int, list] = {}
    for ref in sampler(False):  # a fresh sampler: from the start of epoch 0
        if ref.step >= setup.steps:
            break
        by_step.setdefault(ref.step, []).append(collate_padded(ds, ref, PAD_TOKEN_ID))
    same = [Step(0, s, mbs) for s, mbs in sorted(by_step.items())]

    # (b) must hold exactly (a)'s micro-batches: the real tokens of each padded batch, row by
    # row, are the packed row. (c) must train the same samples: step contents do not depend
    # on the plan's micro-batches.
    for step_a, step_b, step_c in zip(packed, same, aware, strict=True):
        for mb_a, mb_b in zip(step_a.micro_batches, step_b.micro_batches, strict=True):
            if not mb_b.input_ids[mb_b.attention_mask.bool()].equal(mb_a.input_ids[0]):
                raise RuntimeError(f"step {step_a.step}: (b)'s micro-batch {mb_a.index} is not (a)'s")
        if step_a.targets != step_c.targets or sorted(_sample_lengths(step_a)) != sorted(_sample_lengths(step_c)):
            raise RuntimeError(f"step {step_a.step}: (c) trains other samples than (a)")
    return {"packed": packed, "same": same, "aware": aware}


def _sample_lengths(step) -> list[int]:
    return [int(x) for mb in step.micro_batches for x in np.diff(mb.cu_seqlens.numpy())]


def shape_stats(steps: list) -> dict:
    """Positions the model processes (padding included), real tokens, micro-batches and
    attention sizes: sum over rows of T^2 (a packed row under a full-row mask, or a padded
    row) and sum over samples of l^2 (what per-sample attention needs)."""
    positions = tokens = targets = micro_batches = 0
    row_sq = sample_sq = 0
    for step in steps:
        for mb in step.micro_batches:
            rows, width = mb.input_ids.shape
            positions += rows * width
            tokens += mb.num_tokens
            targets += mb.num_targets
            micro_batches += 1
            row_sq += rows * width * width
            lengths = np.diff(mb.cu_seqlens.numpy()).astype(np.int64)
            sample_sq += int((lengths * lengths).sum())
    return {"positions": positions, "tokens": tokens, "targets": targets, "micro_batches": micro_batches,
            "row_sq": row_sq, "sample_sq": sample_sq}


def per_sample_attention(attn: str, padded: bool) -> bool:
    """Whether `attn` computes only each sample's own l x l scores: flash-attention's varlen
    kernels do for packed and (unpadded by transformers) padded rows; sdpa_packed for packed
    rows only (padded batches go to the regular sdpa). Others fill whole rows: T x T."""
    return attn.startswith("flash_attention") or (attn == "sdpa_packed" and not padded)


def run(ns: argparse.Namespace) -> int:
    if ns.backend:
        from . import backends
        return backends.run(ns)
    import torch

    from instructpack.config import TrainingArgs
    from instructpack.data.loader import Step
    from instructpack.train.backends import Backend
    from instructpack.train.distributed import World
    from instructpack.train.model.load import choose_attention
    from instructpack.train.optim import build_optimizer
    from instructpack.train.precision import decide_precision
    from instructpack.train.step import run_step

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    setup = (GPU_QUICK if ns.quick else GPU) if cuda else (CPU_QUICK if ns.quick else CPU)
    attn = ns.attn or choose_attention(device, disable_flash_attn=False)
    # What the library runs for one process: fp32 master weights with bf16 autocast on CUDA
    # (train/precision.py), its AdamW (fused on CUDA, weight decay on matrices only).
    args = TrainingArgs(model_path="-", data_path="-", ckpt_output_dir="-", data_output_dir="-",
                        max_seq_len=setup.max_batch_len, max_batch_len=setup.max_batch_len,
                        effective_batch_size=setup.effective_batch_size, learning_rate=1e-5,
                        distributed_backend="ddp")
    precision = decide_precision(args, device)
    world = World(0, 0, 1, device)

    ds = dataset(setup.effective_batch_size * setup.steps, setup.vocab, setup.max_batch_len)
    variants = plan_variants(ds, setup)
    stats = {name: shape_stats(steps) for name, steps in variants.items()}
    model = build_model(setup, attn, device, precision.weights)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = sum(p.numel() for p in model.parameters())
    a = stats["packed"]
    flops = model_flops(model, setup, a["tokens"], a["targets"], a["sample_sq"])

    def reset() -> torch.optim.Optimizer:
        """The same initial weights and a fresh AdamW for every run: identical work."""
        model.load_state_dict(initial)
        model.zero_grad(set_to_none=True)
        return build_optimizer(model, args)

    def train(steps: list) -> tuple[float, float]:
        """Seconds of wall time through run_step over `steps`, and the first step's mean loss."""
        backend = Backend(model, reset(), world, precision=precision)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        results = [run_step(backend, step, None, device=device) for step in steps]  # .item() syncs
        seconds = time.perf_counter() - start
        return seconds, results[0].loss_sum / max(results[0].targets, 1)

    def attempt(name: str, steps: list) -> tuple[float, float] | None:
        """train(steps), or None when (b) outgrows the GPU: reported, and the others measured."""
        try:
            return train(steps)
        except torch.OutOfMemoryError as error:
            failed[name] = f"out of memory ({str(error).splitlines()[0][:80]})"
        # Out of the except block the error and its frames (activations, the optimizer and its
        # state) are gone: only now can their memory go back.
        model.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        return None

    names = ("packed", "same", "aware")
    times: dict[str, list[float]] = {name: [] for name in names}
    losses, peak_gib, failed = {}, {}, {}
    for name in names:  # untimed warm-up: kernels, allocator, first-call overheads
        step = variants[name][0]
        if setup.warmup_micro_batches:
            step = Step(step.epoch, step.step, step.micro_batches[:setup.warmup_micro_batches])
        attempt(name, [step])
    for _ in range(setup.repeats):
        for name in names:
            if name in failed:
                continue
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            measured = attempt(name, variants[name])
            if measured is None:
                continue
            seconds, loss = measured
            times[name].append(seconds)
            losses.setdefault(name, loss)
            if cuda:
                peak_gib[name] = max(peak_gib.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**30)

    report(setup, attn, ds.lengths, params, flops, stats, times, losses, peak_gib, failed, ns.peak_tflops, cuda)
    rate = {name: stats[name]["targets"] / median(times[name]) for name in names if name not in failed}
    ratio = {}
    for name, short in (("same", "(b)"), ("aware", "(c)")):
        if "packed" in rate and name in rate:
            ratio[name] = rate["packed"] / rate[name]
            print(f"packed / {short}: {ratio[name]:.2f}x")
        else:
            print(f"packed / {short}: n/a ({failed.get(name) or failed.get('packed')})")
    c = stats["aware"]
    print(f"  (c) pads {1 - c['tokens'] / c['positions']:.1%} of its positions: packing it saves at most "
          f"{c['positions'] / c['tokens']:.2f}x in positions, plus attention and per-micro-batch costs")
    ok = ratio.get("same", 0) >= TARGET_RATIO
    print(f"target: packed >= {TARGET_RATIO}x padded rows of the same micro-batches (b): {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


def model_flops(model, setup: Setup, tokens: int, targets: int, sample_sq: int) -> float:
    """Model FLOPs of one pass over the data, forward and backward (PaLM, appendix B;
    Megatron-LM): 6 x matmul parameters per token, where the input embedding is a lookup
    (no matmul) and the output layer runs only at the positions with a target (the step
    computes logits there alone), plus 12 x layers x hidden x l^2 per sample for the
    attention scores and their use, without halving for the causal mask. Real tokens only,
    the same for every variant; recomputation is not counted."""
    params = sum(p.numel() for p in model.parameters())
    output = model.get_output_embeddings().weight.numel()
    body = params - model.get_input_embeddings().weight.numel() - output
    return 6 * body * tokens + 6 * output * targets + 12 * setup.layers * setup.hidden * sample_sq


LABELS = {"packed": "(a) packed rows, packed plan", "same": "(b) padded, (a)'s micro-batches",
          "aware": "(c) padded, padding-aware plan"}


def report(setup: Setup, attn: str, lens: np.ndarray, params: int, flops: float, stats: dict, times: dict,
           losses: dict, peak_gib: dict, failed: dict, peak_tflops: float, cuda: bool) -> None:
    import torch

    a = stats["packed"]
    where = f"{torch.cuda.get_device_name()}, bf16" if cuda else f"CPU, {torch.get_num_threads()} threads, fp32"
    print(f"{where}; attention {attn}; Llama from config: {setup.layers} layers, hidden {setup.hidden}, "
          f"intermediate {setup.intermediate}, {setup.heads} heads ({setup.kv_heads} key/value), vocab {setup.vocab}: "
          f"{params / 1e6:,.1f}M parameters; gradient checkpointing {'on' if setup.gradient_checkpointing else 'off'}; "
          f"AdamW")
    warmup = f" of {setup.warmup_micro_batches} micro-batch(es)" if setup.warmup_micro_batches else ""
    print(f"{setup.steps} step(s) of ebs {setup.effective_batch_size} ({fmt(len(lens))} samples, "
          f"mean {lens.mean():.0f} and longest {lens.max()} tokens; {fmt(a['tokens'])} tokens, {fmt(a['targets'])} "
          f"trained), max_batch_len {setup.max_batch_len}; {setup.repeats} timed run(s) per variant, alternating, "
          f"after a warm-up step{warmup}")
    print(f"packed rows: sum of T^2 over rows = {a['row_sq'] / a['sample_sq']:.1f}x sum of l^2 over samples "
          f"(a full-row mask, as transformers' sdpa and eager build, computes the former)\n")
    header = (f"{'variant':32} {'targets/s':>9} {'s/step':>7} {'spread':>6} {'positions':>9} {'padding':>7} "
              f"{'micro-b.':>8} {'attn':>6} {'loss 1st':>8} ")
    header += f"{'TFLOP/s':>7} {'MFU':>6} {'peak GiB':>8}" if cuda else f"{'GFLOP/s':>7}"
    print(header + "\n" + "-" * len(header))
    for name in ("packed", "same", "aware"):
        s = stats[name]
        attn_work = (s["sample_sq"] if per_sample_attention(attn, padded=name != "packed") else s["row_sq"])
        shape = (f"{fmt(s['positions']):>9} {1 - s['tokens'] / s['positions']:7.1%} {s['micro_batches']:>8} "
                 f"{attn_work / a['sample_sq']:5.2f}x")
        if name in failed:
            print(f"{LABELS[name]:32} {'-':>9} {'-':>7} {'-':>6} {shape}  {failed[name]}")
            continue
        t = median(times[name])
        line = (f"{LABELS[name]:32} {fmt(s['targets'] / t):>9} {t / setup.steps:7.2f} "
                f"{(max(times[name]) - min(times[name])) / t:6.0%} {shape} {losses[name]:8.4f} ")
        if cuda:
            line += f"{flops / t / 1e12:7.1f} {flops / t / (peak_tflops * 1e12):6.1%} {peak_gib[name]:8.1f}"
        else:
            line += f"{flops / t / 1e9:7.1f}"
        print(line)
    print("targets/s and s/step: medians of the runs; spread: (slowest - fastest) / median; positions: padding "
          "included;\nattn: attention scores computed / sum of l^2 (padded rows and full-row masks compute every "
          "entry);\nloss 1st: mean loss of the first step, the same for all when the math is; model FLOPs: "
          "6 x matmul parameters x tokens\n(the output layer's at targets only) + 12 x layers x hidden x "
          "sum of l^2, real tokens only"
          + (f"; MFU against {peak_tflops:g} TFLOP/s\n" if cuda else "\n"))


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="trained tokens/s through run_step, packed rows against padded rows",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="CPU: a step of ebs 16 at max_batch_len 2,048, 2 runs per variant; CUDA: 1 step, 2 runs")
    p.add_argument("--attn", default=None,
                   help="attn_implementation (default: what training picks, "
                        "instructpack.train.model.choose_attention)")
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS,
                   help=f"CUDA: peak dense bf16 TFLOP/s of the GPU for MFU (default {PEAK_TFLOPS:g}, H100/H200 SXM)")
    p.add_argument("--backend", nargs="+", metavar="NAME",
                   help="instead: compare backends (ddp, fsdp, deepspeed; space- or comma-separated) through "
                        "run_training on one model and dataset, tokens/s and peak memory side by side "
                        "(benchmarks/backends.py)")
    p.add_argument("--lora", action="store_true", help="with --backend: train LoRA adapters")
    p.set_defaults(run=run)

"""`python -m benchmarks gpu [--dry]`: the GPU proof in one call. One PASS, FAIL or SKIP
line per check, then the figures; exit status 1 if any check failed.

On a lent GPU machine (no network, its own Python, torch and transformers): the packages
its image lacks come from `gpu-wheels/` only (`make gpu-wheels` on the build machine fills
it; carry it), installed with the project itself (its C++ extension built there) into
/tmp/instructpack-site, and the checks run in a fresh process with that on the path:

    python3 -m benchmarks gpu          # about 5 minutes on one H200

`--dry`: the same script on the CPU with tiny shapes (gloo, fp32, nothing installed); the
test suite runs it so that the script cannot rot. Dry figures prove nothing about speed.

The checks, in order:
- packed-logits: a packed row of samples through the attention training picks (torch's
  varlen kernel on CUDA without flash-attn; flash_attention_2 where it works), in bf16,
  against each sample alone: the error of each against an fp32 run of the samples alone
  must be within twice the bf16 error of the samples alone (fp32 on the CPU: 1e-4).
- packed-grads: the loss and gradients of a packed micro-batch (step.forward_loss, fp32
  master weights under bf16 autocast, as one process trains) against the samples one by
  one, with the same criterion against an fp32 reference.
- backends: run_training with one process under DDP, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 on
  a small Llama: the per-step losses agree with DDP's (bf16: 2e-2 relative; CPU: 1e-4).
- two-processes: nccl refuses two ranks on one GPU, so on the GPU this is a SKIP (the gloo
  suite of `make test` runs every backend on two processes); in the dry run, DDP on two
  processes (gloo) against one.
- lora, qlora: run_training with LoRA adapters, then over an NF4 base: every step's loss
  is finite and the adapter is saved.
- checkpoint: the DDP run's Hugging Face checkpoint loads with transformers alone (dtype
  from its config) and generates.
- resume: a DDP run killed (SIGKILL, by a callback at the start of step 4) after its full
  state of step 2, run again: it resumes and its per-step loss and gradient norm equal the
  uninterrupted DDP run's (to 1e-6 relative; both with `deterministic=True`).
- throughput: TinyLlama-1.1B's shape from config, random weights, trained as the library
  does (fp32 masters, bf16 autocast, gradient checkpointing, fused AdamW) on the same
  samples as packed rows with the chunked output-layer loss, packed rows with all logits
  at once, and padded rows of the same micro-batches: trained tokens/s, MFU (PaLM's model
  FLOPs, benchmarks/train.model_flops, against the bf16 matmul rate measured in the same
  run), peak memory allocated and reserved. Passes when packed >= 1.5x padded and the
  chunked loss's peak is not above the full logits' (not judged in the dry run).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

from ._util import OUTPUT, REPO, fmt, median

HERE = OUTPUT / "gpu"
WHEELS = REPO / "gpu-wheels"
SITE = Path("/tmp/instructpack-site")
KILL_AT_STEP = 4


@dataclass(frozen=True)
class Sizes:
    small: object  # benchmarks.backends.Setup: the run_training checks' model and data
    big: object  # benchmarks.train.Setup: the throughput model and plan
    row: tuple[int, ...]  # sample lengths of the packed-row checks
    matmul: int  # side of the square matmul that measures the peak rate
    bf16_floor: float  # the least tolerance of the packed checks (fp32: rounding only)


def sizes(dry: bool) -> Sizes:
    from . import backends, train

    small = backends.Setup(layers=2, hidden=256, intermediate=688, heads=4, vocab=8000, samples=40, shortest=32,
                           longest=256, effective_batch_size=8, max_batch_len=512, steps=5, warmup_steps=0,
                           gradient_checkpointing=False)
    if dry:
        small = replace(small, hidden=64, intermediate=128, vocab=2000, longest=128, max_batch_len=256)
        big = replace(train.CPU_QUICK, layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=2000,
                      effective_batch_size=8, max_batch_len=512, repeats=1)
        return Sizes(small, big, (13, 5, 1, 8, 20), 512, 1e-5)
    return Sizes(small, replace(train.GPU_QUICK, repeats=2), (700, 33, 1, 250, 1500, 64), 8192, 1e-3)


def install() -> dict[str, str]:
    """The wheels of gpu-wheels/ and this project (its extension built here) into SITE;
    returns the environment that puts SITE first on the path."""
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"{WHEELS} has no wheels: run `make gpu-wheels` on the build machine and carry gpu-wheels/")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", str(SITE)]
    print(f"installing {len(wheels)} wheels from {WHEELS} and instructpack into {SITE}", flush=True)
    subprocess.run(pip + [str(w) for w in wheels], check=True)
    subprocess.run(pip + ["--no-build-isolation", str(REPO)], check=True)
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SITE), str(REPO),
                                                                     os.environ.get("PYTHONPATH")])))


@dataclass
class Context:
    dry: bool
    sizes: Sizes
    device: object
    model_dir: Path = None
    data_dir: Path = None
    runs: dict = None  # name -> metrics records of the run_training checks
    figures: list = None


# ------------------------------------------------------------------ packed rows

def _packed_batch(lengths, vocab: int, seed: int = 0):
    """One packed MicroBatch of samples of `lengths`, every position but each sample's last a target."""
    import torch

    from instructpack.data.collate import IGNORE_INDEX, MicroBatch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, sum(lengths)), generator=g)
    positions = torch.cat([torch.arange(n) for n in lengths]).view(1, -1)
    bounds = torch.tensor([0, *lengths]).cumsum(0)
    labels = torch.roll(ids, -1, 1)
    labels[0, bounds[1:] - 1] = IGNORE_INDEX
    keep = (labels[0] != IGNORE_INDEX).nonzero().squeeze(1)
    return MicroBatch(input_ids=ids, position_ids=positions, shift_labels=labels,
                      cu_seqlens=bounds.to(torch.int32), max_seqlen=max(lengths), attention_mask=None,
                      target_positions=keep, num_samples=len(lengths), num_tokens=sum(lengths),
                      num_targets=len(keep), step_targets=len(keep), epoch=0, step=0, index=0, count=1)


def _samples(mb):
    """Each sample of a packed MicroBatch as a MicroBatch of its own."""
    bounds = mb.cu_seqlens.tolist()
    return [_packed_batch_slice(mb, a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _packed_batch_slice(mb, a: int, b: int):
    import torch

    from instructpack.data.collate import IGNORE_INDEX

    labels = mb.shift_labels[:, a:b]
    keep = (labels[0] != IGNORE_INDEX).nonzero().squeeze(1)
    return replace(mb, input_ids=mb.input_ids[:, a:b], position_ids=mb.position_ids[:, a:b], shift_labels=labels,
                   cu_seqlens=torch.tensor([0, b - a], dtype=torch.int32), max_seqlen=b - a, target_positions=keep,
                   num_samples=1, num_tokens=b - a, num_targets=len(keep), step_targets=len(keep))


def _small_model(ctx: Context, dtype, attn: str):
    import torch
    from transformers import AutoModelForCausalLM

    from ._util import llama_config

    s = ctx.sizes.small
    config = llama_config(layers=s.layers, hidden=s.hidden, intermediate=s.intermediate, heads=s.heads,
                          kv_heads=max(1, s.heads // 4), vocab=s.vocab, max_positions=4096, use_cache=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype).to(ctx.device)


def _attention(ctx: Context) -> str:
    from instructpack.train.model.load import choose_attention

    return choose_attention(ctx.device, disable_flash_attn=False)


def _relative(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def check_packed_logits(ctx: Context):
    import torch

    from instructpack.train.model import attention
    from instructpack.train.precision import compute_dtype
    from instructpack.train.step import takes_varlen

    attn = _attention(ctx)
    dtype = compute_dtype(ctx.device)
    model = _small_model(ctx, dtype, attn).eval()
    reference = _small_model(ctx, torch.float32, attn).eval()
    mb = _packed_batch(ctx.sizes.row, ctx.sizes.small.vocab).to(ctx.device)
    calls = []
    real = attention.varlen_forward

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    attention.varlen_forward = counted
    try:
        with torch.no_grad():
            packed = model(**mb.model_inputs(varlen=takes_varlen(model)), use_cache=False).logits[0].float()
            packed_calls = len(calls)
            alone = torch.cat([model(**s.model_inputs(varlen=True), use_cache=False).logits[0].float()
                               for s in _samples(mb)])
            exact = torch.cat([reference(**s.model_inputs(varlen=True), use_cache=False).logits[0]
                               for s in _samples(mb)])
    finally:
        attention.varlen_forward = real
    err_packed, err_alone = (float((x - exact).abs().max()) for x in (packed, alone))
    tol = max(2 * err_alone, ctx.sizes.bf16_floor * float(exact.abs().max()))
    kernel = f"{attn}" + (f", torch varlen kernel ({packed_calls} calls for the packed row's "
                          f"{model.config.num_hidden_layers} layers)" if packed_calls else "")
    return err_packed <= tol, (f"{dtype}, attention {kernel}; max |packed - fp32| {err_packed:.3g}, "
                               f"|alone - fp32| {err_alone:.3g} (tolerance {tol:.3g})")


def check_packed_grads(ctx: Context):
    import torch

    from instructpack.config import TrainingArgs
    from instructpack.train.backends import Backend
    from instructpack.train.distributed import World
    from instructpack.train.optim import build_optimizer
    from instructpack.train.precision import decide_precision
    from instructpack.train.step import forward_loss

    args = TrainingArgs(model_path="-", data_path="-", ckpt_output_dir="-", data_output_dir="-", max_seq_len=4096,
                        max_batch_len=4096, effective_batch_size=1, learning_rate=1e-5, distributed_backend="ddp")
    precision = decide_precision(args, ctx.device)
    model = _small_model(ctx, precision.weights, _attention(ctx))
    backend = Backend(model, build_optimizer(model, args), World(0, 0, 1, ctx.device), precision=precision)
    mb = _packed_batch(ctx.sizes.row, ctx.sizes.small.vocab, seed=1).to(ctx.device)

    def loss_and_grads(batches, autocast: bool):
        model.zero_grad(set_to_none=True)
        total = 0.0
        for b in batches:
            with backend.autocast() if autocast else contextlib.nullcontext():
                loss = forward_loss(model, b).summed
            loss.backward()
            total += float(loss)
        return total, torch.cat([p.grad.flatten() for p in model.parameters()])

    loss_packed, grad_packed = loss_and_grads([mb], autocast=True)
    loss_alone, grad_alone = loss_and_grads(_samples(mb), autocast=True)
    loss_exact, grad_exact = loss_and_grads(_samples(mb), autocast=False)  # fp32 masters, no autocast
    floor = ctx.sizes.bf16_floor
    loss_ok = abs(loss_packed - loss_exact) <= max(2 * abs(loss_alone - loss_exact), floor * abs(loss_exact))
    err_packed, err_alone = _relative(grad_packed, grad_exact), _relative(grad_alone, grad_exact)
    grads_ok = err_packed <= max(2 * err_alone, floor)
    return loss_ok and grads_ok, (f"loss packed {loss_packed:.6g}, alone {loss_alone:.6g}, fp32 {loss_exact:.6g}; "
                                  f"gradient relative error packed {err_packed:.3g}, alone {err_alone:.3g}")


# ------------------------------------------------------------------ run_training

def _run(ctx: Context, name: str, *, nproc: int = 1, callbacks=None, **settings) -> list:
    """One run_training into HERE/run-<name> (fresh unless resuming), quiet; its metrics."""
    from instructpack import TorchrunArgs, TrainingArgs, run_training
    from instructpack.train.metrics import read_metrics

    s = ctx.sizes.small
    out = HERE / f"run-{name}"
    args = dict(model_path=str(ctx.model_dir), data_path="-", data_output_dir=str(ctx.data_dir), process_data=False,
                ckpt_output_dir=str(out), max_seq_len=s.longest, max_batch_len=s.max_batch_len,
                effective_batch_size=s.effective_batch_size, learning_rate=1e-3, warmup_steps=1, num_epochs=1,
                distributed_backend="ddp", gradient_checkpointing=False, deterministic=True, log_level="WARNING",
                fsdp_options={"sharding_strategy": "FULL_SHARD"})
    args.update(settings)
    with contextlib.redirect_stdout(io.StringIO()):  # the workers' log goes to out/training.log
        run_training(TorchrunArgs(nproc_per_node=nproc), TrainingArgs(**args, callbacks=callbacks))
    return read_metrics(out)


def _fresh(name: str) -> None:
    import shutil

    shutil.rmtree(HERE / f"run-{name}", ignore_errors=True)


def _agree(records: list, reference: list, key: str = "loss") -> float:
    """The largest relative difference of `key` between two runs, step by step."""
    if len(records) != len(reference):
        return math.inf
    return max(abs(r[key] - w[key]) / max(abs(w[key]), 1e-12) for r, w in zip(records, reference))


BACKENDS = {"ddp": {}, "fsdp": {"distributed_backend": "fsdp"},
            "zero2": {"distributed_backend": "deepspeed", "deepspeed_options": {"zero_stage": 2}},
            "zero3": {"distributed_backend": "deepspeed", "deepspeed_options": {"zero_stage": 3}}}


def _backend_run(ctx: Context, name: str) -> list:
    """The metrics of the one-process run of backend `name`, run once per invocation (the
    DDP one is the reference of several checks); full state every 2 steps, HF checkpoint at the end."""
    if name not in ctx.runs:
        _fresh(name)
        start = time.perf_counter()
        ctx.runs[name] = _run(ctx, name, full_state_every_steps=2, **BACKENDS[name])
        ctx.figures.append(f"{name}: {len(ctx.runs[name])} steps in {time.perf_counter() - start:.0f} s, losses "
                           + " ".join(f"{r['loss']:.4f}" for r in ctx.runs[name]))
    return ctx.runs[name]


def check_backends(ctx: Context):
    tol = 1e-4 if ctx.dry else 2e-2
    runs = {name: _backend_run(ctx, name) for name in BACKENDS}
    diffs = {name: _agree(records, runs["ddp"]) for name, records in runs.items() if name != "ddp"}
    return all(d <= tol for d in diffs.values()), ("one process each, largest relative loss difference from DDP: "
                                                   + ", ".join(f"{k} {v:.2g}" for k, v in diffs.items())
                                                   + f" (tolerance {tol:g})")


def check_two_processes(ctx: Context):
    if not ctx.dry:
        return None, ("nccl refuses two ranks on one GPU; every backend runs on two processes in the gloo suite "
                      "(make test: tests/train/test_backends.py, tests/e2e)")
    _fresh("ddp-2")
    records = _run(ctx, "ddp-2", nproc=2)
    diff = _agree(records, _backend_run(ctx, "ddp"))
    return diff <= 1e-4, f"DDP on 2 processes (gloo) against 1: largest relative loss difference {diff:.2g}"


def _adapter_run(ctx: Context, name: str, lora: dict):
    _fresh(name)
    records = _run(ctx, name, lora=lora)
    saved = list((HERE / f"run-{name}" / "hf_format").rglob("adapter_model.safetensors"))
    ok = len(records) == ctx.sizes.small.steps and all(math.isfinite(r["loss"]) for r in records) and bool(saved)
    return ok, (f"{len(records)} steps, losses {records[0]['loss']:.4f} .. {records[-1]['loss']:.4f}; "
                f"adapter saved: {'yes' if saved else 'NO'}") if records else (False, "no step logged")


def check_lora(ctx: Context):
    return _adapter_run(ctx, "lora", {"rank": 8, "alpha": 16})


def check_qlora(ctx: Context):
    return _adapter_run(ctx, "qlora", {"rank": 8, "alpha": 16, "quantize_data_type": "nf4"})


def check_checkpoint(ctx: Context):
    import torch
    from transformers import AutoModelForCausalLM

    _backend_run(ctx, "ddp")
    final = sorted((HERE / "run-ddp" / "hf_format").iterdir(), key=lambda p: p.stat().st_mtime)[-1]
    model = AutoModelForCausalLM.from_pretrained(final, dtype="auto").to(ctx.device).eval()
    prompt = torch.arange(3, 19, device=ctx.device).view(1, -1)
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                             do_sample=False)
        logits = model(input_ids=out, use_cache=False).logits
    ok = out.shape[1] == prompt.shape[1] + 8 and bool(torch.isfinite(logits).all())
    return ok, f"{final.name}: loaded in {model.dtype}, generated {out.shape[1] - prompt.shape[1]} tokens"


def check_resume(ctx: Context):
    from instructpack.errors import TrainingError

    from ._kill import KillAtStep

    _fresh("resume")
    try:
        _run(ctx, "resume", full_state_every_steps=2, callbacks=[KillAtStep(KILL_AT_STEP)])
        return False, f"the callback did not kill the worker at step {KILL_AT_STEP}"
    except TrainingError as exc:
        killed = "SIGKILL" in exc.reason
    records = _run(ctx, "resume", full_state_every_steps=2, log_level="INFO")  # INFO: the log says it resumed
    resumed = "resumed from" in (HERE / "run-resume" / "training.log").read_text()
    diff = max(_agree(records, _backend_run(ctx, "ddp"), key) for key in ("loss", "grad_norm"))
    return killed and resumed and diff <= 1e-6, (f"killed by SIGKILL at step {KILL_AT_STEP}: {killed}, resumed: "
                                                 f"{resumed}; largest relative difference of loss and gradient "
                                                 f"norm from the uninterrupted run {diff:.2g}")


# ------------------------------------------------------------------ throughput

def matmul_tflops(device, side: int, seconds: float = 1.0) -> float:
    """The bf16 (CPU: fp32) matmul rate of this device on random square matrices: the best
    of five timings of as many products as fill `seconds` / 5 each."""
    import torch

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(side, side, device=device, dtype=dtype) for _ in range(2))

    def timed(reps: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(3)  # warm-up: kernels chosen, clocks up
    reps = max(1, int(seconds / 5 / max(timed(3) / 3, 1e-9)))
    return 2 * side**3 * reps / min(timed(reps) for _ in range(5)) / 1e12


def check_throughput(ctx: Context):
    import torch

    from instructpack.config import TrainingArgs
    from instructpack.train import chunked_loss
    from instructpack.train.backends import Backend
    from instructpack.train.distributed import World
    from instructpack.train.optim import build_optimizer
    from instructpack.train.precision import decide_precision
    from instructpack.train.step import run_step

    from . import train

    setup = ctx.sizes.big
    cuda = ctx.device.type == "cuda"
    peak = matmul_tflops(ctx.device, ctx.sizes.matmul)
    args = TrainingArgs(model_path="-", data_path="-", ckpt_output_dir="-", data_output_dir="-",
                        max_seq_len=setup.max_batch_len, max_batch_len=setup.max_batch_len,
                        effective_batch_size=setup.effective_batch_size, learning_rate=1e-5, distributed_backend="ddp")
    precision = decide_precision(args, ctx.device)
    ds = train.dataset(setup.effective_batch_size * setup.steps, setup.vocab, setup.max_batch_len)
    variants = train.plan_variants(ds, setup)
    stats = train.shape_stats(variants["packed"])
    model = train.build_model(setup, _attention(ctx), ctx.device, precision.weights)
    flops = train.model_flops(model, setup, stats["tokens"], stats["targets"], stats["sample_sq"])
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    world = World(0, 0, 1, ctx.device)
    runs = {"packed, chunked loss": ("packed", chunked_loss.CHUNK_LOGITS), "packed, all logits": ("packed", 1 << 62),
            "padded, same micro-batches": ("same", chunked_loss.CHUNK_LOGITS)}
    results = {}
    default = chunked_loss.CHUNK_LOGITS
    for label, (variant, threshold) in runs.items():
        chunked_loss.CHUNK_LOGITS = threshold
        times, memory = [], (0.0, 0.0)
        try:
            for repeat in range(setup.repeats + 1):  # the first is warm-up
                model.load_state_dict(initial)
                backend = Backend(model, build_optimizer(model, args), world, precision=precision)
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                for step in variants[variant]:
                    run_step(backend, step, None, device=ctx.device)
                if repeat:
                    times.append(time.perf_counter() - start)
                if cuda:
                    memory = (torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30)
                del backend
        except torch.OutOfMemoryError as error:
            results[label] = f"out of memory ({str(error).splitlines()[0][:60]})"
        finally:
            chunked_loss.CHUNK_LOGITS = default
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.empty_cache()
        if label not in results:
            t = median(times)
            results[label] = (stats["targets"] / t, flops / t / 1e12, memory)
    unit = "bf16" if cuda else "fp32"
    ctx.figures.append(f"throughput: {setup.layers} layers, hidden {setup.hidden}, vocab {setup.vocab} "
                       f"({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters), {stats['tokens']:,} "
                       f"tokens ({stats['targets']:,} trained) per step; measured {unit} matmul peak "
                       f"{peak:.1f} TFLOP/s")
    for label, r in results.items():
        if isinstance(r, str):
            ctx.figures.append(f"  {label:28} {r}")
            continue
        rate, tflops, (allocated, reserved) = r
        ctx.figures.append(f"  {label:28} {fmt(rate):>9} trained tokens/s  {tflops:7.2f} TFLOP/s  MFU "
                           f"{tflops / peak:6.1%}" + (f"  peak {allocated:.1f} GiB allocated, {reserved:.1f} reserved"
                                                      if cuda else ""))
    measured = {k: v for k, v in results.items() if not isinstance(v, str)}
    packed, padded = measured.get("packed, chunked loss"), measured.get("padded, same micro-batches")
    ratio = packed[0] / padded[0] if packed and padded else float("nan")
    detail = f"packed / padded {ratio:.2f}x (target >= {train.TARGET_RATIO}x)"
    if ctx.dry:
        return packed is not None, detail + "; dry run: not judged"
    full = measured.get("packed, all logits")
    memory_ok = packed is not None and (full is None or packed[2][0] <= full[2][0] * 1.01)
    detail += (f"; chunked loss peak {packed[2][0]:.1f} GiB against {full[2][0]:.1f} with all logits"
               if packed and full else "")
    return ratio >= train.TARGET_RATIO and memory_ok, detail


CHECKS = (("packed-logits", check_packed_logits), ("packed-grads", check_packed_grads),
          ("backends", check_backends), ("two-processes", check_two_processes), ("lora", check_lora),
          ("qlora", check_qlora), ("checkpoint", check_checkpoint), ("resume", check_resume),
          ("throughput", check_throughput))


def run_checks(dry: bool, only: set[str]) -> int:
    import torch
    import transformers

    from . import backends

    if not dry and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: `python -m benchmarks gpu --dry` runs the script on the CPU")
    device = torch.device("cuda" if not dry else "cpu")
    ctx = Context(dry=dry, sizes=sizes(dry), device=device, runs={}, figures=[])
    ctx.model_dir, ctx.data_dir = backends.build_inputs(ctx.sizes.small)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{where}; torch {torch.__version__}, transformers {transformers.__version__}; attention "
          f"{_attention(ctx)}{'; dry run' if dry else ''}", flush=True)
    failed = 0
    checks = [(name, check) for name, check in CHECKS if not only or name in only]
    for name, check in checks:
        start = time.perf_counter()
        try:
            ok, detail = check(ctx)
        except Exception as exc:  # noqa: BLE001 - a check that breaks is a failure to report, not the end
            ok, detail = False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            traceback.print_exc(file=sys.stderr)
        verdict = "SKIP" if ok is None else "PASS" if ok else "FAIL"
        failed += verdict == "FAIL"
        print(f"{verdict} {name} ({time.perf_counter() - start:.0f} s): {detail}", flush=True)
    print("\n" + "\n".join(ctx.figures))
    print(f"\n{len(checks) - failed} of {len(checks)} checks passed or skipped; {failed} failed")
    return 1 if failed else 0


def run(ns: argparse.Namespace) -> int:
    if ns.dry:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, for this process and its workers
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    only = {name for names in ns.only or [] for name in names.split(",") if name}
    unknown = sorted(only - {name for name, _ in CHECKS})
    if unknown:
        raise SystemExit(f"--only: unknown {', '.join(unknown)}; the checks are {', '.join(n for n, _ in CHECKS)}")
    if ns.dry or ns.installed:
        return run_checks(ns.dry, only)
    env = install()
    cmd = [sys.executable, "-m", "benchmarks", "gpu", "--installed", *(["--only", ",".join(only)] if only else [])]
    return subprocess.run(cmd, cwd=REPO, env=dict(env, PYTHONUNBUFFERED="1")).returncode


def add_parser(sub) -> None:
    p = sub.add_parser("gpu", help="the GPU proof: one PASS/FAIL line per GPU path, and throughput figures",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="on the CPU with tiny shapes, installing nothing")
    p.add_argument("--installed", action="store_true",
                   help="skip installing from gpu-wheels/ (instructpack and its dependencies are importable)")
    p.add_argument("--only", nargs="+", metavar="CHECK", help="run only these checks (space- or comma-separated)")
    p.set_defaults(run=run)

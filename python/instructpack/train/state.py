"""Full-state checkpoints: everything a run needs to continue exactly where it stopped.

`ckpt_output_dir/full_state/step_<N>/` holds, after optimizer step N:
- `model/`: the trained weights and the optimizer state, as the backend keeps them (one
  file per rank for sharded backends, DeepSpeed's own files under DeepSpeed);
- `rng_rank<R>.pt`: the random generators of rank R (torch, CUDA, numpy, Python), so
  dropout continues the same stream;
- `trainer_state.json`: progress (step, samples, tokens, elapsed time), the planner
  position (epoch, step), the LR schedule, and the fingerprint of what the run trains;
- `COMPLETE`, written last.

Writing is atomic: every rank writes into `.step_<N>.tmp`, rank 0 fsyncs it, renames it
into place and then writes the mark. A directory without the mark (a crash, a full disk) is
never resumed from, and the previous checkpoint is removed only after the new one is
complete. Resuming costs the same whatever the step: nothing is replayed, the sampler jumps
to its saved position.

Every file is loaded with `torch.load(weights_only=True)` or as JSON: a checkpoint
directory cannot make the library run code. Importing this module does not import torch
(the launcher checks the fingerprint before it starts the workers).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import msgspec

from ..config import DistributedBackend, TrainingArgs
from ..fileio import fsync_dir, fsync_tree, write_synced

log = logging.getLogger(__name__)

FULL_STATE = "full_state"
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
MODEL_STATE = "model"
FORMAT = "instructpack-full-state"
FORMAT_VERSION = 1


class CheckpointError(OSError):
    """A checkpoint could not be written; the previous complete one is intact."""


class ResumeError(ValueError):
    """The newest full-state checkpoint cannot be resumed by this run; says why and how to
    start fresh."""


@dataclass
class Progress:
    """How far a run has come: optimizer steps, samples and tokens (all ranks), wall time."""
    step: int = 0
    samples: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0


# ------------------------------------------------------------------ fingerprint

def run_fingerprint(args: TrainingArgs, manifest: dict, world_size: int) -> dict[str, str]:
    """What a resumed run must share with the run that saved, field by field: the model, the
    data, and every setting that shapes the sequence of updates. Settings that do not
    (max_batch_len, checkpoint and logging options, paths) may change between runs:
    lowering max_batch_len after running out of memory is a reason to resume."""
    lora = None if args.lora is None else msgspec.to_builtins(args.lora)
    backend = args.distributed_backend
    layout = {DistributedBackend.FSDP: args.fsdp_options.sharding_strategy.value,
              DistributedBackend.DEEPSPEED: f"ZeRO-{args.deepspeed_options.zero_stage}"}.get(backend, "replicated")
    return {
        "model": _model_fingerprint(args.model_path),
        "dataset": _digest([{k: s.get(k) for k in ("samples", "tokens", "checksum")}
                            for s in manifest.get("shards", [])]),
        "effective_batch_size": str(args.effective_batch_size),
        "num_epochs": str(args.num_epochs),
        "random_seed": str(args.random_seed),
        "optimizer": json.dumps({"learning_rate": args.learning_rate, "warmup_steps": args.warmup_steps,
                                 "lr_scheduler": args.lr_scheduler, "weight_decay": args.adamw_weight_decay,
                                 "betas": list(args.adamw_betas), "eps": args.adamw_eps}, sort_keys=True),
        "lora": json.dumps(lora, sort_keys=True),
        "distributed_backend": f"{backend.value} ({layout})",
        "world_size": str(world_size),
    }


def _model_fingerprint(model_path: str) -> str:
    """The model's config and the names and sizes of its weight files: cheap, and enough to
    tell models apart without reading gigabytes of weights."""
    path = Path(model_path)
    parts: list = []
    if (path / "config.json").is_file():
        parts.append(hashlib.sha256((path / "config.json").read_bytes()).hexdigest())
    if path.is_dir():
        parts += sorted((f.name, f.stat().st_size) for f in path.glob("*.safetensors"))
    return _digest(parts or [model_path])


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def check_fingerprint(saved: dict[str, str], ours: dict[str, str], checkpoint: Path) -> None:
    changed = [k for k in ours if saved.get(k) != ours[k]]
    if changed:
        what = "; ".join(f"{k}: the checkpoint has {saved.get(k)!r}, this run {ours[k]!r}" for k in changed)
        raise ResumeError(
            f"cannot resume from {checkpoint}: this run differs from the one that saved it ({what}). Run with the "
            f"same model, data and settings to resume, or start fresh: delete or move {checkpoint.parent}, or "
            "use another ckpt_output_dir")


# ------------------------------------------------------------------ finding

def full_state_root(ckpt_output_dir: str | Path) -> Path:
    return Path(ckpt_output_dir) / FULL_STATE


def _step_of(directory: Path) -> int | None:
    name = directory.name
    return int(name[5:]) if name.startswith("step_") and name[5:].isdigit() else None


def complete_checkpoints(ckpt_output_dir: str | Path) -> list[Path]:
    """Complete full-state checkpoints, oldest first."""
    root = full_state_root(ckpt_output_dir)
    if not root.is_dir():
        return []
    found = [(_step_of(d), d) for d in root.iterdir() if d.is_dir() and (d / COMPLETE).is_file()]
    return [d for step, d in sorted((s, d) for s, d in found if s is not None)]


def latest_checkpoint(ckpt_output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(ckpt_output_dir)
    return found[-1] if found else None


def read_trainer_state(checkpoint: Path) -> dict:
    path = checkpoint / TRAINER_STATE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ResumeError(f"{path}: unreadable ({e}); the checkpoint is damaged: delete {checkpoint} to resume "
                          "from the one before it, or start fresh") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("format_version") != FORMAT_VERSION:
        raise ResumeError(f"{path}: not an instructpack full-state checkpoint of format {FORMAT_VERSION}; move "
                          f"{checkpoint.parent} away to start fresh")
    return state


def check_resumable(ckpt_output_dir: str | Path, fingerprint: dict[str, str]) -> Path | None:
    """The newest complete checkpoint, after checking that this run may resume it; None if
    there is none (a fresh start)."""
    checkpoint, _ = _resumable(ckpt_output_dir, fingerprint)
    return checkpoint


def _resumable(ckpt_output_dir: str | Path, fingerprint: dict[str, str]) -> tuple[Path | None, dict | None]:
    """The newest complete checkpoint and its trainer state, fingerprint checked."""
    checkpoint = latest_checkpoint(ckpt_output_dir)
    if checkpoint is None:
        return None, None
    state = read_trainer_state(checkpoint)
    check_fingerprint(state["fingerprint"], fingerprint, checkpoint)  # world size included: files are per rank
    return checkpoint, state


# ------------------------------------------------------------------ writing

def save_full_state(ckpt_output_dir: str | Path, backend, scheduler, sampler, progress: Progress,
                    fingerprint: dict[str, str], world) -> Path:
    """Writes `full_state/step_<N>` atomically (a collective: every rank calls it) and then
    removes older ones. Raises CheckpointError on every rank if any rank failed to write."""
    from .distributed import barrier

    root = full_state_root(ckpt_output_dir)
    final = root / f"step_{progress.step}"
    tmp = root / f".step_{progress.step}.tmp"

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.iterdir():  # left by a crash or a full disk: never resumed from
            if not (stale / COMPLETE).is_file():
                shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()

    def write_rank_files() -> None:
        backend.save_state(tmp / MODEL_STATE)
        _save_rng(tmp / f"rng_rank{world.rank:05d}.pt")

    def finish() -> None:
        state = {"format": FORMAT, "format_version": FORMAT_VERSION, "time": time.time(),
                 "progress": asdict(progress), "sampler": sampler.state_dict(),
                 "scheduler": scheduler.state_dict(), "fingerprint": fingerprint}
        write_synced(tmp / TRAINER_STATE, json.dumps(state, indent=2) + "\n")
        fsync_tree(tmp)
        os.replace(tmp, final)
        fsync_dir(root)
        write_synced(final / COMPLETE, json.dumps({"step": progress.step}) + "\n")
        fsync_dir(final)

    previous = latest_checkpoint(ckpt_output_dir)
    kept = f"the previous full state, {previous}, is intact" if previous else "there is no earlier full state"
    try:
        write_collectively(prepare, world, final, main_only=True, kept=kept)
        write_collectively(write_rank_files, world, final, kept=kept)
        write_collectively(finish, world, final, main_only=True, kept=kept)
    except CheckpointError:
        if world.is_main:  # half-written: free the space again
            shutil.rmtree(tmp, ignore_errors=True)
            if not (final / COMPLETE).is_file():
                shutil.rmtree(final, ignore_errors=True)
        raise
    if world.is_main:
        for old in complete_checkpoints(ckpt_output_dir)[:-1]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("saved full training state %s", final)
    barrier(world)
    return final


def write_collectively(work, world, target: Path, *, main_only: bool = False, kept: str = "") -> None:
    """Runs `work` (on rank 0 only if main_only), then lets every rank know whether it
    failed, so that all raise CheckpointError together instead of some waiting forever in
    the next collective. `kept` says what is still intact.

    Work on every rank may hold collectives of its own (DeepSpeed's save has barriers): a
    rank that fails in it cannot know which collective the others wait in, so it raises at
    once; its exit ends the job (torchrun stops the others) and the launcher names it."""
    from .distributed import all_reduce

    error = None
    if not main_only or world.is_main:
        try:
            work()
        except Exception as e:  # disk full, permissions, quota (torch.save says RuntimeError)
            if not main_only:
                raise _write_error(target, e, kept) from e
            error = e
    (failed,) = all_reduce([float(error is not None)], world, op="max")
    if failed:
        raise _write_error(target, error, kept) from error


def _write_error(target: Path, error: Exception | None, kept: str) -> CheckpointError:
    cause = f"{error}" if error is not None else "rank 0 could not write it"
    return CheckpointError(f"could not write {target}: {cause}; {kept}. Free space on that disk or point "
                           "ckpt_output_dir at a writable one, then run again (a run resumes from the newest "
                           "complete full-state checkpoint)")


def check_shared(ckpt_output_dir: str | Path, world) -> None:
    """Every rank writes its part of a full-state checkpoint into one directory, so all of
    them must see the same ckpt_output_dir (a filesystem every machine shares). Checked
    once at the start: rank 0 leaves a token there, every rank reads it."""
    from .distributed import all_reduce

    if not world.distributed:
        return
    root = full_state_root(ckpt_output_dir)
    token = random.SystemRandom().randrange(1, 2**40) if world.is_main else 0
    probe = root / ".shared"
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_text(str(token))
    (token,) = all_reduce([float(token)], world)  # rank 0's token, once it is written
    try:
        seen = probe.read_text() == str(int(token))
    except OSError:
        seen = False
    (missing,) = all_reduce([float(not seen)], world, op="max")
    if world.is_main:
        probe.unlink(missing_ok=True)
    if missing:
        who = "another rank" if seen else f"rank {world.rank}"
        raise ResumeError(f"{root} is not the same directory on every machine ({who} cannot see the files rank 0 "
                          "writes there): full-state checkpoints hold every rank's part, so ckpt_output_dir must be "
                          "on a filesystem that all machines share")


# ------------------------------------------------------------------ random generators

def _save_rng(path: Path) -> None:
    import numpy as np
    import torch

    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    with open(path, "wb") as f:
        torch.save(state, f)


def _load_rng(path: Path) -> None:
    import numpy as np
    import torch

    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------ resuming

def resume(ckpt_output_dir: str | Path, backend, scheduler, sampler, fingerprint: dict[str, str],
           world) -> tuple[Progress, Path | None]:
    """Loads the newest complete full-state checkpoint into the backend, the schedule, the
    sampler and this rank's random generators; a fresh Progress when there is none. Every
    rank must see the same checkpoint (ckpt_output_dir on a shared filesystem)."""
    from .distributed import all_reduce

    check_shared(ckpt_output_dir, world)
    checkpoint, state = _resumable(ckpt_output_dir, fingerprint)
    step = _step_of(checkpoint) if checkpoint is not None else -1
    highest, lowest = all_reduce([step, -step], world, op="max")
    if highest != -lowest:
        raise ResumeError(f"the ranks see different full-state checkpoints in {full_state_root(ckpt_output_dir)} "
                          "(this rank: " + (str(checkpoint) if checkpoint else "none") + "); ckpt_output_dir must "
                          "be one directory that every machine shares")
    if checkpoint is None:
        return Progress(), None
    try:
        backend.load_state(checkpoint / MODEL_STATE)  # DeepSpeed returns its client state: unused
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        _load_rng(checkpoint / f"rng_rank{world.rank:05d}.pt")
        progress = Progress(**{f.name: state["progress"][f.name] for f in fields(Progress)})  # every one
    except (OSError, RuntimeError, KeyError, TypeError) as e:  # a file missing or cut short, a field missing
        raise ResumeError(f"{checkpoint} is damaged ({type(e).__name__}: {e}); delete it to resume from an earlier "
                          f"one, or start fresh by moving {checkpoint.parent} away") from e
    log.info("resumed from %s: step %d, %d samples seen, epoch %d step %d next", checkpoint, progress.step,
             progress.samples, sampler.epoch, sampler.step)
    return progress, checkpoint

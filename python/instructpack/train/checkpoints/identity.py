"""Which full-state checkpoint a run would resume, and whether it may: the checkpoints' names
and completeness marks, the trainer state (a typed document) and the fingerprint of what a
run trains. No torch here: the launcher refuses a run that cannot resume before any worker
starts, and the workers check again.

`ckpt_output_dir/full_state/step_<N>/` holds, after optimizer step N, `model/` (the backend's
files), `rng_rank<R>.pt`, `trainer_state.json` and, written last, `COMPLETE`
(full_state.py writes them).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import msgspec

from ...config import DistributedBackend, TrainingArgs
from ...data.manifest import Manifest
from ...documents import DocumentError, convert_document
from ...errors import ResumeError

FULL_STATE = "full_state"
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
MODEL_STATE = "model"
FORMAT = "instructpack-full-state"
FORMAT_VERSION = 1


class Progress(msgspec.Struct):
    """How far a run has come: optimizer steps, samples and tokens (all ranks), wall time.
    Every field is required in a trainer state: a missing one means a damaged checkpoint."""
    step: int
    samples: int
    tokens: int
    elapsed_s: float

    @classmethod
    def start(cls) -> Progress:
        return cls(0, 0, 0, 0.0)


class TrainerState(msgspec.Struct, kw_only=True):
    """trainer_state.json: where the run was, and what it trained."""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    time: float  # when it was saved (time.time())
    progress: Progress
    sampler: dict[str, int]  # MultipackSampler.state_dict(): the planner position
    scheduler: dict[str, Any]  # the learning-rate schedule's state_dict()
    fingerprint: dict[str, str]  # run_fingerprint of the run that saved it


# ------------------------------------------------------------------ fingerprint

def run_fingerprint(args: TrainingArgs, manifest: Manifest, world_size: int) -> dict[str, str]:
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
        "dataset": _digest([{"samples": s.samples, "tokens": s.tokens, "checksum": s.checksum}
                            for s in manifest.shards]),
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


def step_of(directory: Path) -> int | None:
    name = directory.name
    return int(name[5:]) if name.startswith("step_") and name[5:].isdigit() else None


def complete_checkpoints(ckpt_output_dir: str | Path) -> list[Path]:
    """Complete full-state checkpoints, oldest first."""
    root = full_state_root(ckpt_output_dir)
    if not root.is_dir():
        return []
    found = [(step_of(d), d) for d in root.iterdir() if d.is_dir() and (d / COMPLETE).is_file()]
    return [d for step, d in sorted((s, d) for s, d in found if s is not None)]


def latest_checkpoint(ckpt_output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(ckpt_output_dir)
    return found[-1] if found else None


def encode_trainer_state(state: TrainerState) -> str:
    """The document as written to trainer_state.json (full_state.py writes and syncs it)."""
    return msgspec.json.format(msgspec.json.encode(state)).decode() + "\n"


def read_trainer_state(checkpoint: Path) -> TrainerState:
    path = checkpoint / TRAINER_STATE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ResumeError(f"{path}: unreadable ({e}); the checkpoint is damaged: delete {checkpoint} to resume "
                          "from the one before it, or start fresh") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
        raise ResumeError(f"{path}: not an instructpack full-state checkpoint of format {FORMAT_VERSION}; move "
                          f"{checkpoint.parent} away to start fresh")
    try:
        return convert_document(data, TrainerState)
    except DocumentError as e:
        raise ResumeError(f"{checkpoint} is damaged ({path.name}: {e}); delete it to resume from an earlier one, "
                          f"or start fresh by moving {checkpoint.parent} away") from None


def check_resumable(ckpt_output_dir: str | Path, fingerprint: dict[str, str]) -> Path | None:
    """The newest complete checkpoint, after checking that this run may resume it; None if
    there is none (a fresh start)."""
    checkpoint, _ = resumable(ckpt_output_dir, fingerprint)
    return checkpoint


def resumable(ckpt_output_dir: str | Path, fingerprint: dict[str, str]) -> tuple[Path | None, TrainerState | None]:
    """The newest complete checkpoint and its trainer state, fingerprint checked."""
    checkpoint = latest_checkpoint(ckpt_output_dir)
    if checkpoint is None:
        return None, None
    state = read_trainer_state(checkpoint)
    check_fingerprint(state.fingerprint, fingerprint, checkpoint)  # world size included: files are per rank
    return checkpoint, state

"""What a full-state checkpoint says about the run that saved it, and whether this run may
resume it: the trainer state (a typed document), the fingerprint of what a run trains, and
a summary of its dataset in words. No torch here: the launcher refuses a run that cannot
resume before anything is written or any worker starts, and the workers check again.

`ckpt_output_dir/full_state/step_<N>/` holds, after optimizer step N, `model/` (the backend's
files), `rng_rank<R>.pt`, `trainer_state.json` and, written last, `COMPLETE` with every
file's checksum (full_state.py writes them; resumable.py finds and verifies them).
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


class DatasetSummary(msgspec.Struct, kw_only=True):
    """The dataset a run trains, in words a person recognises (for messages), with the
    identity the fingerprint compares."""
    directory: str
    identity: str  # dataset_identity: what the fingerprint compares
    samples: int
    tokens: int
    source: str | None = None  # the JSONL file it was made from (None: synthetic)
    source_sha256: str | None = None
    preprocess_fingerprint: str | None = None  # what preprocessing would make of the same inputs

    @classmethod
    def of(cls, directory: str | Path, manifest: Manifest) -> DatasetSummary:
        return cls(directory=str(directory), identity=dataset_identity(manifest),
                   samples=sum(s.samples for s in manifest.shards), tokens=sum(s.tokens for s in manifest.shards),
                   source=manifest.source.path if manifest.source else None,
                   source_sha256=manifest.source.sha256 if manifest.source else None,
                   preprocess_fingerprint=manifest.fingerprint)

    def describe(self) -> str:
        made = f"made from {self.source} (sha256 {self.source_sha256[:12]})" if self.source else "synthetic"
        return f"{self.directory}, {made}: {self.samples:,} samples, {self.tokens:,} tokens"


class TrainerState(msgspec.Struct, kw_only=True):
    """trainer_state.json: where the run was, and what it trained."""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    time: float  # when it was saved (time.time())
    progress: Progress
    sampler: dict[str, int]  # MultipackSampler.state_dict(): the planner position
    scheduler: dict[str, Any]  # the learning-rate schedule's state_dict()
    fingerprint: dict[str, str]  # run_fingerprint of the run that saved it
    dataset: DatasetSummary | None = None  # the dataset it trained (None in checkpoints of 0.1.0)


# ------------------------------------------------------------------ fingerprint

def dataset_identity(manifest: Manifest) -> str:
    """The samples a dataset holds, by its shards' checksums (not their names or paths)."""
    return _digest([{"samples": s.samples, "tokens": s.tokens, "checksum": s.checksum} for s in manifest.shards])


def run_fingerprint(args: TrainingArgs, manifest: Manifest | None, world_size: int) -> dict[str, str]:
    """What a resumed run must share with the run that saved, field by field: the model, the
    data, and every setting that shapes the sequence of updates. Settings that do not
    (max_batch_len, checkpoint and logging options, paths) may change between runs:
    lowering max_batch_len after running out of memory is a reason to resume. Without a
    manifest (before the dataset is prepared), everything but the dataset."""
    lora = None if args.lora is None else msgspec.to_builtins(args.lora)
    backend = args.distributed_backend
    layout = {DistributedBackend.FSDP: args.fsdp_options.sharding_strategy.value,
              DistributedBackend.DEEPSPEED: f"ZeRO-{args.deepspeed_options.zero_stage}"}.get(backend, "replicated")
    fingerprint = {
        "model": _model_fingerprint(args.model_path),
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
    if manifest is not None:
        fingerprint["dataset"] = dataset_identity(manifest)
    return fingerprint


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


def check_fingerprint(saved: dict[str, str], ours: dict[str, str], checkpoint: Path, *,
                      saved_dataset: DatasetSummary | None = None, our_dataset: DatasetSummary | None = None) -> None:
    """Raises ResumeError naming every field this run changed (the fields of `ours` only).
    The dataset is named in words when both summaries are known."""
    changed = [k for k in ours if saved.get(k) != ours[k]]
    if changed:
        def words(k: str) -> str:
            if k == "dataset" and saved_dataset is not None and our_dataset is not None:
                return (f"dataset: the checkpoint trained {saved_dataset.describe()}; this run has "
                        f"{our_dataset.describe()}")
            return f"{k}: the checkpoint has {saved.get(k)!r}, this run {ours[k]!r}"

        raise ResumeError(
            f"cannot resume from {checkpoint}: this run differs from the one that saved it "
            f"({'; '.join(words(k) for k in changed)}). Run with the same model, data and settings to resume, or start "
            f"fresh: move {checkpoint.parent} away, or use another ckpt_output_dir")


def encode_trainer_state(state: TrainerState) -> str:
    """The document as written to trainer_state.json (full_state.py writes and syncs it)."""
    return msgspec.json.format(msgspec.json.encode(state)).decode() + "\n"


def read_trainer_state(checkpoint: Path) -> TrainerState:
    path = checkpoint / TRAINER_STATE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ResumeError(f"{path}: unreadable ({e}); the checkpoint is damaged") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
        raise ResumeError(f"{path}: not an instructpack full-state checkpoint of format {FORMAT_VERSION}; move "
                          f"{checkpoint.parent} away to start fresh")
    try:
        return convert_document(data, TrainerState)
    except DocumentError as e:
        raise ResumeError(f"{checkpoint} is damaged ({path.name}: {e})") from None

"""Hugging Face checkpoints: when to write them and how to write them atomically.

Each one is a directory that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load as it is: safetensors weights in the training dtype,
config, generation config, and the tokenizer with the chat template the data was rendered
with. It is written to a temporary sibling and renamed into place, so a crash never leaves
a directory that looks complete.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import DistributedBackend, LoraOptions, TrainingArgs
from ..fileio import replace_directory
from .backends import Backend
from .distributed import World
from .model import hf_model, training_dtype
from .state import write_collectively

log = logging.getLogger(__name__)

HF_FORMAT = "hf_format"
DEEPSPEED_FORMAT = "deepspeed"  # DeepSpeed-native checkpoints (deepspeed_options.save_samples)
LAST = "last_epoch"


@dataclass(frozen=True)
class CheckpointSchedule:
    """`save_samples` becomes a whole number of steps (at least one), so a checkpoint always
    happens: with 64 samples per step, save_samples=100 saves every 2 steps (128 samples)."""
    every_steps: int | None  # None: no sample-based checkpoints
    at_epoch_end: bool
    at_last_step: bool = True

    @classmethod
    def from_args(cls, args: TrainingArgs) -> "CheckpointSchedule":
        return cls.every(args.save_samples, args.effective_batch_size, at_epoch_end=args.checkpoint_at_epoch)

    @classmethod
    def deepspeed_native(cls, args: TrainingArgs) -> "CheckpointSchedule | None":
        """DeepSpeed-native checkpoints every deepspeed_options.save_samples; None when off."""
        save_samples = args.deepspeed_options.save_samples
        if args.distributed_backend != DistributedBackend.DEEPSPEED or not save_samples:
            return None
        return cls.every(save_samples, args.effective_batch_size, at_epoch_end=False)

    @classmethod
    def full_state(cls, args: TrainingArgs) -> "CheckpointSchedule":
        """Full training state: at epoch ends (accelerate_full_state_at_epoch) and every
        full_state_every_steps steps; the end of training is an epoch end."""
        every = args.full_state_every_steps if args.full_state_every_steps > 0 else None
        return cls(every, at_epoch_end=args.accelerate_full_state_at_epoch, at_last_step=False)

    @classmethod
    def every(cls, save_samples: int | None, effective_batch_size: int, *, at_epoch_end: bool) -> "CheckpointSchedule":
        steps = max(1, round(save_samples / effective_batch_size)) if save_samples and save_samples > 0 else None
        return cls(steps, at_epoch_end)

    def due(self, global_step: int, epoch_end: bool, last_step: bool) -> bool:
        """After optimizer step `global_step` (1-based)."""
        return ((last_step and self.at_last_step) or (epoch_end and self.at_epoch_end)
                or (self.every_steps is not None and global_step % self.every_steps == 0))


def checkpoint_dir(ckpt_output_dir: str | Path, total_samples: int, keep_last_only: bool,
                   kind: str = HF_FORMAT) -> Path:
    name = LAST if keep_last_only else f"samples_{total_samples}"
    return Path(ckpt_output_dir) / kind / name


def save_hf_checkpoint(backend: Backend, tokenizer, directory: Path, world: World,
                       lora: LoraOptions | None = None) -> None:
    """Called on every rank (sharded backends gather the weights collectively); rank 0
    writes. A LoRA run writes the adapter and, unless turned off, the merged model."""
    state = backend.full_state_dict()

    def write() -> None:
        tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            if lora is not None:
                from .lora import save_lora_checkpoint
                save_lora_checkpoint(backend.model, state, tokenizer, tmp, save_merged=lora.save_merged_model,
                                     dtype=training_dtype(world.device))
            else:
                _save_model(hf_model(backend.model), state, tmp, training_dtype(world.device))
                tokenizer.save_pretrained(tmp)
            replace_directory(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("saved checkpoint %s", directory)

    # Rank 0 writes; if it fails (a full disk), every rank raises instead of waiting for it.
    write_collectively(write, world, directory, main_only=True,
                       kept="earlier checkpoints are intact (each is written aside and renamed into place)")


def _save_model(model: torch.nn.Module, state: dict[str, torch.Tensor], directory: Path,
                dtype: torch.dtype) -> None:
    """The weights in `dtype` (bf16 on GPUs, not the fp32 master weights that FSDP2 and DDP
    train: half the size), without a second copy of tied weights, and a config that says so."""
    state = {k: v.to(device="cpu", dtype=dtype) if v.is_floating_point() else v
             for k, v in without_tied_copies(model, state).items()}
    config = model.config
    use_cache, config.use_cache = config.use_cache, True  # trained without; generate with
    try:
        model.save_pretrained(directory, state_dict=state, safe_serialization=True)
    finally:
        config.use_cache = use_cache
    # save_pretrained writes the live model's dtype (fp32 masters) into config.json; loaders
    # with dtype="auto" (transformers, vLLM) must see what the file holds.
    path = directory / "config.json"
    saved = json.loads(path.read_text())
    keys = [k for k in ("dtype", "torch_dtype") if k in saved] or ["dtype"]  # torch_dtype: transformers 4
    saved.update(dict.fromkeys(keys, str(dtype).removeprefix("torch.")))
    path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def without_tied_copies(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A gathered state dict holds a separate copy of each tied weight (an output layer tied
    to the input embeddings) under every name. `save_pretrained` drops ties only when the
    tensors share storage, so the checkpoint would carry the copy; keep the first name."""
    first: dict[int, str] = {}
    copies = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(param), name) != name:
            copies.add(name)
    return {k: v for k, v in state.items() if k not in copies}

"""Hugging Face checkpoints: directories that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load as they are: safetensors weights in the run's compute
dtype (train/precision.py), config, generation config, and the tokenizer with the chat
template the data was rendered with. A LoRA run writes the adapter and, unless turned off,
the merged model (lora_export.py). Each is written to a temporary sibling and renamed into
place, so a crash never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ...config import LoraOptions
from ...fileio import directory_written_aside, remove_stale_temporaries
from ..backends import Backend
from ..distributed import World
from ..model.layers import hf_model
from .collective import write_collectively
from .lora_export import save_lora_checkpoint

log = logging.getLogger(__name__)


def save_hf_checkpoint(backend: Backend, tokenizer, directory: Path, world: World,
                       lora: LoraOptions | None = None) -> None:
    """Called on every rank (sharded backends gather the weights collectively); rank 0
    writes. A LoRA run writes the adapter and, unless turned off, the merged model."""
    state = backend.gather_weights()
    dtype = backend.precision.checkpoint

    def write() -> None:
        remove_stale_temporaries(directory)  # left by a run that was killed while saving
        with directory_written_aside(directory) as tmp:
            if lora is not None:
                save_lora_checkpoint(backend.model, state, tokenizer, tmp, save_merged=lora.save_merged_model,
                                     dtype=dtype)
            else:
                _save_model(hf_model(backend.model), state, tmp, dtype)
                tokenizer.save_pretrained(tmp)
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

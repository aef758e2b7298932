"""LoRA checkpoints: from the full state dict the backend gathered on rank 0, the adapter
(for `peft.PeftModel.from_pretrained`) and, unless told not to, the base model with the
adapter merged in, in full precision (for `transformers` alone).

- `save_lora_checkpoint`: writes both (called by hf.save_hf_checkpoint).
- `merge_lora_state_dict`: the merge, as a pure function of the state dict.

This side never reads the live model's weights, which may be sharded (FSDP2, ZeRO-3): the
model only supplies configurations and classes.
"""

from __future__ import annotations

import copy
import logging
import math
import re
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."  # the HF model's keys inside a PeftModel's state dict
ADAPTER_DIR = "adapter"  # where the adapter goes when the merged model takes the top level

# Keys bitsandbytes stores beside a 4-bit weight `<name>.weight` (Linear4bit._save_to_state_dict).
_QUANT_SUFFIX = re.compile(r"^(.*\.weight)\.(absmax|quant_map|nested_absmax|nested_quant_map|"
                           r"quant_state\.bitsandbytes__(?:nf4|fp4))$")


def merge_lora_state_dict(state: dict[str, torch.Tensor], peft_config, *, adapter_name: str = "default",
                          dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A peft model's full state dict as the base model's, with each adapter merged in:
    W + scaling * B @ A (scaling = alpha / r, or alpha / sqrt(r) with rsLoRA; per-module
    rank_pattern/alpha_pattern respected), computed in fp32 and cast to `dtype` (floating
    tensors; default: the base weight's dtype, for 4-bit ones the dtype they were quantized
    from). `modules_to_save` copies replace the originals. bitsandbytes 4-bit weights (packed uint8 and their quant
    state entries) are dequantized from the state dict alone, so the result holds plain
    full-precision tensors. Tied weights are left as they come (both keys when both are
    given); `save_lora_checkpoint` decides whether the tie still holds."""
    if getattr(peft_config, "use_dora", False):
        raise NotImplementedError("merging DoRA adapters is not supported")
    if getattr(peft_config, "lora_bias", False):
        raise NotImplementedError("merging LoRA adapters with a bias (lora_bias) is not supported")
    plain = {k.removeprefix(PEFT_PREFIX): v for k, v in state.items()}
    quantized = _group_quant_states(plain)
    a_tag, b_tag = f".lora_A.{adapter_name}.weight", f".lora_B.{adapter_name}.weight"
    ea_tag, eb_tag = f".lora_embedding_A.{adapter_name}", f".lora_embedding_B.{adapter_name}"
    save_tag = f".modules_to_save.{adapter_name}."

    def cast(t: torch.Tensor, like: torch.dtype) -> torch.Tensor:
        return t.to(dtype or like) if t.is_floating_point() else t

    def scaling(module: str, r: int) -> float:
        alpha = peft_config.lora_alpha
        for pattern, value in (getattr(peft_config, "alpha_pattern", None) or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = value
                break
        return alpha / math.sqrt(r) if getattr(peft_config, "use_rslora", False) else alpha / r

    out: dict[str, torch.Tensor] = {}
    for key, value in plain.items():
        if key in quantized.companions:
            continue
        if ".lora_" in key:
            if not (key.endswith((a_tag, b_tag, ea_tag, eb_tag))):
                raise NotImplementedError(f"cannot merge {key!r} (another adapter or an unsupported LoRA kind)")
            continue
        if ".original_module." in key:
            continue  # replaced by its modules_to_save copy
        if ".modules_to_save." in key:
            if save_tag in key:
                out[key.replace(save_tag, ".")] = cast(value, value.dtype)
            continue
        if ".trainable_tokens_" in key or ".token_adapter." in key:
            raise NotImplementedError(f"cannot merge {key!r}: trainable tokens are not supported")
        if key in quantized.states:
            value = _dequantize_4bit(value, quantized.states[key])
        native = value.dtype
        if ".base_layer." not in key:
            out[key] = cast(value, native)
            continue
        module, _, param = key.partition(".base_layer.")
        target = f"{module}.{param}"
        if param != "weight":
            out[target] = cast(value, native)
            continue
        linear = (plain.get(module + a_tag), plain.get(module + b_tag))
        embedding = (plain.get(module + ea_tag), plain.get(module + eb_tag))
        if linear[0] is not None and linear[1] is not None:
            a, b = linear
            delta = b.float() @ a.float()
            if getattr(peft_config, "fan_in_fan_out", False):
                delta = delta.T
        elif embedding[0] is not None and embedding[1] is not None:
            a, b = embedding  # A: r x vocabulary, B: hidden x r
            delta = (b.float() @ a.float()).T
        else:
            raise ValueError(f"{key!r} has no {adapter_name!r} adapter weights in the state dict")
        if delta.shape != value.shape:
            raise ValueError(f"adapter of {module!r} has shape {tuple(delta.shape)}, "
                             f"its weight {tuple(value.shape)}")
        merged = value.float() + scaling(module, a.shape[0]) * delta.to(value.device)
        out[target] = cast(merged, native)
    return out


class _QuantStates:
    def __init__(self):
        self.states: dict[str, dict[str, torch.Tensor]] = {}  # weight key -> its quant state entries
        self.companions: set[str] = set()


def _group_quant_states(state: dict[str, torch.Tensor]) -> _QuantStates:
    found = _QuantStates()
    for key in state:
        m = _QUANT_SUFFIX.match(key)
        if m:
            found.states.setdefault(m.group(1), {})[m.group(2)] = state[key]
            found.companions.add(key)
    for weight, entries in found.states.items():
        if weight not in state or not any(k.startswith("quant_state.") for k in entries):
            raise ValueError(f"incomplete bitsandbytes 4-bit state for {weight!r}: {sorted(entries)}")
    return found


def _dequantize_4bit(packed: torch.Tensor, entries: dict[str, torch.Tensor]) -> torch.Tensor:
    """A bitsandbytes 4-bit weight as a full-precision tensor (its original dtype), from the
    entries `Linear4bit` writes to a state dict."""
    import bitsandbytes.functional as bnbf

    quant_state = bnbf.QuantState.from_dict(dict(entries), device=packed.device)
    return bnbf.dequantize_4bit(packed, quant_state)


def save_lora_checkpoint(model: torch.nn.Module, state: dict[str, torch.Tensor], tokenizer, directory: Path, *,
                         save_merged: bool, dtype: torch.dtype) -> None:
    """Rank 0 only; `state` is the peft model's full state dict (gathered, on the CPU) and
    `directory` exists (a temporary one). With `save_merged`: the merged model in Hugging
    Face format at `directory` (weights in `dtype`, no quantization config, `use_cache` on)
    and the adapter in `directory/adapter`; else the adapter alone at `directory`. The
    tokenizer goes wherever an adapter or model goes."""
    directory = Path(directory)
    # Under DDP the state is the live model's, on the GPU: merging there would allocate a
    # full-precision copy of every adapted weight next to training's memory.
    state = {k: v.detach().cpu() for k, v in state.items()}
    peft_model = _peft_model(model)
    adapter_name = peft_model.active_adapter
    peft_config = peft_model.peft_config[adapter_name]
    adapter_dir = directory / ADAPTER_DIR if save_merged else directory
    _save_adapter(peft_model, state, adapter_dir, adapter_name)
    tokenizer.save_pretrained(adapter_dir)
    if save_merged:
        merged = merge_lora_state_dict(state, peft_config, adapter_name=adapter_name, dtype=dtype)
        _save_merged(peft_model.get_base_model(), merged, directory, dtype)
        tokenizer.save_pretrained(directory)


def _save_adapter(peft_model, state: dict[str, torch.Tensor], directory: Path, adapter_name: str) -> None:
    """What `PeftModel.save_pretrained` writes (adapter_config.json, adapter_model.safetensors),
    from the given state dict and always at `directory` whatever the adapter's name. Resized
    embeddings are saved with the adapter (peft's "auto"), since the base model lacks them."""
    from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    weights = get_peft_model_state_dict(peft_model, state_dict=state, adapter_name=adapter_name,
                                        save_embedding_layers="auto")
    seen: set[tuple[int, int]] = set()
    for name, tensor in weights.items():  # safetensors refuses shared storage
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        tensor = tensor.detach().cpu().contiguous()
        weights[name] = tensor.clone() if ident in seen else tensor
        seen.add(ident)
    save_file(weights, str(directory / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    config = copy.deepcopy(peft_model.peft_config[adapter_name])
    config.inference_mode = True
    if not config.base_model_name_or_path:
        config.base_model_name_or_path = getattr(peft_model.get_base_model(), "name_or_path", None) or None
    config.save_pretrained(str(directory))


def _save_merged(base: torch.nn.Module, merged: dict[str, torch.Tensor], directory: Path, dtype: torch.dtype) -> None:
    """`save_pretrained` of a weightless (meta) copy of the base model's class and config,
    with the merged weights: transformers writes them as it writes any checkpoint (sharding,
    tied weights, its own key conventions), with a config free of quantization."""
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.use_cache = True
    if _ties_broken(base, config, merged):
        log.warning("the adapter changed the input embeddings and the output layer differently: "
                    "the merged model unties them (tie_word_embeddings=False)")
        config.tie_word_embeddings = False
    # The constructor, not _from_config, which would partition the copy under DeepSpeed ZeRO-3
    # (collectives on rank 0 alone); save_pretrained writes the parameters' dtype into the config.
    with torch.device("meta"):
        fresh = type(base)(config).to(dtype)
    if getattr(base, "generation_config", None) is not None:
        fresh.generation_config = copy.deepcopy(base.generation_config)
    fresh.save_pretrained(directory, state_dict=merged, safe_serialization=True)


def _ties_broken(base: torch.nn.Module, config, merged: dict[str, torch.Tensor]) -> bool:
    """Whether a model that ties its output layer to its input embeddings ends up with two
    different matrices (e.g. one of them was in modules_to_save or adapted)."""
    if not getattr(config, "tie_word_embeddings", False):
        return False
    ties = getattr(base, "_tied_weights_keys", None) or {}
    if not isinstance(ties, dict):
        return False
    for target, source in ties.items():
        if target in merged and source in merged and not torch.equal(merged[target], merged[source]):
            return True
    return False


def _peft_model(model: torch.nn.Module):
    """The PeftModel inside DDP/DeepSpeed wrappers (FSDP2 keeps the class)."""
    while not hasattr(model, "peft_config") and hasattr(model, "module"):
        model = model.module
    if not hasattr(model, "peft_config"):
        raise TypeError(f"{type(model).__name__} is not a peft model")
    return model

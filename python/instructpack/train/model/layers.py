"""Finding one's way in a (wrapped) transformers model: the model inside DDP, DeepSpeed and
peft wrappers, and its repeated decoder blocks (FSDP2's units of sharding, where LoRA looks
for projections, what activation checkpointing recomputes)."""

from __future__ import annotations

import torch


def hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a DDP/DeepSpeed wrapper (`.module`) and a peft wrapper."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model (its `_no_split_modules` names their class)."""
    names = set(getattr(hf_model(model), "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"cannot find the decoder layers of {type(hf_model(model)).__name__} "
                         f"(_no_split_modules: {sorted(names)})")
    return layers


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each layer's activations in the backward pass. Non-reentrant checkpointing
    works with DDP/FSDP and with frozen inputs (LoRA). transformers 5.2x renamed the method;
    the old name still works but warns."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

"""LoRA and QLoRA: low-rank adapters on a frozen (optionally 4-bit) base model.

- `quantization_config`: the bitsandbytes NF4 settings the loader passes to `from_pretrained`.
- `default_target_modules`: the projection layers of the decoder blocks, found in the model.
- `apply_lora`: freezes the base model and wraps it in a peft model with trainable adapters.

Saving (the adapter, and the base model with it merged in) is checkpoints/lora_export.py.
peft is imported inside the functions that use it: it takes seconds to import, and full
fine-tunes never need it.
"""

from __future__ import annotations

import logging

import torch

from ...config import LoraOptions, QuantizeDataType
from .layers import decoder_layers, enable_activation_checkpointing, hf_model

log = logging.getLogger(__name__)


def quantization_config(options: LoraOptions | None, compute_dtype: torch.dtype):
    """bitsandbytes 4-bit NormalFloat with double quantization, computing in the run's compute
    dtype (train/precision.py: bf16 on CUDA, fp32 on the CPU); None without QLoRA."""
    if options is None or options.quantization is None:
        return None
    if options.quantization != QuantizeDataType.NF4:
        raise ValueError(f"unsupported quantize_data_type {options.quantize_data_type!r}")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def default_target_modules(model: torch.nn.Module) -> list[str]:
    """The distinct names of the linear layers inside the decoder blocks (model.decoder_layers):
    the attention and MLP projections, never the embeddings or the output layer, nor a
    mixture-of-experts gate (a linear layer with one output per expert, or a single one).
    bitsandbytes' Linear4bit/Linear8bitLt are nn.Linear."""
    config = hf_model(model).config
    gates = {1} | {getattr(config, k, None) for k in ("num_experts", "num_local_experts", "n_routed_experts")}
    names: list[str] = []
    for block in decoder_layers(model):
        for name, module in block.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(module, torch.nn.Linear) and module.out_features not in gates and leaf not in names:
                names.append(leaf)
    if not names:
        raise ValueError(f"found no linear layers in the decoder blocks of {type(hf_model(model)).__name__}; "
                         "set lora.target_modules")
    return names


def is_quantized(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
                or getattr(model, "is_quantized", False))


def keep_4bit_layout(model: torch.nn.Module) -> None:
    """Stops bitsandbytes from repacking 4-bit weights for its CPU inference kernel. On CPUs
    with AVX512-BF16, a Linear4bit called in eval mode on an input without gradient rewrites
    its weight in place (absmax rounded to bf16) and computes in bf16; `state_dict()` later
    undoes it only approximately (absmax quantized afresh). The frozen base would drift a
    little with every evaluation and checkpoint, and eval outputs would not be those of the
    dequantized weights that training and the merged checkpoint use."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def apply_lora(model: torch.nn.Module, options: LoraOptions, *, gradient_checkpointing: bool):
    """Freezes `model` and adds LoRA adapters (a `peft.PeftModel`; adapter weights in fp32).

    A quantized model first goes through `peft.prepare_model_for_kbit_training`, minus its
    side effect on dtypes: it casts every fp16/bf16 parameter that is not 4-bit (embeddings,
    norms, output layer) to fp32, which would double their memory and run the residual
    stream in fp32 under a bf16 run. Those parameters go back to the dtype they were loaded
    in. bitsandbytes' CPU inference repacking is turned off (`keep_4bit_layout`). Gradient
    checkpointing, when asked, is the non-reentrant kind, which back-propagates
    into adapters inside a checkpointed layer although the layer's input needs no gradient."""
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    if options.rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {options.rank}")
    if is_quantized(model):
        dtypes = {name: p.dtype for name, p in model.named_parameters()}
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        for name, p in model.named_parameters():
            if p.dtype != dtypes[name]:
                p.data = p.data.to(dtypes[name])
        keep_4bit_layout(model)
    if gradient_checkpointing:
        enable_activation_checkpointing(model)
    targets = list(options.target_modules) if options.target_modules else default_target_modules(model)
    config = LoraConfig(r=options.rank, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=targets, bias="none", task_type=TaskType.CAUSAL_LM)
    peft_model = get_peft_model(model, config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info("%s r=%d alpha=%d dropout=%g on %s: %s of %s parameters trainable (%.3f%%)",
             "QLoRA (nf4)" if is_quantized(model) else "LoRA", options.rank, options.alpha, options.dropout,
             ",".join(targets), f"{trainable:,}", f"{total:,}", 100.0 * trainable / max(total, 1))
    return peft_model

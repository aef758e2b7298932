"""The model and tokenizer a run trains: loaded once per process, set up for packed rows."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from ..config import DistributedBackend, TrainingArgs
from . import attention

log = logging.getLogger(__name__)


def choose_attention(device: torch.device, disable_flash_attn: bool) -> str:
    """flash_attention_2 (varlen kernels, packed rows natively) on CUDA when the package is
    installed and not disabled; else per-sample SDPA (see attention.py)."""
    if device.type == "cuda" and not disable_flash_attn and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return attention.NAME


def training_dtype(device: torch.device) -> torch.dtype:
    # bf16 where the hardware has it; fp32 on CPU, where bf16 matmuls are slow and inexact.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_dtype(args: TrainingArgs, device: torch.device) -> torch.dtype:
    """The dtype the weights are loaded (and kept) in. On the CPU, fp32. On GPUs, a full
    fine-tune under FSDP2 or DDP keeps fp32 master weights and computes in bf16 (FSDP2's
    mixed-precision policy; autocast under DDP): AdamW's updates are often below bf16's
    resolution (8 bits of mantissa) and would be rounded away. DeepSpeed keeps its own fp32
    masters of a bf16 model. LoRA freezes the base, which then stays bf16 under DDP (the
    adapters are fp32); FSDP2 shards it in fp32 like any other weight."""
    if device.type != "cuda":
        return torch.float32
    if args.distributed_backend == DistributedBackend.DEEPSPEED:
        return torch.bfloat16
    if args.lora is not None and args.distributed_backend != DistributedBackend.FSDP:
        return torch.bfloat16
    return torch.float32


def autocast_dtype(args: TrainingArgs, device: torch.device) -> torch.dtype | None:
    """bf16 autocast for the forward pass where fp32 weights are not cast by the backend
    itself (DDP or one process on a GPU); None elsewhere."""
    if device.type == "cuda" and args.distributed_backend == DistributedBackend.DDP \
            and load_dtype(args, device) == torch.float32:
        return torch.bfloat16
    return None


def load_model(args: TrainingArgs, device: torch.device, vocab_size: int | None = None, *,
               weights: bool = True) -> torch.nn.Module:
    """`from_pretrained` in the training dtype and attention, without a KV cache (a cache
    disables transformers' packed-row detection), with gradient checkpointing if asked,
    and LoRA adapters (over 4-bit base weights for QLoRA) when `args.lora` is set. On
    `device`, except under FSDP2, which moves it there once sharded.
    `vocab_size`: the tokenizer's; embeddings grow to cover it when the model's are smaller.
    `weights=False`: the same model on the meta device, without reading the weights (FSDP2
    ranks other than 0, which receive their shards from rank 0).
    Weights load from safetensors only: a directory with only pickled weights
    (pytorch_model.bin) raises OSError instead of unpickling them (unpickling can run code).
    A model's own modelling code (config.json "auto_map") runs only with args.trust_remote_code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    impl = choose_attention(device, args.disable_flash_attn)
    if args.lora is not None:
        from . import lora  # peft takes seconds to import; full fine-tunes skip it
    quantization = lora.quantization_config(args.lora, device) if args.lora is not None else None
    placement = {"quantization_config": quantization, "device_map": {"": device}} if quantization else {}
    if weights:
        model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=load_dtype(args, device),
                                                     attn_implementation=impl, use_safetensors=True,
                                                     trust_remote_code=args.trust_remote_code, **placement)
    else:
        config = AutoConfig.from_pretrained(args.model_path, trust_remote_code=args.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=load_dtype(args, device), attn_implementation=impl,
                                                     trust_remote_code=args.trust_remote_code)
    model.config.use_cache = False
    embeddings = model.get_input_embeddings().num_embeddings
    if vocab_size is not None and vocab_size > embeddings:
        log.warning("the tokenizer has %d tokens and the model's embeddings %d rows: growing the embeddings "
                    "(to a multiple of 8)", vocab_size, embeddings)
        # On the meta device there are no rows to average: rank 0's resized rows arrive later.
        model.resize_token_embeddings(vocab_size, pad_to_multiple_of=8, mean_resizing=weights)
    if args.gradient_checkpointing and args.lora is None:  # apply_lora turns it on after preparing the model
        enable_activation_checkpointing(model)
    log.info("model %s: %.1fM parameters, %s, attention %s, gradient checkpointing %s", args.model_path,
             sum(p.numel() for p in model.parameters()) / 1e6, load_dtype(args, device), impl,
             "on" if args.gradient_checkpointing else "off")
    if args.lora is not None:
        model = lora.apply_lora(model, args.lora, gradient_checkpointing=args.gradient_checkpointing)
    # A quantized model is already placed (and refuses .to()). FSDP2 places the model
    # itself after sharding, so a GPU only ever receives this process's shards.
    if not quantization and args.distributed_backend != DistributedBackend.FSDP:
        model = model.to(device)
    return model.train()


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each layer's activations in the backward pass. Non-reentrant checkpointing
    works with DDP/FSDP and with frozen inputs (LoRA). transformers 5.2x renamed the method;
    the old name still works but warns."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a DDP/DeepSpeed wrapper (`.module`) and a peft wrapper."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model (its `_no_split_modules` names their
    class): FSDP2's units of sharding, and where LoRA looks for projections."""
    names = set(getattr(hf_model(model), "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"cannot find the decoder layers of {type(hf_model(model)).__name__} "
                         f"(_no_split_modules: {sorted(names)})")
    return layers


def load_tokenizer(args: TrainingArgs):
    """The model's tokenizer; a chat_tmpl_path template replaces its own, so the saved
    checkpoint renders conversations exactly as the training data was rendered."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_path, trust_remote_code=args.trust_remote_code)
    if args.chat_tmpl_path:
        tokenizer.chat_template = Path(args.chat_tmpl_path).read_text(encoding="utf-8")
    return tokenizer

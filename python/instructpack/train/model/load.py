"""The model and tokenizer a run trains: loaded once per process, set up for packed rows."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from pathlib import Path

import torch

from ...config import DistributedBackend, TrainingArgs
from ...data.template_module import looks_like_module, read_template_module, setup_tokenizer
from ..precision import Precision, decide_precision
from . import attention, liger, lora, moe
from .layers import enable_activation_checkpointing

log = logging.getLogger(__name__)


def choose_attention(device: torch.device, disable_flash_attn: bool, model_class: type | None = None) -> str:
    """flash_attention_2 (varlen kernels, packed rows natively) on CUDA when it works (see
    `flash_attn_2_unusable`), is not disabled and the model supports it; else "sdpa_packed"
    (torch's own varlen attention on CUDA in bf16/fp16, per-sample SDPA elsewhere), or the
    model's own eager attention per sample where it has no SDPA (GPT-OSS; attention.py)."""
    packed = attention.name_for(model_class) if model_class is not None else attention.NAME
    if device.type != "cuda" or disable_flash_attn or not getattr(model_class, "_supports_flash_attn", True):
        return packed
    why = flash_attn_2_unusable()
    if why is None:
        return "flash_attention_2"
    if why != NOT_INSTALLED:  # installed but not usable: say so, once per process
        _warn_once(f"flash-attn is installed but not used: {why}; attention runs as {packed} (torch's own "
                   "variable-length attention)")
    return packed


NOT_INSTALLED = "flash-attn is not installed"


def flash_attn_2_unusable() -> str | None:
    """Why flash_attention_2 cannot run here, or None when it can: transformers' own check
    (the flash-attn 2 distribution, >= 2.3.3, CUDA), and its CUDA extension must import. A
    flash-attn built for another torch fails only there (undefined symbols), and FA4 alone
    ships a `flash_attn` package without FA2's kernels: picking it on the package alone
    would crash every rank after the weights load."""
    from transformers.utils import is_flash_attn_2_available

    if importlib.util.find_spec("flash_attn") is None:
        return NOT_INSTALLED
    if not is_flash_attn_2_available():
        return "transformers does not find a usable flash-attn 2 (FA2 >= 2.3.3 with CUDA; FA3/FA4 alone are not FA2)"
    try:
        importlib.import_module("flash_attn_2_cuda")  # the compiled kernels flash_attn_varlen_func calls
    except Exception as exc:  # noqa: BLE001 - ImportError or OSError from a library built for another torch
        return f"its CUDA kernels do not load ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    return None


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning("%s", message)


def _model_class(config) -> type | None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:  # a model of its own code (trust_remote_code)
        return None


def load_model(args: TrainingArgs, device: torch.device, vocab_size: int | None = None, *,
               weights: bool = True, precision: Precision | None = None) -> torch.nn.Module:
    """`from_pretrained` in the training dtype and attention, without a KV cache (a cache
    disables transformers' packed-row detection), with gradient checkpointing if asked,
    and LoRA adapters (over 4-bit base weights for QLoRA) when `args.lora` is set. On
    `device`, except under FSDP2, which moves it there once sharded.
    `vocab_size`: the tokenizer's; embeddings grow to cover it when the model's are smaller.
    `weights=False`: the same model on the meta device, without reading the weights (FSDP2
    ranks other than 0, which receive their shards from rank 0).
    Weights load from safetensors only: a directory with only pickled weights
    (pytorch_model.bin) raises OSError instead of unpickling them (unpickling can run code).
    A model's own modelling code (config.json "auto_map") runs only with args.trust_remote_code.
    `precision`: the run's (default: decided from args and the device, as the worker does)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    precision = precision or decide_precision(args, device)
    config = AutoConfig.from_pretrained(args.model_path, trust_remote_code=args.trust_remote_code)
    impl = choose_attention(device, args.disable_flash_attn, _model_class(config))
    quantization = lora.quantization_config(args.lora, precision.compute)
    placement = {"quantization_config": quantization, "device_map": {"": device}} if quantization else {}
    # ZeRO-3 partitions the model while it loads (backends/deepspeed.py); a 4-bit base cannot be.
    zero3 = args.distributed_backend == DistributedBackend.DEEPSPEED and args.deepspeed_options.zero_stage == 3 \
        and weights and not quantization
    loading = contextlib.nullcontext()
    if zero3:
        from ..backends.deepspeed import partitioned_at_load  # imports DeepSpeed: only when asked

        loading = partitioned_at_load(args, device, precision)
    with loading:
        if weights:
            model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=precision.weights,
                                                         attn_implementation=impl, use_safetensors=True,
                                                         trust_remote_code=args.trust_remote_code, **placement)
        else:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=precision.weights, attn_implementation=impl,
                                                         trust_remote_code=args.trust_remote_code)
        model.config.use_cache = False
        embeddings = model.get_input_embeddings().num_embeddings
        if vocab_size is not None and vocab_size > embeddings:
            log.warning("the tokenizer has %d tokens and the model's embeddings %d rows: growing the embeddings "
                        "(to a multiple of 8)", vocab_size, embeddings)
            # On the meta device there are no rows to average: rank 0's resized rows arrive later.
            # Under ZeRO-3 transformers gathers the partitioned rows to resize them.
            model.resize_token_embeddings(vocab_size, pad_to_multiple_of=8, mean_resizing=weights)
    moe.freeze_routers(model, args.freeze_router)
    if args.use_liger:
        liger.apply_liger(model)
    if args.gradient_checkpointing and args.lora is None:  # apply_lora turns it on after preparing the model
        enable_activation_checkpointing(model)
    log.info("model %s: %.1fM parameters%s, %s, attention %s, gradient checkpointing %s", args.model_path,
             sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()) / 1e6,
             ", partitioned by ZeRO-3 as it loaded" if zero3 else "", precision.weights, impl,
             "on" if args.gradient_checkpointing else "off")
    if args.lora is not None:
        model = lora.apply_lora(model, args.lora, gradient_checkpointing=args.gradient_checkpointing)
    # A quantized model is already placed (and refuses .to()); a ZeRO-3 one too, partitioned.
    # FSDP2 places the model itself after sharding, so a GPU only ever receives this
    # process's shards.
    if not quantization and not zero3 and args.distributed_backend != DistributedBackend.FSDP:
        model = model.to(device)
    return model.train()


def load_tokenizer(args: TrainingArgs):
    """The model's tokenizer; a chat_tmpl_path template replaces its own, so the saved
    checkpoint renders conversations exactly as the training data was rendered. An InstructLab
    template module also registers its special tokens, as preprocessing did (the launcher
    checked that the dataset was made with this template)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_path, trust_remote_code=args.trust_remote_code)
    if args.chat_tmpl_path:
        path = Path(args.chat_tmpl_path)
        text = path.read_text(encoding="utf-8")
        if looks_like_module(path, text):
            return setup_tokenizer(tokenizer, read_template_module(path))
        tokenizer.chat_template = text
    return tokenizer

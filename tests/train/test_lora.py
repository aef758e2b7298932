"""LoRA and QLoRA (train/model/lora.py, train/checkpoints/lora_export.py): target modules,
trainable parameters, the merge, checkpoints (adapter for peft, merged model for transformers
alone), gradient checkpointing, and NF4 on the CPU. Tiny models built from configs, fp32, one
process."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import torch

from instructpack import LoraOptions, TrainingArgs
from instructpack.demo.example import build_tiny_model
from instructpack.train.checkpoints import lora_export
from instructpack.train.model import lora
from instructpack.train.precision import decide_precision

PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def tiny_config(arch: str, vocab: int = 600, tie: bool = False):
    import transformers

    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie)
    if arch == "Qwen3":
        kw["head_dim"] = 16
    return getattr(transformers, f"{arch}Config")(**kw), getattr(transformers, f"{arch}ForCausalLM")


@pytest.fixture(scope="module")
def models(tokenizer_dirs, tmp_path_factory) -> dict[str, Path]:
    """A tied Llama (the examples' tiny model, with its tokenizer) and an untied Qwen3."""
    root = tmp_path_factory.mktemp("lora_models")
    llama = build_tiny_model(root / "llama", tokenizer_dirs["chatml"], seed=1)
    config, cls = tiny_config("Qwen3", tie=False)
    torch.manual_seed(2)
    cls(config).save_pretrained(root / "qwen3")
    return {"llama": llama, "qwen3": root / "qwen3"}


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dirs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dirs["chatml"])


def load(path, quantize: bool = False, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    kw = {}
    if quantize:
        kw = dict(quantization_config=lora.quantization_config(LoraOptions(quantize_data_type="nf4"), torch.float32),
                  device_map={"": CPU})
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    if quantize:
        lora.keep_4bit_layout(model)  # as apply_lora does: no bf16 CPU repacking in eval
    return model


def batch(seed: int = 0, vocab: int = 600) -> torch.Tensor:
    # Two rows repeating a short pattern: learnable in a few steps.
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (2, 6), generator=g).repeat(1, 4)


def loss_of(model, ids) -> torch.Tensor:
    return model(input_ids=ids, labels=ids, use_cache=False).loss


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids, use_cache=False).logits


def perturb_b(peft_model, seed: int = 0) -> None:
    """Fresh adapters are a no-op (B = 0): give B values so that merges show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def train(peft_model, ids, steps: int, lr: float = 1e-2) -> list[float]:
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_of(peft_model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


OPTIONS = LoraOptions(rank=8, alpha=16, dropout=0.0)


# -- target modules ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["Llama", "Qwen2", "Qwen3", "Mistral", "Granite"])
def test_default_target_modules(arch):
    config, cls = tiny_config(arch)
    with torch.device("meta"):
        model = cls(config)
    found = lora.default_target_modules(model)
    assert set(found) == PROJECTIONS and len(found) == 7


def test_default_target_modules_skip_mixture_of_experts_gates():
    """Qwen2-MoE: the shared expert's scalar gate is a linear layer but not a projection (in
    transformers 5 the router and the experts are not nn.Linear at all)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen2_moe", vocab_size=100, hidden_size=64, intermediate_size=128,
                                  moe_intermediate_size=32, shared_expert_intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert any(n.endswith("shared_expert_gate") for n, _ in model.named_modules())
    assert set(lora.default_target_modules(model)) == PROJECTIONS


def test_default_target_modules_of_4bit_model(models):
    from bitsandbytes.nn import Linear4bit

    model = load(models["qwen3"], quantize=True)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear4bit)
    assert set(lora.default_target_modules(model)) == PROJECTIONS


def test_explicit_target_modules(models):
    options = LoraOptions(rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    peft_model = lora.apply_lora(load(models["qwen3"]), options, gradient_checkpointing=False)
    adapted = {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "v_proj"}
    assert peft_model.peft_config["default"].r == 4 and peft_model.peft_config["default"].lora_alpha == 8


def test_quantization_config():
    def compute(device: torch.device) -> torch.dtype:  # what the worker passes: the run's compute dtype
        qlora = TrainingArgs(model_path="m", data_path="d", ckpt_output_dir="c", data_output_dir="o", max_seq_len=8,
                             max_batch_len=8, effective_batch_size=8, learning_rate=1e-3, distributed_backend="ddp",
                             lora={"rank": 4, "quantize_data_type": "nf4"})
        return decide_precision(qlora, device).compute

    assert lora.quantization_config(None, compute(CPU)) is None
    assert lora.quantization_config(LoraOptions(), compute(CPU)) is None
    q = lora.quantization_config(LoraOptions(quantize_data_type="nf4"), compute(CPU))
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.float32
    cuda = lora.quantization_config(LoraOptions(quantize_data_type="nf4"), compute(torch.device("cuda")))
    assert cuda.bnb_4bit_compute_dtype == torch.bfloat16


# -- training ---------------------------------------------------------------------------------------------

def test_only_adapters_train_and_loss_falls(models, caplog):
    with caplog.at_level(logging.INFO, logger="instructpack.train.model.lora"):
        peft_model = lora.apply_lora(load(models["llama"]), OPTIONS, gradient_checkpointing=False)
    assert any("trainable" in r.getMessage() for r in caplog.records)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == PROJECTIONS
    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    losses = train(peft_model, batch(), steps=8)
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(torch.equal(p, frozen[n]) for n, p in peft_model.named_parameters() if not p.requires_grad)


def test_gradient_checkpointing_gives_the_same_gradients(models):
    ids = batch(3)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same A initialisation
        peft_model = lora.apply_lora(load(models["qwen3"]), LoraOptions(rank=4, alpha=8, dropout=0.1),
                                     gradient_checkpointing=checkpointing)
        assert peft_model.get_base_model().is_gradient_checkpointing == checkpointing
        perturb_b(peft_model)
        peft_model.train()
        torch.manual_seed(1)  # the same dropout masks (checkpointing replays the RNG)
        loss_of(peft_model, ids).backward()
        grads.append({n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert all(g is not None and g.abs().sum() > 0 for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


# -- merge ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_merged_state_dict_matches_the_peft_model(models, name):
    from transformers import AutoConfig, AutoModelForCausalLM

    peft_model = lora.apply_lora(load(models[name]), OPTIONS, gradient_checkpointing=False)
    perturb_b(peft_model)
    ids = batch(1)
    expected = logits(peft_model, ids)
    merged = lora_export.merge_lora_state_dict(peft_model.state_dict(), peft_model.peft_config["default"])
    assert not any("lora_" in k or "base_layer" in k or k.startswith("base_model.") for k in merged)
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(models[name]), dtype=torch.float32)
    assert set(merged) == set(fresh.state_dict())
    fresh.load_state_dict(merged, strict=True)
    torch.testing.assert_close(logits(fresh, ids), expected, rtol=1e-5, atol=1e-5)
    unloaded = peft_model.merge_and_unload()
    for key, value in unloaded.state_dict().items():
        torch.testing.assert_close(merged[key], value, rtol=1e-6, atol=1e-6)


def test_merge_handles_modules_to_save_and_untie(models, tmp_path, tokenizer):
    """An lm_head trained in full (modules_to_save) breaks the Llama's tie: the merged
    model is saved untied, with the trained output layer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = load(models["llama"])
    assert base.config.tie_word_embeddings
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 modules_to_save=["lm_head"], task_type="CAUSAL_LM"))
    perturb_b(peft_model)
    with torch.no_grad():
        peft_model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.1)
    ids = batch(2)
    expected = logits(peft_model, ids)
    merged = lora_export.merge_lora_state_dict(peft_model.state_dict(), peft_model.peft_config["default"])
    assert not torch.equal(merged["lm_head.weight"], merged["model.embed_tokens.weight"])
    lora_export.save_lora_checkpoint(peft_model, peft_model.state_dict(), tokenizer, tmp_path, save_merged=True,
                              dtype=torch.float32)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert reloaded.config.tie_word_embeddings is False
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=1e-5, atol=1e-5)


# -- checkpoints ------------------------------------------------------------------------------------------

def check_adapter(directory: Path, base_path: Path, ids, expected, quantize=False, atol=1e-5):
    from peft import PeftModel

    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in directory.iterdir()}
    assert json.loads((directory / "adapter_config.json").read_text())["inference_mode"] is True
    adapter = PeftModel.from_pretrained(load(base_path, quantize=quantize), directory)
    torch.testing.assert_close(logits(adapter, ids), expected, rtol=1e-5, atol=atol)


def check_merged(directory: Path, ids, expected, dtype=torch.float32, atol=1e-5):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((directory / "config.json").read_text())
    assert config["use_cache"] is True and "quantization_config" not in config
    assert (directory / "generation_config.json").exists()
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert all(f.get_tensor(k).dtype == dtype for k in keys)
    assert not any("lora" in k or "base_layer" in k or "absmax" in k for k in keys)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    assert AutoTokenizer.from_pretrained(directory) is not None
    if dtype == torch.float32:
        torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=atol)
    return model


@pytest.mark.parametrize("save_merged", [True, False])
def test_checkpoint_round_trip(models, tokenizer, tmp_path, save_merged):
    peft_model = lora.apply_lora(load(models["llama"]), LoraOptions(rank=8, alpha=16, dropout=0.1),
                                 gradient_checkpointing=False)
    ids = batch(4)
    train(peft_model, ids, steps=2)
    expected = logits(peft_model, ids)
    lora_export.save_lora_checkpoint(peft_model, peft_model.state_dict(), tokenizer, tmp_path, save_merged=save_merged,
                              dtype=torch.float32)
    if save_merged:
        check_adapter(tmp_path / "adapter", models["llama"], ids, expected)
        check_merged(tmp_path, ids, expected)
    else:
        check_adapter(tmp_path, models["llama"], ids, expected)
        assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / "config.json").exists()
        assert not (tmp_path / "adapter").exists()
        assert (tmp_path / "tokenizer.json").exists()


def test_resized_embeddings_travel_with_the_adapter(models, tokenizer, tmp_path):
    """The loader grows the embeddings for a larger tokenizer: the new rows are not in the
    base model, so the adapter carries the embedding and output layers (peft's "auto")."""
    from safetensors import safe_open

    base = load(models["llama"])
    size = base.get_input_embeddings().num_embeddings + 5
    base.resize_token_embeddings(size, pad_to_multiple_of=8)
    peft_model = lora.apply_lora(base, OPTIONS, gradient_checkpointing=False)
    perturb_b(peft_model)
    ids = batch(7, vocab=size)
    expected = logits(peft_model, ids)
    lora_export.save_lora_checkpoint(peft_model, peft_model.state_dict(), tokenizer, tmp_path, save_merged=True,
                              dtype=torch.float32)
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.model.embed_tokens.weight" in set(f.keys())
    from peft import PeftModel

    fresh = load(models["llama"])
    fresh.resize_token_embeddings(size, pad_to_multiple_of=8)  # new rows: different random values
    adapter = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    torch.testing.assert_close(logits(adapter, ids), expected, rtol=1e-5, atol=1e-5)
    assert check_merged(tmp_path, ids, expected).config.vocab_size == base.config.vocab_size


def test_merged_checkpoint_in_bf16(models, tokenizer, tmp_path):
    peft_model = lora.apply_lora(load(models["qwen3"]), OPTIONS, gradient_checkpointing=False)
    perturb_b(peft_model)
    lora_export.save_lora_checkpoint(peft_model, peft_model.state_dict(), tokenizer, tmp_path, save_merged=True,
                              dtype=torch.bfloat16)
    model = check_merged(tmp_path, None, None, dtype=torch.bfloat16)
    expected = lora_export.merge_lora_state_dict(peft_model.state_dict(), peft_model.peft_config["default"])
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key].to(torch.bfloat16), rtol=0, atol=0)


# -- QLoRA ------------------------------------------------------------------------------------------------

def test_qlora_keeps_the_loaded_dtypes(models):
    """prepare_model_for_kbit_training casts bf16/fp16 parameters to fp32; apply_lora undoes it."""
    model = load(models["qwen3"], quantize=True, dtype=torch.bfloat16)
    before = {n: p.dtype for n, p in model.named_parameters()}
    assert torch.bfloat16 in before.values()
    peft_model = lora.apply_lora(model, OPTIONS, gradient_checkpointing=True)
    for name, p in peft_model.get_base_model().named_parameters():
        if "lora_" in name:
            assert p.dtype == torch.float32 and p.requires_grad
        else:
            assert p.dtype == before[name.replace(".base_layer", "")] and not p.requires_grad
    assert peft_model.get_base_model().is_gradient_checkpointing


def test_qlora_evaluation_leaves_the_4bit_weights_alone(models):
    """bitsandbytes repacks 4-bit weights in place for eval on AVX512-BF16 CPUs and undoes
    it only approximately in state_dict(); apply_lora turns that off."""
    peft_model = lora.apply_lora(load(models["qwen3"], quantize=True), OPTIONS, gradient_checkpointing=False)
    ids = batch(6)
    first, state = logits(peft_model, ids), peft_model.state_dict()
    second, again = logits(peft_model, ids), peft_model.state_dict()
    assert torch.equal(first, second)
    assert all(torch.equal(state[k], again[k]) for k in state)


def test_qlora_trains_saves_and_merges(models, tokenizer, tmp_path):
    from bitsandbytes.nn import Linear4bit

    base = load(models["llama"], quantize=True)
    assert base.is_loaded_in_4bit
    assert all(isinstance(base.model.layers[0].mlp.get_submodule(n), Linear4bit)
               for n in ("gate_proj", "up_proj", "down_proj"))
    peft_model = lora.apply_lora(base, OPTIONS, gradient_checkpointing=True)
    ids = batch(5)
    losses = train(peft_model, ids, steps=8)
    assert losses[-1] < 0.9 * losses[0], losses
    expected = logits(peft_model, ids)
    state = peft_model.state_dict()
    assert any(k.endswith(".weight.quant_state.bitsandbytes__nf4") for k in state)
    lora_export.save_lora_checkpoint(peft_model, state, tokenizer, tmp_path, save_merged=True, dtype=torch.float32)
    check_adapter(tmp_path / "adapter", models["llama"], ids, expected, quantize=True)
    # The merged model holds the dequantized NF4 weights plus the adapters: the same
    # function as the 4-bit model, up to float rounding.
    check_merged(tmp_path, ids, expected, atol=1e-4)


# -- LoRA over a bf16 base under DDP/one process (GPUs) --------------------------------------------

def saved_fp32_activations(model, ids, autocast: bool) -> int:
    """How many whole fp32 activations (>= tokens x hidden elements) the forward pass saves
    for the backward."""
    saved = []

    def pack(t):
        if t.dtype == torch.float32 and t.numel() >= ids.numel() * model.config.hidden_size:
            saved.append(tuple(t.shape))
        return t

    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), context:
        logits = model(input_ids=ids, use_cache=False).logits
    logits.float().sum().backward()
    return len(saved)


def test_bf16_lora_under_autocast_saves_no_fp32_copies_of_the_adapted_inputs(models, monkeypatch):
    """The run's precision on a GPU (bf16 base, fp32 adapters, autocast: train/precision.py),
    here on the CPU in bf16. peft casts each adapted input to its adapter's fp32; without
    autocast that fp32 copy is what the adapter's matmul saves for the backward, one per
    adapted projection (7 per layer). Under autocast the matmul runs in bf16 and saves bf16.
    (The norms save fp32 in both: they compute in fp32 on purpose.)"""
    # torch's own linear: a DeepSpeed ZeRO-3 engine built earlier in this process (another
    # test) leaves its own autograd function in F.linear for good.
    monkeypatch.setattr(torch.nn.functional, "linear", torch._C._nn.linear)
    model = lora.apply_lora(load(models["qwen3"], dtype=torch.bfloat16), OPTIONS, gradient_checkpointing=False)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    ids = torch.randint(5, 600, (1, 96), generator=torch.Generator().manual_seed(0))
    plain, autocast = (saved_fp32_activations(model, ids, autocast=a) for a in (False, True))
    assert plain - autocast >= len(PROJECTIONS) * model.config.num_hidden_layers, (plain, autocast)

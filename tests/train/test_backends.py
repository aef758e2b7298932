"""Every backend and adapter option gives the plain path's training result, on CPU with 2
processes (gloo): FSDP2 with each sharding strategy (and CPU offload), DeepSpeed ZeRO-2,
ZeRO-3 and ZeRO-2 with optimizer offload against DDP, on a tiny Llama and a tiny Qwen3;
LoRA under DDP, FSDP2 and DeepSpeed; QLoRA (nf4) under DDP and DeepSpeed ZeRO-2.

All jobs run in one torchrun launch (tests/backend_runs.py), which also saves each trained
model's logits on a probe row, computed through the backend's own sharded module: each
checkpoint must reproduce them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from instructpack import TrainingArgs
from instructpack.demo.example import build_tiny_model, generate_fact_conversations, write_jsonl
from instructpack.launch.dataset import prepare_dataset
from instructpack.train.job import JobConfig, write_job
from instructpack.train.metrics import read_metrics

pytestmark = pytest.mark.slow

SUPPORT = Path(__file__).parents[1] / "support"
from support.backend_runs import PROBE  # noqa: E402

FULL_FINE_TUNES = {  # name: (model, backend settings)
    "llama-ddp": ("llama", {"distributed_backend": "ddp"}),
    "llama-fsdp-full-shard": ("llama", {"fsdp_options": {"sharding_strategy": "FULL_SHARD"}}),
    "llama-fsdp-shard-grad-op": ("llama", {"fsdp_options": {"sharding_strategy": "SHARD_GRAD_OP"}}),
    "llama-fsdp-hybrid-shard": ("llama", {"fsdp_options": {"sharding_strategy": "HYBRID_SHARD"}}),
    "llama-fsdp-no-shard": ("llama", {"fsdp_options": {"sharding_strategy": "NO_SHARD"}}),
    "llama-fsdp-offload": ("llama", {"fsdp_options": {"sharding_strategy": "FULL_SHARD", "cpu_offload_params": True}}),
    "llama-zero2": ("llama", {"distributed_backend": "deepspeed", "deepspeed_options": {"save_samples": 32}}),
    "llama-zero3": ("llama", {"distributed_backend": "deepspeed", "deepspeed_options": {"zero_stage": 3}}),
    "llama-zero2-offload": ("llama", {"distributed_backend": "deepspeed",
                                      "deepspeed_options": {"cpu_offload_optimizer": True}}),
    "qwen3-ddp": ("qwen3", {"distributed_backend": "ddp"}),
    "qwen3-fsdp-full-shard": ("qwen3", {"fsdp_options": {"sharding_strategy": "FULL_SHARD"}}),
    "qwen3-zero3": ("qwen3", {"distributed_backend": "deepspeed", "deepspeed_options": {"zero_stage": 3}}),
}
LORA = {"rank": 16, "alpha": 32, "dropout": 0.0}
ADAPTERS = {
    "lora-ddp": {"distributed_backend": "ddp", "lora": LORA},
    "lora-fsdp": {"fsdp_options": {"sharding_strategy": "FULL_SHARD"}, "lora": LORA},
    "lora-zero3": {"distributed_backend": "deepspeed", "deepspeed_options": {"zero_stage": 3}, "lora": LORA},
    "qlora-ddp": {"distributed_backend": "ddp", "lora": {**LORA, "quantize_data_type": "nf4"}},
    "qlora-zero2": {"distributed_backend": "deepspeed", "lora": {**LORA, "quantize_data_type": "nf4"}},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_dirs) -> dict[str, Path]:
    """Trains every configuration once; returns each one's ckpt_output_dir."""
    root = tmp_path_factory.mktemp("backends")
    data = write_jsonl(root / "facts.jsonl", generate_fact_conversations(64, seed=3))
    models = {arch: build_tiny_model(root / arch, tokenizer_dirs["chatml"], architecture=arch)
              for arch in ("llama", "qwen3")}
    # Adapters train on a frozen output layer: with the usual 0.02 initialisation its logits
    # stay near 0 whatever the adapters do, and the loss cannot fall far below log(vocabulary).
    models["llama-base"] = build_tiny_model(root / "llama-base", tokenizer_dirs["chatml"], initializer_range=0.3)
    jobs = {}

    def add(name: str, arch: str, settings: dict, **overrides) -> None:
        # 4 steps of 16 samples per epoch, 2-3 micro-batches per rank and step
        args = TrainingArgs(**{
            "model_path": str(models[arch]), "data_path": str(data), "ckpt_output_dir": str(root / name),
            "data_output_dir": str(root / f"data-{arch}"), "max_seq_len": 128, "max_batch_len": 256,
            "effective_batch_size": 16, "learning_rate": 1e-3, "num_epochs": 1, "checkpoint_at_epoch": False,
            "gradient_checkpointing": False, "data_process_num_cpu_procs": 1, **settings, **overrides})
        Path(args.ckpt_output_dir).mkdir()
        dataset = prepare_dataset(args, world_size=2)
        jobs[name] = write_job(root / f"{name}.json", JobConfig(training_args=args, dataset_path=str(dataset),
                                                                status_dir=str(root)))

    for name, (arch, settings) in FULL_FINE_TUNES.items():
        add(name, arch, settings)
    for name, settings in ADAPTERS.items():  # long enough to learn; adapters with activation checkpointing
        add(name, "llama-base", settings, learning_rate=2e-2, num_epochs=4 if "qlora" not in name else 3,
            gradient_checkpointing=True)

    log = root / "runs.log"
    with log.open("w") as out:
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                               str(SUPPORT / "backend_runs.py"), *map(str, jobs.values())],
                              stdout=out, stderr=subprocess.STDOUT, timeout=900)
    if done.returncode != 0:
        pytest.fail(f"the backend runs failed (exit {done.returncode}):\n" + log.read_text()[-6000:])
    return {name: root / name for name in jobs} | {"models": models}


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out)]


def final_checkpoint(out: Path) -> Path:
    (directory,) = (out / "hf_format").iterdir()
    return directory


def probe_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=PROBE, use_cache=False).logits.float()


@pytest.mark.parametrize("name", [n for n in FULL_FINE_TUNES if not n.endswith("-ddp")])
def test_each_backend_trains_like_ddp(runs, name):
    reference = runs[FULL_FINE_TUNES[name][0] + "-ddp"]
    expected, got = read_metrics(reference), read_metrics(runs[name])
    assert len(got) == len(expected) == 4
    assert all(r["micro_batches"] >= 2 for r in got)  # accumulation over micro-batches is exercised
    for e, g in zip(expected, got):
        assert g["loss"] == pytest.approx(e["loss"], rel=1e-4)
        assert g["grad_norm"] == pytest.approx(e["grad_norm"], rel=1e-3)
        assert g["lr"] == pytest.approx(e["lr"], rel=1e-6) and g["trained_tokens"] == e["trained_tokens"]
    assert expected[-1]["loss"] < expected[0]["loss"]  # the steps really moved the weights


@pytest.mark.parametrize("name", list(FULL_FINE_TUNES))
def test_checkpoint_loads_and_reproduces_the_trained_model(runs, name):
    from transformers import AutoModelForCausalLM

    directory = final_checkpoint(runs[name])
    reference_dir = final_checkpoint(runs[FULL_FINE_TUNES[name][0] + "-ddp"])
    with safe_open(directory / "model.safetensors", "pt") as f, \
            safe_open(reference_dir / "model.safetensors", "pt") as ref:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}  # the training dtype on CPU
        assert set(f.keys()) == set(ref.keys())  # whole, and without a copy of the tied output layer
    model = AutoModelForCausalLM.from_pretrained(directory)
    assert type(model).__name__ == {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[FULL_FINE_TUNES[name][0]]
    torch.testing.assert_close(probe_logits(model), torch.load(runs[name] / "probe_logits.pt"), rtol=1e-5, atol=1e-5)
    reference = AutoModelForCausalLM.from_pretrained(reference_dir)
    for (key, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=key)


def test_deepspeed_native_checkpoints_every_save_samples(runs):
    """deepspeed_options.save_samples=32 with 16 samples per step: every 2 steps."""
    native = runs["llama-zero2"] / "deepspeed"
    assert sorted(p.name for p in native.iterdir()) == ["samples_32", "samples_64"]
    for directory in native.iterdir():
        tag = (directory / "latest").read_text().strip()
        assert any((directory / tag).glob("*optim_states.pt"))  # DeepSpeed's own sharded format


@pytest.mark.parametrize("name", [n for n in ADAPTERS if n.startswith("lora")])
def test_lora_learns_and_saves_adapter_and_merged_model(runs, name):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    curve = losses(runs[name])
    assert curve[-1] < 0.1 * curve[0]
    if name != "lora-ddp":  # the same adapter training under a sharded backend
        reference = losses(runs["lora-ddp"])
        assert curve[:4] == pytest.approx(reference[:4], rel=1e-4)  # the first epoch
        assert curve == pytest.approx(reference, rel=1e-2)  # later, lr 2e-2 amplifies rounding
    trained = torch.load(runs[name] / "probe_logits.pt")
    directory = final_checkpoint(runs[name])

    base = AutoModelForCausalLM.from_pretrained(runs["models"]["llama-base"])
    adapter = PeftModel.from_pretrained(base, directory / "adapter")
    torch.testing.assert_close(probe_logits(adapter), trained, rtol=1e-5, atol=1e-5)

    merged = AutoModelForCausalLM.from_pretrained(directory)  # transformers alone: no adapter files here
    assert not (directory / "adapter_config.json").exists()
    assert not any("lora" in key for key in merged.state_dict())
    torch.testing.assert_close(probe_logits(merged), trained, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", [n for n in ADAPTERS if n.startswith("qlora")])
def test_qlora_trains_4bit_and_saves_a_loadable_adapter(runs, name):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from instructpack.config import LoraOptions
    from instructpack.train.model.lora import keep_4bit_layout, quantization_config

    curve = losses(runs[name])
    assert curve[-1] < 0.2 * curve[0]
    if name != "qlora-ddp":  # ZeRO-2 shards the adapters' gradients and optimizer state only
        assert curve == pytest.approx(losses(runs["qlora-ddp"]), rel=1e-4)
    trained = torch.load(runs[name] / "probe_logits.pt")
    directory = final_checkpoint(runs[name])

    base = AutoModelForCausalLM.from_pretrained(
        runs["models"]["llama-base"], device_map={"": "cpu"},
        quantization_config=quantization_config(LoraOptions(quantize_data_type="nf4"), torch.float32))  # CPU compute
    keep_4bit_layout(base)  # as training ran: no bf16 repacking by bitsandbytes' CPU inference path
    adapter = PeftModel.from_pretrained(base, directory / "adapter")
    torch.testing.assert_close(probe_logits(adapter), trained, rtol=1e-5, atol=1e-5)

    merged = AutoModelForCausalLM.from_pretrained(directory)  # full precision, no bitsandbytes
    assert "quantization_config" not in merged.config.to_dict()
    torch.testing.assert_close(probe_logits(merged), trained, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", list(FULL_FINE_TUNES) + list(ADAPTERS))
def test_saved_training_state_restores_weights_and_optimizer(runs, name):
    """save_weights_and_optimizer / load_weights_and_optimizer (plain tensors, or DeepSpeed's own format):
    a fresh model restored from the saved state takes the same next step as the original."""
    check = torch.load(runs[name] / "state_check.pt")
    original, restored = check["original"], check["restored"]
    assert restored["loss"] == pytest.approx(original["loss"], rel=1e-6)
    torch.testing.assert_close(restored["logits"], original["logits"], rtol=1e-6, atol=1e-6)

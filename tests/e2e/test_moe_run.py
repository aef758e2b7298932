"""Mixture-of-experts models trained end to end with 2 processes: the router loss and load
in the metrics, a checkpoint that transformers loads, GPT-OSS's routers left as they were."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from instructpack import TorchrunArgs, run_training
from instructpack.demo.example import build_tiny_model
from instructpack.train.metrics import read_metrics

from support.launching import small_args

pytestmark = pytest.mark.slow

CONFIGS = {
    "qwen3_moe": ("fsdp", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                           "decoder_sparse_step": 1, "router_aux_loss_coef": 0.01}),
    "gpt_oss": ("ddp", {"num_local_experts": 4, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.9,
                        "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}),
}


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_a_mixture_of_experts_model_trains_with_two_processes(arch, tmp_path, tokenizer_dirs):
    backend, config = CONFIGS[arch]
    model = build_tiny_model(tmp_path / "model", tokenizer_dirs["chatml"], architecture=arch, **config)
    args = small_args(tmp_path, model, num_epochs=3, distributed_backend=backend, checkpoint_at_epoch=True,
                      learning_rate=5e-3)
    run_training(TorchrunArgs(nproc_per_node=2), args)
    records = read_metrics(tmp_path / "ckpt")
    assert all(r["router_aux_loss"] > 0 and r["max_expert_load"] >= 1.0 for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    from transformers import AutoModelForCausalLM

    final = max((tmp_path / "ckpt" / "hf_format").iterdir(), key=lambda p: int(p.name.split("_")[1]))
    trained = AutoModelForCausalLM.from_pretrained(final)
    assert trained.config.model_type == arch
    before, after = load_file(model / "model.safetensors"), load_file(final / "model.safetensors")
    routers = [k for k in before if ".router." in k or ".gate.weight" in k]
    assert routers
    unchanged = all(torch.equal(before[k], after[k]) for k in routers)
    assert unchanged is (arch == "gpt_oss")  # frozen by default for GPT-OSS, as InstructLab does

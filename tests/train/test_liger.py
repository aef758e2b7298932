"""use_liger: refused before launch where Liger's kernels cannot run (never a silent no-op),
and on a CUDA GPU the fused linear cross-entropy gives the summed loss and gradient of
the plain path (marked cuda: skipped without a GPU)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import instructpack.launch.checks as checks
from instructpack import ConfigError, MissingPackageError, run_training

from support.launching import small_args


def test_use_liger_without_the_package_is_refused_before_launch(tmp_path, model, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel"
                        else real(name, *a))  # not installed, even where it is
    with pytest.raises(MissingPackageError, match=r"needs the liger-kernel package.*instructpack\[cuda\]"):
        run_training(training_args=small_args(tmp_path, model, use_liger=True))
    assert not (tmp_path / "data").exists()


def test_use_liger_without_a_gpu_or_with_lora_is_refused_before_launch(tmp_path, model, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: real("json") if name == "liger_kernel"
                        else real(name, *a))  # as if it were installed
    monkeypatch.setattr(checks, "visible_gpus", lambda: 0)
    with pytest.raises(ConfigError, match="use_liger = True: Liger's kernels run on CUDA GPUs and none is visible"):
        run_training(training_args=small_args(tmp_path, model, use_liger=True))
    monkeypatch.setattr(checks, "visible_gpus", lambda: 1)
    with pytest.raises(ConfigError, match="use_liger = True: Liger's kernels and LoRA adapters"):
        run_training(training_args=small_args(tmp_path, model, use_liger=True, lora={"rank": 4}))
    assert not (tmp_path / "data").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
                    reason="Liger's kernels need a CUDA GPU and liger-kernel")
def test_fused_linear_cross_entropy_equals_the_plain_summed_loss(tmp_path, valid_model, tokenizer_dirs):
    from transformers import AutoModelForCausalLM

    from instructpack import load_dataset
    from instructpack.data.loader import StepLoader
    from instructpack.data.sampler import MultipackSampler
    from instructpack.demo.example import generate_fact_conversations
    from instructpack.train.model.attention import NAME as PACKED_SDPA
    from instructpack.train.model.liger import apply_liger
    from instructpack.train.step import summed_loss

    from support.samples import preprocess

    ds = load_dataset(preprocess(tmp_path, valid_model, list(generate_fact_conversations(8, seed=1))).output_path)
    step = next(iter(StepLoader(ds, MultipackSampler(ds.lengths, effective_batch_size=8, max_batch_len=4096))))
    mb = step.micro_batches[0].to("cuda")

    def loss_and_grads(liger: bool):
        model = AutoModelForCausalLM.from_pretrained(valid_model, dtype=torch.float32,
                                                     attn_implementation=PACKED_SDPA).cuda().train()
        if liger:
            apply_liger(model)
        loss = summed_loss(model, mb)
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters()}

    plain, plain_grads = loss_and_grads(False)
    fused, fused_grads = loss_and_grads(True)
    assert fused == pytest.approx(plain, rel=1e-4)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)

"""Packed micro-batches against transformers itself: a packed row (no attention mask,
use_cache=False) must give each sample the logits, loss and gradients it gets alone, and
a padded micro-batch the same per-token loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from instructpack.data.collate import collate_packed, collate_padded
from instructpack.data.sampler import MicroBatchRef
from instructpack.data.shards import load_dataset

from support.samples import preprocess, tricky_conversations

TOL = 1e-5


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tokenizer_dirs):
    out = preprocess(tmp_path_factory.mktemp("packed"), tokenizer_dirs["chatml"], tricky_conversations(40, seed=21),
                     num_cpu_procs=1)
    return load_dataset(out.output_path)


def tiny_model(kind: str, vocab_size: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  attn_implementation="sdpa", dtype=torch.float32)
    config = LlamaConfig(**common) if kind == "llama" else Qwen3Config(head_dim=16, **common)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).float().eval()


def _ref(ids):
    return MicroBatchRef(epoch=0, step=0, index=0, count=1, sample_ids=np.asarray(ids, np.int64), step_targets=-1)


IDS = [7, 2, 30, 11, 0]


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_packed_row_equals_each_sample_alone(dataset, kind):
    model = tiny_model(kind, dataset.manifest.tokenizer.vocab_size)
    mb = collate_packed(dataset, _ref(IDS))
    assert mb.num_targets > 0

    # Packed: transformers' own ForCausalLM loss on our shifted labels, summed.
    model.zero_grad()
    out = model(**mb.model_inputs(), labels=mb.shift_labels, shift_labels=mb.shift_labels,
                num_items_in_batch=torch.tensor(1), use_cache=False)
    out.loss.backward()
    packed_logits = out.logits.detach()
    packed_loss = out.loss.detach()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    # Alone: each sample as its own batch, transformers shifting its unshifted labels.
    model.zero_grad()
    alone_loss = torch.zeros(())
    for i, (a, b) in zip(IDS, zip(mb.cu_seqlens[:-1].tolist(), mb.cu_seqlens[1:].tolist())):
        sample = dataset[i]
        input_ids = torch.from_numpy(sample["input_ids"]).view(1, -1)
        labels = torch.from_numpy(sample["labels"]).view(1, -1)
        o = model(input_ids=input_ids, labels=labels, num_items_in_batch=torch.tensor(1), use_cache=False)
        o.loss.backward()
        alone_loss += o.loss.detach()
        torch.testing.assert_close(packed_logits[:, a:b], o.logits.detach(), atol=TOL, rtol=0)
    # The summed losses divided by the same target count: the loss a step reports.
    torch.testing.assert_close(packed_loss / mb.num_targets, alone_loss / mb.num_targets, atol=TOL, rtol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, atol=TOL, rtol=TOL, msg=name)


def test_packed_row_without_use_cache_false_would_leak(dataset):
    """Why use_cache=False matters: with a cache, samples attend to each other."""
    model = tiny_model("llama", dataset.manifest.tokenizer.vocab_size)
    mb = collate_packed(dataset, _ref(IDS[:2]))
    with torch.no_grad():
        cached = model(**mb.model_inputs(), use_cache=True).logits
        packed = model(**mb.model_inputs(), use_cache=False).logits
    second = slice(mb.cu_seqlens[1].item(), mb.cu_seqlens[2].item())
    assert (cached[:, second] - packed[:, second]).abs().max() > 1e-3


def _token_losses(logits, shift_labels):
    flat = shift_labels.reshape(-1)
    losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat,
                                               ignore_index=-100, reduction="none")
    return losses[flat != -100]


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_padded_gives_the_same_per_token_loss_as_packed(dataset, kind):
    model = tiny_model(kind, dataset.manifest.tokenizer.vocab_size)
    packed = collate_packed(dataset, _ref(IDS))
    padded = collate_padded(dataset, _ref(IDS), pad_token_id=0)
    with torch.no_grad():
        a = _token_losses(model(**packed.model_inputs(), use_cache=False).logits, packed.shift_labels)
        b = _token_losses(model(**padded.model_inputs(), use_cache=False).logits, padded.shift_labels)
    assert len(a) == len(b) == packed.num_targets
    torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)

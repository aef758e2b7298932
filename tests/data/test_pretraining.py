"""Continual pretraining data: documents tokenized as InstructLab tokenizes them, cut into
blocks of block_size tokens; inside a block, positions restart at each document and no
document attends to another (the model's logits on a packed block equal each piece alone)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from instructpack import DataProcessArgs, InputError, PretrainingConfig, TorchrunArgs, data_process, load_dataset
from instructpack.data.collate import IGNORE_INDEX, collate_packed
from instructpack.data.sampler import MicroBatchRef
from instructpack.demo.example import TextGenerator, build_tiny_model

BLOCK = 64


def _documents(n: int, seed: int = 0) -> list[str]:
    gen = TextGenerator(seed)
    return [gen.text(gen.rng.randint(3, 60)) for _ in range(n)]


def _write(path, docs, key="document"):
    path.write_text("".join(json.dumps({key: d}) + "\n" for d in docs))
    return path


def _preprocess(tmp_path, model, docs, name="out", **kw):
    data = _write(tmp_path / f"{name}.jsonl", docs)
    return data_process.main(DataProcessArgs(data_path=str(data), data_output_path=str(tmp_path / name),
                                             model_path=str(model), max_seq_len=4096, num_cpu_procs=1,
                                             pretraining=PretrainingConfig(block_size=BLOCK, **kw)), progress=False)


def _instructlab_ids(model, docs) -> list[list[int]]:
    """InstructLab's encoding (process_documents_for_pretraining): encode with the special
    tokens, then EOS unless the encoding ends with it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    out = []
    for doc in docs:
        ids = tok.encode(doc, add_special_tokens=True)
        out.append(ids if ids[-1] == tok.eos_token_id else ids + [tok.eos_token_id])
    return out


@pytest.mark.parametrize("style", ["llama3", "chatml"])
def test_blocks_are_the_hand_computed_cut_of_the_document_stream(style, tmp_path, tokenizer_dirs):
    docs = _documents(40) + [""] + _documents(5, seed=1)  # an empty document is dropped and counted
    result = _preprocess(tmp_path, tokenizer_dirs[style], docs)
    encoded = _instructlab_ids(tokenizer_dirs[style], [d for d in docs if d])
    stream = [t for ids in encoded for t in ids]
    starts = set(np.cumsum([0] + [len(ids) for ids in encoded[:-1]]).tolist())
    ds = load_dataset(result.output_path)
    assert len(ds) == -(-len(stream) // BLOCK) and result.manifest.counts.dropped == {"empty_document": 1}
    assert result.manifest.pretraining.documents == 45
    for b in range(len(ds)):
        block = stream[b * BLOCK:(b + 1) * BLOCK]
        assert ds[b]["input_ids"].tolist() == block
        # every token trained but each document's first
        expected = [IGNORE_INDEX if b * BLOCK + i in starts else t for i, t in enumerate(block)]
        assert ds[b]["labels"].tolist() == expected
    assert ds.lengths.tolist() == [BLOCK] * (len(ds) - 1) + [len(stream) - BLOCK * (len(ds) - 1)]


def test_positions_restart_at_each_document_and_no_document_attends_to_another(tmp_path, tokenizer_dirs):
    from transformers import AutoModelForCausalLM

    from instructpack.train.model.attention import NAME as PACKED_SDPA

    model_dir = build_tiny_model(tmp_path / "model", tokenizer_dirs["llama3"])
    ds = load_dataset(_preprocess(tmp_path, model_dir, _documents(30)).output_path)
    ids = np.array([2, 3])  # two blocks in one packed row
    mb = collate_packed(ds, MicroBatchRef(0, 0, 0, 1, ids, -1))
    row = mb.input_ids[0]
    pieces = np.split(np.arange(len(row)), mb.cu_seqlens.numpy()[1:-1])
    assert len(pieces) > 3  # the blocks hold several documents
    for piece in pieces:
        assert mb.position_ids[0, piece].tolist() == list(range(len(piece)))
        assert mb.shift_labels[0, piece[-1]] == IGNORE_INDEX  # a piece's last token predicts nothing after it
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=PACKED_SDPA)
    model.eval()
    with torch.no_grad():
        packed = model(**mb.model_inputs(), use_cache=False).logits[0]
        for piece in pieces:
            alone = model(input_ids=row[piece][None], use_cache=False).logits[0]
            torch.testing.assert_close(packed[piece], alone, rtol=1e-5, atol=1e-5)
    # The loss counts match what the planner expects (the shard's trained counts).
    assert mb.num_targets == int((mb.shift_labels != IGNORE_INDEX).sum())


def test_bad_lines_name_the_file_and_line(tmp_path, tokenizer_dirs):
    data = tmp_path / "docs.jsonl"
    data.write_text('{"document": "fine text here"}\n{"text": "wrong key"}\n')
    args = DataProcessArgs(data_path=str(data), data_output_path=str(tmp_path / "out"), num_cpu_procs=1,
                           model_path=str(tokenizer_dirs["llama3"]), max_seq_len=512,
                           pretraining=PretrainingConfig(block_size=BLOCK))
    with pytest.raises(InputError, match=rf"{data}:2: no 'document' key"):
        data_process.main(args)
    assert not (tmp_path / "out").exists()
    result = data_process.main(args.model_copy(update={"skip_invalid_lines": True}))
    assert result.manifest.counts.invalid_lines == 1 and len(load_dataset(result.output_path)) == 1
    with pytest.raises(InputError, match=r"other.jsonl:1: no 'body' key"):  # document_column_name is the key
        _preprocess(tmp_path, tokenizer_dirs["llama3"], ["some text"], name="other", document_column_name="body")


def test_the_preprocessing_command_has_a_pretraining_mode(tmp_path, tokenizer_dirs):
    data = _write(tmp_path / "docs.jsonl", _documents(20), key="body")
    proc = subprocess.run([sys.executable, "-c", "import sys; from instructpack.cli import preprocess_main; "
                           "sys.exit(preprocess_main())", "--data-path", str(data), "--data-output-path",
                           str(tmp_path / "out"), "--model-path", str(tokenizer_dirs["llama3"]), "--max-seq-len",
                           "512", "--pretraining-block-size", "32", "--document-column-name", "body"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "documents" in proc.stdout and "blocks of 32 tokens" in proc.stdout
    assert set(load_dataset(tmp_path / "out").lengths[:-1].tolist()) == {32}


@pytest.mark.slow
def test_run_training_pretrains_on_documents_with_two_processes(tmp_path, valid_model):
    from instructpack import run_training
    from instructpack.train.metrics import read_metrics

    from support.launching import small_args

    data = _write(tmp_path / "docs.jsonl", _documents(60, seed=4))
    args = small_args(tmp_path, valid_model, data_path=str(data), num_epochs=3, effective_batch_size=4,
                      max_seq_len=128, max_batch_len=256, pretraining_config=PretrainingConfig(block_size=BLOCK))
    run_training(TorchrunArgs(nproc_per_node=2), args)
    records = read_metrics(tmp_path / "ckpt")
    ds = load_dataset(tmp_path / "data")
    assert sum(r["samples"] for r in records) == 3 * len(ds)  # blocks are the samples
    assert sum(r["trained_tokens"] for r in records) == 3 * int(ds.target_counts.sum())
    assert records[-1]["loss"] < records[0]["loss"]

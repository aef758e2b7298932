"""Preprocessing against independent expectations: transformers' own tokenization of the
rendered template, and hand-written rules for what each template trains on."""

from __future__ import annotations

import json

import msgspec
import numpy as np
import pytest

from instructpack import DataProcessArgs, data_process, load_dataset
from instructpack.demo.example import write_jsonl

from support.samples import END_OF_TURN, TEMPLATE_STYLES, preprocess, tricky_conversations


def _expected_trained_text(style: str, sample: dict) -> list[str]:
    """The trained text of each trained message, written from the template's rules.

    Unmasked non-assistant turns train their content only (InstructLab's rule): the
    end-of-turn after a user turn is not a prediction the model should learn to stop on.
    """
    pieces = []
    for m in sample["messages"]:
        trained = m["role"] == "assistant" or (sample.get("unmask") and m["role"] != "system")
        if not trained:
            continue
        eot = END_OF_TURN[style] if m["role"] == "assistant" else ""
        content = m["content"]
        if style == "llama3":
            pieces.append(content.strip() + eot)  # the template trims, ignores reasoning
        elif style == "chatml" and m["role"] == "assistant" and "reasoning_content" in m:
            pieces.append(m["reasoning_content"].strip("\n") + "\n</think>\n\n" + content + eot)
        else:
            pieces.append(content + eot)
    return pieces


def _trained_runs(input_ids, labels):
    """Contiguous runs of trained tokens."""
    runs, current = [], []
    for tok, lab in zip(input_ids, labels):
        if lab != -100:
            assert lab == tok
            current.append(int(tok))
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


@pytest.mark.parametrize("style", TEMPLATE_STYLES)
def test_ids_equal_transformers_and_labels_cover_exactly_the_trained_text(tmp_path, tokenizer_dirs, style):
    from transformers import AutoTokenizer

    model = tokenizer_dirs[style]
    samples = tricky_conversations(300, seed=TEMPLATE_STYLES.index(style))
    result = preprocess(tmp_path, model, samples)
    ds = load_dataset(result.output_path)
    tok = AutoTokenizer.from_pretrained(model)
    assert len(ds) == len(samples) - result.manifest.counts.dropped["no_trained_tokens"]
    assert list(ds.source_lines) == sorted(ds.source_lines)
    for i in range(len(ds)):
        sample = samples[ds.source_lines[i] - 1]
        text = tok.apply_chat_template(sample["messages"], tokenize=False)
        expected_ids = tok(text, add_special_tokens=False)["input_ids"]
        item = ds[i]
        assert item["input_ids"].tolist() == expected_ids, f"line {ds.source_lines[i]}"
        runs = [tok.decode(r, skip_special_tokens=False) for r in _trained_runs(item["input_ids"], item["labels"])]
        # Adjacent trained messages (unmask) may merge into one run; compare the concatenation.
        # The last trained turn is an assistant turn, so it ends with the end-of-turn marker;
        # without unmask every run is an assistant turn.
        assert "".join(runs) == "".join(_expected_trained_text(style, sample)), f"line {ds.source_lines[i]}"
        assert runs[-1].endswith(END_OF_TURN[style])
        if not sample.get("unmask"):
            assert all(r.endswith(END_OF_TURN[style]) for r in runs)
    assert ds.lengths.tolist() == [len(ds[i]["input_ids"]) for i in range(len(ds))]


def test_reasoning_that_the_template_drops_keeps_the_end_of_turn_label(tmp_path, tokenizer_dirs):
    sample = {"messages": [{"role": "user", "content": "Question?"},
                           {"role": "assistant", "content": "Answer.", "reasoning_content": "thinking hard"}]}
    ds = load_dataset(preprocess(tmp_path, tokenizer_dirs["llama3"], [sample]).output_path)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dirs["llama3"] / "tokenizer.json"))
    item = ds[0]
    trained = [int(t) for t, lab in zip(item["input_ids"], item["labels"]) if lab != -100]
    assert tok.decode(trained, skip_special_tokens=False) == "Answer.<|eot_id|>"


def test_byte_offsets_path_equals_tokenizer_offsets_path(tokenizer_dirs):
    """The fast path (offsets from ids) gives the same masks as the tokenizer's offsets."""
    from instructpack.data.chat import load_tokenizer_files
    from instructpack.data.encode import ChunkEncoder

    files = load_tokenizer_files(tokenizer_dirs["chatml"])
    lines = [json.dumps(s, ensure_ascii=False).encode() for s in tricky_conversations(200, seed=7)]
    fast = ChunkEncoder(files, 4096, 0)
    slow = ChunkEncoder(files, 4096, 0)
    assert fast.byte_len is not None
    slow.byte_len = None
    a, b = fast.encode(1, lines), slow.encode(1, lines)
    for name in ("tokens", "mask", "lengths", "trained", "source_lines"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_non_byte_level_tokenizer_uses_character_offsets(tmp_path):
    """A SentencePiece-style (Metaspace) tokenizer: labels still cover exactly the answer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from instructpack.demo.example import CHAT_TEMPLATES, TextGenerator

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    gen = TextGenerator(1)
    tok.train_from_iterator([gen.text(100) for _ in range(100)] + ["<>|_\n!?"],
                            trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                                                show_progress=False))
    model = tmp_path / "sp"
    model.mkdir()
    tok.save(str(model / "tokenizer.json"))
    (model / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (model / "chat_template.jinja").write_text(CHAT_TEMPLATES["chatml"])
    from instructpack.data.encode import byte_length_table

    assert byte_length_table(tok) is None
    sample = {"messages": [{"role": "user", "content": "ka lo mi"}, {"role": "assistant", "content": "ne su ta"}]}
    ds = load_dataset(preprocess(tmp_path, model, [sample]).output_path)
    item = ds[0]
    trained = [int(t) for t, lab in zip(item["input_ids"], item["labels"]) if lab != -100]
    assert tok.decode(trained, skip_special_tokens=False).replace("▁", " ").strip() == "ne su ta<|im_end|>"


def test_drop_rules_are_counted_never_truncated(tmp_path, tokenizer_dirs):
    model = tokenizer_dirs["chatml"]
    samples = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ka " * 300}]},  # long
        {"messages": [{"role": "user", "content": "only a user turn"}]},  # nothing trained
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},  # short
        {"messages": [{"role": "user", "content": "ka lo mi ne"}, {"role": "assistant", "content": "su ta ri"}]},
    ]
    # The short one has 21 tokens, the kept one 26.
    result = preprocess(tmp_path, model, samples, max_seq_len=100, min_seq_len=24)
    counts = result.manifest.counts
    assert counts.dropped == {"too_long": 1, "too_short": 1, "no_trained_tokens": 1, "no_end_of_text": 0}
    ds = load_dataset(result.output_path)
    assert ds.source_lines.tolist() == [4]
    assert counts.samples == 1 and counts.tokens == int(ds.lengths.sum())
    assert counts.trained_tokens == int((ds[0]["labels"] != -100).sum())


def test_unmask_trains_user_turns_but_not_system(tmp_path, tokenizer_dirs):
    sample = {"unmask": True, "messages": [{"role": "system", "content": "SYS"}, {"role": "user", "content": "USR"},
                                           {"role": "assistant", "content": "ASST"}]}
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dirs["granite"] / "tokenizer.json"))
    item = load_dataset(preprocess(tmp_path, tokenizer_dirs["granite"], [sample]).output_path)[0]
    runs = [tok.decode(r, skip_special_tokens=False) for r in _trained_runs(item["input_ids"], item["labels"])]
    # InstructLab's rule: the user turn trains its content, not the end-of-turn after it.
    assert runs == ["USR", "ASST<|end_of_text|>"]


def test_manifest_and_dataset_reader(tmp_path, tokenizer_dirs):
    samples = tricky_conversations(50, seed=3)
    result = preprocess(tmp_path, tokenizer_dirs["chatml"], samples)
    m = result.manifest
    assert m.format == "instructpack-shards" and m.format_version == 1
    assert m.tokenizer.token_dtype == "uint16"
    assert m.settings.max_seq_len == 4096
    assert json.loads((result.output_path / "manifest.json").read_text()) == msgspec.to_builtins(m)
    ds = load_dataset(result.output_path)
    assert isinstance(ds.lengths, np.ndarray) and ds.lengths.sum() == m.counts.tokens
    assert ds.manifest == m
    assert ds[-1]["input_ids"].tolist() == ds[len(ds) - 1]["input_ids"].tolist()
    with pytest.raises(IndexError):
        ds[len(ds)]
    ds.verify()


def test_many_shards_read_as_one_dataset(tmp_path, tokenizer_dirs):
    samples = tricky_conversations(120, seed=4)
    one = load_dataset(preprocess(tmp_path, tokenizer_dirs["chatml"], samples, name="one").output_path)
    data = write_jsonl(tmp_path / "many.jsonl", samples)
    result = data_process.main(DataProcessArgs(data_path=str(data), data_output_path=str(tmp_path / "many"),
                                               model_path=str(tokenizer_dirs["chatml"]), max_seq_len=4096),
                               progress=False, shard_tokens=2000)
    many = load_dataset(result.output_path)
    assert len(result.manifest.shards) > 3
    assert all(s.tokens <= 2000 or s.samples == 1 for s in result.manifest.shards)
    ids = np.arange(len(one))[::-1]
    for a, b in zip(one.gather(ids), many.gather(ids)):
        np.testing.assert_array_equal(a, b)


def test_single_process_equals_parallel(tmp_path, tokenizer_dirs):
    samples = tricky_conversations(150, seed=5)
    a = preprocess(tmp_path, tokenizer_dirs["llama3"], samples, name="a", num_cpu_procs=1)
    b = preprocess(tmp_path, tokenizer_dirs["llama3"], samples, name="b", num_cpu_procs=2)
    for x, y in zip(load_dataset(a.output_path).shards.gather(np.arange(a.manifest.counts.samples)),
                    load_dataset(b.output_path).shards.gather(np.arange(b.manifest.counts.samples))):
        np.testing.assert_array_equal(x, y)
    assert [s.checksum for s in a.manifest.shards] == [s.checksum for s in b.manifest.shards]


# Two more template families, given as template files (chat_tmpl_path): Gemma renames the
# assistant role and closes turns with <end_of_turn>; Mistral puts the answer right after
# "[/INST]" and closes it with the eos token only, never after user turns.
EXTRA_TEMPLATES = {
    "gemma": ("{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
              "else message['role'] %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + "
              "'<end_of_turn>\\n' }}{% endfor %}", "<end_of_turn>"),
    "mistral": ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                "{{ message['content'] + eos_token }}{% endif %}{% endfor %}", "<|end_of_text|>"),
}


@pytest.mark.parametrize("family", sorted(EXTRA_TEMPLATES))
def test_other_template_families_from_a_template_file(tmp_path, tokenizer_dirs, family):
    from tokenizers import Tokenizer

    template, eot = EXTRA_TEMPLATES[family]
    path = tmp_path / f"{family}.jinja"
    path.write_text(template)
    model = tokenizer_dirs["granite"]  # eos_token <|end_of_text|>
    samples = [{"messages": [{"role": "user", "content": f"question {i} ka lo"},
                             {"role": "assistant", "content": f"answer {i} mi ne"},
                             {"role": "user", "content": "again?"},
                             {"role": "assistant", "content": "Yes 🙂 su ta"}]} for i in range(20)]
    ds = load_dataset(preprocess(tmp_path, model, samples, chat_tmpl_path=str(path)).output_path)
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    assert len(ds) == 20
    for i in range(20):
        item = ds[i]
        runs = [tok.decode(r, skip_special_tokens=False) for r in _trained_runs(item["input_ids"], item["labels"])]
        assert runs == [f"answer {i} mi ne{eot}", f"Yes 🙂 su ta{eot}"]


def test_nfc_normalizing_tokenizer_with_decomposed_text_keeps_exact_labels(tmp_path, tokenizer_dirs):
    """Qwen-style tokenizers normalize to NFC: where that changes the text, the byte offsets
    from ids no longer match it, and the tokenizer's own offsets must be used instead."""
    import shutil
    import unicodedata

    from tokenizers import Tokenizer, normalizers

    model = tmp_path / "nfc"
    shutil.copytree(tokenizer_dirs["chatml"], model)
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    tok.normalizer = normalizers.NFC()
    tok.save(str(model / "tokenizer.json"))
    answer = "cafe\u0301 ka lo"  # decomposed é: NFC changes it
    sample = {"messages": [{"role": "user", "content": "ne\u0301 su"}, {"role": "assistant", "content": answer}]}
    item = load_dataset(preprocess(tmp_path, model, [sample]).output_path)[0]
    runs = [tok.decode(r, skip_special_tokens=False) for r in _trained_runs(item["input_ids"], item["labels"])]
    assert runs == [unicodedata.normalize("NFC", answer) + "<|im_end|>"]

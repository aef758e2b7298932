"""InstructLab's chat template modules as chat_tmpl_path: read without being run, special
tokens registered as InstructLab registers them, the same tokens rendered, and labels by
InstructLab's rule for these templates (after an assistant marker, everything up to the
next role marker is trained; with "unmask", after any marker but the system's). Files
that are neither such a module nor a Jinja template are refused, naming the file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import instructpack.chat_templates as chat_templates
from instructpack import ConfigError, load_dataset
from instructpack.chat_templates import ibm_generic_tmpl, ibm_legacy_tmpl, mistral_tmpl
from instructpack.demo.example import TextGenerator

from support.samples import preprocess

MODULES = Path(chat_templates.__file__).parent


def _conversations(n: int) -> list[dict]:
    gen = TextGenerator(11)
    out = []
    for i in range(n):
        messages = [{"role": "system", "content": gen.text(6)}] if i % 3 == 0 else []
        for _ in range(1 + i % 3):
            messages += [{"role": "user", "content": gen.text(8)}, {"role": "assistant", "content": gen.text(10)}]
        out.append({"messages": messages, **({"unmask": True} if i % 4 == 1 else {})})
    return out


def _transformers_tokenizer(model_dir: Path, module):
    """The tokenizer as InstructLab sets it up for a template module: the module's tokens as
    the special tokens, no automatic bos/eos, the module's template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tokens = module.SPECIAL_TOKENS
    tok.add_special_tokens({"bos_token": tokens.bos.token, "eos_token": tokens.eos.token,
                            "pad_token": tokens.pad.token or tokens.eos.token})
    tok.add_special_tokens({"extra_special_tokens": tokens.get_tokens_to_add()})
    return tok


def _trained_text(rendered: str, markers: dict[str, str], unmask: bool) -> str:
    """InstructLab's rule on the rendered text: each stretch after a role marker, up to the
    next marker, is trained when the marker is the assistant's (any but the system's, with
    unmask)."""
    pattern = "|".join(re.escape(m) for m in sorted(markers.values(), key=len, reverse=True))
    role_of = {m: role for role, m in markers.items()}
    pieces, parts = [], re.split(f"({pattern})", rendered)
    for marker, stretch in zip(parts[1::2], parts[2::2]):
        role = role_of[marker]
        if role == "assistant" or (unmask and role != "system"):
            pieces.append(stretch)
    return "".join(pieces)


@pytest.mark.parametrize("module", [ibm_generic_tmpl, ibm_legacy_tmpl], ids=lambda m: m.__name__.split(".")[-1])
def test_module_renders_the_same_tokens_and_labels_by_instructlabs_rule(module, tmp_path, tokenizer_dirs):
    model = tokenizer_dirs["granite"]
    samples = _conversations(24)
    result = preprocess(tmp_path, model, samples, chat_tmpl_path=module.__file__)
    ds = load_dataset(result.output_path)
    assert len(ds) == len(samples)  # every sample has at least 20 tokens and ends with eos
    tok = _transformers_tokenizer(model, module)
    t = module.SPECIAL_TOKENS
    if t.start_role.token:
        markers = {role: f"{t.start_role.token}{role}{t.end_role.token}" for role in ("system", "user", "assistant")}
    else:
        markers = {"system": t.system.token, "user": t.user.token, "assistant": t.assistant.token}
    for i in range(len(ds)):
        sample = samples[ds.source_lines[i] - 1]
        rendered = tok.apply_chat_template(sample["messages"], chat_template=module.CHAT_TEMPLATE, tokenize=False)
        item = ds[i]
        assert item["input_ids"].tolist() == tok(rendered, add_special_tokens=False)["input_ids"], i
        trained = [int(x) for x, label in zip(item["input_ids"], item["labels"]) if label != -100]
        assert tok.decode(trained) == _trained_text(rendered, markers, sample.get("unmask", False)), i


def test_module_is_read_not_run(tmp_path, tokenizer_dirs):
    source = Path(ibm_generic_tmpl.__file__).read_text()
    booby_trapped = tmp_path / "my_template.py"
    booby_trapped.write_text("import os\nraise SystemExit('this module must not be run')\n" + source)
    samples = _conversations(6)
    ours = load_dataset(preprocess(tmp_path, tokenizer_dirs["granite"], samples, name="a",
                                   chat_tmpl_path=str(booby_trapped)).output_path)
    packaged = load_dataset(preprocess(tmp_path, tokenizer_dirs["granite"], samples, name="b",
                                       chat_tmpl_path=ibm_generic_tmpl.__file__).output_path)
    assert [ours[i]["input_ids"].tolist() for i in range(len(ours))] == \
        [packaged[i]["input_ids"].tolist() for i in range(len(packaged))]


@pytest.mark.parametrize("content, problem", [
    ("SPECIAL_TOKENS = None\n", "no CHAT_TEMPLATE assignment"),
    ("CHAT_TEMPLATE = make_template()\nSPECIAL_TOKENS = SpecialTokens()\n", "line 1: CHAT_TEMPLATE must be a string"),
    ("def f(:\n", "not valid Python"),
], ids=["no-template", "not-a-literal", "syntax-error"])
def test_a_python_file_that_is_no_template_module_is_refused(content, problem, tmp_path, tokenizer_dirs):
    path = tmp_path / "template.py"
    path.write_text(content)
    with pytest.raises(ConfigError, match=re.escape(str(path))) as e:
        preprocess(tmp_path, tokenizer_dirs["granite"], _conversations(2), chat_tmpl_path=str(path))
    assert problem in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_text_file_that_is_no_template_is_refused(tmp_path, tokenizer_dirs):
    path = tmp_path / "notes.txt"
    path.write_text("remember to train on the new data\n")
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        preprocess(tmp_path, tokenizer_dirs["granite"], _conversations(2), chat_tmpl_path=str(path))


def test_mistral_module_keeps_its_markers_as_text(tmp_path, tokenizer_dirs):
    """Its [INST] markers are not special tokens (add_to_tokenizer=False): they are tokenized
    as text, and the marker tokens themselves are never trained."""
    model = tokenizer_dirs["chatml"]
    samples = [s for s in _conversations(12) if s["messages"][0]["role"] != "system"]
    ds = load_dataset(preprocess(tmp_path, model, samples, chat_tmpl_path=mistral_tmpl.__file__).output_path)
    tok = _transformers_tokenizer(model, mistral_tmpl)
    assert "[INST]" not in tok.all_special_tokens and "</s>" in tok.all_special_tokens
    for i in range(len(ds)):
        sample = samples[ds.source_lines[i] - 1]
        rendered = tok.apply_chat_template(sample["messages"], chat_template=mistral_tmpl.CHAT_TEMPLATE,
                                           tokenize=False)
        assert ds[i]["input_ids"].tolist() == tok(rendered, add_special_tokens=False)["input_ids"]
        trained = tok.decode([int(x) for x, y in zip(ds[i]["input_ids"], ds[i]["labels"]) if y != -100])
        assert trained == _trained_text(rendered, {"user": "[INST]", "assistant": "[/INST]"},
                                        sample.get("unmask", False))


def test_use_legacy_tmpl_trains_with_instructlabs_legacy_module(tmp_path, model, recorded_launch):
    from instructpack import run_training
    from instructpack.data.manifest import read_manifest
    from instructpack.train.model.load import load_tokenizer

    from support.launching import small_args

    args = small_args(tmp_path, model, use_legacy_tmpl=True)
    run_training(training_args=args)
    assert args.chat_tmpl_path is None  # the caller's object is left as it was
    (_, job), = recorded_launch
    assert job.training_args.chat_tmpl_path == ibm_legacy_tmpl.__file__
    assert read_manifest(job.dataset_path).chat_template.path == ibm_legacy_tmpl.__file__
    # The workers' tokenizer (saved with every checkpoint) is set up as preprocessing's was.
    tok = load_tokenizer(job.training_args)
    assert tok.chat_template == ibm_legacy_tmpl.CHAT_TEMPLATE
    assert {"<|system|>", "<|user|>", "<|assistant|>", "<|endoftext|>"} <= set(tok.all_special_tokens)
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    ids = load_dataset(job.dataset_path)[0]["input_ids"].tolist()
    assert tok.decode(ids).startswith("<|user|>\n")

"""Nothing a model directory or a data file holds makes the library run code: custom
modelling code only with trust_remote_code, weights only from safetensors, conversation
contents as plain text, chat templates in transformers' Jinja sandbox.

Each attack comes with its control: the same payload, run the unsafe way on purpose (a plain
unpickle, a plain Jinja environment, trust_remote_code=True), does create its marker file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import msgspec
import pytest
import torch

from instructpack import DataProcessArgs, data_process, load_dataset
from instructpack.config import TrainingArgs
from instructpack.demo.example import CHAT_TEMPLATES, write_jsonl
from instructpack.errors import UnsafeTemplateError
from instructpack.train.model.load import load_model, load_tokenizer

CPU = torch.device("cpu")


def jinja_payloads(marker: Path) -> list[str]:
    """Jinja template injections that create `marker` when rendered outside a sandbox."""
    touch = f"touch {marker}"
    return [
        f"{{{{ cycler.__init__.__globals__.os.popen('{touch}').read() }}}}",
        f"{{{{ lipsum.__globals__['os'].popen('{touch}').read() }}}}",
        f"{{{{ namespace.__init__.__globals__.os.system('{touch}') }}}}",
        # subprocess.Popen, not multiprocessing's Popen classes, which take other arguments
        "{% for x in ().__class__.__base__.__subclasses__() %}"
        "{% if x.__name__ == 'Popen' and x.__module__ == 'subprocess' %}"
        f"{{{{ x('{touch}', shell=True).wait() }}}}{{% endif %}}{{% endfor %}}",
    ]


def test_the_jinja_payloads_run_code_outside_a_sandbox(tmp_path):
    """The control of the template tests below: each payload is live."""
    import subprocess  # noqa: F401  (Popen among object's subclasses, as in any real process)

    import jinja2

    for i, payload in enumerate(jinja_payloads(tmp_path / "marker")):
        jinja2.Environment().from_string(payload).render()
        assert (tmp_path / "marker").exists(), i
        (tmp_path / "marker").unlink()


def training_args(model_path: Path, **kw) -> TrainingArgs:
    return TrainingArgs(model_path=str(model_path), data_path="unused", ckpt_output_dir="unused",
                        data_output_dir="unused", max_seq_len=64, max_batch_len=64, effective_batch_size=8,
                        learning_rate=1e-3, **kw)


def edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


# ---------------------------------------------------------------- (a) remote code

def test_trust_remote_code_is_off_by_default(valid_model):
    assert training_args(valid_model).trust_remote_code is False


@pytest.fixture
def no_module_cache(tmp_path, monkeypatch):
    """transformers copies a model's own code into its modules cache before importing it:
    keep that under tmp_path, and the imported modules out of later tests."""
    import sys

    import transformers.dynamic_module_utils as dmu

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("transformers_modules"):
            del sys.modules[name]


def _custom_model(model: Path, marker: Path, model_type: str) -> None:
    """Gives `model` its own modelling code (config.json "auto_map"), which writes `marker`
    when imported; `model_type` "llama" keeps an architecture transformers has built in."""
    (model / "modeling_evil.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('ran')  # what any code could do on import\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n\n"
        "class EvilConfig(LlamaConfig):\n"
        f"    model_type = {model_type!r}\n\n\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n"
        "    config_class = EvilConfig\n")
    edit_json(model / "config.json", model_type=model_type,
              auto_map={"AutoConfig": "modeling_evil.EvilConfig",
                        "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})


def test_custom_modelling_code_runs_only_with_trust_remote_code(model, tmp_path, no_module_cache):
    marker = tmp_path / "modelling_code_ran"
    _custom_model(model, marker, "evil")  # an architecture only its own code defines

    for weights in (True, False):
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            load_model(training_args(model), CPU, weights=weights)
    assert not marker.exists()
    # The control: load_model does pass args.trust_remote_code on.
    assert type(load_model(training_args(model, trust_remote_code=True), CPU)).__name__ == "EvilForCausalLM"
    assert marker.read_text() == "ran"


def test_custom_modelling_code_of_a_built_in_architecture_is_ignored(model, tmp_path, no_module_cache):
    marker = tmp_path / "modelling_code_ran"
    _custom_model(model, marker, "llama")
    # transformers uses its own Llama code and never imports the model's.
    assert type(load_model(training_args(model), CPU)).__name__ == "LlamaForCausalLM"
    assert not marker.exists()
    assert type(load_model(training_args(model, trust_remote_code=True), CPU)).__name__ == "EvilForCausalLM"
    assert marker.read_text() == "ran"


def test_custom_tokenizer_code_runs_only_with_trust_remote_code(model, tmp_path, no_module_cache):
    marker = tmp_path / "tokenizer_code_ran"
    (model / "tokenization_evil.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n"
        "    pass\n")
    edit_json(model / "tokenizer_config.json", tokenizer_class="EvilTokenizer",
              auto_map={"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]})

    with pytest.raises(ValueError, match="trust_remote_code=True"):
        load_tokenizer(training_args(model))
    assert not marker.exists()
    assert type(load_tokenizer(training_args(model, trust_remote_code=True))).__name__ == "EvilTokenizer"
    assert marker.read_text() == "ran"


# ---------------------------------------------------------------- (b) pickled weights

class _Payload:
    """Unpickling it runs code: it writes `marker` (exec of a line of Python)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_pickled_weights_are_never_loaded(model, tmp_path):
    from safetensors.torch import load_file

    weights = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    benign = Path(shutil.copytree(model, tmp_path / "benign"))
    torch.save(weights, benign / "pytorch_model.bin")  # a plain state dict transformers could load
    marker = tmp_path / "unpickled"
    torch.save({**weights, "extra": _Payload(marker)}, model / "pytorch_model.bin")
    torch.load(model / "pytorch_model.bin", weights_only=False)  # the control: the payload is live
    assert marker.exists()
    marker.unlink()

    for directory in (model, benign):
        with pytest.raises(OSError, match="no file named model.safetensors"):
            load_model(training_args(directory), CPU)
    assert not marker.exists()


# ---------------------------------------------------------------- (c) data files

def test_template_injection_in_data_stays_text(tokenizer_dirs, tmp_path):
    from transformers import AutoTokenizer

    marker = tmp_path / "marker"
    payloads = jinja_payloads(marker)
    samples = [{"messages": [{"role": "system", "content": payloads[0]},
                             {"role": "user", "content": payloads[1] + " and " + payloads[2]},
                             {"role": "assistant", "content": payloads[3]}]},
               {"messages": [{"role": "user", "content": "{{ raise_exception('x') }}{% set x = 1 %}"},
                             {"role": "assistant", "content": "{{ bos_token }}{{ messages }}"}]}]
    data = write_jsonl(tmp_path / "data.jsonl", samples)
    result = data_process.main(DataProcessArgs(data_path=str(data), data_output_path=str(tmp_path / "out"),
                                               model_path=str(tokenizer_dirs["chatml"]), max_seq_len=4096,
                                               num_cpu_procs=1), progress=False)
    assert not marker.exists()

    ds = load_dataset(result.output_path)
    assert len(ds) == len(samples)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dirs["chatml"])
    texts = [tokenizer.decode(ds[i]["input_ids"]) for i in range(len(ds))]
    for sample in samples:
        contents = [m["content"] for m in sample["messages"]]
        assert any(all(c in text for c in contents) for text in texts), contents
    # The assistant's payload is trained on, as written.
    trained = [t for i in range(len(ds)) for t, lab in zip(ds[i]["input_ids"], ds[i]["labels"]) if lab != -100]
    assert payloads[3] in tokenizer.decode(trained)


# ---------------------------------------------------------------- (d) chat templates

def _poisoned_templates(marker: Path) -> list[str]:
    return [payload + CHAT_TEMPLATES["chatml"] for payload in jinja_payloads(marker)]


def test_chat_template_in_the_model_dir_renders_in_a_sandbox(model, tmp_path):
    import jinja2

    marker = tmp_path / "marker"
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    for template in _poisoned_templates(marker):
        (model / "chat_template.jinja").write_text(template)
        tokenizer = load_tokenizer(training_args(model))
        assert tokenizer.chat_template == template
        with pytest.raises(jinja2.exceptions.SecurityError):
            tokenizer.apply_chat_template(conversation, tokenize=False)
        assert not marker.exists()


def test_chat_template_in_preprocessing_renders_in_a_sandbox(model, tmp_path):
    marker = tmp_path / "marker"
    data = write_jsonl(tmp_path / "data.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "hello"}]}])
    for i, template in enumerate(_poisoned_templates(marker)):
        (model / "chat_template.jinja").write_text(template)
        args = DataProcessArgs(data_path=str(data), data_output_path=str(tmp_path / f"out{i}"),
                               model_path=str(model), max_seq_len=4096, num_cpu_procs=1)
        # The template is at fault, not the data: refused whole, even with skip_invalid_lines.
        for skip in (False, True):
            with pytest.raises(UnsafeTemplateError, match="chat template tried an unsafe operation.*access to "
                                                          "attribute .* is unsafe"):
                data_process.main(msgspec.structs.replace(args, skip_invalid_lines=skip), progress=False)
        assert not marker.exists()

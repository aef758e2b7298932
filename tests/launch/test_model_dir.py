"""check_model_dir: a model directory's problems found from its files alone (no torch), each
as a ConfigError on training_args.model_path that names the file and the fix."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from instructpack.errors import ConfigError
from instructpack.launch.model_dir import check_model_dir


def refused(path, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        check_model_dir(str(path), **kw)
    assert info.value.field == "training_args.model_path"
    assert info.value.value == str(path)
    return str(info.value)


def edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


def test_a_valid_model_directory_passes(valid_model):
    check_model_dir(str(valid_model))
    check_model_dir(str(valid_model), trust_remote_code=True)


def test_import_leaves_torch_and_transformers_out():
    code = ("import sys, instructpack.launch.model_dir; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_missing_path_says_nothing_is_downloaded(tmp_path, monkeypatch):
    missing = tmp_path / "no-such-model"
    message = refused(missing)
    assert f"{missing} does not exist" in message
    assert "local Hugging Face model directory" in message and "does not download" in message
    assert "huggingface-cli download ID --local-dir DIR" in message
    # A hub id (relative, so it does not exist here) appears in the download command.
    monkeypatch.chdir(tmp_path)
    assert "huggingface-cli download ibm-granite/granite-3.1-2b-instruct --local-dir DIR" in refused(
        "ibm-granite/granite-3.1-2b-instruct")


def test_a_file_is_not_a_model_directory(model):
    message = refused(model / "config.json")
    assert f"{model / 'config.json'} is not a directory" in message and "model directory" in message


def test_a_directory_without_config_json(model):
    (model / "config.json").unlink()
    message = refused(model)
    assert f"{model} has no config.json" in message and "give the directory that holds config.json" in message


def test_invalid_config_json_is_named(model):
    (model / "config.json").write_text('{"model_type": "llama",')
    message = refused(model)
    assert f"{model / 'config.json'} is not valid JSON" in message and "restore the file" in message
    (model / "config.json").write_text("[1, 2]")
    assert f"{model / 'config.json'} does not hold a JSON object" in refused(model)


def test_no_weights(model):
    (model / "model.safetensors").unlink()
    message = refused(model)
    assert f"{model} has no *.safetensors weights: expected model.safetensors or model.safetensors.index.json" \
        in message


def test_only_pickled_weights_are_refused_with_the_conversion(model):
    (model / "model.safetensors").rename(model / "pytorch_model.bin")  # the name is what counts here
    (model / "training_args.pt").write_bytes(b"")
    message = refused(model)
    assert f"{model} has no *.safetensors weights, only pickled ones (pytorch_model.bin, training_args.pt)" in message
    assert "unpickling can run code" in message
    assert "save_pretrained(DIR, safe_serialization=True)" in message and "trusted environment" in message


def test_config_naming_a_pickled_weights_file_is_refused(model):
    # transformers loads config.json's "transformers_weights" file even with use_safetensors=True.
    edit_json(model / "config.json", transformers_weights="adapter_model.bin")
    message = refused(model)
    assert f"{model / 'config.json'} names 'adapter_model.bin' as its weights" in message
    assert "unpickling can run code" in message and "safe_serialization=True" in message


def test_sharded_checkpoint_needs_every_shard(valid_model, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(valid_model).save_pretrained(sharded, max_shard_size="60KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2 and (sharded / "model.safetensors.index.json").is_file()
    check_model_dir(str(sharded))

    shards[1].unlink()
    message = refused(sharded)
    assert f"{sharded / 'model.safetensors.index.json'} names the shard {shards[1].name}, which is missing" in message
    assert "download the checkpoint again" in message


@pytest.mark.parametrize("file", ["config.json", "tokenizer_config.json"])
def test_custom_code_needs_trust_remote_code(model, file):
    edit_json(model / file, auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
                                      "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})
    message = refused(model)
    assert f"{model / file} has \"auto_map\"" in message
    assert "ships its own Python code (modeling_evil.py, tokenization_evil.py)" in message
    assert "runs only with trust_remote_code=True" in message and "only if you trust the source" in message
    check_model_dir(str(model), trust_remote_code=True)

"""Checks of the model directory a run trains, before any heavy work (the launcher calls
`check_model_dir` first). Reads only JSON and file names: no torch, no transformers.

What loading will need, each problem raised as a ConfigError on training_args.model_path
that names the file and the fix: a local Hugging Face model directory (nothing is
downloaded), a config.json, safetensors weights (pickled weights are never loaded, since
unpickling can run code), every shard a sharded checkpoint's index names, and
trust_remote_code=True when the model ships its own Python code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, NoReturn

from ..errors import ConfigError, PathNotFoundError

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
# Pickled weights (torch.save), which transformers would otherwise fall back to.
_PICKLES = ("pytorch_model*.bin", "*.pt", "*.pth")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def check_model_dir(model_path: str, *, trust_remote_code: bool = False) -> None:
    """Raise ConfigError("training_args", ("model_path",), ...) unless `model_path` is a
    local model directory that `load_model` and `load_tokenizer` can load as configured."""
    path = Path(model_path)

    def fail(problem: str, error: type[ConfigError] = ConfigError) -> NoReturn:
        raise error("training_args", ("model_path",), problem, model_path)

    if not path.exists():
        hub_id = model_path if _HUB_ID.fullmatch(model_path) else "ID"
        fail(f"{path} does not exist. Give a local Hugging Face model directory: instructpack does not download "
             f"models, so a hub id must be downloaded first, e.g. with "
             f"`huggingface-cli download {hub_id} --local-dir DIR`, then give DIR", PathNotFoundError)
    if not path.is_dir():
        fail(f"{path} is not a directory; give a local Hugging Face model directory "
             f"(config.json and {SAFE_WEIGHTS} weights)", PathNotFoundError)
    if not (path / "config.json").is_file():
        fail(f"{path} has no config.json, so it is not a Hugging Face model directory; give the directory "
             f"that holds config.json and the {SAFE_WEIGHTS} weights")
    config = _json_object(path / "config.json", fail)
    _check_weights(path, config, fail)
    for name in ("config.json", "tokenizer_config.json"):
        settings = config if name == "config.json" else (
            _json_object(path / name, fail) if (path / name).is_file() else {})
        if "auto_map" in settings and not trust_remote_code:
            code = sorted({str(v).split(".")[0] + ".py" for v in _leaves(settings["auto_map"])})
            fail(f"{path / name} has \"auto_map\": the model ships its own Python code ({', '.join(code)}), "
                 f"which runs only with trust_remote_code=True; set it only if you trust the source of this model")


def _check_weights(path: Path, config: dict, fail) -> None:
    explicit = config.get("transformers_weights")  # config.json may name its weights file
    if explicit is not None and not str(explicit).endswith((".safetensors", ".safetensors.index.json")):
        fail(f"{path / 'config.json'} names {explicit!r} as its weights (\"transformers_weights\"): only "
             f"safetensors weights are loaded, since unpickling can run code; remove the key and save the "
             f"weights as {SAFE_WEIGHTS} (save_pretrained(DIR, safe_serialization=True))")
    names = [explicit] if explicit is not None else [SAFE_WEIGHTS, SAFE_INDEX]
    found = next((path / n for n in names if (path / n).is_file()), None)
    if found is None:
        pickles = sorted({p.name for pattern in _PICKLES for p in path.glob(pattern)})
        if pickles:
            fail(f"{path} has no *.safetensors weights, only pickled ones ({', '.join(pickles)}): these are not "
                 f"loaded because unpickling can run code. Convert them to safetensors, e.g. by loading the model "
                 f"once in a trusted environment and saving it with save_pretrained(DIR, safe_serialization=True)")
        fail(f"{path} has no *.safetensors weights: expected {' or '.join(names)}")
    if found.name.endswith(".index.json"):
        weight_map = _json_object(found, fail).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            fail(f"{found} has no \"weight_map\" naming the weight shards; download the checkpoint again")
        for shard in sorted(set(map(str, weight_map.values()))):
            if not (path / shard).is_file():
                fail(f"{found} names the shard {shard}, which is missing from {path}; "
                     f"download the checkpoint again, with all its shards")


def _json_object(file: Path, fail) -> dict:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        fail(f"{file} is not valid JSON ({exc}); restore the file from the model's source")
    if not isinstance(value, dict):
        fail(f"{file} does not hold a JSON object; restore the file from the model's source")
    return value


def _leaves(value: Any) -> list:
    # auto_map maps a class to "module.Class", or (tokenizers) to a list of them or null.
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _leaves(v)]
    return [] if value is None else [value]

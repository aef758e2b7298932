"""`model_path` given as a Hugging Face Hub id ("org/name") rather than a local directory, as
InstructLab accepts it: resolved to the snapshot directory in the Hugging Face cache,
downloading it when online; with HF_HUB_OFFLINE=1 only the cache is used. Only what
loading reads is fetched (configs, safetensors weights, tokenizer files, chat templates;
the model's own Python files only with trust_remote_code). No torch here: the launcher and
the preprocessing command resolve before anything else.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import PathNotFoundError

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_FILES = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]


def is_hub_id(model_path: str) -> bool:
    return not Path(model_path).exists() and HUB_ID.fullmatch(model_path) is not None


def resolve_model_path(model_path: str, *, root: str = "training_args", trust_remote_code: bool = False) -> str:
    """A local model directory for `model_path`: itself when it exists (or is not a Hub id:
    the checks that follow name what is wrong with it), else the Hub snapshot."""
    if not is_hub_id(model_path):
        return model_path
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = constants.HF_HUB_OFFLINE
    try:
        return snapshot_download(model_path, local_files_only=offline,
                                 allow_patterns=_FILES + (["*.py"] if trust_remote_code else []))
    except LocalEntryNotFoundError:
        where = f"the Hugging Face cache ({constants.HF_HUB_CACHE})"
        fix = ("download it there first (huggingface-cli download " + model_path + "), or unset HF_HUB_OFFLINE"
               if offline else "check the network, or download it first")
        raise PathNotFoundError(root, ("model_path",), f"not a local directory, and the Hub model {model_path} is "
                                f"not in {where}{' (HF_HUB_OFFLINE is set)' if offline else ''}: {fix}; or give "
                                "a local model directory", model_path) from None
    except HfHubHTTPError as e:
        raise PathNotFoundError(root, ("model_path",), f"not a local directory, and the Hub could not give the model "
                                f"{model_path} ({e}): check the id (org/name) and your access to it, or give a "
                                "local model directory", model_path) from None

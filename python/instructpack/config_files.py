"""Configuration files: YAML (.yaml/.yml), JSON or TOML read into TrainingArgs, a RunConfig
(training_args + torchrun_args), or any other configuration object. Files are strict, as
config_base.py describes: unknown fields and values of another type are errors, and every
range is checked at once; each error names the file and the field."""

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomllib

from .config import RunConfig, TrainingArgs
from .config_base import build, strict_building
from .errors import ConfigError

__all__ = ["config_from_dict", "load_config"]


def config_from_dict(data: Any, into: type | None = None, source: str | None = None) -> Any:
    """Build `into` (default: RunConfig when the mapping has a training_args or torchrun_args
    key, else TrainingArgs) from a mapping of plain values; raises ConfigError."""
    try:
        if not isinstance(data, Mapping):
            raise ConfigError("", (), "the top level must be a mapping of field names to "
                              f"values, got {type(data).__name__}")
        if into is None:
            into = RunConfig if {"training_args", "torchrun_args"} & set(data) else TrainingArgs
        with strict_building():
            return build(into, data)
    except ConfigError as exc:
        raise (exc.from_source(source) if source else exc) from None


# YAML 1.1 reads 2e-6 (no dot) as a string; configs write learning rates that way.
_YAML_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_FORMATS = {".yaml": "YAML", ".yml": "YAML", ".json": "JSON", ".toml": "TOML"}


def _parse(kind: str, text: str) -> Any:
    if kind == "JSON":
        return json.loads(text)
    if kind == "TOML":
        return tomllib.loads(text)
    import yaml  # only YAML users need PyYAML

    class Loader(yaml.SafeLoader):  # safe_load's loader, plus exponent-only floats
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML_FLOAT, list("-+0123456789"))
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass


def load_config(path: str | Path, into: type | None = None) -> Any:
    """Read a YAML (.yaml/.yml), JSON or TOML file into TrainingArgs, or into a RunConfig when
    its top level has training_args/torchrun_args keys (or into `into`, e.g. DataProcessArgs).
    Every problem raises ConfigError naming the file and the field."""
    path = Path(path)
    kind = _FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ConfigError("", (), f"unknown config file type {path.suffix!r}; expected one of "
                          + ", ".join(_FORMATS), source=str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("", (), "no such config file", source=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("", (), f"cannot read: {exc}", source=str(path)) from None
    try:
        data = _parse(kind, text)
    except ImportError:
        raise ConfigError("", (), "reading YAML needs PyYAML (pip install pyyaml)",
                          source=str(path)) from None
    except Exception as exc:  # each parser has its own error type; all mean "bad file"
        raise ConfigError("", (), f"invalid {kind}: {exc}", source=str(path)) from None
    return config_from_dict(data, into=into, source=str(path))

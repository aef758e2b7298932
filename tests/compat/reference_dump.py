"""Builds config objects from a JSON description and prints their model_dump(), the same way
under instructlab.training (in the reference venv) and instructpack: `python
reference_dump.py MODULE CASES.json`. Enum members are written as ["enum", value] so that a
member and its plain value stay distinguishable, as they are in pydantic's dump."""

from __future__ import annotations

import enum
import importlib
import json
import sys
import warnings


def normal(value):
    if isinstance(value, enum.Enum):
        return ["enum", value.value]
    if isinstance(value, dict):
        return {k: normal(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [normal(v) for v in value]
    return value


def build(module, spec: dict):
    obj = getattr(module, spec["class"])(**spec.get("kwargs", {}))
    for path, value in spec.get("set", []):  # assignments after construction, as InstructLab's CLI makes them
        *parents, name = path.split(".")
        target = obj
        for parent in parents:
            target = getattr(target, parent)
        if isinstance(value, dict) and "class" in value:
            value = build(module, value)
        elif isinstance(value, list) and value[:1] == ["enum"]:
            value = getattr(module, value[1])(value[2])
        setattr(target, name, value)
    return obj


def main(module_name: str, cases_path: str) -> None:
    module = importlib.import_module(module_name)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for spec in json.load(open(cases_path)):
            obj = build(module, spec)
            if spec.get("copy"):
                obj = obj.model_copy(deep=True)
            out.append({"python": normal(obj.model_dump()), "json": json.loads(obj.model_dump_json())})
    print(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:])

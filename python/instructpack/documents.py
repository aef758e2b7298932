"""Typed JSON documents on disk (the dataset manifest, the trainer state of a full-state
checkpoint): msgspec Structs, converted from parsed JSON by `convert_document`, whose
errors name the field as a person reads it (`shards[0].bytes`), the value found and what
was expected (a field's `msgspec.Meta(description=...)`, else its type in words).

No torch here: the preprocessing command and the launcher read these documents.
"""

from __future__ import annotations

import re
import types
from typing import Annotated, Any, Union, get_args, get_origin

import msgspec

_AT = re.compile(r" - at `\$(.*)`$")
_MISSING = re.compile(r"^Object missing required field `([^`]+)`")
_KEY = re.compile(r"\.([^.\[]+)|\[(\d+)\]")
_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
          dict: "an object", type(None): "null"}


class DocumentError(ValueError):
    """A document that does not have the shape of its Struct; the message is the problem
    alone (the caller adds the file and the fix)."""


def convert_document(data: Any, into: type) -> Any:
    """`data` (parsed JSON) as an `into` Struct, every field's type and constraints checked
    (strictly: "12" is not an integer, true is not a number)."""
    try:
        return msgspec.convert(data, into, strict=True)
    except msgspec.ValidationError as exc:
        raise DocumentError(_in_words(str(exc), data, into)) from None


def _in_words(message: str, data: Any, into: type) -> str:
    at = _AT.search(message)
    keys: list[str | int] = [k if k else int(i) for k, i in _KEY.findall(at.group(1))] if at else []
    missing = _MISSING.match(message)
    if missing:
        field = missing.group(1)
        if keys:
            return f"{_where(keys)} lacks {field}"
        inside = _required_fields(_field_type(into, [field]))
        return f'"{field}" is missing' + (f" (it records {', '.join(f'{field}.{f}' for f in inside)})"
                                          if inside else "")
    value = _lookup(data, keys)
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    expected = _describe(_field_type(into, keys)) or message.split(" - at ")[0].replace("`", "")
    return f"{_where(keys)} is {shown}, expected {expected}"


def _where(keys: list[str | int]) -> str:
    """shards[0].bytes; a top-level field in quotes ("shards")."""
    if len(keys) == 1 and isinstance(keys[0], str):
        return f'"{keys[0]}"'
    text = ""
    for k in keys:
        text += f"[{k}]" if isinstance(k, int) else (f".{k}" if text else k)
    return text


def _lookup(data: Any, keys: list[str | int]) -> Any:
    for k in keys:
        try:
            data = data[k]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _unwrap(tp: Any) -> tuple[Any, str | None]:
    """The type inside Annotated/Optional, and the description its Meta gives."""
    description = None
    while True:
        if get_origin(tp) is Annotated:
            tp, *extra = get_args(tp)
            description = next((m.description for m in extra if isinstance(m, msgspec.Meta) and m.description),
                               description)
        elif get_origin(tp) in (Union, types.UnionType):
            members = [a for a in get_args(tp) if a is not type(None)]
            if len(members) != 1:
                return tp, description
            tp = members[0]
        else:
            return tp, description


def _field_type(into: type, keys: list[str | int]) -> Any:
    tp = into
    for k in keys:
        tp, _ = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
            tp = next((f.type for f in msgspec.structs.fields(tp) if f.encode_name == k), None)
        elif get_origin(tp) in (list, tuple):
            tp = get_args(tp)[0]
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1]
        else:
            return None
        if tp is None:
            return None
    return tp


def _describe(tp: Any) -> str | None:
    if tp is None:
        return None
    tp, description = _unwrap(tp)
    if description:
        return description
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return "an object"
    return _WORDS.get(get_origin(tp) or tp)


def _required_fields(tp: Any) -> list[str]:
    tp, _ = _unwrap(tp) if tp is not None else (None, None)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return [f.encode_name for f in msgspec.structs.fields(tp) if f.required]
    return []

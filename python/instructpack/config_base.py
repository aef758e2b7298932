"""What every configuration object is (config.py declares them): a msgspec Struct that builds
from keywords the way pydantic models do, so code written for InstructLab's pydantic models
runs unchanged.

- Built from Python keywords (or `model_validate`): input is converted laxly, as pydantic
  does ("4096" for an int, "2e-5" for a float, "true" for a bool, a dict for a nested
  object); unknown keywords are ignored with one warning per object naming them (with a
  did-you-mean). Only the checks InstructLab makes at construction run then; the objects
  stay mutable, and `validate()` (which `run_training` and `data_process.main` call) checks
  every field and range as the object is at that moment, nested objects included.
- Built from a config file (`config_files.load_config`): strict: unknown fields, and values
  of another type, are errors; `validate()` runs at once.
- The pydantic methods users and the InstructLab CLI call: `model_copy`, `model_dump`,
  `model_dump_json`, `model_validate`, `model_fields`, `model_json_schema`, and the older
  `dict()` and `json()`.

Every problem is a ConfigError naming the field (a dotted path), the value and what is
allowed.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import difflib
import enum
import json
import types
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

import msgspec

from .errors import ConfigError

_STRICT = contextvars.ContextVar("instructpack_config_strict", default=False)
# Set while deepcopy rebuilds an object: a copy is the object as it is, unconverted and unchecked.
_COPYING = contextvars.ContextVar("instructpack_config_copying", default=False)


@contextlib.contextmanager
def strict_building() -> Iterator[None]:
    """Objects built inside refuse unknown fields and values of another type (config files)."""
    token = _STRICT.set(True)
    try:
        yield
    finally:
        _STRICT.reset(token)


def describe(tp: Any) -> str:
    """A type annotation in words, for error messages."""
    if tp is type(None):
        return "null"
    if tp is Any:
        return "a value"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return f"a {tp.__name__} or a mapping of its fields"
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is tuple:
        return f"a list of {len(args)} values ({', '.join(describe(a) for a in args)})"
    if origin is list:
        return f"a list (each {describe(args[0])})"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


@cache
def _field_plan(cls: type) -> tuple:
    """Per field: (name, annotation, exact types needing no conversion, nested Struct type)."""
    plan = []
    for f in msgspec.structs.fields(cls):
        members = get_args(f.type) if get_origin(f.type) in (Union, types.UnionType) else (f.type,)
        exact = frozenset(m for m in members if isinstance(m, type) and get_origin(m) is None)
        sub = next((m for m in members
                    if isinstance(m, type) and issubclass(m, msgspec.Struct)), None)
        plan.append((f.name, f.type, exact, sub))
    return tuple(plan)


def _unknown_fields(cls: type, kwargs: dict) -> dict:
    names = [f.name for f in msgspec.structs.fields(cls)]
    return {k: v for k, v in kwargs.items() if k not in names}


def _hint(cls: type, key: str) -> str:
    names = [f.name for f in msgspec.structs.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    return f"did you mean {close[0]!r}?" if close else "allowed: " + ", ".join(names)


def _call_error(cls: type, args: tuple, kwargs: dict, exc: TypeError) -> ConfigError:
    """Turn msgspec's TypeError for a bad constructor call into a ConfigError."""
    if args:
        return ConfigError(cls._root, (), f"{cls.__name__} takes keyword arguments only")
    for key, value in _unknown_fields(cls, kwargs).items():
        return ConfigError(cls._root, (key,), f"unknown field; {_hint(cls, key)}", value)
    for f in msgspec.structs.fields(cls):
        if f.required and f.name not in kwargs:
            return ConfigError(cls._root, (f.name,), "missing required field")
    return ConfigError(cls._root, (), str(exc))


def build(cls: type, data: Mapping) -> Any:
    """`cls` from a mapping of field names to values."""
    bad = next((k for k in data if not isinstance(k, str)), None)
    if bad is not None:
        raise ConfigError(cls._root, (), "field names must be strings", bad)
    return cls(**data)


class _Meta(type(msgspec.Struct)):
    # msgspec forbids overriding __init__; catching here turns missing or positional
    # arguments into ConfigError, and unknown ones into a warning (or, strict, an error).
    def __call__(cls, *args, **kwargs):
        unknown = _unknown_fields(cls, kwargs)
        if unknown and not _STRICT.get():
            hints = "; ".join(f"{k!r} ({_hint(cls, k)})" for k in unknown)
            warnings.warn(f"{cls.__name__}: ignoring {len(unknown)} unknown field(s): {hints}", UserWarning,
                          stacklevel=2)
            kwargs = {k: v for k, v in kwargs.items() if k not in unknown}
        try:
            return super().__call__(*args, **kwargs)
        except TypeError as exc:
            raise _call_error(cls, args, kwargs, exc) from None


@dataclass(frozen=True)
class FieldInfo:
    """What pydantic's `model_fields` gives for a field, as far as callers use it."""
    annotation: Any
    default: Any
    default_factory: Any
    description: str | None = None

    def is_required(self) -> bool:
        return self.default is msgspec.NODEFAULT and self.default_factory is msgspec.NODEFAULT


class _ClassProperty:
    def __init__(self, fn):
        self.fn = fn

    def __get__(self, instance, owner):
        return self.fn(owner)


class ConfigModel(msgspec.Struct, metaclass=_Meta, kw_only=True, forbid_unknown_fields=True):
    _root: ClassVar[str] = ""
    # Fields kept out of model_dump (as pydantic's Field(exclude=True)).
    _dump_excludes: ClassVar[frozenset] = frozenset()
    # Fields whose value is converted by a function of the object's own (enums msgspec cannot
    # hold, kept as InstructLab keeps them).
    _converters: ClassVar[dict] = {}

    def __post_init__(self) -> None:
        # msgspec does not convert __init__ arguments: convert each field to its annotation
        # (laxly, as pydantic does, unless built strictly from a file), build nested objects
        # from plain mappings, then run the checks InstructLab makes at construction.
        if _COPYING.get():
            return
        strict = _STRICT.get()
        for name, tp, exact, sub in _field_plan(type(self)):
            value = getattr(self, name)
            if name in self._converters:
                new = self._converters[name](self, value)
            elif type(value) in exact:
                continue
            elif sub is not None and isinstance(value, Mapping):
                try:
                    new = build(sub, value)
                except ConfigError as exc:
                    raise exc.nested(self._root, name) from None
            else:
                try:
                    new = msgspec.convert(value if strict else _as_pydantic_reads(value, exact), tp, strict=strict)
                except msgspec.ValidationError:
                    raise ConfigError(self._root, (name,), f"expected {describe(tp)}", value) from None
            setattr(self, name, new)
        self._check_on_build()
        if strict:
            self._check()

    def validate(self) -> None:
        """Checks the object as it is now, nested objects included, and converts fields set
        since construction: these objects are mutable (clients set fields after building
        them), and `run_training` calls this so that such a field gets the same ConfigError."""
        for name, _, _, _ in _field_plan(type(self)):
            value = getattr(self, name)
            if isinstance(value, ConfigModel):
                try:
                    value.validate()
                except ConfigError as exc:
                    raise exc.nested(self._root, name) from None
        self.__post_init__()
        self._check()

    def _check_on_build(self) -> None:
        """What InstructLab checks when the object is built (its pydantic validators)."""

    def _check(self) -> None:
        """Every range and relation: at validate(), or at once for a config file."""

    def _need(self, ok: bool, name: str, allowed: str) -> None:
        if not ok:
            raise ConfigError(self._root, (name,), allowed, getattr(self, name))

    def __deepcopy__(self, memo: dict):
        # msgspec's deepcopy rebuilds through __init__, which would convert and check the
        # fields; a copy must be the object as it is (a bad value is reported by validate()).
        token = _COPYING.set(True)
        try:
            new = type(self)(**{f: copy.deepcopy(getattr(self, f), memo) for f in self.__struct_fields__})
        finally:
            _COPYING.reset(token)
        memo[id(self)] = new
        return new

    # ---------------------------------------------------------------- pydantic's methods

    @classmethod
    def model_validate(cls, obj: Any):
        """An object from a mapping of its fields (laxly); an instance is returned as it is."""
        if isinstance(obj, cls):
            return obj
        if not isinstance(obj, Mapping):
            raise ConfigError(cls._root, (), f"expected a mapping of fields, got {type(obj).__name__}")
        return build(cls, obj)

    def model_copy(self, *, update: Mapping | None = None, deep: bool = False):
        """A copy (nested objects shared unless `deep`), with `update` set as it is (not
        converted or checked, as pydantic does)."""
        new = copy.deepcopy(self) if deep else copy.copy(self)
        for key, value in (update or {}).items():
            setattr(new, key, value)
        return new

    def model_dump(self, *, mode: str = "python", include=None, exclude=None, exclude_none: bool = False,
                   exclude_defaults: bool = False, **_ignored) -> dict:
        """The fields as a dict, nested objects as dicts. mode="python" keeps enum members
        and tuples; mode="json" gives what JSON holds (values, lists)."""
        out = {}
        for f in msgspec.structs.fields(self):
            name = f.name
            if name in self._dump_excludes or (include is not None and name not in include) \
                    or (exclude is not None and name in exclude):
                continue
            value = getattr(self, name)
            if exclude_none and value is None:
                continue
            if exclude_defaults and f.default is not msgspec.NODEFAULT and value == f.default:
                continue
            out[name] = _dump_value(value, mode)
        return out

    def model_dump_json(self, *, indent: int | None = None, **kwargs) -> str:
        return json.dumps(self.model_dump(mode="json", **kwargs), indent=indent)

    def dict(self, **kwargs) -> dict:  # pydantic v1's name
        return self.model_dump(**kwargs)

    def json(self, **kwargs) -> str:  # pydantic v1's name
        return self.model_dump_json(**kwargs)

    @_ClassProperty
    def model_fields(cls) -> dict[str, FieldInfo]:
        return {f.name: FieldInfo(f.type, f.default, f.default_factory) for f in msgspec.structs.fields(cls)}

    @classmethod
    def model_json_schema(cls) -> dict:
        """A JSON schema in pydantic's shape: the object's own at the top, nested ones in $defs."""
        schema = msgspec.json.schema(cls)
        defs = schema.get("$defs", {})
        root = defs.pop(cls.__name__, schema)
        for definition in [root, *defs.values()]:
            for name, prop in definition.get("properties", {}).items():
                prop.setdefault("title", name.replace("_", " ").title())
        return {**root, **({"$defs": defs} if defs else {})}


_TRUE = {"1", "on", "t", "true", "y", "yes"}
_FALSE = {"0", "off", "f", "false", "n", "no"}


def _as_pydantic_reads(value: Any, types_: frozenset) -> Any:
    """What msgspec's lax conversion does not do and pydantic's does: the words pydantic
    reads as booleans ("yes", "off"...), and a bool given for a number."""
    if isinstance(value, str) and bool in types_ and str not in types_:
        word = value.strip().lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
    if isinstance(value, bool) and bool not in types_ and (int in types_ or float in types_):
        return int(value) if int in types_ else float(value)
    return value


def _dump_value(value: Any, mode: str) -> Any:
    if isinstance(value, ConfigModel):
        return value.model_dump(mode=mode)
    if isinstance(value, enum.Enum):
        return value.value if mode == "json" else value
    if isinstance(value, (list, tuple)):
        items = [_dump_value(v, mode) for v in value]
        return items if mode == "json" or isinstance(value, list) else tuple(items)
    if isinstance(value, Mapping):
        return {k: _dump_value(v, mode) for k, v in value.items()}
    return value

"""Typed records from plain data: dataclasses built from JSON/YAML mappings, and back.

Why one strict reader for every file we read back (training configs, index manifests, trained
model metadata): a typo or a wrong type in a key must stop with a message naming the file and
the key, not run on with a default or fail later with a ``KeyError`` traceback.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing

from cvgl.errors import InputError


def plain_dict(record) -> dict:
    """A dataclass as JSON/YAML-ready nested dicts and lists (tuples become lists)."""
    return _plain(dataclasses.asdict(record))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def from_dict(cls, data, where: str, error: type[Exception] = InputError):
    """Build dataclass ``cls`` from ``data``, refusing unknown keys and wrong types.

    ``where`` names the file (and key path) in messages; ``error`` is the exception raised
    (an index reader raises :class:`cvgl.errors.IndexFormatError`, a config reader InputError).
    Missing keys take the field's default; a field without a default must be present.
    """
    if not isinstance(data, dict):
        raise error(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise error(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(fields))})")
    required = [
        name for name, f in fields.items()
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if required:
        raise error(f"{where}: missing key '{required[0]}'")
    kwargs = {key: coerce(hints[key], value, f"{where}.{key}", error) for key, value in data.items()}
    return cls(**kwargs)


def coerce(hint, value, where: str, error: type[Exception] = InputError):
    """``value`` checked (and converted where lossless: int -> float, list -> tuple) to ``hint``."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        reader = getattr(hint, "from_dict", None)  # a record that validates itself reads itself
        return reader(value, where) if reader is not None else from_dict(hint, value, where, error)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if value is None:
            raise error(f"{where}: expected a value, got null")
        return coerce(inner[0], value, where, error)
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            if not isinstance(value, (list, tuple)):
                raise error(f"{where}: expected a list, got {value!r}")
            return tuple(coerce(args[0], v, where, error) for v in value)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise error(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(coerce(a, v, where, error) for a, v in zip(args, value))
    if origin is list:
        if not isinstance(value, list):
            raise error(f"{where}: expected a list, got {value!r}")
        (arg,) = typing.get_args(hint)
        return [coerce(arg, v, where, error) for v in value]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise error(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise error(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise error(f"{where}: expected a whole number, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise error(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise error(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise error(f"{where}: expected text, got {value!r}")
        return value
    return value

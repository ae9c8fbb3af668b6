"""dict -> dataclass conversion that reports every problem at once.

OmegaConf's structured merge stops at the first bad value; users fixing a config want the full
list, so conversion walks the schema itself and collects errors with their dotted field paths.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

T = TypeVar("T")

MISSING = "???"


class ConfigError(ValueError):
    """Every problem found in a run configuration, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid configuration ({len(problems)} problem{'s' * (len(problems) != 1)}):\n{lines}")


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin in (list, dict):
        return repr(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str, errors: list[str]) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(value, tp, path, errors)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            trial: list[str] = []
            out = _convert(value, arg, path, trial)
            if not trial:
                return out
        errors.append(f"{path}: expected {_describe(tp)}, got {value!r}")
        return None
    if origin is Literal:
        if value not in get_args(tp):
            errors.append(f"{path}: {value!r} is not valid; expected {_describe(tp)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            errors.append(f"{path}: expected a list, got {value!r}")
            return []
        (item,) = get_args(tp)
        return [_convert(v, item, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {value!r}")
            return {}
        _, vt = get_args(tp)
        return {str(k): _convert(v, vt, f"{path}.{k}", errors) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{path}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if value == MISSING:
            errors.append(f"{path}: is required but not set")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # Hydra reads name=2024 or env.OMP_NUM_THREADS=4 as numbers
        elif not isinstance(value, str):
            errors.append(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"schema type {tp!r} at {path} is not supported")


def _build(data: Any, cls: type, path: str, errors: list[str]) -> Any:
    where = path or "config"
    if not isinstance(data, dict):
        errors.append(f"{where}: expected a mapping, got {data!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            errors.append(f"{path + '.' if path else ''}{key}: unknown field; valid fields: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], sub, errors)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{sub}: is required but not set")
        elif f.default == MISSING:
            errors.append(f"{sub}: is required but not set")
    try:
        return cls(**kwargs)
    except TypeError:
        return None


def check_value(value: Any, tp: Any, path: str) -> list[str]:
    """The problems of `value` as a value of schema type `tp` at `path` (none: an empty list), in
    the words `to_typed` uses: how command-line overrides are checked before composition."""
    errors: list[str] = []
    _convert(value, tp, path, errors)
    return errors


def to_typed(data: dict, cls: type[T]) -> T:
    """Build `cls` from a plain dict or raise ConfigError listing every problem."""
    errors: list[str] = []
    out = _build(data, cls, "", errors)
    if errors:
        raise ConfigError(errors)
    return out

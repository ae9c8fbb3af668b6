"""The schema dataclasses as Hydra structured configs: the one place defaults live.

conf/config.yaml starts its defaults list with `run_schema`, the structured config registered
here, so Hydra fills every field an option YAML leaves out with the dataclass default; a YAML
option holds only what it changes.

OmegaConf 2.3 supports neither `Literal` nor a `Union` other than `Optional`, which the schema
uses to document valid values (and which `to_typed` checks, reporting every problem at once).
So Hydra gets a copy of each schema dataclass derived here, with the same fields and defaults
and the nearest type OmegaConf supports: a Literal becomes the type of its values, any other
Union becomes Any, containers and nested dataclasses are mapped item by item.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Dict, List, Literal, Optional, Union, get_args, get_origin  # noqa: UP035 (OmegaConf's)

from omegaconf import MISSING

from orchestrator.config.schema import RunConfig

SCHEMA_NAME = "run_schema"
"""The name conf/config.yaml's defaults list gives the registered RunConfig."""


def omegaconf_type(tp: Any) -> Any:
    """The type OmegaConf 2.3 can hold closest to schema type `tp`."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return structured(tp)
    if origin is Literal:
        kinds = {type(a) for a in get_args(tp)}
        return kinds.pop() if len(kinds) == 1 and kinds <= {str, int, float, bool} else Any
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            inner = omegaconf_type(rest[0])
            return Optional[inner] if len(rest) < len(args) and inner is not Any else inner  # noqa: UP045
        return Any
    if origin is list:
        return List[omegaconf_type(get_args(tp)[0])]  # noqa: UP006
    if origin is dict:
        key, value = get_args(tp)
        return Dict[key, omegaconf_type(value)]  # noqa: UP006
    return tp


@functools.cache
def structured(cls: type) -> type:
    """A dataclass with the fields and defaults of schema dataclass `cls`, typed for OmegaConf."""
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        tp = omegaconf_type(hints[f.name])
        if dataclasses.is_dataclass(hints[f.name]):
            spec = dataclasses.field(default_factory=tp)
        elif f.default_factory is not dataclasses.MISSING:
            spec = dataclasses.field(default_factory=f.default_factory)
        elif f.default is not dataclasses.MISSING:
            spec = dataclasses.field(default=f.default)
        else:
            spec = dataclasses.field(default=MISSING)
        specs.append((f.name, tp, spec))
    derived = dataclasses.make_dataclass(cls.__name__, specs)
    derived.__doc__ = f"OmegaConf view of {cls.__module__}.{cls.__qualname__} (see there for each field)."
    return derived


def register() -> None:
    """Store the structured RunConfig in Hydra's ConfigStore as `run_schema` (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=structured(RunConfig))

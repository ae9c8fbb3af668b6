"""Composition of conf/ into a RunConfig, shared by the CLI and the tests."""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from orchestrator.config.schema import RunConfig
from orchestrator.config.structured import register as register_schema
from orchestrator.config.typed import ConfigError, check_value, to_typed
from orchestrator.packaged import packaged

CONF_DIR = Path(os.environ.get("ORCHESTRATOR_CONF_DIR", packaged("conf")))


def _demo(kind: str) -> str:
    from orchestrator import demo

    paths = {"model": demo.demo_dir() / "tiny-llama", "alpaca": demo.DEMO_DATA, "chat": demo.DEMO_CHAT_DATA}
    if kind not in paths:
        raise ValueError(f"${{demo:{kind}}}: unknown demo asset; valid: {', '.join(paths)}")
    return str(paths[kind])


def _number(value: object) -> int | float:
    if isinstance(value, bool):
        raise ValueError(f"${{mul:...}}: expected numbers, got {value!r}")
    if isinstance(value, (int, float)):
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"${{mul:...}}: expected numbers, got {value!r}") from None


def _mul(*factors) -> int | float:
    """`${mul:${adapter.r},2}`: the product of its arguments, a number (int if all are ints), so
    that a coupled field like alpha = 2 * r reaches the typed config as a number, not a string."""
    product: int | float = 1
    for f in factors:
        product *= _number(f)
    return product


if not OmegaConf.has_resolver("demo"):
    OmegaConf.register_new_resolver("demo", _demo)
if not OmegaConf.has_resolver("mul"):
    OmegaConf.register_new_resolver("mul", _mul)

# Sweepers a `sweep=` preset may select that are plugins outside hydra-core: (module, pip spec).
SWEEPER_PLUGINS = {"optuna": ("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper==1.3.0")}

# The schema dataclasses, as the structured config conf/config.yaml's defaults list starts with.
register_schema()

ConfigDirs = Sequence["str | os.PathLike[str]"]
"""Config directories of the user's own, searched after conf/ (Hydra's --config-dir)."""


def _search_dirs(config_dirs: ConfigDirs = ()) -> list[Path]:
    """conf/ first, then the user's directories: the order in which Hydra looks for an option."""
    return [CONF_DIR, *(Path(d).expanduser().resolve() for d in config_dirs)]


def group_options(config_dirs: ConfigDirs = ()) -> dict[str, list[str]]:
    """Every config group and its options (YAML files) in conf/ and in `config_dirs`."""
    options: dict[str, set[str]] = {}
    for root in _search_dirs(config_dirs):
        if root.is_dir():
            for d in root.iterdir():
                if d.is_dir():
                    options.setdefault(d.name, set()).update(p.stem for p in d.glob("*.yaml"))
    return {group: sorted(names) for group, names in sorted(options.items())}


def _missing_sweeper_plugin(preset: str, config_dirs: ConfigDirs = ()) -> str | None:
    """Problem text if sweep=<preset> selects a sweeper plugin that is not installed (Hydra alone
    would say "Could not find 'hydra/sweeper/optuna'")."""
    import importlib.util

    import yaml

    found_in = [p for d in _search_dirs(config_dirs) for p in [d / "sweep" / f"{preset}.yaml"] if p.is_file()]
    try:
        text = yaml.safe_load(found_in[0].read_text()) or {}
    except (IndexError, OSError, yaml.YAMLError):
        return None
    for entry in text.get("defaults") or []:
        if not isinstance(entry, dict):
            continue
        for key, value in entry.items():
            if str(key).split()[-1].lstrip("/") == "hydra/sweeper" and value in SWEEPER_PLUGINS:
                module, spec = SWEEPER_PLUGINS[value]
                try:
                    found = importlib.util.find_spec(module) is not None
                except ImportError:
                    found = False
                if not found:
                    return f"sweep={preset}: needs the {value} sweeper plugin, not installed; pip install {spec}"
    return None


def _field_type(dotted: str) -> tuple[Any, str | None]:
    """(schema type of the field `dotted` names, None), or (None, problem text) if it names no
    field (Hydra would abort on it alone). A key inside a dict field (cluster.env.FOO) has the
    dict's value type; below a leaf the type is None, left to Hydra and `to_typed`."""
    tp: Any = RunConfig
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if dataclasses.is_dataclass(tp):
            fields = [f.name for f in dataclasses.fields(tp)]
            if part not in fields:
                return None, f"{'.'.join(parts[: i + 1])}: unknown field; valid fields: {', '.join(fields)}"
            tp = typing.get_type_hints(tp)[part]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            return None, f"{dotted}: unknown field; {'.'.join(parts[:i])} is a value, not a mapping"
    return tp, None


def _in_mapping_field(dotted: str) -> bool:
    """True for a dict field (cluster.env) or a key inside one (cluster.env.FOO)."""
    cls: type = RunConfig
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            return False
        fields = {f.name for f in dataclasses.fields(cls)}
        if part not in fields:
            return False
        cls = typing.get_type_hints(cls)[part]
        if typing.get_origin(cls) is dict:
            return True
    return False


def _has_interpolation(value: Any) -> bool:
    if isinstance(value, str):
        return "${" in value
    if isinstance(value, (list, tuple)):
        return any(_has_interpolation(v) for v in value)
    if isinstance(value, dict):
        return any(_has_interpolation(v) for v in value.values())
    return False


def _value_problems(ov: Any, tp: Any) -> list[str]:
    """Type problems of an override's value(s) as schema type `tp`: every value of a choice or
    range sweep is checked; interpolations (resolved later), `???` and intervals are not."""
    from hydra.core.override_parser.types import IntervalSweep

    if ov.is_sweep_override():
        if isinstance(ov.value(), IntervalSweep):
            return []
        try:
            values = list(ov.sweep_iterator())
        except Exception:  # noqa: BLE001 - a sweep Hydra cannot enumerate is left to the sweeper
            return []
    else:
        values = [ov.value()]
    problems: list[str] = []
    for v in values:
        if v != MISSING and not _has_interpolation(v):
            problems += [p for p in check_value(v, tp, ov.key_or_group) if p not in problems]
    return problems


def _parse_problem(e: Exception) -> str:
    """What Hydra's override parser objects to, in one line (its message also holds the input, a
    caret under it and a link)."""
    lines = [x.strip() for x in str(e).splitlines()]
    if lines and lines[0].startswith("LexerNoViableAltException"):
        return "a character the grammar does not accept; quote the value"
    detail = [x for x in lines[1:] if x and not x.startswith("See ") and set(x) != {"^"}]
    return detail[0] if detail else (lines[0] if lines else type(e).__name__)


def check_group_overrides(overrides: Sequence[str], config_dirs: ConfigDirs = ()) -> tuple[list[str], list[str]]:
    """Split overrides into (usable, problems) so that an unknown group option or field, or a
    value of the wrong type, is reported together with every other problem instead of aborting
    composition on its own (the structured config makes Hydra check types as it composes).
    `config_dirs`: the user's config directories, whose options count too."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    overrides = list(overrides)
    problems: list[str] = [f"config dir {d}: not a directory" for d in _search_dirs(config_dirs)[1:] if not d.is_dir()]
    groups = group_options(config_dirs)
    parser = OverridesParser.create()
    usable: list[str] = []
    for text in overrides:
        try:
            (ov,) = parser.parse_overrides([text])
        except HydraException as e:
            problems.append(
                f"{text!r}: not an override Hydra can parse ({_parse_problem(e)}); "
                "the forms are key=value, group=option, +key=value, ~key"
            )
            continue
        key = ov.key_or_group
        if not key:
            problems.append(f"{text!r}: an override needs a key before '='")
            continue
        if key in groups:
            if not ov.is_delete():
                values = ov.value()
                choices = values if isinstance(values, list) else [values]
                if ov.is_sweep_override():
                    choices = list(ov.sweep_string_iterator())
                # Hydra takes no null for a group (~group removes one): it would abort composition.
                bad = [c for c in choices if c is None or str(c) not in groups[key]]
                if bad:
                    problems.append(
                        f"{key}={','.join('null' if c is None else str(c) for c in bad)}: no such option; "
                        f"valid: {', '.join(groups[key])}"
                    )
                    continue
                missing = [
                    m
                    for c in choices
                    if key == "sweep" and c is not None
                    for m in [_missing_sweeper_plugin(str(c), config_dirs)]
                    if m
                ]
                if missing:
                    problems.extend(missing)
                    continue
            usable.append(text)
            continue
        if key.startswith("hydra"):
            usable.append(text)
            continue
        tp, problem = _field_type(key)
        if problem:
            problems.append(problem)
            continue
        if ov.is_delete() and not ("." in key and _in_mapping_field(key.rsplit(".", 1)[0])):
            problems.append(f"~{key}: a field of the schema cannot be removed; set {key}=<value> instead")
            continue
        if tp is not None and not ov.is_delete() and not dataclasses.is_dataclass(tp):
            bad_values = _value_problems(ov, tp)
            if bad_values:
                problems.extend(bad_values)
                continue
        # Dict fields take new keys (cluster.env.FOO=1): `++` lets Hydra add them to a struct config.
        usable.append("++" + text if not text.startswith(("+", "~")) and _in_mapping_field(key) else text)
    return usable, problems


def resolve(cfg: DictConfig) -> RunConfig:
    """Resolve interpolations and convert to the typed schema (all type errors at once)."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        data = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "config"
        raise ConfigError([f"{key}: cannot be resolved ({e.msg if hasattr(e, 'msg') else e})"]) from None
    data.pop("hydra", None)
    data.pop("experiment", None)
    run = to_typed(data, RunConfig)
    if run.storage_path and run.name:
        # The run's identity is its name under shared storage: the same name continues that run.
        run.output_dir = run.storage_run_dir()
    if run.data.cache_dir is None:
        # Resolved here, once: workers on other machines or with another environment use this one.
        from orchestrator.rundir import data_cache_root

        run.data.cache_dir = str(data_cache_root(run.storage_path))
    c = run.cluster
    if c.cpus_per_worker is None:
        local = c.kind == "local" and not c.address
        # One thread per worker would leave a single local worker on one core of many.
        c.cpus_per_worker = float(max(len(os.sched_getaffinity(0)) // max(c.num_workers, 1), 1)) if local else 1.0
    return run


def _quoted(text: str) -> str:
    """`text` as a quoted string of Hydra's override grammar."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _composition_problem(e: Exception) -> str:
    """One line for what Hydra stopped composing on (an option YAML with an unknown key or a
    value of the wrong type, which `check_group_overrides` cannot see)."""
    from omegaconf.errors import OmegaConfBaseException

    where = str(e).splitlines()[0] if str(e) else type(e).__name__
    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        key = getattr(cause, "full_key", None)
        msg = (getattr(cause, "msg", None) or str(cause)).splitlines()[0]
        return f"{key + ': ' if key else ''}{msg} ({where.rstrip(':')})"
    return " ".join(str(e).split())


def compose(overrides: Sequence[str] | None = None, config_dirs: ConfigDirs = ()) -> RunConfig:
    """Compose conf/ with overrides outside a Hydra app (tests, library use).

    `output_dir` must be given as an override, since Hydra's run directory exists only in an app.
    `config_dirs`: the user's config directories, searched after conf/ (like --config-dir), so
    their options (experiment=mine) can be selected.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    usable, problems = check_group_overrides(list(overrides or []), config_dirs)
    extra = [d for d in _search_dirs(config_dirs)[1:] if d.is_dir()]
    if extra:
        usable.append(f"hydra.searchpath=[{','.join(_quoted(f'file://{d}') for d in extra)}]")
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=usable)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        raise ConfigError(problems + [_composition_problem(e)]) from None
    try:
        run = resolve(cfg)
    except ConfigError as e:
        raise ConfigError(problems + e.problems) from None
    if problems:
        raise ConfigError(problems)
    return run

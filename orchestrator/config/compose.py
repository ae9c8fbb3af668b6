"""Composition of conf/ into a RunConfig, shared by the CLI and the tests."""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from orchestrator.config.schema import RunConfig
from orchestrator.config.typed import ConfigError, to_typed

CONF_DIR = Path(os.environ.get("ORCHESTRATOR_CONF_DIR", Path(__file__).resolve().parents[2] / "conf"))


def _demo(kind: str) -> str:
    from orchestrator import demo

    paths = {"model": demo.demo_dir() / "tiny-llama", "alpaca": demo.DEMO_DATA, "chat": demo.DEMO_CHAT_DATA}
    if kind not in paths:
        raise ValueError(f"${{demo:{kind}}}: unknown demo asset; valid: {', '.join(paths)}")
    return str(paths[kind])


def _number(value) -> int | float:
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


def group_options() -> dict[str, list[str]]:
    return {
        d.name: sorted(p.stem for p in d.glob("*.yaml"))
        for d in sorted(CONF_DIR.iterdir())
        if d.is_dir()
    }


def _missing_sweeper_plugin(preset: str) -> str | None:
    """Problem text if sweep=<preset> selects a sweeper plugin that is not installed (Hydra alone
    would say "Could not find 'hydra/sweeper/optuna'")."""
    import importlib.util

    import yaml

    try:
        text = yaml.safe_load((CONF_DIR / "sweep" / f"{preset}.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
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


def _unknown_field(dotted: str) -> str | None:
    """Problem text if `dotted` names no field of the schema (Hydra would abort on it alone)."""
    cls: type = RunConfig
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            where = ".".join(parts[:i] + [part])
            return f"{where}: unknown field; valid fields: {', '.join(fields)}"
        tp = typing.get_type_hints(cls)[part]
        if not dataclasses.is_dataclass(tp):
            return None  # a leaf (dict fields take any sub-key)
        cls = tp
    return None


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


def check_group_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """Split overrides into (usable, problems) so that an unknown group option or field is
    reported together with every other problem instead of aborting composition on its own."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    groups = group_options()
    parsed = OverridesParser.create().parse_overrides(overrides)
    usable, problems = [], []
    for text, ov in zip(overrides, parsed):
        key = ov.key_or_group
        if key not in groups and not ov.is_add() and not key.startswith("hydra"):
            problem = _unknown_field(key)
            if problem:
                problems.append(problem)
                continue
        if key in groups and not ov.is_delete():
            values = ov.value()
            choices = values if isinstance(values, list) else [values]
            if ov.is_sweep_override():
                choices = list(ov.sweep_string_iterator())
            bad = [c for c in choices if c is not None and str(c) not in groups[key]]
            if bad:
                problems.append(f"{key}={','.join(map(str, bad))}: no such option; valid: {', '.join(groups[key])}")
                continue
            missing = [m for c in choices if key == "sweep" and c is not None for m in [_missing_sweeper_plugin(str(c))] if m]
            if missing:
                problems.extend(missing)
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
    return run


def compose(overrides: list[str] | None = None) -> RunConfig:
    """Compose conf/ with overrides outside a Hydra app (tests, library use).

    `output_dir` must be given as an override, since Hydra's run directory exists only in an app.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    usable, problems = check_group_overrides(list(overrides or []))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=usable)
    try:
        run = resolve(cfg)
    except ConfigError as e:
        raise ConfigError(problems + e.problems) from None
    if problems:
        raise ConfigError(problems)
    return run

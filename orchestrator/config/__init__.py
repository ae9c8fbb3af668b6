"""Run configuration: schema, composition from conf/, and validation."""

from orchestrator.config.compose import CONF_DIR, check_group_overrides, compose, group_options, resolve
from orchestrator.config.schema import (
    AdapterConfig,
    ClusterConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    QuantConfig,
    RunConfig,
    StrategyConfig,
    TrackingConfig,
    TrainerConfig,
    as_dict,
)
from orchestrator.config.typed import ConfigError, to_typed
from orchestrator.config.validate import static_problems, validate

__all__ = [
    "CONF_DIR",
    "AdapterConfig",
    "ClusterConfig",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "QuantConfig",
    "RunConfig",
    "StrategyConfig",
    "TrackingConfig",
    "TrainerConfig",
    "as_dict",
    "check_group_overrides",
    "compose",
    "group_options",
    "resolve",
    "static_problems",
    "to_typed",
    "validate",
]

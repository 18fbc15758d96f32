"""Typed configuration: one dataclass per component, a strict YAML loader with dotted overrides, validation."""

from megatron_hapo.config.algo import (
    AdvantageConfig,
    AggregationConfig,
    AlgoConfig,
    ClipConfig,
    EntropyConfig,
    GroupFilterConfig,
    GuidePolicyConfig,
    RatioConfig,
    RedistributionConfig,
    RewardShapingConfig,
    SamplingConfig,
)
from megatron_hapo.config.errors import ConfigError, ConfigWarning
from megatron_hapo.config.loader import (
    build_dataclass,
    field_docs,
    load_config,
    parse_override,
    resolve_tree,
    to_tree,
)
from megatron_hapo.config.run import Config, OptimConfig, RolloutConfig, TrainConfig
from megatron_hapo.config.validation import no_effect_warnings, validate

__all__ = [
    "AdvantageConfig",
    "AggregationConfig",
    "AlgoConfig",
    "ClipConfig",
    "Config",
    "ConfigError",
    "ConfigWarning",
    "EntropyConfig",
    "GroupFilterConfig",
    "GuidePolicyConfig",
    "OptimConfig",
    "RatioConfig",
    "RedistributionConfig",
    "RewardShapingConfig",
    "RolloutConfig",
    "SamplingConfig",
    "TrainConfig",
    "build_dataclass",
    "field_docs",
    "load_config",
    "no_effect_warnings",
    "parse_override",
    "resolve_tree",
    "to_tree",
    "validate",
]

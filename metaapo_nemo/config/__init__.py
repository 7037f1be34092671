"""Typed recipe configuration: schema, YAML loader with inheritance, and the shared CLI.

Typical use in a recipe::

    from metaapo_nemo.config import dry_run_report, parse, read_model_dims, world_size_from_env

    cfg, args = parse(description=__doc__, method="dpo")
    if args.dry_run:
        print(dry_run_report(cfg, world_size_from_env(), read_model_dims(cfg)))
        return
"""

from metaapo_nemo.config.cli import (
    build_arg_parser,
    dry_run_report,
    parse,
    read_model_dims,
    world_size_from_env,
)
from metaapo_nemo.config.loader import (
    CONF_DIR,
    DEFAULT_RECIPE,
    DEFAULT_RECIPES,
    REPO_ROOT,
    load_config,
    resolve_repo_path,
    to_yaml,
)
from metaapo_nemo.config.schema import (
    Config,
    ConfigError,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    ReferenceConfig,
    RunConfig,
    TinyModelConfig,
    TrainConfig,
    check_layout,
)

__all__ = [
    "CONF_DIR",
    "DEFAULT_RECIPE",
    "DEFAULT_RECIPES",
    "REPO_ROOT",
    "Config",
    "ConfigError",
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "ReferenceConfig",
    "RunConfig",
    "TinyModelConfig",
    "TrainConfig",
    "build_arg_parser",
    "check_layout",
    "dry_run_report",
    "load_config",
    "parse",
    "read_model_dims",
    "resolve_repo_path",
    "to_yaml",
    "world_size_from_env",
]

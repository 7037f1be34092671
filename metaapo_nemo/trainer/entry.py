"""The shared `main()` of every recipe: parse -> --dry-run report, or setup -> train -> finish.

Bad input found while setting up (config, data rows, paths, chat templates) ends the run
with exit status 2 and the message, never a traceback from deep inside a library.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from metaapo_nemo.checkpoint import CheckpointError
from metaapo_nemo.config.cli import dry_run_report, parse, read_model_dims, world_size_from_env
from metaapo_nemo.config.schema import Config, ConfigError
from metaapo_nemo.data.preference import BadRowError, ChatTemplateError
from metaapo_nemo.trainer.resilience import NonFiniteError

USER_ERRORS = (ConfigError, BadRowError, ChatTemplateError, FileNotFoundError, CheckpointError)
NONFINITE_EXIT = 3  # stopped on a non-finite loss/gradient after saving the last good state


def run_recipe(
    doc: str | None,
    setup: Callable[[Config], Any],
    train: Callable[[Any], Any],
    finish: Callable[[Any, Any], None],
    argv: list[str] | None = None,
) -> int:
    """Runs a recipe's three phases; returns the process exit status."""
    cfg, args = parse(argv, description=doc)
    if args.dry_run:
        print(dry_run_report(cfg, world_size_from_env(), read_model_dims(cfg)))
        return 0
    try:
        components = setup(cfg)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        from metaapo_nemo.parallel import state

        state.destroy()  # setup may have initialised the process groups before the bad input
        return 2
    try:
        state = train(components)
    except NonFiniteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        _close(components)
        return NONFINITE_EXIT
    finish(components, state)
    return state.exit_code


def _close(components: Any) -> None:
    """Releases what a run holds (engines, files, process groups) after an early stop."""
    from metaapo_nemo.parallel import state

    rollout = getattr(components, "rollout", None)
    if rollout is not None:
        rollout.shutdown()
    logger = getattr(components, "logger", None)
    if logger is not None:
        logger.close()
    state.destroy()

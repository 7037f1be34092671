"""Evaluations at the end of a run, chosen by name in the config (``eval.task``).

The library ships no evaluation task; it calls the one the config names, after training and
the HF export, on every rank (an evaluation may need the process groups, e.g. to push the
trained weights into a generation engine):

    eval:
      task: tasks.ifeval_eval:evaluate_run   # or a name given to `register_eval`

A name is either registered in this process (`register_eval`, for code that builds runs
itself) or ``module:function`` (resolved by `metaapo_nemo.named`, so modules beside the
package such as ``tasks/`` are found from any script). `get_eval` is called when the run is
built, so a bad name stops the run before step 1, not after training.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from metaapo_nemo.config.schema import ConfigError
from metaapo_nemo.named import load_callable

#: ``fn(cfg, ctx, policy, model_dir, run_dir) -> result or None``: `cfg` the validated
#: `Config` (its ``eval`` section set), `ctx` the `ParallelContext`, `policy` the trained
#: `MegatronLM`, `model_dir` the initial HF checkpoint, `run_dir` where results go.
EvalFn = Callable[[Any, Any, Any, Path, Path], Any]
#: With ``eval.every_steps`` the function is also called during training with ``step=`` (the
#: optimiser steps done); it appends that point to ``run_dir / EVAL_CURVE`` (one JSON object per
#: line with a "step" key), which a resumed run truncates to the points before its checkpoint.
EVAL_CURVE = "eval_curve.jsonl"

_EVALS: dict[str, EvalFn] = {}


def register_eval(name: str, fn: EvalFn) -> None:
    """Makes `fn` selectable as ``eval.task=name`` in this process.

    Raises:
        ValueError: `name` contains ':' (reserved for ``module:function``) or is taken by
            another function.
    """
    if ":" in name:
        raise ValueError(f"eval name {name!r}: ':' is reserved for 'module:function' names")
    if _EVALS.get(name, fn) is not fn:
        raise ValueError(f"eval name {name!r} is already registered to {_EVALS[name]!r}")
    _EVALS[name] = fn


def registered_evals() -> list[str]:
    """The names `register_eval` has given, sorted."""
    return sorted(_EVALS)


def get_eval(name: str) -> EvalFn:
    """The evaluation ``eval.task=name`` selects: a registered name, else ``module:function``.

    Raises:
        ConfigError: Neither a registered name nor an importable ``module:function``.
    """
    if name in _EVALS:
        return _EVALS[name]
    if ":" not in name:
        known = ", ".join(registered_evals()) or "none"
        raise ConfigError(
            f"eval.task={name!r} is not a registered evaluation (registered: {known}); name one "
            "as 'module:function', e.g. eval.task=tasks.ifeval_eval:evaluate_run"
        )
    return load_callable(name, "eval.task")

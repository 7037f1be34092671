"""A small callback mechanism for the training loop.

The loop calls `CallbackList.fire("on_step_end", state)` at fixed points; a callback is
any object with some of the hook methods (no base class to inherit). Logging,
checkpointing and (MetaAPO issue) the meta-learner's T_meta update plug in here.

Hooks: on_train_start, on_step_end, on_round_end, on_train_end.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

HOOKS = ("on_train_start", "on_step_end", "on_round_end", "on_train_end")


@dataclass
class TrainState:
    """What callbacks may read (and the loop owns)."""

    step: int = 0  # optimiser steps done
    epoch: int = 0
    total_steps: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)  # the latest step's metrics
    stop: bool = False  # a callback may request a clean stop
    exit_code: int = 0  # the process exit status (e.g. 85 after a preemption checkpoint)


class Callback(Protocol):
    """Any subset of: on_train_start, on_step_end, on_round_end, on_train_end(state)."""


class CallbackList:
    def __init__(self, callbacks: Iterable[object] = ()):
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            if not any(callable(getattr(cb, h, None)) for h in HOOKS):
                raise TypeError(f"{type(cb).__name__} implements none of the hooks {HOOKS}")

    def fire(self, hook: str, state: TrainState) -> None:
        if hook not in HOOKS:
            raise ValueError(f"unknown hook {hook!r}; hooks are {HOOKS}")
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(state)

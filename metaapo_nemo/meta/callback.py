"""T_meta callback: one meta-learner step every T_meta policy optimiser steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from metaapo_nemo.meta.learner import MetaLearner


class MetaUpdateCallback:
    """Steps the meta-learner on the buffer recorded since its last step, then clears it.

    With `frozen=True` (the fixed-weights ablation) the buffer is still cleared every
    T_meta steps but h_phi never changes.
    """

    def __init__(self, learner: MetaLearner, every: int = 8, frozen: bool = False,
                 after_step: Callable[[dict[str, float]], dict[str, float] | None] | None = None):
        """`after_step(metrics)` runs after every meta step (e.g. sync h_phi across pipeline
        stages); what it returns, if anything, replaces the step's meta metrics."""
        if every < 1:
            raise ValueError(f"metaapo.t_meta={every} must be >= 1")
        self.learner, self.every, self.frozen = learner, every, frozen
        self.after_step = after_step
        self.last: dict[str, float] = {}

    def on_step_end(self, state: Any) -> None:
        """`state`: the loop's TrainState (step, metrics); duck-typed so meta/ needs no trainer import."""
        if state.step % self.every:
            return
        if self.frozen:
            self.learner.buffer.clear()
            return
        self.last = self.learner.step()
        if self.after_step is not None:  # may replace the metrics (e.g. by the last stage's)
            self.last = self.after_step(self.last) or self.last
        state.metrics.update(self.last)

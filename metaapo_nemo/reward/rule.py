"""Rule-based rewards: a plain Python callable named in the config as ``module:function``.

The callable takes ``(messages, response)`` (the prompt's chat history and the response
text) and returns a float, e.g. ``tasks.toy_rules:score`` for the bundled toy data or
``tasks.ifeval_task:score`` for the IFEval-style task (both outside the installed package;
how names resolve: `metaapo_nemo.named`). Name errors are reported at construction
(start-up), not at the first scoring call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from metaapo_nemo.named import load_callable
from metaapo_nemo.reward.base import Message

RuleFn = Callable[[Sequence[Message], str], float]


class RuleReward:
    """`RewardModel` that applies a named Python function to each response."""

    def __init__(self, spec: str):
        self.spec = spec
        self.fn: RuleFn = load_callable(spec, "reward.callable")

    def score(self, prompts: Sequence[Sequence[Message]], responses: Sequence[str]) -> list[float]:
        return [float(self.fn(msgs, text)) for msgs, text in zip(prompts, responses)]

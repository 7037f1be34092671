"""Rule-based rewards: a plain Python callable named in the config as ``module:function``.

The callable takes ``(messages, response)`` (the prompt's chat history and the response
text) and returns a float; see `toy_rules.score` for the bundled toy data. Name errors are
reported at construction (start-up), not at the first scoring call.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence

from metaapo_nemo.reward.base import Message

RuleFn = Callable[[Sequence[Message], str], float]


def load_callable(spec: str) -> RuleFn:
    """Imports ``module:function``.

    Raises:
        ValueError: Bad format, missing module or function, or not callable, with the
            config key and what was found instead.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"reward.callable={spec!r} must look like 'module:function', e.g. "
            "'metaapo_nemo.reward.toy_rules:score'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"reward.callable={spec!r}: cannot import module {module_name!r} "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            found = sorted(
                n
                for n, v in vars(module).items()
                if callable(v) and not n.startswith("_") and inspect.isfunction(v)
            )
            raise ValueError(
                f"reward.callable={spec!r}: module {module_name!r} has no "
                f"attribute {attr!r}; its functions: {', '.join(found) or 'none'}"
            )
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(  # noqa: TRY004 (a config value, reported like every config error)
            f"reward.callable={spec!r} names a {type(fn).__name__}, not a function"
        )
    return fn  # type: ignore[return-value]


class RuleReward:
    """`RewardModel` that applies a named Python function to each response."""

    def __init__(self, spec: str):
        self.spec = spec
        self.fn = load_callable(spec)

    def score(self, prompts: Sequence[Sequence[Message]], responses: Sequence[str]) -> list[float]:
        return [float(self.fn(msgs, text)) for msgs, text in zip(prompts, responses)]

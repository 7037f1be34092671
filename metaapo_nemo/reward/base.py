"""The `RewardModel` seam: (prompt messages, response text) -> one scalar score each.

Backends: `hf.HFRewardModel` (a Bradley-Terry sequence-classification checkpoint with its
own tokenizer and chat template) and `rule.RuleReward` (a Python callable named in the
config). `registry.build_reward_model` picks one from the `reward` config section.

`score_batched` is what the trainer calls: it splits the texts into ``reward.batch_size``
chunks, checks that every score is a finite float, and turns any failure into a
`RewardError` that names the prompt batch and the policy step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

Message = dict[str, str]


class RewardError(RuntimeError):
    """The reward model failed or returned unusable scores (names batch and step)."""


@runtime_checkable
class RewardModel(Protocol):
    """Scores responses to prompts; higher is better."""

    def score(self, prompts: Sequence[Sequence[Message]], responses: Sequence[str]) -> list[float]:
        """One float per (prompt messages, response text) pair, in order."""
        ...


def score_batched(
    model: RewardModel,
    prompts: Sequence[Sequence[Message]],
    responses: Sequence[str],
    batch_size: int,
    *,
    policy_step: int,
    what: str,
) -> list[float]:
    """Scores in chunks of `batch_size`; every failure becomes a `RewardError`.

    Args:
        model: The reward model.
        prompts: Chat histories (one per response).
        responses: Response texts.
        batch_size: Texts per call of `model.score`.
        policy_step: The policy step whose samples are scored (for the message).
        what: The prompt batch, e.g. `PromptBatch.describe()` (for the message).

    Raises:
        RewardError: If the model raises, returns the wrong count, or a non-finite score.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    scores: list[float] = []
    for start in range(0, len(responses), batch_size):
        chunk_p, chunk_r = (
            prompts[start : start + batch_size],
            responses[start : start + batch_size],
        )
        where = (
            f"reward model {type(model).__name__} at policy step {policy_step} on {what} "
            f"(texts {start}..{start + len(chunk_r) - 1})"
        )
        try:
            out = model.score(chunk_p, chunk_r)
        except Exception as exc:
            raise RewardError(f"{where} failed: {type(exc).__name__}: {exc}") from exc
        out = list(out)
        if len(out) != len(chunk_r):
            raise RewardError(f"{where} returned {len(out)} scores for {len(chunk_r)} texts")
        bad = [i + start for i, s in enumerate(out) if not _finite(s)]
        if bad:
            raise RewardError(f"{where} returned non-finite scores for texts {bad[:8]}")
        scores.extend(float(s) for s in out)
    return scores


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


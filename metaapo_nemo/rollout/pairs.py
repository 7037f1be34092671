"""Online preference pairs: best and worst of K samples by reward, with exact counters.

For each prompt, the candidates are its K samples minus those the truncation policy
(``rollout.truncated``) removes; the reward model scores exactly the candidates; the
chosen sample is the highest-ranked, the rejected the lowest-ranked.

Truncation (samples cut at ``max_new_tokens``, ``finish_reason == "length"``):
- ``keep``: they compete like any other sample;
- ``drop``: they are not candidates (and are not scored); fewer than 2 complete samples
  -> no pair (``too_few_candidates``);
- ``worst``: they rank below every complete sample (ties among them by score), so the
  chosen is always complete; no complete sample at all -> no pair (``too_few_candidates``).

Ties give no pair and are counted: all candidates' scores equal (``ties_all_equal``), or
the chosen and rejected texts equal (``ties_same_text``): never train on y_w == y_l.
Among equal scores the lower sample index wins, so the choice is deterministic.

Counters are exact sums over prompts; `AnnotationCounters.add` merges rounds or ranks.

Tie refills (``rollout.tie_refills``, `metaapo_nemo.algorithms.online.online_pairs`): a prompt
without a pair gets K more samples and best/worst is picked again over all of its samples;
`annotate` takes the scores it already has (``known``) so only new texts go to the reward
model, and every refill draw counts in the cost counters (``refill_prompts``,
``refill_samples`` and the usual generated / scored totals).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Literal

from metaapo_nemo.reward.base import Message, RewardModel, score_batched
from metaapo_nemo.rollout.generator import PromptBatch, PromptSamples, Sample

TruncationPolicy = Literal["keep", "drop", "worst"]


@dataclass
class AnnotationCounters:
    """What one or more rounds of online annotation cost and produced."""

    prompts_generated: int = 0  # prompts sent to the engine
    samples_generated: int = 0
    samples_truncated: int = 0  # cut at max_new_tokens
    samples_scored: int = 0  # texts sent to the reward model
    pairs: int = 0
    ties_all_equal: int = 0
    ties_same_text: int = 0
    too_few_candidates: int = 0  # truncation left < 2 candidates (or no complete one)
    refill_prompts: int = 0  # tie refills: prompt draws after the first (rollout.tie_refills)
    refill_samples: int = 0  # samples those draws generated (also in samples_generated)

    def add(self, other: AnnotationCounters) -> AnnotationCounters:
        """Adds `other` in place (returns self)."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class OnlinePair:
    """One online preference pair (token ids are the response only, EOS included)."""

    key: int
    prompt_ids: tuple[int, ...]
    chosen: Sample
    rejected: Sample
    chosen_score: float
    rejected_score: float


def candidates(group: PromptSamples, policy: TruncationPolicy) -> list[int]:
    """Indices of the samples of `group` that go to the reward model.

    Returns [] when no pair is possible anyway (so nothing is scored for it).
    """
    idx = list(range(len(group.samples)))
    complete = [i for i in idx if not group.samples[i].truncated]
    if policy == "drop":
        idx = complete
    if len(idx) < 2 or (policy == "worst" and not complete):
        return []
    return idx


def pick_pair(
    group: PromptSamples, cand: Sequence[int], scores: Sequence[float], policy: TruncationPolicy
) -> tuple[OnlinePair | None, str | None]:
    """Best and worst of the candidates; (pair, None) or (None, reason counted instead).

    Args:
        group: The prompt's samples.
        cand: Candidate indices (from `candidates`), len >= 2.
        scores: Reward of each candidate, aligned with `cand`.
        policy: The truncation policy ("worst" demotes truncated samples).
    """

    def rank(j: int) -> tuple[int, float]:
        demoted = policy == "worst" and group.samples[cand[j]].truncated
        return (0 if demoted else 1, scores[j])

    order = range(len(cand))
    best = max(order, key=lambda j: (rank(j), -j))  # ties -> lower index
    worst = min(order, key=lambda j: (rank(j), j))
    if all(s == scores[0] for s in scores) and len({rank(j)[0] for j in order}) == 1:
        return None, "ties_all_equal"
    chosen, rejected = group.samples[cand[best]], group.samples[cand[worst]]
    if chosen.text == rejected.text:
        return None, "ties_same_text"
    return OnlinePair(
        group.key, group.prompt_ids, chosen, rejected, scores[best], scores[worst]
    ), None


def make_pairs(
    groups: Sequence[PromptSamples],
    scores: Sequence[Sequence[float]],
    policy: TruncationPolicy,
) -> tuple[list[OnlinePair], AnnotationCounters]:
    """Pairs from already-scored groups (scores aligned with `candidates(group, policy)`).

    Raises:
        ValueError: If a group's score count does not match its candidates.
    """
    counters = AnnotationCounters(prompts_generated=len(groups))
    pairs: list[OnlinePair] = []
    for group, group_scores in zip(groups, scores, strict=True):
        cand = candidates(group, policy)
        counters.samples_generated += len(group.samples)
        counters.samples_truncated += sum(s.truncated for s in group.samples)
        if len(group_scores) != len(cand):
            raise ValueError(
                f"prompt {group.key}: {len(group_scores)} scores for {len(cand)} candidates"
            )
        counters.samples_scored += len(cand)
        if not cand:
            counters.too_few_candidates += 1
            continue
        pair, reason = pick_pair(group, cand, group_scores, policy)
        if pair is None:
            setattr(counters, reason, getattr(counters, reason) + 1)  # type: ignore[arg-type]
        else:
            pairs.append(pair)
    counters.pairs = len(pairs)
    return pairs, counters


def annotate(
    batch: PromptBatch,
    groups: Sequence[PromptSamples],
    reward: RewardModel,
    policy: TruncationPolicy,
    batch_size: int,
    policy_step: int,
    known: dict[tuple[int, int], float] | None = None,
) -> tuple[list[OnlinePair], AnnotationCounters]:
    """Scores the candidates of every prompt with `reward` and builds the online pairs.

    Args:
        batch: The generated prompt batch (its `messages` feed the RM's chat template).
        groups: The engine's samples, in batch order.
        reward: The reward model.
        policy: ``rollout.truncated``.
        batch_size: ``reward.batch_size``.
        policy_step: For error messages.
        known: Scores already computed, by (prompt key, sample index): those candidates are
            not sent to the reward model again (tie refills); new scores are added to it.
            ``samples_scored`` counts only the texts sent.

    Raises:
        RewardError: Naming the prompt batch and the step.
        ValueError: If the batch has no messages or does not match the groups.
    """
    if batch.messages is None:
        raise ValueError(f"{batch.describe()}: the reward model needs the prompts' messages")
    if [g.key for g in groups] != list(batch.keys):
        raise ValueError(f"{batch.describe()}: samples do not match the batch's prompts")
    known = {} if known is None else known
    cands = [candidates(g, policy) for g in groups]
    prompts: list[Sequence[Message]] = []
    texts: list[str] = []
    todo: list[tuple[int, int]] = []
    for msgs, group, cand in zip(batch.messages, groups, cands):
        new = [i for i in cand if (group.key, i) not in known]
        prompts.extend([msgs] * len(new))
        texts.extend(group.samples[i].text for i in new)
        todo.extend((group.key, i) for i in new)
    flat = score_batched(
        reward, prompts, texts, batch_size, policy_step=policy_step, what=batch.describe()
    ) if texts else []
    known.update(zip(todo, flat))
    per_group = [[known[(g.key, i)] for i in cand] for g, cand in zip(groups, cands)]
    pairs, counters = make_pairs(groups, per_group, policy)
    counters.samples_scored = len(todo)
    return pairs, counters

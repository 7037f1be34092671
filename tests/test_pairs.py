"""Online pairs: best/worst of K, ties, truncation policies, exact counters (synthetic)."""

from __future__ import annotations

import math

import pytest

from metaapo_nemo.reward.base import RewardError
from metaapo_nemo.reward.rule import RuleReward
from metaapo_nemo.rollout.generator import PromptBatch, PromptSamples, Sample
from metaapo_nemo.rollout.pairs import AnnotationCounters, annotate, candidates, make_pairs


def _group(key: int, texts: list[str], truncated: set[int] = frozenset()) -> PromptSamples:
    samples = tuple(
        Sample(
            k,
            tuple(range(10 * k, 10 * k + 3)),
            text,
            "length" if k in truncated else "stop",
            (-1.0, -1.0, -1.0),
        )
        for k, text in enumerate(texts)
    )
    return PromptSamples(key, (1, 2, 3), samples)


def test_best_and_worst_with_deterministic_tie_breaks():
    g = _group(0, ["a", "b", "c", "d"])
    pairs, c = make_pairs([g], [[1.0, 3.0, 3.0, -2.0]], "keep")
    (pair,) = pairs
    assert (pair.chosen.k, pair.rejected.k) == (1, 3)  # two maxima: the lower index wins
    assert (pair.chosen_score, pair.rejected_score) == (3.0, -2.0)
    pairs, _ = make_pairs([g], [[0.0, 5.0, 0.0, 0.0]], "keep")
    assert (pairs[0].chosen.k, pairs[0].rejected.k) == (1, 0)
    assert c.as_dict() == {
        "prompts_generated": 1,
        "samples_generated": 4,
        "samples_truncated": 0,
        "samples_scored": 4,
        "pairs": 1,
        "ties_all_equal": 0,
        "ties_same_text": 0,
        "too_few_candidates": 0,
        "refill_prompts": 0,
        "refill_samples": 0,
    }


def test_ties_give_no_pair_and_are_counted():
    all_equal = _group(0, ["a", "b", "c"])
    same_text = _group(1, ["same", "other", "same"])
    pairs, c = make_pairs([all_equal, same_text], [[2.0, 2.0, 2.0], [9.0, 5.0, 1.0]], "keep")
    assert pairs == []
    assert (c.ties_all_equal, c.ties_same_text, c.pairs) == (1, 1, 0)


@pytest.mark.parametrize(
    "policy, cands, scores, expect",
    [
        # sample 0 is truncated and has the best score
        ("keep", [0, 1, 2, 3], [9.0, 1.0, 2.0, 3.0], (0, 1)),
        ("drop", [1, 2, 3], [1.0, 2.0, 3.0], (3, 1)),
        ("worst", [0, 1, 2, 3], [9.0, 1.0, 2.0, 3.0], (3, 0)),  # truncated ranks last
    ],
)
def test_truncation_policies(policy, cands, scores, expect):
    g = _group(0, ["t", "a", "b", "c"], truncated={0})
    assert candidates(g, policy) == cands
    pairs, c = make_pairs([g], [scores], policy)
    assert (pairs[0].chosen.k, pairs[0].rejected.k) == expect
    assert c.samples_truncated == 1 and c.samples_scored == len(cands)


def test_truncation_edge_cases():
    mostly_cut = _group(0, ["a", "b", "c"], truncated={0, 1})
    all_cut = _group(1, ["a", "b"], truncated={0, 1})
    assert candidates(mostly_cut, "drop") == []  # one complete sample: no pair possible
    assert candidates(all_cut, "worst") == []  # no complete sample to be chosen
    assert candidates(all_cut, "keep") == [0, 1]
    # worst: equal scores, but complete beats truncated -> a pair, not a tie
    pairs, c = make_pairs([mostly_cut], [[1.0, 1.0, 1.0]], "worst")
    assert (pairs[0].chosen.k, pairs[0].rejected.k) == (2, 0) and c.ties_all_equal == 0
    _, c = make_pairs([mostly_cut, all_cut], [[], []], "drop")
    assert c.too_few_candidates == 2 and c.samples_scored == 0 and c.samples_generated == 5


def test_counters_exact_over_a_mixed_batch():
    groups = [
        _group(0, ["a", "b", "c", "d"]),  # pair
        _group(1, ["a", "b", "c", "d"]),  # all equal
        _group(2, ["x", "y", "x", "z"]),  # best == worst text
        _group(3, ["a", "b", "c", "d"], truncated={0, 1, 2}),  # drop -> too few
        _group(4, ["a", "b", "c", "d"], truncated={3}),  # pair among 3
    ]
    scores = [[1, 2, 3, 4], [5, 5, 5, 5], [9, 1, 0, 9], [], [3, 2, 1]]
    pairs, c = make_pairs(groups, scores, "drop")
    assert [p.key for p in pairs] == [0, 4]
    assert c.as_dict() == {
        "prompts_generated": 5,
        "samples_generated": 20,
        "samples_truncated": 4,
        "samples_scored": 15,
        "pairs": 2,
        "ties_all_equal": 1,
        "ties_same_text": 1,
        "too_few_candidates": 1,
        "refill_prompts": 0,
        "refill_samples": 0,
    }
    total = AnnotationCounters().add(c).add(c)
    assert total.samples_scored == 30 and total.pairs == 4


def test_score_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 scores for 3 candidates"):
        make_pairs([_group(0, ["a", "b", "c"])], [[1.0, 2.0]], "keep")


def _batch(n: int) -> PromptBatch:
    msgs = [[{"role": "user", "content": f"What is {i} + 1?"}] for i in range(n)]
    return PromptBatch.build([[1, 2]] * n, keys=list(range(100, 100 + n)), round=2, messages=msgs)


def test_annotate_scores_only_candidates_with_the_rule_rm():
    batch = _batch(2)
    groups = [
        _group(100, ["0 + 1 = 1.", "It is 7.", "no idea", "1"], truncated={3}),
        _group(101, ["3", "3", "3", "2"]),
    ]
    pairs, c = annotate(
        batch,
        groups,
        RuleReward("tasks.toy_rules:score"),
        "drop",
        batch_size=2,
        policy_step=9,
    )
    assert c.samples_scored == 3 + 4 and c.pairs == 2
    assert pairs[0].chosen.text == "0 + 1 = 1." and pairs[0].rejected.text == "It is 7."
    assert pairs[1].chosen.text == "2" and pairs[1].rejected.text == "3"


class _Flaky:
    def __init__(self, result):
        self.result = result

    def score(self, prompts, responses):
        if isinstance(self.result, Exception):
            raise self.result
        return [self.result] * len(responses)


def test_reward_failure_names_batch_and_step():
    batch = _batch(3)
    groups = [_group(k, ["a", "b"]) for k in batch.keys]
    with pytest.raises(
        RewardError, match=r"policy step 12 on round 2, 3 prompts, keys \[100, 101, 102\].*OSError"
    ):
        annotate(batch, groups, _Flaky(OSError("disk")), "keep", batch_size=4, policy_step=12)
    with pytest.raises(RewardError, match="non-finite"):
        annotate(batch, groups, _Flaky(math.nan), "keep", batch_size=4, policy_step=12)

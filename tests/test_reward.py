"""Reward models: the tiny HF Bradley-Terry RM and the rule backend (no vLLM needed)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from metaapo_nemo.config.loader import load_config
from metaapo_nemo.models.tiny import TinyModelSpec
from metaapo_nemo.reward.base import RewardError, score_batched
from metaapo_nemo.reward.hf import HFRewardModel, resolve_dtype
from metaapo_nemo.reward.registry import build_reward_model
from metaapo_nemo.named import load_callable
from metaapo_nemo.reward.rule import RuleReward
from metaapo_nemo.reward.tiny_rm import ensure_tiny_reward_model

PROMPTS = [
    [{"role": "user", "content": "What is 3 + 4?"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "List three colours."},
    ],
    [{"role": "user", "content": "What is the capital of Peru?"}],
]
RESPONSES = ["3 + 4 = 7.", "Here are three colours: red, blue and green.", "Lima."]


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    return ensure_tiny_reward_model(TinyModelSpec(arch="qwen2"), tmp_path_factory.mktemp("rm"))


def test_tiny_rm_is_a_scalar_head_checkpoint(tiny_rm, tmp_path_factory):
    cfg = json.loads((tiny_rm / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForSequenceClassification"]
    assert cfg.get("num_labels", len(cfg.get("id2label", {}))) == 1
    assert (
        ensure_tiny_reward_model(TinyModelSpec(arch="qwen2"), tiny_rm.parent) == tiny_rm
    )  # cached


def test_hf_rm_scores_deterministically_and_batch_invariantly(tiny_rm):
    rm = HFRewardModel(tiny_rm, batch_size=3)
    assert rm.dtype == torch.float32 and rm.resident_device.type == "cpu"
    prompts, responses = PROMPTS * 2, RESPONSES + ["7", "red", "Rome, probably, or maybe Lima."]
    first = rm.score(prompts, responses)
    assert first == rm.score(prompts, responses)  # bit-identical on a repeat
    assert first == HFRewardModel(tiny_rm, batch_size=3).score(prompts, responses)  # and a reload
    one_by_one = HFRewardModel(tiny_rm, batch_size=1).score(prompts, responses)
    torch.testing.assert_close(torch.tensor(first), torch.tensor(one_by_one), rtol=0, atol=1e-5)
    assert len(set(first)) == len(first)  # different texts, different scores


def test_hf_rm_uses_its_own_chat_template(tiny_rm):
    rm = HFRewardModel(tiny_rm)
    (text,) = rm.render([PROMPTS[0]], ["Seven."])
    assert (
        text
        == "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\nSeven.<|im_end|>"
    )
    # the score is read at the last real token: it must not depend on right padding
    alone = rm.score([PROMPTS[0]], ["Seven."])[0]
    padded = rm.score([PROMPTS[0], PROMPTS[1]], ["Seven.", RESPONSES[1] * 3])[0]
    assert abs(alone - padded) < 1e-5


def test_hf_rm_refuses_a_causal_lm(tiny_llama):
    with pytest.raises(ValueError, match="num_labels=2"):
        HFRewardModel(tiny_llama)


def test_dtype_resolution():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_rule_backend_loads_by_name_and_ranks_the_toy_data():
    rm = RuleReward("tasks.toy_rules:score")
    good = rm.score(PROMPTS, RESPONSES)
    bad = rm.score(PROMPTS, ["3 + 4 = 8.", "Here are three colours: cat, dog and fox.", "Rome."])
    assert all(g > b for g, b in zip(good, bad))


def test_toy_rule_prefers_every_bundled_chosen_answer():
    from metaapo_nemo.config.loader import resolve_repo_path
    from tasks.toy_rules import score

    path = resolve_repo_path("metaapo_nemo/data/samples/toy_prefs.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        prompt = row["chosen"][:-1]
        assert score(prompt, row["chosen"][-1]["content"]) > score(
            prompt, row["rejected"][-1]["content"]
        )


@pytest.mark.parametrize(
    "spec, message",
    [
        ("tasks.toy_rules", "must look like 'module:function'"),
        ("no_such_module_xyz:score", "cannot import module 'no_such_module_xyz'"),
        ("tasks.toy_rules:scor", r"has no attribute 'scor'; its functions: score"),
        ("tasks.toy_rules:_CAPITALS", "names a dict, not a function"),
    ],
)
def test_rule_backend_bad_names(spec, message):
    with pytest.raises(ValueError, match=message):
        load_callable(spec, "reward.callable")


def test_rule_names_resolve_from_the_working_directory(tmp_path, monkeypatch):
    # `python recipes/x.py` puts recipes/ on sys.path, not the cwd: a user's module beside
    # the run (or tasks/ in the checkout) is still found by name, after sys.path
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rules_7f3a.py").write_text("def score(messages, response):\n    return 1.5\n")
    assert RuleReward("my_rules_7f3a:score").score(PROMPTS[:1], ["x"]) == [1.5]
    assert sys.path[-1] == str(tmp_path)
    with pytest.raises(ValueError, match="cannot import module 'my_rules_7f3a.sub'"):
        load_callable("my_rules_7f3a.sub:score", "reward.callable")


def test_build_from_config(tmp_path):
    rule = build_reward_model(load_config(None, ["reward.backend=rule", "reward.tiny=null",
                                                 "reward.callable=tasks.toy_rules:score"]))
    assert isinstance(rule, RuleReward) and rule.spec == "tasks.toy_rules:score"
    cfg = load_config(
        None, ["reward.backend=hf", "reward.tiny={arch: llama}", "reward.batch_size=2"]
    )
    hf = build_reward_model(cfg, cache_dir=str(tmp_path))
    assert isinstance(hf, HFRewardModel) and hf.batch_size == 2 and hf.offload
    assert len(hf.score(PROMPTS, RESPONSES)) == 3
    with pytest.raises(Exception, match="exactly one of reward.path"):
        load_config(None, ["reward.backend=hf", "reward.tiny=null"])
    with pytest.raises(Exception, match="module:function"):
        load_config(None, ["reward.backend=rule", "reward.callable=toy_rules"])


def test_score_batched_checks_every_chunk():
    class Short:
        def score(self, prompts, responses):
            return [0.0] * (len(responses) - 1)

    with pytest.raises(
        RewardError, match=r"policy step 3 on round 1 .*texts 0\.\.1\) returned 1 scores"
    ):
        score_batched(Short(), PROMPTS, RESPONSES, 2, policy_step=3, what="round 1 keys [5]")

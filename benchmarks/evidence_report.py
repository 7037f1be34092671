"""The evidence study's analysis (benchmarks/results/claims.md fixes it): tables, verdicts, plots.

Reads the cells of `benchmarks/evidence_study.py` (``--work``/cells/<method>_seed<s>/: eval.json,
rounds.jsonl, metrics.jsonl, cell.json) and writes ``<prefix>.md``, ``<prefix>.json`` and three
PNGs into the results folder. Methods or seeds without a finished cell are listed as missing;
a claim whose cells are missing is "not run".

Analysis (claims.md): per held-out prompt p and seed s, G_s(p, s) = mean gold of the sampled
responses, G_g(p, s) = gold of the greedy one. A difference X - Y is paired by (p, s); its 95%
interval is a two-level percentile bootstrap (10,000 resamples, seed 0): seeds with replacement,
then prompts with replacement, the same prompt draw for every drawn seed (the prompts are the same
for every seed: a crossed design).

    python benchmarks/evidence_report.py runs/evidence_smollm2 [--results benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from metaapo_nemo.evals import EVAL_CURVE
from metaapo_nemo.trainer.summary import read_jsonl

SFT = "sft"
LABELS = {"sft": "SFT start", "dpo": "offline DPO", "online_dpo": "Online DPO", "metaapo": "MetaAPO",
          "random_sampling": "random sampling", "fixed_weights": "fixed weights",
          "sample_all_meta": "sample-all + meta w", "metaapo_lora": "MetaAPO + LoRA r16 (10x lr)"}
ORDER = ("dpo", "online_dpo", "metaapo", "random_sampling", "fixed_weights", "sample_all_meta")
EXTRA = ("metaapo_lora",)  # reported when run (evidence_study --methods), never "missing"
LR_SCALE = {"metaapo_lora": 10.0}  # their lr as a multiple of the tuned one (as evidence_study.LR_SCALE)
META_METHODS = ("metaapo", "random_sampling", "fixed_weights", "sample_all_meta")
MARGIN = 0.01  # claims (a), (b): non-inferiority margin
# A cell whose 1-minute load average at its end was above this shared the 2 cores with other
# jobs (a cell alone runs at ~2): its wall time is flagged in the report.
LOADED = 3.0


ROUND_KEYS = ("round", "epoch", "step", "prompts", "sampled", "online_pairs", "trained_prompts", "ties",
              "refill_prompts", "samples_generated_total", "annotation_ratio", "w_mean", "prepare_s", "train_s")


def load_study(work: Path, cells_from: Path | None = None) -> tuple[dict[str, dict[int, dict]], dict | None]:
    """(method -> seed -> cell, the tuning result) from the study's ``--work`` folder (the main
    cells with a cell.json) or from a digest file (`digest`). `cells_from`: a digest whose cells
    join the folder's (cells run earlier, e.g. in a session whose run directories are gone); a
    method and seed in both is taken from the folder."""
    cells: dict[str, dict[int, dict]] = {}
    if cells_from is not None:
        cells, tuning = load_study(cells_from)
        own, own_tuning = load_study(work)
        for m, by_seed in own.items():
            cells.setdefault(m, {}).update(by_seed)
        return cells, own_tuning or tuning
    if work.is_file():
        data = json.loads(work.read_text())
        for c in data["cells"]:
            cells.setdefault(c["method"], {})[c["seed"]] = c
        return cells, data["tuning"]
    for done in sorted((work / "cells").glob("*/cell.json")):
        rec = json.loads(done.read_text())
        if rec["name"].startswith("tune_"):
            continue
        d = done.parent
        rec |= {"eval": json.loads((d / "eval.json").read_text()), "rounds": read_jsonl(d / "rounds.jsonl"),
                "steps": read_jsonl(d / "metrics.jsonl"), "config": _cell_config(d),
                "curve": [{"step": x["step"], "G_s": x["sampled"]["gold"], "G_g": x["greedy"]["gold"]}
                          for x in read_jsonl(d / EVAL_CURVE)]}
        cells.setdefault(rec["method"], {})[rec["seed"]] = rec
    tuning = work / "tuning.json"
    return cells, json.loads(tuning.read_text()) if tuning.is_file() else None


def digest(cells: dict[str, dict[int, dict]], tuning: dict | None) -> dict:
    """The cells in compact form (scores, rounds, losses, config; no texts), committed beside the
    report so the analysis can be rerun without the run directories."""
    out = []
    for by_seed in cells.values():
        for c in by_seed.values():
            ev = c["eval"]
            out.append({k: c[k] for k in ("name", "method", "seed", "wall_s", "command", "finished", "config")}
                       | {"loadavg_1m_at_end": c.get("loadavg_1m_at_end"), "concurrent_cells": c.get("concurrent_cells", 1)}
                       | {"eval": {part: {mode: {"scores": _rounded(ev[part][mode]["scores"])} for mode in ("greedy", "sampled")}
                                   for part in ("before", "after")} | {"prompts": [p["key"] if "key" in p else i
                                                                                   for i, p in enumerate(ev["prompts"])]},
                          "rounds": [{k: r.get(k) for k in ROUND_KEYS} for r in c["rounds"]],
                          "steps": [{"step": x["step"], "loss": round(x["loss"], 9)} for x in c["steps"]],
                          "curve": [{k: round(v, 9) for k, v in x.items()} for x in c.get("curve", [])]})
    return {"cells": out, "tuning": tuning}


def _rounded(scores: list[list[float]]) -> list[list[float]]:
    """Scores to 9 decimals (a gold score is a ratio of small integers; the analysis prints 3)."""
    return [[round(x, 9) for x in xs] for xs in scores]


def per_prompt(ev_part: dict, mode: str) -> np.ndarray:
    """Per-prompt gold: the mean over a prompt's responses (greedy: its one response)."""
    return np.array([sum(xs) / len(xs) for xs in ev_part[mode]["scores"]], dtype=np.float64)


def matrix(cells: dict[int, dict], seeds: list[int], mode: str, part: str = "after") -> np.ndarray:
    return np.stack([per_prompt(cells[s]["eval"][part], mode) for s in seeds])  # (S, P)


def bootstrap(d: np.ndarray, resamples: int, seed: int = 0) -> tuple[float, float, float]:
    """Mean of d (S x P) and its two-level percentile 95% interval."""
    rng = np.random.default_rng(seed)
    S, P = d.shape
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // (S * P))
    for start in range(0, resamples, chunk):
        n = min(chunk, resamples - start)
        si = rng.integers(0, S, size=(n, S))
        pi = rng.integers(0, P, size=(n, P))
        means[start:start + n] = d[si[:, :, None], pi[:, None, :]].mean(axis=(1, 2))
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)


def annotation_at(cell: dict, step: int) -> float:
    """A (as `annotation`) spent before optimiser step `step + 1`: the samples of every round
    that started before it (a round generates at its start; its `step` is the step at its end)."""
    cfg, start, samples = cell["config"], 0, 0
    for r in cell["rounds"]:
        if start >= step:
            break
        samples, start = r.get("samples_generated_total", 0), r["step"]
    return samples / (cfg["k"] * cfg["data_prompts"]) if cell["rounds"] else 0.0


def curves(cells: dict[str, dict[int, dict]], methods: list[str], seeds: list[int]) -> dict:
    """method -> [(step, A, mean sampled gold over seeds, min, max)] of the points measured during
    training (``eval.every_steps``: eval_curve.jsonl), for the steps every seed measured."""
    out = {}
    for m in methods:
        by_step: dict[int, list[tuple[float, float]]] = {}
        for s in seeds:
            for x in cells[m][s].get("curve", []):
                by_step.setdefault(x["step"], []).append((x["G_s"], annotation_at(cells[m][s], x["step"])))
        pts = [(step, float(np.mean([a for _, a in v])), float(np.mean([g for g, _ in v])),
                min(g for g, _ in v), max(g for g, _ in v))
               for step, v in sorted(by_step.items()) if len(v) == len(seeds)]
        if pts:
            out[m] = pts
    return out


def annotation(cell: dict) -> dict:
    """Annotation cost of a cell (claims.md amendment 1): A = samples generated / (K x prompts in
    the data), refill draws and extra passes included; A_p = prompt draws (first draws and
    refills) / prompts in the data; untrained = online pairs annotated but never trained on
    (with unselected prompts dropped, a round trains whole global batches of its pairs only,
    and the step budget may end a round early)."""
    rounds = cell["rounds"]
    if not rounds:
        return {"A": 0.0, "A_prompts": 0.0, "samples": 0, "refill_prompts": 0, "untrained_pairs": 0}
    cfg = cell["config"]
    k, data_prompts, G = cfg["k"], cfg["data_prompts"], cfg["global_batch"]
    samples = rounds[-1].get("samples_generated_total", 0)
    refills = sum(r.get("refill_prompts") or 0 for r in rounds)
    draws = sum(r["sampled"] for r in rounds) + refills
    untrained, prev = 0, 0
    for r in rounds:  # a round's `step` is the optimiser step at its end
        trained = G * (r["step"] - prev)
        prev = r["step"]
        if cfg["drop"]:
            untrained += r["online_pairs"] - trained
        else:  # every prompt trains (offline pair when it has no online one): only a round cut short by
            untrained += max(0, r["online_pairs"] - trained)  # the budget leaves some (a lower bound)
    return {"A": samples / (k * data_prompts), "A_prompts": draws / data_prompts, "samples": samples,
            "refill_prompts": refills, "untrained_pairs": untrained}


def _cell_config(run_dir: Path) -> dict:
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    rollout, data, m = cfg.get("rollout") or {}, cfg.get("data") or {}, cfg.get("metaapo") or {}
    return {"k": rollout.get("samples_per_prompt", 0), "data_prompts": data.get("limit"),
            "global_batch": cfg["train"]["global_batch_size"], "max_steps": cfg["train"].get("max_steps"),
            "drop": m.get("unselected") == "drop", "lr": cfg["optim"]["lr"], "beta": cfg["loss"]["beta"]}


def w_slope(rounds: list[dict]) -> float:
    ws = [r["w_mean"] for r in rounds]
    if len(ws) < 2:
        return float("nan")
    x = np.arange(len(ws), dtype=np.float64)
    return float(np.polyfit(x, np.array(ws), 1)[0])


def verdict_diff(kind: str, mean: float, lo: float, hi: float, greedy_mean: float) -> str:
    if kind == "noninferior":  # (a), (b)
        if lo > -MARGIN and mean > 0:
            return "reproduced" if greedy_mean >= 0 else "inconclusive (greedy contradicts)"
        return "refuted" if hi < 0 else "inconclusive"
    if lo > 0:  # (e): interval excludes 0 above
        return "reproduced" if greedy_mean >= 0 else "inconclusive (greedy contradicts)"
    return "refuted" if hi < 0 else "inconclusive"


def _all_or_none(values: list[float], ok) -> str:
    if not values or any(math.isnan(v) for v in values):
        return "not run"
    if all(ok(v) for v in values):
        return "reproduced"
    if all(not ok(v) for v in values):
        return "refuted"
    return "inconclusive"


def tuning_table(rows: list[dict], chosen: dict | None) -> list[str]:
    """Tuning cells as a markdown table; the row equal to `chosen` is marked."""
    lines = ["| lr | beta | sampled gold | greedy gold |", "|---|---|---|---|"]
    for g in rows:
        star = " **(chosen)**" if g == chosen else ""
        lines.append(f"| {g['lr']:g} | {g['beta']:g} | {g['sampled']:.3f}{star} | {g['greedy']:.3f} |")
    return lines


def edge_lines(tuning: dict) -> list[str]:
    """The tuning cells past the grid (run when the grid's best lr sat on its edge), if any, and
    which rule chose the setting: the grid's best ("grid", the first study) or the best of all
    tuning cells ("extend", claims.md amendment 3)."""
    edge, best = tuning.get("edge"), tuning["best"]
    if not edge:
        return []
    grid_best = tuning.get("grid_best", best)
    extend = tuning.get("rule") == "extend"
    lines = [f"Past the grid: the grid's best lr {grid_best['lr']:g} sat on its edge, so offline DPO also ran "
             "past it (half and a whole grid step, repeated while the best stayed on the edge; then the grid's "
             "betas at the best lr):", "", *tuning_table(edge, best if extend else None)]
    top = max(edge, key=lambda e: (e["sampled"], e["greedy"]))
    if extend:
        lines += ["", f"Every method uses the best of ALL tuning cells (claims.md amendment 3): lr {best['lr']:g}, "
                      f"beta {best['beta']:g} ({best['sampled']:.3f} sampled gold; the grid's best: "
                      f"{grid_best['sampled']:.3f})."]
    elif top["sampled"] > grid_best["sampled"]:
        lines += ["", f"**The optimum lies past the grid**: lr {top['lr']:g} beats the chosen setting on the "
                      f"tuning split ({top['sampled']:.3f} vs {grid_best['sampled']:.3f} sampled gold), so every "
                      "method ran at a learning rate below offline DPO's best; read the comparison with that in "
                      "mind (claims.md amendment 3)."]
    else:
        lines += ["", f"None beats the chosen setting ({grid_best['sampled']:.3f} sampled gold): the grid's edge "
                      "is a maximum along lr at this beta."]
    return lines + [""]


def analyse(cells: dict[str, dict[int, dict]], tuning: dict | None, resamples: int = 10_000) -> dict:
    """Tables and verdicts from `load_study`'s cells."""
    methods = [m for m in ORDER + EXTRA if m in cells]
    seeds = sorted(set.intersection(*(set(cells[m]) for m in methods))) if methods else []
    every = sorted(set().union(*(set(cells[m]) for m in methods))) if methods else []
    missing = [m for m in ORDER if m not in cells] + [f"{m} seed {s}" for m in methods for s in every
                                                      if s not in cells[m]]
    result: dict = {"seeds": seeds, "methods": methods, "missing": missing,
                    "concurrent_cells": max((c.get("concurrent_cells", 1) for m in methods
                                             for c in cells[m].values()), default=1)}
    if not seeds:
        return result | {"rows": [], "claims": []}
    # an extra method runs at a fixed multiple of the tuned lr (evidence_study.LR_SCALE)
    settings = {(round(c["config"]["lr"] / LR_SCALE.get(m, 1.0), 12), c["config"]["beta"], c["config"]["max_steps"])
                for m in methods for c in cells[m].values()}
    if len(settings) != 1:  # claims.md: every method gets the tuned DPO setting and the same budget
        raise ValueError(f"the main cells ran with different (lr, beta, max_steps): {sorted(settings)}")
    any_cell = cells[methods[0]][seeds[0]]
    P = len(any_cell["eval"]["prompts"])
    keys = {m: {s: [p["key"] if isinstance(p, dict) else p for p in cells[m][s]["eval"]["prompts"]] for s in seeds}
            for m in methods}
    want = keys[methods[0]][seeds[0]]
    for m in methods:  # the pairing: every cell evaluated the same prompts in the same order
        for s in seeds:
            if keys[m][s] != want:
                raise ValueError(f"cell {m} seed {s} evaluated other held-out prompts than {methods[0]} seed "
                                 f"{seeds[0]}: the study's eval settings differ between cells")
    sft = {mode: np.stack([per_prompt(cells[methods[0]][s]["eval"]["before"], mode) for s in seeds])
           for mode in ("sampled", "greedy")}
    gold = {m: {mode: matrix(cells[m], seeds, mode) for mode in ("sampled", "greedy")} for m in methods}
    gold[SFT] = sft
    ref = "metaapo" if "metaapo" in gold else None

    rows = []
    for m in [SFT, *methods]:
        row = {"method": m, "label": LABELS[m], "G_s": float(gold[m]["sampled"].mean()),
               "G_g": float(gold[m]["greedy"].mean()),
               "G_s_ci": bootstrap(gold[m]["sampled"], resamples)[1:]}
        if ref and m != ref:
            row["diff_vs_metaapo_s"] = bootstrap(gold[ref]["sampled"] - gold[m]["sampled"], resamples)
            row["diff_vs_metaapo_g"] = bootstrap(gold[ref]["greedy"] - gold[m]["greedy"], resamples)
        if m != SFT:
            cs = [cells[m][s] for s in seeds]
            ann = [annotation(c) for c in cs]
            row |= {"A": float(np.mean([a["A"] for a in ann])), "A_range": [min(a["A"] for a in ann), max(a["A"] for a in ann)],
                    "A_prompts": float(np.mean([a["A_prompts"] for a in ann])),
                    "refill_prompts": float(np.mean([a["refill_prompts"] for a in ann])),
                    "untrained_pairs": float(np.mean([a["untrained_pairs"] for a in ann])),
                    "steps": [len(c["steps"]) for c in cs], "wall_s": [c["wall_s"] for c in cs],
                    "loaded": [(s, c["loadavg_1m_at_end"]) for s, c in zip(seeds, cs)
                               if (c.get("loadavg_1m_at_end") or 0) > LOADED],
                    "lr": cs[0]["config"]["lr"], "beta": cs[0]["config"]["beta"],
                    "sft_diff_s": bootstrap(gold[m]["sampled"] - sft["sampled"], resamples)}
        rows.append(row)
    steps = {row["method"]: row["steps"] for row in rows if "steps" in row}
    budget = {n for v in steps.values() for n in v}
    result |= {"prompts": P, "rows": rows,
               "unequal_budget": None if len(budget) <= 1 else {m: v for m, v in steps.items()}}

    claims = []

    def diff(x: str, y: str) -> tuple | None:
        if x not in gold or y not in gold:
            return None
        return (bootstrap(gold[x]["sampled"] - gold[y]["sampled"], resamples),
                float((gold[x]["greedy"] - gold[y]["greedy"]).mean()))

    b = [diff(m, SFT) for m in ("dpo", "online_dpo")]
    b_run = None not in b
    b_met = b_run and all(x[0][1] > 0 for x in b)
    claims.append({"id": "B", "claim": "the baselines learn (DPO - SFT, Online DPO - SFT on G_s)",
                   "estimate": [None if x is None else x[0] for x in b],
                   "verdict": "not run" if not b_run else ("met" if b_met else "NOT met")})
    for cid, other, kind, text in (("a", "dpo", "noninferior", "MetaAPO >= offline DPO"),
                                   ("b", "online_dpo", "noninferior", "MetaAPO >= Online DPO"),
                                   ("e1", "random_sampling", "superior", "random sampling < MetaAPO"),
                                   ("e2", "fixed_weights", "superior", "fixed weights < MetaAPO"),
                                   ("e3", "sample_all_meta", "superior", "sample-all with meta weights < MetaAPO")):
        d = diff("metaapo", other)
        v = "not run" if d is None else verdict_diff(kind, *d[0], d[1])
        claims.append({"id": cid, "claim": text, "estimate": None if d is None else d[0],
                       "greedy_mean": None if d is None else d[1], "verdict": v})
    online_a = [annotation(cells["online_dpo"][s])["A"] for s in seeds] if "online_dpo" in cells else []
    if "metaapo" in cells and online_a and all(a > 0 for a in online_a):
        ratios = [annotation(cells["metaapo"][s])["A"] / a for s, a in zip(seeds, online_a)]
        claims.append({"id": "c", "claim": "MetaAPO's annotation <= 0.6 of Online DPO's", "estimate": ratios,
                       "verdict": _all_or_none(ratios, lambda r: r <= 0.6)})
    else:
        claims.append({"id": "c", "claim": "MetaAPO's annotation <= 0.6 of Online DPO's", "estimate": None,
                       "verdict": "not run"})
    slopes = [w_slope(cells["metaapo"][s]["rounds"]) for s in seeds] if "metaapo" in cells else []
    claims.append({"id": "d", "claim": "mean w rises over training", "estimate": slopes,
                   "verdict": _all_or_none(slopes, lambda v: v > 0)})
    order = {"B": 0, "a": 1, "b": 2, "c": 3, "d": 4, "e1": 5, "e2": 6, "e3": 7}
    claims.sort(key=lambda c: order[c["id"]])
    if not b_met:
        why = "B not met" if b_run else "B not run"
        for c in claims[1:]:
            if c["verdict"] != "not run":
                c["verdict"] = f"not read ({why}): {c['verdict']}"
    result["claims"] = claims
    result["b_met"] = b_met
    result["w"] = {m: {s: [r["w_mean"] for r in cells[m][s]["rounds"]] for s in seeds}
                   for m in methods if m in META_METHODS}
    result["curves"] = curves(cells, methods, seeds)
    result["tuning"] = tuning
    return result


def _ci(t) -> str:
    mean, lo, hi = t
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def markdown(r: dict, meta: dict) -> str:
    lines = [f"# Evidence study: {meta.get('title', 'SmolLM2-135M-Instruct on the IFEval-style task')}", "",
             f"Pre-registered in `benchmarks/results/claims.md`. Generated by `{meta.get('command', '')}` "
             f"on {meta.get('date', '')} ({meta.get('machine', '')}).", ""]
    if meta.get("cells_from"):
        lines += [f"Cells run earlier come from `{meta['cells_from']}` (their scores, rounds and wall times "
                  "as recorded then; not rerun).", ""]
    extra = [m for m in r.get("methods", []) if m in EXTRA]
    if extra:
        lines += [f"Outside the pre-registered claims: {', '.join(LABELS[m] for m in extra)}, at "
                  + ", ".join(f"{LR_SCALE.get(m, 1.0):g}x" for m in extra) + " the tuned lr (one untuned point; "
                  "the claims below compare the pre-registered methods only).", ""]
    if meta.get("ci"):
        lines += ["**CI size** (a tiny random model, a few steps): checks the pipeline, says nothing about the "
                  "claims.", ""]
    if not r.get("rows"):
        return "\n".join(lines + ["No finished cells yet."]) + "\n"
    lines += [f"Seeds: {r['seeds']}; held-out prompts per seed: {r['prompts']}; "
              f"missing methods: {r['missing'] or 'none'}.", ""]
    planned = (meta.get("plan") or {}).get("seeds")
    short = sorted(set(planned or ()) - set(r["seeds"]))
    if short:
        lines += [f"**INTERIM**: the study plans seeds {sorted(planned)}; seed(s) {short} have no complete "
                  f"set of cells yet, so every interval and verdict below rests on {len(r['seeds'])} seed(s) and "
                  "is not the study's answer (claims.md fixes the seeds).", ""]
    if r.get("unequal_budget"):
        lines += [f"**UNEQUAL BUDGET**: optimiser steps per method and seed {r['unequal_budget']}; the "
                  "comparison does not meet claims.md's equal-budget rule.", ""]
    t = r.get("tuning")
    if t:
        lines += ["## Tuning (offline DPO only, seed 0, tuning split of the held-out prompts)", "",
                  *tuning_table(t["grid"], t["best"])]
        lines += [f"\nSFT start on the tuning split: sampled gold {t['grid'][0]['before_sampled']:.3f}.", ""]
        if t.get("from"):
            lines += [f"These tuning results are {t['from']}'s, replayed through the rule (`--tuning-from`), "
                      "not rerun.", ""]
        lines += edge_lines(t)
    lines += ["## Results (held-out gold; mean over prompts and seeds)", "",
              "G_s: sampled gold (primary), G_g: greedy gold. Differences are MetaAPO minus the row, paired by "
              "prompt and seed, with 95% two-level bootstrap intervals. A: samples generated / (K x prompts in the "
              "data), A_p: prompt draws (refills included) / prompts in the data (the paper's ratio); untrained: online "
              "pairs annotated but never trained on (per seed, mean).", "",
              "| method | G_s [95% CI] | G_g | vs SFT (G_s) | MetaAPO - row (G_s) | MetaAPO - row (G_g) | A | A_p | "
              "refill draws | untrained | steps | wall s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        ci = row["G_s_ci"]
        cells = [row["label"], f"{row['G_s']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]", f"{row['G_g']:.3f}",
                 _ci(row["sft_diff_s"]) if "sft_diff_s" in row else "-",
                 _ci(row["diff_vs_metaapo_s"]) if "diff_vs_metaapo_s" in row else "-",
                 _ci(row["diff_vs_metaapo_g"]) if "diff_vs_metaapo_g" in row else "-"]
        if row["method"] == SFT:
            cells += ["-"] * 6
        else:
            cells += [f"{row['A']:.3f}", f"{row['A_prompts']:.3f}", f"{row['refill_prompts']:.0f}",
                      f"{row['untrained_pairs']:.0f}",
                      "/".join(map(str, row["steps"])), "/".join(f"{w:.0f}" for w in row["wall_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    loaded = [f"{row['label']} seed {seed} ({load:.1f})" for row in r["rows"] for seed, load in row.get("loaded", [])]
    jobs = r.get("concurrent_cells", 1)
    lines += ["", "Wall s: per seed, the cell's whole process (training and both evaluations)."
              + (f" Cells that ended with the 1-minute load average above {LOADED:g} on the 2 cores (other jobs "
                 f"shared the machine, so their wall time is inflated): {', '.join(loaded)}." if loaded else "")
              + (f" Up to {jobs} cells ran at once (`--jobs {jobs}`, each with cpus/{jobs} threads): the wall times "
                 "are of cells sharing the cores." if jobs > 1 else "")]
    lines += ["", "## Claims (rules fixed in claims.md)", "", "| id | claim | estimate | verdict |", "|---|---|---|---|"]
    for c in r["claims"]:
        est = c["estimate"]
        if est is None:
            text = "-"
        elif c["id"] == "B":
            text = "; ".join("-" if e is None else _ci(e) for e in est)
        elif c["id"] == "c":
            text = f"mean {np.mean(est):.3f} (seeds {min(est):.3f} to {max(est):.3f})"
        elif c["id"] == "d":
            text = "slopes " + ", ".join(f"{v:+.4f}" for v in est) + " per round (per seed)"
        else:
            text = _ci(est) + f"; greedy mean {c['greedy_mean']:+.3f}"
        lines.append(f"| {c['id']} | {c['claim']} | {text} | **{c['verdict']}** |")
    if r.get("curves"):
        every = sorted({p[0] for pts in r["curves"].values() for p in pts})
        how = (f"Held-out gold is measured at the start, during training (after optimiser steps "
               f"{', '.join(map(str, every))}: `eval.every_steps`, the same prompts and seeds as the end) and at "
               "the end; curves are means over seeds, the bars at the end the 95% interval (claims.md "
               "pre-registers end-point gold; the points during training are descriptive); w is per round.")
    else:
        how = ("Held-out gold is measured at the start and the end of each run only (this study ran without "
               "`eval.every_steps`: each point costs one evaluation, ~100 s per SmolLM2 cell; claims.md "
               "pre-registers end-point gold), so the gold curves are two-point lines with the end's 95% "
               "interval; w is per round.")
    lines += ["", "## Plots", "", how, "",
              f"![gold vs steps]({meta['prefix']}_gold_vs_steps.png) "
              f"![gold vs annotations]({meta['prefix']}_gold_vs_annotations.png) "
              f"![w over training]({meta['prefix']}_w_over_training.png)", ""]
    return "\n".join(lines) + "\n"


def plots(r: dict, out: Path, prefix: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {row["method"]: row for row in r["rows"]}
    sft = rows[SFT]
    paths = []
    for kind in ("steps", "annotations"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in r["methods"]:
            row = rows[m]
            x1 = float(np.mean(row["steps"])) if kind == "steps" else row["A"]
            lo, hi = row["G_s_ci"]
            mid = r.get("curves", {}).get(m, [])
            xs = [0.0, *[p[0] if kind == "steps" else p[1] for p in mid], x1]
            ys = [sft["G_s"], *[p[2] for p in mid], row["G_s"]]
            err = [[0.0] * (len(xs) - 1) + [row["G_s"] - lo], [0.0] * (len(xs) - 1) + [hi - row["G_s"]]]
            ax.errorbar(xs, ys, yerr=err, marker="o", markersize=3 if mid else 6, capsize=3, label=LABELS[m])
        ax.set_xlabel("optimiser steps" if kind == "steps" else "annotation spent (samples / (K x data prompts))")
        ax.set_ylabel("held-out sampled gold (95% CI)")
        ax.set_title(f"gold vs {kind}: {len(r['seeds'])} seeds x {r['prompts']} prompts")
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = out / f"{prefix}_gold_vs_{kind}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, by_seed in r["w"].items():
        for i, (s, ws) in enumerate(sorted(by_seed.items())):
            ax.plot(range(len(ws)), ws, marker="o", color=f"C{list(r['w']).index(m)}",
                    label=LABELS[m] if i == 0 else None, alpha=0.8)
    ax.set_xlabel("round")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("mean w (offline weight)")
    ax.set_title("w over training (one line per seed)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = out / f"{prefix}_w_over_training.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return paths + [p]


def report(work: Path, out: Path, prefix: str, meta: dict, bootstrap: int = 10_000,
           cells_from: Path | None = None) -> Path:
    cells, tuning = load_study(work, cells_from)
    r = analyse(cells, tuning, bootstrap)
    out.mkdir(parents=True, exist_ok=True)
    meta = meta | {"prefix": prefix}
    if r.get("rows"):
        plots(r, out, prefix)
    if not work.is_file():
        (out / f"{prefix}_cells.json").write_text(json.dumps(digest(cells, tuning)))
    (out / f"{prefix}.json").write_text(json.dumps(r | {"meta": meta}, indent=1, default=str))
    path = out / f"{prefix}.md"
    path.write_text(markdown(r, meta))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", help="the study's --work folder, or a committed <prefix>_cells.json digest")
    parser.add_argument("--results", default="benchmarks/results")
    parser.add_argument("--prefix", default="evidence_smollm2")
    parser.add_argument("--bootstrap", type=int, default=10_000)
    parser.add_argument("--cells-from", default=None, help="a digest of cells run earlier, joined to WORK's")
    args = parser.parse_args(argv)
    import os
    import platform
    import time

    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cpus", "date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/evidence_report.py "
            + " ".join(argv if argv is not None else sys.argv[1:])}
    if args.cells_from:
        meta["cells_from"] = args.cells_from
    print(report(Path(args.work), Path(args.results), args.prefix, meta, args.bootstrap,
                 Path(args.cells_from) if args.cells_from else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())

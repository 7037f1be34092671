"""Table of the SmolLM2 IFEval-task runs: held-out gold score before/after, annotation, time.

    python benchmarks/smollm2_ifeval_report.py runs/smollm2_dpo runs/smollm2_online_dpo runs/smollm2_metaapo

Reads each run directory's eval.json, rounds.jsonl, metrics.jsonl and (if present)
wall_s.txt (the recipe's wall time, written by whoever timed the command). Prints markdown.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from metaapo_nemo.trainer.summary import read_jsonl


def row(run: Path) -> str:
    ev = json.loads((run / "eval.json").read_text())
    rounds, steps = read_jsonl(run / "rounds.jsonl"), read_jsonl(run / "metrics.jsonl")
    ratio = rounds[-1]["annotation_ratio"] if rounds else 0.0
    wall = (run / "wall_s.txt").read_text().strip() if (run / "wall_s.txt").is_file() else "?"
    b, a = ev["before"], ev["after"]
    loss = f"{steps[0]['loss']:.4f} -> {steps[-1]['loss']:.4f}" if steps else "-"
    return (f"| {run.name} | {b['greedy']['gold']:.3f} -> **{a['greedy']['gold']:.3f}** | "
            f"{b['greedy']['all_met']:.3f} -> {a['greedy']['all_met']:.3f} | "
            f"{b['sampled']['gold']:.3f} -> **{a['sampled']['gold']:.3f}** | "
            f"{b['sampled']['all_met']:.3f} -> {a['sampled']['all_met']:.3f} | {ratio:.3f} | "
            f"{len(steps)} | {loss} | {wall} |")


def main(argv: list[str]) -> int:
    print("| run | greedy gold (before -> after) | greedy all met | sampled gold | sampled all met "
          "| annotation ratio | steps | loss first -> last | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for d in argv:
        if (Path(d) / "eval.json").is_file():
            print(row(Path(d)))
        else:
            print(f"| {Path(d).name} | (no eval.json) | | | | | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

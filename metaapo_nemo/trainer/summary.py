"""Run outputs for people: TensorBoard events, and a markdown + PNG summary at the end.

The summary is built from the run directory's `metrics.jsonl` (per optimiser step) and
`rounds.jsonl` (per MetaAPO round), so it can be regenerated for any finished run:
`python -m metaapo_nemo.trainer.summary runs/<name>`.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from metaapo_nemo.trainer.callbacks import TrainState


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


class TensorBoardCallback:
    """Writes every numeric step metric as a scalar, and the resolved config as text (main
    rank only)."""

    def __init__(self, run_dir: Path, enabled: bool, config_yaml: str | None = None):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            if config_yaml is not None:
                self.writer.add_text("config", "```yaml\n" + config_yaml + "```", 0)

    def on_step_end(self, state: TrainState) -> None:
        if self.writer is None:
            return
        for k, v in state.metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.writer.add_scalar(f"train/{k}", v, state.step)

    def on_round_end(self, state: TrainState) -> None:
        if self.writer is None:
            return
        for k, v in state.metrics.items():
            if k.startswith("round/") and isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(k, v, state.step)
        self.writer.flush()

    def on_train_end(self, state: TrainState) -> None:
        if self.writer is not None:
            self.writer.close()


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r.get("step", len(xs) + 1))
            ys.append(float(v))
    return xs, ys


def _plot(path: Path, title: str, curves: list[tuple[str, list, list]], xlabel: str, ylabel: str,
          hline: tuple[float, str] | None = None) -> Path | None:
    curves = [c for c in curves if c[1]]
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for label, xs, ys in curves:
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=label)
    if hline is not None:
        ax.axhline(hline[0], color="grey", ls="--", lw=1, label=hline[1])
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_summary(run_dir: Path, title: str = "run summary") -> Path:
    """Writes summary.md and plots/*.png into the run directory; returns summary.md's path."""
    steps = read_jsonl(run_dir / "metrics.jsonl")
    rounds = read_jsonl(run_dir / "rounds.jsonl")
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    made: list[tuple[str, Path]] = []

    def add(name: str, p: Path | None) -> None:
        if p is not None:
            made.append((name, p))

    add("losses", _plot(plots / "losses.png", "policy loss", [
        ("total", *_series(steps, "loss")), ("offline part", *_series(steps, "loss_offline")),
        ("online part", *_series(steps, "loss_online"))], "optimiser step", "loss"))
    add("meta loss", _plot(plots / "meta_loss.png", "meta-learner loss",
                           [("meta loss", *_series(steps, "meta_loss"))], "optimiser step", "meta loss"))
    rx = [r["round"] for r in rounds]
    qs = [("w " + q, rx, [r.get(f"w_{q}", float("nan")) for r in rounds]) for q in ("q10", "q50", "q90")]
    add("w per round", _plot(plots / "w_per_round.png", "meta weight w per round (quantiles)",
                             qs + [("w mean", rx, [r.get("w_mean", float("nan")) for r in rounds])],
                             "round", "w"))
    add("sample ratio", _plot(plots / "sample_ratio.png", "fraction of prompts sampled per round",
                              [("sample ratio", rx, [r.get("sample_ratio", float("nan")) for r in rounds])],
                              "round", "ratio"))
    add("annotation", _plot(plots / "annotation_ratio.png", "cumulative annotation ratio",
                            [("this run", rx, [r.get("annotation_ratio", float("nan")) for r in rounds])],
                            "round", "prompts annotated / prompts seen", hline=(1.0, "Online DPO")))
    add("RM reward", _plot(plots / "rm_reward.png", "reward-model score of generations",
                           [("mean of K samples", rx, [r.get("rm_reward_mean", float("nan")) for r in rounds]),
                            ("online chosen", rx, [r.get("rm_chosen_mean", float("nan")) for r in rounds])],
                           "round", "RM score"))
    last = steps[-1] if steps else {}
    lines = [f"# {title}", "", f"- optimiser steps: {len(steps)}", f"- rounds: {len(rounds)}"]
    for key in ("loss", "reward_accuracy", "reward_accuracy_online", "w_mean", "annotation_ratio"):
        if key in last and not (key.startswith("reward_accuracy") and last[key] == "nan"):  # none trained
            lines.append(f"- final {key}: {last[key]:.4f}" if isinstance(last[key], float) else f"- final {key}: {last[key]}")
    if rounds:
        lines += ["", "| round | prompts | sample ratio | w mean | online pairs | ties | annotation ratio |",
                  "|---|---|---|---|---|---|---|"]
        for r in rounds:
            lines.append(f"| {r['round']} | {r.get('prompts', '')} | {r.get('sample_ratio', float('nan')):.3f} | "
                         f"{r.get('w_mean', float('nan')):.3f} | {r.get('online_pairs', '')} | "
                         f"{r.get('ties', '')} | {r.get('annotation_ratio', float('nan')):.3f} |")
    lines += [""] + [f"![{name}](plots/{p.name})" for name, p in made]
    lines += ["", "## Files", f"- config: {run_dir / 'config.yaml'}", f"- metrics: {run_dir / 'metrics.jsonl'}",
              f"- rounds: {run_dir / 'rounds.jsonl'}", f"- tensorboard: {run_dir / 'tensorboard'}",
              f"- plots: {plots}", f"- policy (HF checkpoint): {run_dir / 'hf_final'}"]
    out = run_dir / "summary.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def final_table(run_dir: Path, summary: Path, hf_dir: Path | None, exit_code: int = 0) -> str:
    """The terminal's last lines: what the run did and where its files are."""
    from metaapo_nemo.trainer.metrics import fmt_seconds

    steps, rounds = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "rounds.jsonl")
    status = "done" if exit_code == 0 else f"stopped (exit {exit_code}; resumes from the checkpoint)"
    took = fmt_seconds(float(steps[-1].get("time", 0.0))) if steps else "0s"
    head = f"{status}: {len(steps)} optimiser steps in {took}" + (f", {len(rounds)} rounds" if rounds else "")
    rows: list[tuple[str, str]] = []
    losses = [s["loss"] for s in steps if isinstance(s.get("loss"), (int, float))]
    if losses:
        tail = losses[-min(4, len(losses)):]
        rows.append(("loss", f"{losses[0]:.4f} -> {losses[-1]:.4f} (mean of the last {len(tail)}: "
                             f"{sum(tail) / len(tail):.4f})"))
    for key, name in (("reward_accuracy", "reward accuracy"), ("reward_accuracy_online", "reward accuracy, online")):
        acc = [s[key] for s in steps if isinstance(s.get(key), (int, float))]  # "nan": none trained
        if acc:
            tail = acc[-min(4, len(acc)):]
            rows.append((name, f"{sum(tail) / len(tail):.3f} (mean of the last {len(tail)} steps)"))
    if rounds:
        sampled, prompts = sum(r.get("sampled", 0) for r in rounds), sum(r.get("prompts", 0) for r in rounds)
        rows.append(("annotation", f"{sampled}/{prompts} prompts sampled (ratio "
                                   f"{rounds[-1].get('annotation_ratio', float('nan')):.3f}), "
                                   f"{sum(r.get('online_pairs', 0) for r in rounds)} online pairs, "
                                   f"{sum(r.get('ties', 0) for r in rounds)} ties"))
    files = [f for f in ("config.yaml", "metrics.jsonl", "rounds.jsonl", "log.txt", "tensorboard", "plots")
             if (run_dir / f).exists()]
    rows += [("run directory", str(run_dir)), ("  files", "  ".join(files)), ("  summary", str(summary))]
    if hf_dir is not None:
        rows.append(("policy (HF checkpoint)", str(hf_dir)))
    width = max(len(k) for k, _ in rows)
    return "\n".join([head] + [f"  {k:<{width}}  {v}" for k, v in rows])


if __name__ == "__main__":
    print(write_summary(Path(sys.argv[1])))

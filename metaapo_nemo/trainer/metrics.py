"""Step metrics: cross-rank reduction, JSONL file, terminal progress bar and round lines.

Loss-side statistics exist on the last pipeline stage of every data-parallel replica.
`reduce_stats` sums them over the data-parallel group and broadcasts the result along the
pipeline group, so every rank (in particular global rank 0, which logs) holds the same
global sums.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from metaapo_nemo import console
from metaapo_nemo.parallel.state import ParallelContext


def reduce_stats(vec: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Sum over DP ranks (last stage), then broadcast from the last stage to all stages."""
    vec = vec.to(device=ctx.device, dtype=torch.float64).clone()
    if ctx.dims.dp > 1 and ctx.is_last_stage:
        dist.all_reduce(vec, group=ctx.dp_group)
    if ctx.dims.pp > 1:
        ranks = dist.get_process_group_ranks(ctx.pp_group)
        dist.broadcast(vec, src=ranks[-1], group=ctx.pp_group)
    return vec.cpu()


class MetricsLogger:
    """Writes one JSON object per step to `metrics.jsonl`; shows the steps on the terminal.

    On a terminal (``train.progress_bar=auto``) a tqdm bar over the optimiser steps (loss,
    reward accuracy, ETA); elsewhere (a log file, ``progress_bar=off``) a step line every
    ``log_every`` steps and at the last step. Only the main rank writes; other ranks construct
    it with `enabled=False`.
    """

    def __init__(self, run_dir: Path, total_steps: int, enabled: bool, progress: str = "auto",
                 resume_step: int | None = None, log_every: int = 1):
        """`resume_step`: a resumed run keeps the records of steps <= resume_step (lines
        written after the checkpoint by the interrupted run are dropped) and appends."""
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.total = total_steps
        self.log_every = log_every
        self.last: dict[str, Any] = {}  # the latest step's metrics (the final table reads it)
        if enabled and resume_step is not None:
            from metaapo_nemo.checkpoint_io import truncate_jsonl

            truncate_jsonl(self.path, lambda r: r.get("step", 0) <= resume_step)
        mode = "w" if resume_step is None else "a"
        self._file = open(self.path, mode, buffering=1) if enabled else None
        show = {"on": True, "off": False, "auto": sys.stderr.isatty()}[progress]
        self._bar = None
        self._first_step = resume_step or 0
        if enabled and show:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=self._first_step, desc="train", unit="step",
                             dynamic_ncols=True)
            console.set_bar(self._bar)
        self._t0 = time.perf_counter()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.last = metrics
        record = {"step": step, "time": round(time.perf_counter() - self._t0, 4), **metrics}
        for k, v in record.items():
            if isinstance(v, float) and not math.isfinite(v):
                record[k] = str(v)  # JSON has no NaN/inf
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(
                loss=f"{metrics.get('loss', float('nan')):.4f}",
                acc=f"{metrics.get('reward_accuracy', float('nan')):.2f}",
            )
        elif step % self.log_every == 0 or step == self.total:
            console.say(self.step_line(step, metrics))

    def step_line(self, step: int, metrics: dict[str, Any]) -> str:
        """"step 8/32: loss=0.3625 reward_accuracy=0.875 ... eta 1m05s" (values that are not
        finite, e.g. the offline accuracy of an Online DPO step, which trains no offline pair,
        are left out)."""
        keys = ("loss", "reward_accuracy", "reward_accuracy_online", "margin", "grad_norm", "lr", "pairs_per_s")
        text = " ".join(f"{k}={metrics[k]:.4g}" for k in keys
                        if isinstance(metrics.get(k), (int, float)) and math.isfinite(metrics[k]))
        done = step - self._first_step
        eta = (time.perf_counter() - self._t0) / done * (self.total - step) if done > 0 else 0.0
        return f"step {step}/{self.total}: {text}" + (f" eta {fmt_seconds(eta)}" if step < self.total else "")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            console.set_bar(None)
            self._bar = None
        if self._file is not None:
            self._file.close()
            self._file = None


def fmt_seconds(s: float) -> str:
    """12.3 -> "12.3s", 125 -> "2m05s", 7300 -> "2h01m"."""
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def round_line(r: dict[str, Any]) -> str:
    """One MetaAPO round for the terminal, from its `rounds.jsonl` record (keys without the
    "round/" prefix): what was sampled and annotated, and where the time went.

    The margin pass is the preparation time not spent in refit / generate / score / the
    online pairs' reference pass (it includes the meta-learner's w and the selection)."""
    parts = {k: float(r.get(f"{k}_s", 0.0) or 0.0) for k in ("refit", "generate", "score", "reference", "train")}
    margins = max(0.0, float(r.get("prepare_s", 0.0)) - sum(v for k, v in parts.items() if k != "train"))
    split = {"margins": margins, **parts}
    total = float(r.get("round_s", sum(split.values())))
    times = " ".join(f"{k} {fmt_seconds(v)}" for k, v in split.items() if k != "reference" or v > 0)
    return (f"round {int(r['round'])}: sampled {int(r['sampled'])}/{int(r['prompts'])}, "
            f"{int(r['online_pairs'])} online pairs, {int(r['ties'])} ties, w mean {r['w_mean']:.3f}, "
            f"annotation ratio {r['annotation_ratio']:.3f} | {fmt_seconds(total)}: {times}")

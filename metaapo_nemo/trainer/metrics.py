"""Step metrics: cross-rank reduction, JSONL file, terminal progress bar.

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
    """Writes one JSON object per step to `metrics.jsonl`; shows a progress bar on a TTY.

    Only the main rank writes; other ranks construct it with `enabled=False`.
    """

    def __init__(self, run_dir: Path, total_steps: int, enabled: bool, progress: str = "auto",
                 resume_step: int | None = None):
        """`resume_step`: a resumed run keeps the records of steps <= resume_step (lines
        written after the checkpoint by the interrupted run are dropped) and appends."""
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        if enabled and resume_step is not None:
            from metaapo_nemo.checkpoint import truncate_jsonl

            truncate_jsonl(self.path, lambda r: r.get("step", 0) <= resume_step)
        mode = "w" if resume_step is None else "a"
        self._file = open(self.path, mode, buffering=1) if enabled else None
        show = {"on": True, "off": False, "auto": sys.stderr.isatty()}[progress]
        self._bar = None
        if enabled and show:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True)
        self._t0 = time.perf_counter()
        if self._bar is not None and resume_step:
            self._bar.update(resume_step)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
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
        else:
            keys = ("loss", "reward_accuracy", "margin", "grad_norm", "lr", "pairs_per_s")
            text = " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)
            print(f"step {step}: {text}", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()

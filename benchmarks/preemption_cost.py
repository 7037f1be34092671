"""The cost of a preemption: seconds from SIGUSR1 to exit 85, per point of a run (tiny model).

    python benchmarks/preemption_cost.py                       # DP2, every point; ~5 min on 2 cores
    python benchmarks/preemption_cost.py --nproc 1 --points step checkpoint_write

Each point gets its own run directory and launch of the MetaAPO recipe (the real entry point,
one process per rank with the launch variables srun sets), with the signal placed by the test
hook ``METAAPO_SIGNAL_AT`` (metaapo_nemo/preempt.py) on every rank; the resume load and the
round points are measured after a first launch preempted at step 1 (so round 1's preparation,
abandoned, costs a checkpoint of step 2). The signal's time is the
first line of the run's preemption marker (written by the handler); the exit's is when the
last rank has exited. Printed per point: the phase, what the run did (exited at once / a
checkpoint of step N / abandoned a round), the seconds, and `latest` afterwards; the JSON goes
to --out. docs/checkpoint_sizing.md scales the in-loop points to 8B / 70B.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from metaapo_nemo import preempt  # noqa: E402

FAST = ("data.limit=32", "metaapo.round_size=16", "metaapo.t_meta=2", "rollout.samples_per_prompt=2",
        "rollout.max_new_tokens=12", "train.global_batch_size=8", "train.micro_batch_size=2",
        "model.tiny.num_layers=2", "train.progress_bar=off", "train.max_steps=4", "checkpoint.every_steps=2",
        "metaapo.prompts_per_chunk=8")


# Points measured from a run preempted after step 1: the resume load, and round 1's preparation
# (reached after step 2 trains; abandoning it checkpoints step 2). The others start fresh.
AFTER_STEP_1 = ("resume", "margins", "refit", "generate", "score")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(run_dir: Path, nproc: int, point: str | None, cache: Path) -> tuple[list[int], float]:
    """Starts the ranks; returns their exit statuses and the time the last one exited."""
    run_dir.mkdir(parents=True, exist_ok=True)  # as slurm/launch.sh does, for the marker
    port, procs = _port(), []
    args = [sys.executable, str(REPO / "recipes" / "metaapo.py"), *FAST, f"run.output_dir={run_dir.parent}",
            f"run.name={run_dir.name}", f"run.cache_dir={cache}"]
    for rank in range(nproc):
        env = {k: v for k, v in os.environ.items() if k != "METAAPO_SIGNAL_AT"}
        env |= {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
                "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                "METAAPO_PREEMPT_MARKER": str(run_dir / ".preempted")}
        if point is not None:
            env["METAAPO_SIGNAL_AT"] = point
        procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
    codes = [p.wait(timeout=900) for p in procs]
    return codes, time.time()


def latest(run_dir: Path) -> str | None:
    f = run_dir / "checkpoints" / "latest"
    return f.read_text().strip() if f.exists() else None


def measure(point: str, nproc: int, work: Path) -> dict:
    run_dir = work / point
    cache = work / "cache"
    if point in AFTER_STEP_1:  # a checkpoint of step 1 first: the resume load, or round 1's
        launch(run_dir, nproc, "step", cache)  # preparation after step 2 (then saved on abandon)
        (run_dir / ".preempted").unlink(missing_ok=True)
    before = latest(run_dir)
    codes, t_exit = launch(run_dir, nproc, point, cache)
    marker = (run_dir / ".preempted").read_text().splitlines()
    t_signal = min(float(line.split()[0]) for line in marker)
    phase = marker[0].rsplit("(", 1)[1].rstrip(")")
    after = latest(run_dir)
    did = ("exited at once" if phase != "train" else
           f"checkpoint {after}" if after != before else f"latest already {after}")
    return {"point": point, "phase": phase, "exit_codes": codes, "seconds": round(t_exit - t_signal, 2),
            "latest_before": before, "latest_after": after, "did": did}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--points", nargs="*", default=list(preempt.CHECKPOINTS))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "preemption_cost.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for point in args.points:
            row = measure(point, args.nproc, Path(tmp))
            rows.append(row)
            print(f"{row['point']:<17} {row['phase']:<6} {row['seconds']:>6.2f} s  exit {row['exit_codes']}  "
                  f"{row['did']}", flush=True)
    record = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "nproc": args.nproc,
              "overrides": list(FAST), "rows": rows}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(set(r["exit_codes"]) == {85} for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

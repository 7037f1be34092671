"""Proof of value for refactors: the CPU smoke runs' per-step losses, recorded and compared.

Runs the three CPU smoke jobs (`make demo` = MetaAPO on conf/tiny_cpu.yaml, offline DPO on
its default config, Online DPO on conf/tiny_cpu_online_dpo.yaml), each in its own process,
and either records their per-step losses and grad norms or compares them BIT FOR BIT with a
recording (a refactor must reproduce them; a numerics change names itself by failing here).

    python benchmarks/smoke_losses.py --record benchmarks/results/smoke_losses.json
    python benchmarks/smoke_losses.py --check benchmarks/results/smoke_losses.json

About 1-2 minutes on 2 cores. Exit status 1 when a check finds a difference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = {
    "metaapo_demo": ["recipes/metaapo.py"],
    "dpo_default": ["recipes/dpo.py"],
    "online_dpo": ["recipes/metaapo.py", "--config", "conf/tiny_cpu_online_dpo.yaml"],
}


def run_all(out: Path) -> dict[str, dict]:
    results = {}
    for name, cmd in RUNS.items():
        args = [sys.executable, *cmd, f"run.output_dir={out}", f"run.name={name}", "train.progress_bar=off"]
        proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        rec = {"loss": [r["loss"] for r in rows], "grad_norm": [r["grad_norm"] for r in rows]}
        rounds = out / name / "rounds.jsonl"
        if rounds.exists():
            rr = [json.loads(line) for line in rounds.read_text().splitlines()]
            rec["sampled"] = [r["sampled"] for r in rr]
            rec["w_mean"] = [r["w_mean"] for r in rr]
        results[name] = rec
        print(f"{name}: {len(rec['loss'])} steps, first loss {rec['loss'][0]!r}, last {rec['loss'][-1]!r}")
    return results


def compare(recorded: dict, now: dict) -> list[str]:
    problems = []
    for name, rec in recorded["runs"].items():
        for key, values in rec.items():
            got = now.get(name, {}).get(key)
            if got != values:
                first = next((i for i, (a, b) in enumerate(zip(values, got or [])) if a != b), None)
                where = f"first difference at index {first}: {values[first]!r} -> {got[first]!r}" \
                    if first is not None else f"lengths {len(values)} -> {len(got or [])}"
                problems.append(f"{name}.{key}: {where}")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", type=Path, help="write the losses to this JSON file")
    mode.add_argument("--check", type=Path, help="compare with this recording, bit for bit")
    ap.add_argument("--note", default="", help="what code the recording was made from (with --record)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        now = run_all(Path(tmp))
    if args.record:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
        args.record.write_text(json.dumps({"commit": commit, "note": args.note, "runs": now}, indent=1) + "\n")
        print(f"recorded -> {args.record}")
        return 0
    recorded = json.loads(args.check.read_text())
    problems = compare(recorded, now)
    for p in problems:
        print("DIFFERENT:", p)
    print("bit for bit identical to the recording" if not problems else f"{len(problems)} difference(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

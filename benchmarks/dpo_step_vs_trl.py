"""Side-by-side DPO training throughput: our recipe vs TRL's DPOTrainer (issue 10).

Both train the SAME HF checkpoint on the SAME token-level pairs with the same global batch
and micro-batch (gradient accumulation), fp32, the same thread count, one epoch, in ONE
invocation: every configuration runs in its own subprocess (so its peak RSS is its own),
configurations alternate within each repeat (the order rotates between repeats), and each
prints one JSON line with the median and range over the repeats.

    python benchmarks/dpo_step_vs_trl.py                           # tiny llama, ~10 min
    python benchmarks/dpo_step_vs_trl.py --model smollm2              # SmolLM2-135M, ~40 min
    python benchmarks/dpo_step_vs_trl.py --ours pad bucket+share+sdpa --profile

Configurations: ``ours[<layout>]`` (recipes/dpo.py with train.batching / share_prompt /
attention from the layout string, e.g. ``pack+share+sdpa``) and ``trl``, each with the
reference forward every step (TRL's default) and with precomputed reference log-probs
(``reference.precompute=true`` / ``precompute_ref_log_probs=True``).

pairs/s and tokens/s cover the whole pass (reference precompute included) from the start
of training to the last optimiser step; model loading is excluded on both sides.
``steady_pairs_per_s`` leaves the precompute out. Tokens are the data's tokens (prompt
twice + both responses per pair), the same count for every layout. The ratio of an
``ours`` line is ours / TRL with the same reference mode (medians).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))  # tasks/ (synthetic pairs) beside the package
RESULTS = REPO / "benchmarks" / "results" / "dpo_step_vs_trl.jsonl"
# Per model: pairs per pass, global / micro batch, variable (prompt, response) length ranges,
# fixed (prompt, response) lengths. SmolLM2 is ~1000x the tiny model's compute per token:
# shorter sequences and fewer pairs keep a run to minutes on 2 cores.
DEFAULTS = {
    "tiny": dict(pairs=64, global_batch=8, micro_batch=2, prompt=(16, 512), response=(8, 512),
                 fixed=(256, 256), max_length=1024),
    "smollm2": dict(pairs=8, global_batch=4, micro_batch=2, prompt=(16, 96), response=(8, 96),
                    fixed=(48, 48), max_length=192),
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny | smollm2 | an HF checkpoint directory")
    p.add_argument("--data", nargs="+", default=["variable", "fixed"], choices=["variable", "fixed"])
    p.add_argument("--pairs", type=int, default=None, help="pairs per pass (a multiple of --global-batch)")
    p.add_argument("--global-batch", type=int, default=None, help="pairs per optimiser step")
    p.add_argument("--micro-batch", type=int, default=None, help="pairs per forward")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ours", nargs="+", default=["pad", "bucket+share+sdpa"],
                   help="layouts: <pad|bucket|pack>[+share][+sdpa]")
    p.add_argument("--no-trl", action="store_true", help="only our configurations")
    p.add_argument("--references", nargs="+", default=["per_step", "precomputed"],
                   choices=["per_step", "precomputed"])
    p.add_argument("--profile", action="store_true", help="one profiled run per ours layout")
    p.add_argument("--lora", type=int, default=0, help="ours with LoRA adapters of this rank on every linear")
    p.add_argument("--out", default=str(RESULTS), help="append the JSON lines here ('' = no file)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------- worker (one subprocess)


def load_pairs(job: dict[str, Any]) -> list:
    from tasks.synthetic import chat_lengths, fixed_lengths, synthetic_pairs

    d = job["data"]
    lengths = chat_lengths(tuple(d["prompt"]), tuple(d["response"])) if d["kind"] == "variable" \
        else fixed_lengths(*d["fixed"])
    return synthetic_pairs(job["pairs"], d["vocab"], lengths, seed=job["seed"], low_id=d["low_id"],
                           eos_id=d["eos_id"])


def worker(job: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(job["threads"])
    pairs = load_pairs(job)
    if job["framework"] == "trl":
        from _trl_worker import run_trl

        out = run_trl(job, pairs)
    else:
        from _ours_worker import run_ours

        out = run_ours(job, pairs)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["tokens"] = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    print("RESULT " + json.dumps(out), flush=True)


def spawn(job: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]), MKL_NUM_THREADS=str(job["threads"]),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               CUDA_VISIBLE_DEVICES="", TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{job['name']} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# ----------------------------------------------------------------- driver


def model_source(name: str) -> tuple[str, str]:
    """(model key for defaults, checkpoint directory)."""
    if name == "tiny":
        from metaapo_nemo.config.loader import load_config
        from metaapo_nemo.models.tiny import TinyModelSpec, ensure_tiny_checkpoint

        spec = TinyModelSpec(**load_config(None, method="dpo").model.tiny.model_dump())
        return "tiny", str(ensure_tiny_checkpoint(spec, REPO / ".cache" / "tiny_models"))
    if name == "smollm2":
        from metaapo_nemo.models.smollm2 import ensure_smollm2

        return "smollm2", str(ensure_smollm2(REPO / ".cache" / "smollm2"))
    return "smollm2", name


def token_range(model_dir: str) -> dict[str, int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return {"vocab": len(tok), "low_id": max(tok.all_special_ids) + 1, "eos_id": tok.eos_token_id}


def configurations(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for ref in args.references:
        pre = ref == "precomputed"
        for layout in args.ours:
            parts = layout.split("+")
            out.append(dict(name=f"ours[{layout}]", framework="ours", reference=ref, precompute=pre,
                            batching=parts[0], share_prompt="share" in parts,
                            attention="sdpa" if "sdpa" in parts else "megatron", lora=args.lora))
        if not args.no_trl:
            out.append(dict(name="trl", framework="trl", reference=ref, precompute=pre))
    return out


def summarize(runs: list[dict[str, Any]], pairs: int) -> dict[str, Any]:
    def stat(values: list[float], digits: int) -> tuple[float, list[float]]:
        return round(statistics.median(values), digits), [round(min(values), digits), round(max(values), digits)]

    pps, pps_r = stat([pairs / r["pass_s"] for r in runs], 3)
    tps, tps_r = stat([r["tokens"] / r["pass_s"] for r in runs], 1)
    steady, _ = stat([pairs / r["train_s"] for r in runs], 3)
    rss, rss_r = stat([r["peak_rss_mb"] for r in runs], 0)
    cpu, _ = stat([pairs / r["cpu_s"] for r in runs], 3)
    pre, _ = stat([r["precompute_s"] for r in runs], 2)
    # the best run too: on a shared machine the noise only ever slows a run down
    return {"pairs_per_s": pps, "pairs_per_s_range": pps_r, "pairs_per_s_best": pps_r[1], "tokens_per_s": tps,
            "tokens_per_s_range": tps_r, "steady_pairs_per_s": steady, "precompute_s": pre,
            "peak_rss_mb": rss, "peak_rss_mb_range": rss_r, "pairs_per_cpu_s": cpu}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    import torch
    import transformers

    key, model_dir = model_source(args.model)
    dflt = DEFAULTS[key]
    pairs = args.pairs or dflt["pairs"]
    args.global_batch = args.global_batch or dflt["global_batch"]
    args.micro_batch = args.micro_batch or dflt["micro_batch"]
    if pairs % args.global_batch or args.global_batch % args.micro_batch:
        raise SystemExit(f"--pairs={pairs} must be a multiple of --global-batch={args.global_batch}, "
                         f"and that of --micro-batch={args.micro_batch}")
    toks = token_range(model_dir)
    common = dict(model=key, model_dir=model_dir, pairs=pairs, global_batch=args.global_batch,
                  micro_batch=args.micro_batch, threads=args.threads, lr=5e-4 if key == "tiny" else 5e-7,
                  beta=0.1, seed=args.seed, max_length=dflt["max_length"])
    meta = {"benchmark": "dpo_step_vs_trl", "model": args.model, "model_dir": model_dir,
            "threads": args.threads, "dtype": "float32", "global_batch": args.global_batch,
            "micro_batch": args.micro_batch, "pairs": pairs, "repeats": args.repeats,
            "machine": machine(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": _version("trl"),
            "date": datetime.date.today().isoformat(), "command": command(argv)}
    lines = []
    for kind in args.data:
        data = dict(kind=kind, prompt=dflt["prompt"], response=dflt["response"], fixed=dflt["fixed"], **toks)
        configs = configurations(args)
        runs: dict[str, list] = {c["name"] + "/" + c["reference"]: [] for c in configs}
        for r in range(args.repeats):
            k = r % len(configs)
            for cfg in configs[k:] + configs[:k]:  # alternate; rotate the order per repeat
                res = spawn(dict(common, **cfg, data=data))
                runs[cfg["name"] + "/" + cfg["reference"]].append(res)
                print(f"# {kind} repeat {r + 1}: {cfg['name']} ({cfg['reference']}): "
                      f"{pairs / res['pass_s']:.2f} pairs/s, rss {res['peak_rss_mb']:.0f} MB", file=sys.stderr)
        lines += report(meta, kind, data, configs, runs, pairs)
        if args.profile:
            lines += profiles(meta, kind, data, common, configs)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
    return 0


def report(meta, kind, data, configs, runs, pairs) -> list[dict[str, Any]]:
    summary = {key: summarize(v, pairs) for key, v in runs.items()}
    trl = {ref: summary.get(f"trl/{ref}") for ref in ("per_step", "precomputed")}
    lines = []
    for cfg in configs:
        s = summary[cfg["name"] + "/" + cfg["reference"]]
        lengths = {"prompt": data["prompt"], "response": data["response"]} if kind == "variable" \
            else {"prompt": data["fixed"][0], "response": data["fixed"][1]}
        line = {**meta, "data": kind, "lengths": lengths, "config": cfg["name"],
                "reference": cfg["reference"], **s}
        if cfg["framework"] == "ours" and trl[cfg["reference"]]:
            base = trl[cfg["reference"]]
            line["ratio_vs_trl"] = round(s["pairs_per_s"] / base["pairs_per_s"], 3)
            line["ratio_vs_trl_best"] = round(s["pairs_per_s_best"] / base["pairs_per_s_best"], 3)
            line["ratio_vs_trl_steady"] = round(s["steady_pairs_per_s"] / base["steady_pairs_per_s"], 3)
            line["ratio_vs_trl_cpu"] = round(s["pairs_per_cpu_s"] / base["pairs_per_cpu_s"], 3)
            line["target"] = 1.5 if cfg["reference"] == "per_step" else 1.2
        print(json.dumps(line), flush=True)
        lines.append(line)
    return lines


def profiles(meta, kind, data, common, configs) -> list[dict[str, Any]]:
    lines = []
    for cfg in configs:
        if cfg["framework"] != "ours" or cfg["reference"] != "per_step":
            continue
        res = spawn(dict(common, **cfg, data=data, profile=True))
        line = {**meta, "data": kind, "config": cfg["name"], "reference": cfg["reference"],
                "kind": "profile", **res["profile"]}
        print(json.dumps(line), flush=True)
        lines.append(line)
    return lines


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        for row in Path("/proc/cpuinfo").read_text().splitlines():
            if row.startswith("model name"):
                name = row.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cpus, {platform.system()}"


def command(argv: list[str] | None) -> str:
    rest = sys.argv[1:] if argv is None else argv
    return " ".join(["python benchmarks/dpo_step_vs_trl.py", *rest])


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())

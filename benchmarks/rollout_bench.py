"""Rollout figures on CPU: weight refit, generation throughput vs plain vLLM, RM scoring.

Prints one JSON object per measurement (JSON lines); ``--out FILE`` appends them, each with
the command line and the date, e.g. to benchmarks/results/rollout_bench.jsonl.

    python benchmarks/rollout_bench.py                      # everything (~3-5 min, 2 cores)
    python benchmarks/rollout_bench.py --only refit --sizes tiny 25m

- ``refit``: random-init Llama checkpoints from tiny to ~100M parameters (built locally,
  cached in .cache/bench_models). Megatron policy (TP=1, fp32) -> `iter_hf_tensors` ->
  buckets -> live vLLM engine (`RolloutGroup.push_megatron`). Reported: seconds and GB/s
  for the whole push, and for the stream alone (same conversion, no engine) to split the
  cost; the engine's greedy tokens are checked unchanged after pushing the same weights.
- ``generation``: the same engine, model and prompts, interleaved repeats, median tokens/s:
  (a) our `VllmGenerator.generate` (K seeded requests per prompt, split under the budget,
  converted to Samples); (b) plain ``LLM.generate`` with exactly the same requests and
  seeds (the wrapper's overhead: ratio a/b, goal >= 0.95); (c) plain ``LLM.generate`` with
  one unseeded ``n=K`` request per prompt (what per-sample seeding costs: ratio a/c).
- ``reward``: samples/s of the tiny HF RM, a ~25M HF RM and the toy rule scorer.
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

# name -> TinyModelSpec fields (Llama, byte-level BPE vocab of 512, head_dim 32..64)
SIZES = {
    "tiny": {
        "hidden_size": 128,
        "num_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 256,
    },
    "5m": {
        "hidden_size": 256,
        "num_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 768,
    },
    "25m": {
        "hidden_size": 512,
        "num_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "intermediate_size": 1536,
    },
    "100m": {
        "hidden_size": 768,
        "num_layers": 14,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "intermediate_size": 2560,
    },
}
QUESTIONS = [
    "What is {a} + {b}?",
    "List three colours.",
    "Name three fruits, please.",
    "Give me one sentence about the sea.",
    "What is the capital of Peru?",
    "What is {a} * {b}?",
    "Write a short sentence about autumn.",
    "List three tools.",
]


def machine() -> dict:
    import torch

    return {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        # The CI machine is shared: a 1-minute load above the core count means contention.
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def checkpoint(size: str) -> Path:
    from metaapo_nemo.models.tiny import TinyModelSpec, ensure_tiny_checkpoint

    return ensure_tiny_checkpoint(
        TinyModelSpec(arch="llama", **SIZES[size]), REPO / ".cache" / "bench_models"
    )


def toy_batch(model_dir: Path, n: int):
    from transformers import AutoTokenizer

    from metaapo_nemo.rollout.generator import PromptBatch

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    msgs = [
        [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)].format(a=i, b=2 * i + 1)}]
        for i in range(n)
    ]
    ids = []
    for m in msgs:
        out = tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True)
        ids.append(list(out["input_ids"] if hasattr(out, "keys") else out))
    return PromptBatch.build(ids, messages=msgs)


# ---------------------------------------------------------------------------- generation


def bench_generation(size: str, prompts: int, k: int, new_tokens: int, repeats: int) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from metaapo_nemo.parallel import cpu_compat
    from metaapo_nemo.rollout.generator import SamplingSettings, derive_seed
    from metaapo_nemo.rollout.vllm_backend import EngineSettings, VllmGenerator

    model_dir = checkpoint(size)
    batch = toy_batch(model_dir, prompts)
    settings = SamplingSettings(n=k, temperature=1.0, max_new_tokens=new_tokens, seed=0)
    gen = VllmGenerator(EngineSettings(str(model_dir), max_model_len=256))
    llm = gen.llm

    def ours() -> int:
        out = gen.generate(batch, settings, policy_step=0)
        return sum(len(s.token_ids) for g in out for s in g.samples)

    same = [
        (
            TokensPrompt(prompt_token_ids=list(p)),
            SamplingParams(
                temperature=1.0, max_tokens=new_tokens, logprobs=0, seed=derive_seed(0, 0, key, j)
            ),
        )
        for key, p in zip(batch.keys, batch.prompt_ids)
        for j in range(k)
    ]

    def plain_same() -> int:
        with cpu_compat.suspended():
            out = llm.generate([r[0] for r in same], [r[1] for r in same], use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in out)

    def plain_nk() -> int:
        with cpu_compat.suspended():
            out = llm.generate(
                [TokensPrompt(prompt_token_ids=list(p)) for p in batch.prompt_ids],
                SamplingParams(n=k, temperature=1.0, max_tokens=new_tokens, logprobs=0),
                use_tqdm=False,
            )
        return sum(len(c.token_ids) for o in out for c in o.outputs)

    runs = {"ours": ours, "plain_same_requests": plain_same, "plain_n_k_unseeded": plain_nk}
    for fn in runs.values():  # warm-up
        fn()
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            tokens = fn()
            rates[name].append(tokens / (time.perf_counter() - t0))
    gen.shutdown()
    med = {name: statistics.median(r) for name, r in rates.items()}
    return {
        "benchmark": "rollout_generation",
        "model": f"llama-{size}",
        "prompts": prompts,
        "samples_per_prompt": k,
        "max_new_tokens": new_tokens,
        "repeats": repeats,
        "engine_calls_per_generate": gen.calls // (repeats + 1),
        **{f"tokens_per_s_{n}": round(v, 1) for n, v in med.items()},
        "ratio_vs_plain_same_requests": round(med["ours"] / med["plain_same_requests"], 3),
        "ratio_vs_plain_n_k_unseeded": round(med["ours"] / med["plain_n_k_unseeded"], 3),
        "spread_ours": [round(min(rates["ours"]), 1), round(max(rates["ours"]), 1)],
        **machine(),
    }


# ---------------------------------------------------------------------------- refit


def bench_refit(sizes: list[str], caps_mb: list[int], repeats: int, emit) -> None:
    from metaapo_nemo.models.arch import load_arch
    from metaapo_nemo.models.convert import iter_hf_tensors
    from metaapo_nemo.models.megatron_model import BuildOptions
    from metaapo_nemo.models.policy import MegatronLM
    from metaapo_nemo.parallel import state
    from metaapo_nemo.rollout.generator import PromptBatch, SamplingSettings
    from metaapo_nemo.rollout.group import EnginePlacement, RolloutGroup
    from metaapo_nemo.rollout.vllm_backend import EngineSettings, VllmGenerator

    ctx = state.initialize(seed=0)
    out = []
    greedy = SamplingSettings(n=1, temperature=0.0, max_new_tokens=8)
    probe = PromptBatch.build([[2, 313, 202, 301, 300, 224, 22]])
    for size in sizes:
        model_dir = checkpoint(size)
        arch = load_arch(model_dir)
        lm = MegatronLM(arch, ctx, model_dir, BuildOptions())
        gen = VllmGenerator(EngineSettings(str(model_dir), max_model_len=256))
        group = RolloutGroup(gen, EnginePlacement.for_context(ctx), ctx)
        before = gen.generate(probe, greedy, 0)
        stream_s = []
        for _ in range(repeats):  # the conversion alone: each tensor dropped once made
            t0 = time.perf_counter()
            for _name, _tensor in iter_hf_tensors(lm.modules(), arch, ctx):
                pass
            stream_s.append(time.perf_counter() - t0)
        for cap in caps_mb:
            runs = [group.push_megatron(lm.modules(), arch, 0, cap << 20) for _ in range(repeats)]
            secs = statistics.median(r.seconds for r in runs)
            last = runs[-1]
            out.append(
                {
                    "benchmark": "rollout_refit",
                    "model": f"llama-{size}",
                    "params": arch.num_parameters,
                    "bytes": last.bytes,
                    "dtype": "float32",
                    "cap_mb": cap,
                    "buckets": last.buckets,
                    "peak_bucket_mb": round(last.peak_bucket_bytes / 2**20, 2),
                    "oversize_groups": len(last.oversize_groups),
                    "repeats": repeats,
                    "push_seconds": round(secs, 4),
                    "push_gb_per_s": round(last.bytes / 1e9 / secs, 3),
                    "stream_only_seconds": round(statistics.median(stream_s), 4),
                    "stream_only_gb_per_s": round(
                        last.bytes / 1e9 / statistics.median(stream_s), 3
                    ),
                    "greedy_unchanged": gen.generate(probe, greedy, 0) == before,
                    **machine(),
                }
            )
            emit(out[-1])
        gen.shutdown()
        del lm
    state.destroy()


# ---------------------------------------------------------------------------- reward


def bench_reward(n: int, repeats: int, emit) -> None:
    from metaapo_nemo.models.tiny import TinyModelSpec
    from metaapo_nemo.reward.hf import HFRewardModel
    from metaapo_nemo.reward.rule import RuleReward
    from metaapo_nemo.reward.tiny_rm import ensure_tiny_reward_model

    rows = [
        json.loads(line)
        for line in (REPO / "metaapo_nemo/data/samples/toy_prefs.jsonl").read_text().splitlines()
    ]
    prompts = [r["chosen"][:-1] for r in rows][:n]
    texts = [r["chosen"][-1]["content"] for r in rows][:n]
    models = {"rule-toy": RuleReward("tasks.toy_rules:score")}
    for size in ("tiny", "25m"):
        path = ensure_tiny_reward_model(
            TinyModelSpec(arch="llama", **SIZES[size]), REPO / ".cache" / "bench_models"
        )
        models[f"hf-llama-{size}"] = HFRewardModel(path, batch_size=16)
    out = []
    for name, rm in models.items():
        rm.score(prompts[:16], texts[:16])  # warm-up
        secs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            rm.score(prompts, texts)
            secs.append(time.perf_counter() - t0)
        s = statistics.median(secs)
        out.append(
            {
                "benchmark": "reward_scoring",
                "model": name,
                "samples": len(texts),
                "batch_size": 16,
                "samples_per_s": round(len(texts) / s, 1),
                "repeats": repeats,
                **machine(),
            }
        )
        emit(out[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=("generation", "refit", "reward"), nargs="*")
    parser.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--caps-mb", nargs="*", type=int, default=[256, 64, 16])
    parser.add_argument("--gen-size", default="25m", choices=list(SIZES))
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="append the JSON lines here (with command, date)")
    args = parser.parse_args(argv)
    only = set(args.only or ("generation", "refit", "reward"))
    command = "python benchmarks/rollout_bench.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )

    def emit(record: dict) -> None:  # printed and appended at once: a partial run is kept
        print(json.dumps(record), flush=True)
        if args.out is not None:
            with args.out.open("a") as f:
                f.write(json.dumps({**record, "command": command.strip()}) + "\n")

    if "generation" in only:  # first: before megatron's CPU shims exist in the process
        for size in dict.fromkeys(["tiny", args.gen_size]):
            emit(bench_generation(size, args.prompts, args.k, args.new_tokens, args.repeats))
    if "reward" in only:
        bench_reward(256, args.repeats, emit)
    if "refit" in only:
        bench_refit(args.sizes, args.caps_mb, max(1, args.repeats // 2), emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Mixture-of-experts figures on CPU: the tiny Qwen3-MoE's DPO step at EP1 and EP2 beside the
dense Qwen3 of equal active parameters, and the MoE model's refit into vLLM in buckets.

    python benchmarks/moe_step.py                          # both parts (~4 min on 2 cores)
    python benchmarks/moe_step.py --only step --steps 10
    python benchmarks/moe_step.py --out benchmarks/results/moe_step.jsonl

``step``: real `torchrun recipes/dpo.py` jobs of the tiny DPO recipe (conf/tiny_cpu_dpo.yaml) with
`model.tiny.arch` set to ``qwen3`` (dense MLP of width I) or ``qwen3_moe`` (4 experts of width
I/2, top 2: the same active MLP parameters per token, twice the stored ones). Layouts: one
process each, then 2 processes as DP2 (experts replicated: EP1) and EP2 (each rank holds 2 of
the 4 experts; tokens cross ranks through the all-to-all dispatcher over gloo). Reported: the
recipe's own median step time and tokens/s after the first step, with the total and active
parameter counts. On 2 CPU cores the all-to-all and the router are overhead, not a speed-up:
the figure prices them against the dense step.

``refit``: a larger tiny Qwen3-MoE (hidden 256, 6 layers, 4 experts of width 512, top 2) built by Megatron (TP1,
fp32), pushed into a live vLLM engine by `RolloutGroup.push_megatron` at several bucket caps.
Reported: bytes, buckets, the peak bucket, the expert bytes of the whole model and of one layer,
seconds and GB/s, and whether the engine's greedy tokens are unchanged after pushing the same
weights. A layer's experts are one fusion group (vLLM re-packs a layer's fused experts once all
have loaded), so the peak bucket is at most max(cap, one layer's experts): experts never travel
all at once (``all_experts_in_one_bucket`` false).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.parallel_step import run_recipe  # noqa: E402
from benchmarks.rollout_bench import machine  # noqa: E402

DENSE, MOE = ["model.tiny.arch=qwen3"], ["model.tiny.arch=qwen3_moe"]
LAYOUTS = {  # name: (processes, overrides)
    "dense_1proc": (1, DENSE),
    "moe_ep1_1proc": (1, MOE),
    "dense_dp2": (2, DENSE),
    "moe_dp2_ep1": (2, MOE),
    "moe_dp2_ep2": (2, [*MOE, "parallel.ep=2"]),
}
REFIT_SPEC = {"hidden_size": 256, "num_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 1024}


def param_counts(arch_name: str, cache: Path, **spec) -> dict:
    """Total and per-token active parameters of a tiny checkpoint (the routed experts' top-k share)."""
    from metaapo_nemo.models.arch import load_arch
    from metaapo_nemo.models.tiny import TinyModelSpec, ensure_tiny_checkpoint

    arch = load_arch(ensure_tiny_checkpoint(TinyModelSpec(arch=arch_name, **spec), cache))
    idle = 0
    if arch.num_experts:
        unrouted = arch.num_experts - arch.experts_per_token  # experts a token does not visit
        idle = arch.num_layers * arch.expert_parameters * unrouted // arch.num_experts
    return {"params_total": arch.num_parameters, "params_active": arch.num_parameters - idle,
            "experts": arch.num_experts, "top_k": arch.experts_per_token}


def bench_step(steps: int, layouts: list[str], emit) -> None:
    with tempfile.TemporaryDirectory(prefix="moe_step_") as tmp:
        work = Path(tmp)
        counts = {a: param_counts(a, work / "cache") for a in ("qwen3", "qwen3_moe")}
        rows = {}
        for name in layouts:
            nproc, overrides = LAYOUTS[name]
            arch = overrides[0].split("=")[1]
            rows[name] = run_recipe(name, nproc, [*overrides, "train.batching=pad", "train.share_prompt=false"],
                                    steps, work, f"tiny {arch} (conf/tiny_cpu_dpo.yaml)")
            rows[name] |= {"metric": "moe_cpu_step", **counts[arch], **machine()}
            dense = {1: "dense_1proc", 2: "dense_dp2"}[nproc]
            if arch == "qwen3_moe" and dense in rows:
                rows[name]["tokens_per_s_vs_dense"] = round(
                    rows[name]["tokens_per_s_median"] / rows[dense]["tokens_per_s_median"], 3)
            emit(rows[name])


def bench_refit(caps_mb: list[float], repeats: int, emit) -> None:
    from metaapo_nemo.models.arch import load_arch
    from metaapo_nemo.models.megatron_model import BuildOptions
    from metaapo_nemo.models.policy import MegatronLM
    from metaapo_nemo.models.tiny import TinyModelSpec, ensure_tiny_checkpoint
    from metaapo_nemo.parallel import state
    from metaapo_nemo.rollout.generator import PromptBatch, SamplingSettings
    from metaapo_nemo.rollout.group import EnginePlacement, RolloutGroup
    from metaapo_nemo.rollout.vllm_backend import EngineSettings, VllmGenerator

    cache = REPO / ".cache" / "bench_models"
    model_dir = ensure_tiny_checkpoint(TinyModelSpec(arch="qwen3_moe", **REFIT_SPEC), cache)
    arch = load_arch(model_dir)
    # the model's experts as they travel (fp32, gate/up/down of every expert of every layer)
    layer_expert_bytes = arch.expert_parameters * 4
    counts = param_counts("qwen3_moe", cache, **REFIT_SPEC)
    gen = VllmGenerator(EngineSettings(str(model_dir), max_model_len=256))  # before megatron's CPU shims
    ctx = state.initialize(seed=0)
    lm = MegatronLM(arch, ctx, model_dir, BuildOptions())
    group = RolloutGroup(gen, EnginePlacement.for_context(ctx), ctx)
    greedy = SamplingSettings(n=1, temperature=0.0, max_new_tokens=8)
    probe = PromptBatch.build([[2, 313, 202, 301, 300, 224, 22]])
    before = gen.generate(probe, greedy, 0)
    for cap in caps_mb:
        runs = [group.push_megatron(lm.modules(), arch, 0, int(cap * 2**20)) for _ in range(repeats)]
        secs = statistics.median(r.seconds for r in runs)
        last = runs[-1]
        emit({"metric": "moe_refit", "model": "tiny qwen3_moe " + json.dumps(REFIT_SPEC), **counts,
              "bytes": last.bytes, "expert_bytes_total": layer_expert_bytes * arch.num_layers,
              "expert_bytes_per_layer": layer_expert_bytes, "dtype": "float32", "cap_mb": cap,
              "buckets": last.buckets, "peak_bucket_bytes": last.peak_bucket_bytes,
              "oversize_groups": len(last.oversize_groups),
              "all_experts_in_one_bucket": last.peak_bucket_bytes >= layer_expert_bytes * arch.num_layers,
              "push_seconds": round(secs, 4), "push_gb_per_s": round(last.bytes / 1e9 / secs, 3),
              "repeats": repeats, "greedy_unchanged": gen.generate(probe, greedy, 0) == before, **machine()})
    gen.shutdown()
    state.destroy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("step", "refit"), nargs="*")
    parser.add_argument("--steps", type=int, default=8, help="optimiser steps per layout")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--caps-mb", nargs="*", type=float, default=[64, 4, 1])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="append the JSON lines here (with the command)")
    args = parser.parse_args(argv)
    only = set(args.only or ("step", "refit"))
    command = "python benchmarks/moe_step.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def emit(record: dict) -> None:  # printed and appended at once: a partial run is kept
        print(json.dumps(record), flush=True)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as f:
                f.write(json.dumps({**record, "command": command.strip()}) + "\n")

    if "refit" in only:  # first: vLLM starts before megatron's CPU shims exist in the process
        bench_refit(args.caps_mb, args.repeats, emit)
    if "step" in only:
        bench_step(args.steps, args.layouts, emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())

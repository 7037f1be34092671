"""One-GPU bf16 DPO step on Megatron-Core: tokens/s, MFU and peak memory (issue 6 item 5).

Times OUR training path: `metaapo_nemo.run.build(cfg, "dpo", pairs=...)` and `fit()` (what recipes/dpo.py runs) (Megatron-Core
policy + frozen reference, megatron schedule and optimiser, sigmoid DPO) on a random-init
Llama built locally in HF format (nothing downloaded), with fixed-length synthetic pairs so
the token count of a step is exact. Prints ONE JSON line; `--record` appends it to a JSONL.

    One H100 (the figure issue 6 asks for; bf16, ~1.1B TinyLlama-shaped model):
        python benchmarks/gpu_dpo_step.py --preset 1b --device cuda \
            --record benchmarks/results/gpu_dpo_step.jsonl
    Plan only (no model built; login node / CPU):
        python benchmarks/gpu_dpo_step.py --preset 1b --device cpu --dry-run
    CPU smoke (what CI runs, fp32):
        python benchmarks/gpu_dpo_step.py --preset tiny --steps 2 --warmup 1

On the test GPU machine megatron-core travels as a wheel (see shared/notes/gpu-device.md);
Transformer Engine is absent there, so `--transformer-impl auto` resolves to the local spec
with torch SDPA attention; `--fp8` needs TE.

Timed: the recipe's own `step_time` (reference forward + policy forward/backward + optimiser
step; the loss read-back synchronises the GPU), median and range over the steps after
`--warmup`. Rows are `[prompt | response]` of exactly `--seq-len` tokens, `train.batching=pad`
without prompt sharing, so every row is `--seq-len` tokens and the output layer runs at every
position: the FLOP count of `step_flops` is exact for what runs. Peak memory: CUDA's
max allocated / reserved since the first step (model loading excluded), or peak RSS on CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tasks/ (synthetic pairs) beside the package
RESULTS = REPO / "benchmarks" / "results" / "gpu_dpo_step.jsonl"
H100_BF16_DENSE_TFLOPS = 989.0
# name: (TinyModelSpec fields of a Llama, run defaults): TinyLlama-1.1B, the tests' tiny Llama.
PRESETS = {
    "1b": (dict(hidden_size=2048, num_layers=22, num_attention_heads=32, num_key_value_heads=4,
                intermediate_size=5632, vocab_size=32000, max_position_embeddings=4096),
           dict(seq_len=2048, global_batch=16, micro_batch=2)),
    "tiny": (dict(hidden_size=128, num_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=256, vocab_size=512, max_position_embeddings=1024),
             dict(seq_len=128, global_batch=4, micro_batch=2)),
}


def step_flops(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
               vocab: int, seq_len: int, pairs: int, causal_factor: float = 1.0
               ) -> dict[str, float]:
    """Model FLOPs of one DPO step (policy forward+backward and reference forward).

    Per token of a row of length s (h hidden, d = h / heads, L layers, V vocab):
      N = L * (h*d*(heads + 2*kv_heads) + heads*d*h + 3*h*intermediate)   (q,k,v,o + SwiGLU
          matmul weights; embeddings, norms and biases excluded)
      policy forward+backward = 6*N + 12*L*h*s*causal_factor + 6*h*V
      reference forward       = 2*N +  4*L*h*s*causal_factor + 2*h*V      (one third)
    The attention term counts QK^T and AV (2 matmuls of 2*s*h FLOPs per token forward).
    causal_factor=1.0 counts the full s x s square, the Megatron/PaLM MFU convention
    (Narayanan et al. 2021), so figures compare with published MFU; 0.5 counts only the
    causal half that flash kernels compute. Tokens = pairs * 2 * s (chosen and rejected).
    """
    n = layers * (hidden * (hidden // heads) * (heads + 2 * kv_heads) + hidden * hidden
                  + 3 * hidden * intermediate)
    tokens = pairs * 2 * seq_len
    attn = 12 * layers * hidden * seq_len * causal_factor
    policy = (6 * n + attn + 6 * hidden * vocab) * tokens
    return {"matmul_params": n, "tokens": tokens, "policy_fwd_bwd": policy,
            "reference_fwd": policy / 3, "total": policy * 4 / 3}


def preset_arch(name: str):
    """The preset's `ModelArch` (plain Python; no model built)."""
    from metaapo_nemo.models.arch import arch_from_hf_dict

    dims = dict(PRESETS[name][0])
    dims["num_hidden_layers"] = dims.pop("num_layers")
    return arch_from_hf_dict({"model_type": "llama", **dims}, source=f"preset {name}")


def arch_flops(arch, seq_len: int, pairs: int) -> dict[str, float]:
    """`step_flops` for a `ModelArch`."""
    return step_flops(arch.hidden_size, arch.num_layers, arch.num_attention_heads,
                      arch.num_kv_heads, arch.intermediate_size, arch.vocab_size, seq_len, pairs)


def _bpe_corpus(words: int, seed: int = 0) -> list[str]:
    """Random lowercase words, each line twice: enough repeated pairs for `words` BPE merges."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choice(letters) for _ in range(rng.randint(5, 9))) for _ in range(words)]
    lines = [" ".join(vocab[i:i + 50]) for i in range(0, words, 50)]
    return [line for line in lines for _ in range(2)]


def ensure_model(name: str, cache_dir: Path) -> Path:
    """Builds the preset once in HF format (fp32, random init) under `cache_dir`.

    The tiny-model builder's built-in corpus gives a ~540-token BPE; an extra generated
    corpus lets the tokenizer (and so the model's vocabulary) reach the preset's size.
    """
    from metaapo_nemo.models.tiny import TinyModelSpec, build_tiny_checkpoint

    d = PRESETS[name][0]
    spec = TinyModelSpec(arch="llama", **d)
    final = cache_dir / f"{name}-{spec.cache_key()}"
    if not final.is_dir():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache_dir))
        try:
            build_tiny_checkpoint(spec, tmp, _bpe_corpus(d["vocab_size"]))
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race with another process: a real error
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    built = json.loads((final / "config.json").read_text())["vocab_size"]
    if built != d["vocab_size"]:
        raise RuntimeError(f"{final}: vocab_size={built}, preset wants {d['vocab_size']}")
    return final


def recipe_config(args: argparse.Namespace, model_dir: Path, out_dir: str):
    """The recipe's config for this benchmark (conf/tiny_cpu_dpo.yaml + overrides)."""
    from metaapo_nemo.config.loader import load_config

    over = [
        f"model.path={model_dir}", "model.tiny=null", f"model.dtype={args.dtype}",
        f"model.transformer_impl={args.transformer_impl}", f"run.output_dir={out_dir}",
        "run.name=gpu_dpo_step", f"data.max_length={args.seq_len}",
        f"data.max_prompt_length={args.seq_len // 4}", "data.shuffle=false",
        f"train.global_batch_size={args.global_batch}",
        f"train.micro_batch_size={args.micro_batch}",
        f"train.max_steps={args.warmup + args.steps}", "train.epochs=1", "train.batching=pad",
        "train.share_prompt=false", "train.save_final_hf=false", "train.progress_bar=off",
        "checkpoint.save_at_end=false", "checkpoint.resume=never",
        "optim.lr=1e-5", "optim.warmup_ratio=0.0", "optim.schedule=constant",
        "reference.precompute=false", "loss.name=dpo",
    ]
    if args.fp8:
        over.append(f"model.fp8={args.fp8}")
    return load_config(None, over, method="dpo")


def run_steps(args: argparse.Namespace, model_dir: Path) -> tuple[list[float], str]:
    """Runs warm-up + timed steps of the recipe; returns all step times and the layer spec."""
    import torch

    from tasks.synthetic import fixed_lengths, synthetic_pairs
    from metaapo_nemo.parallel import state

    from metaapo_nemo import run as R
    prompt = args.seq_len // 4
    vocab = PRESETS[args.preset][0]["vocab_size"]
    pairs = synthetic_pairs(args.global_batch * (args.warmup + args.steps), vocab,
                            fixed_lengths(prompt, args.seq_len - prompt), seed=0)
    tokens = args.global_batch * 2 * args.seq_len
    times: list[float] = []

    class _Collect:
        def on_step_end(self, st):
            m = st.metrics
            assert round(m["tokens_per_s"] * m["step_time"]) == tokens, "rows != --seq-len"
            times.append(m["step_time"])

    with tempfile.TemporaryDirectory(prefix="gpu_dpo_step_") as tmp:
        c = R.build(recipe_config(args, model_dir, tmp), "dpo", pairs=pairs)
        try:
            c.logger.enabled = False
            c.callbacks.callbacks.append(_Collect())
            if c.ctx.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            R.fit(c)
            impl = c.policy.build.spec_choice(on_gpu=c.ctx.device.type == "cuda").impl
        finally:
            state.destroy()
    return times, impl



def device_name(device: str) -> str:
    """torch's CUDA device name, or the CPU model from /proc/cpuinfo."""
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cpus)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cpus)"


def peak_memory(device: str) -> dict[str, float]:
    """Peak GPU memory (allocated and reserved) in GiB, or this process's peak RSS on CPU."""
    import torch

    if device == "cuda":
        return {"cuda_max_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                "cuda_max_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3)}
    return {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}


def figures(times: list[float], flops: dict, global_batch: int, peak_tflops: float | None
            ) -> dict:
    """Throughput figures from the timed step times (median)."""
    t = statistics.median(times)
    tflops = flops["total"] / t / 1e12
    mfu = None if peak_tflops is None else float(f"{tflops / peak_tflops:.4g}")
    return {
        "step_time_s_median": round(t, 4),
        "step_time_s_range": [round(min(times), 4), round(max(times), 4)],
        "pairs_per_s": round(global_batch / t, 3), "tokens_per_s": round(flops["tokens"] / t, 1),
        "flops_per_step": flops["total"], "model_tflops_per_s": float(f"{tflops:.4g}"),
        "peak_tflops": peak_tflops, "mfu": mfu,
    }


def memory_plan(args: argparse.Namespace, arch) -> dict:
    """The planner's bf16 train-phase estimate for one 80 GB GPU (offline DPO, no vLLM).

    SDPA (flash / memory-efficient) keeps no s x s attention scores, which is what the
    planner's "selective" recompute mode models; the layers themselves are not recomputed.
    """
    from metaapo_nemo.planner import PlanInput, plan_memory

    plan = plan_memory(PlanInput(
        arch=arch, dtype="bfloat16", distributed_optimizer=False, recompute="selective",
        seq_length=args.seq_len, micro_batch_rows=2 * args.micro_batch,
        num_microbatches=args.global_batch // args.micro_batch, rollout=False,
        vllm_overhead_gib=0.0, gpu_memory_gib=80.0))
    print(plan.report(80.0), file=sys.stderr)
    parts = {k: round(v, 2) for k, v in plan.per_phase["train"].items() if v}
    return parts | {"peak": round(plan.peak("train"), 2)}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="1b")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--seq-len", type=int, help="tokens per row (prompt = a quarter)")
    p.add_argument("--global-batch", type=int, help="pairs per optimiser step")
    p.add_argument("--micro-batch", type=int, help="pairs per forward")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--transformer-impl", default="auto",
                   choices=["auto", "local", "transformer_engine"])
    p.add_argument("--fp8", choices=["hybrid", "e4m3"], default=None,
                   help="needs Transformer Engine")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help=f"dense peak for MFU; default {H100_BF16_DENSE_TFLOPS:g} on CUDA, "
                        "none on CPU")
    p.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "gpu_dpo_step")
    p.add_argument("--record", type=Path, default=None,
                   help=f"append the JSON line here, e.g. {RESULTS.relative_to(REPO)}")
    p.add_argument("--dry-run", action="store_true", help="params, FLOPs and memory plan only")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset][1].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < 1 or args.warmup < 0 or args.seq_len < 8:
        p.error(f"need --steps >= 1, --warmup >= 0 and --seq-len >= 8; got {args.steps}, "
                f"{args.warmup} and {args.seq_len}")
    if args.global_batch % args.micro_batch:
        p.error(f"--micro-batch={args.micro_batch} does not divide --global-batch="
                f"{args.global_batch} ({args.global_batch} % {args.micro_batch} = "
                f"{args.global_batch % args.micro_batch})")
    return args


def resolve_device(args: argparse.Namespace) -> None:
    """Fixes --device and --dtype; hides CUDA for --device cpu (before torch is imported)."""
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda and not args.dry_run:
        raise SystemExit("--device cuda: torch sees no CUDA device; use --device cpu or auto")
    if args.device == "auto":
        args.device = "cuda" if cuda else "cpu"
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.peak_tflops is None and args.device == "cuda":
        args.peak_tflops = H100_BF16_DENSE_TFLOPS


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    resolve_device(args)
    arch = preset_arch(args.preset)
    flops = arch_flops(arch, args.seq_len, args.global_batch)
    config = {"preset": args.preset, "params": arch.num_parameters,
              "matmul_params": flops["matmul_params"], "seq_len": args.seq_len,
              "prompt_len": args.seq_len // 4, "global_batch": args.global_batch,
              "micro_batch": args.micro_batch, "tokens_per_step": flops["tokens"],
              "dtype": args.dtype, "fp8": args.fp8, "attention_causal_factor": 1.0}
    if args.dry_run:
        print(json.dumps({"benchmark": "gpu_dpo_step", "dry_run": True, **config,
                          "flops_per_step": flops["total"],
                          "memory_plan_h100_bf16_gib": memory_plan(args, arch)}))
        return 0
    import megatron.core
    import torch

    from metaapo_nemo.config.schema import ConfigError

    model_dir = ensure_model(args.preset, args.cache_dir)
    try:
        times, impl = run_steps(args, model_dir)
    except ConfigError as exc:  # the recipe's set-up checks: the message has the fix
        raise SystemExit(f"error: {exc}") from None
    record = {
        "benchmark": "gpu_dpo_step", "date": datetime.date.today().isoformat(),
        "device": device_name(args.device), "device_kind": args.device,
        "command": " ".join(["python benchmarks/gpu_dpo_step.py", *(argv or sys.argv[1:])]),
        "config": config | {"steps_timed": args.steps, "warmup": args.warmup,
                            "transformer_impl": impl},
        **figures(times[args.warmup:], flops, args.global_batch, args.peak_tflops),
        **peak_memory(args.device),
        "torch": torch.__version__, "megatron_core": megatron.core.__version__,
        "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(record), flush=True)
    if args.record is not None:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        with open(args.record, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The prepared one-GPU check (issue 19 item 5): one command, one JSON of figures.

    python benchmarks/gpu_check.py --out $OUT/gpu_check.json          # one H100/H200, < ~8 min
    python benchmarks/gpu_check.py --cpu-dry --out /tmp/gpu_check.json # toy sizes on CPU (a test)

Sections (each records its figures or its error; one failing section does not stop the rest):

- ``cuda_context``: device memory a bare CUDA context takes (`torch.cuda.mem_get_info`),
  against the planner's `cuda_context_gib` assumption.
- ``smoke``: a tiny Llama built locally in HF format (metaapo_nemo/models/tiny.py) goes
  through the SAME import path as a real checkpoint onto one rank; fp32 log-probs vs HF
  transformers; `export_hf` back to HF compared tensor by tensor, bitwise.
- ``reference_offload``: a frozen reference moved to the CPU frees its bytes on the GPU.
- ``dpo_step``: benchmarks/gpu_dpo_step.py's functions (our training path) on its ~1.1B
  preset, bf16: tokens/s and MFU against the H200's measured 790 TFLOP/s bf16 matmul rate.
- ``attention``: the same step with SDPA and with megatron's local core attention.
- ``packed``: the same step with rows packed as THD `PackedSeqParams` (the H100 recipes'
  layout: TE's fused varlen attention where TE is installed, else the local spec's SDPA
  core's variable-length attention on CUDA) beside the padded rows.
- ``context_parallel``: the tiny DPO recipe with THD-packed rows, once on one rank and once
  split over 2 context-parallel ranks (TE's context-parallel attention on GPUs; the SDPA
  core's all-gather stand-in on the CPU): per-step losses and grad norms side by side, and
  their largest relative difference. Needs 2 GPUs; on one GPU the section records why it
  did not run.
- ``planner``: a 2-layer, 4096-wide, 128,256-vocabulary Llama, one micro-batch of 4 x 4096
  tokens with full recompute: the step's peak `torch.cuda.max_memory_allocated` above the
  resident state vs the planner's per-layer activations + logits terms.

``--cpu-dry`` runs every section at toy size on the CPU (GPU-only figures are null), so
this script cannot rot between the rare sessions that have a GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

H200_BF16_MATMUL_TFLOPS = 790.0  # measured 8192^3 bf16 matmul (shared/notes/gpu-device.md)
GiB = 1024**3


def _dpo_step_module():
    spec = importlib.util.spec_from_file_location("gpu_dpo_step", REPO / "benchmarks" / "gpu_dpo_step.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_dpo_step"] = mod
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _section(results: dict, name: str, fn, *args) -> None:
    t0 = time.perf_counter()
    try:
        results[name] = fn(*args)
    except Exception as exc:  # noqa: BLE001 - a section's failure is a figure too
        results[name] = {"error": f"{type(exc).__name__}: {exc}",
                         "traceback": traceback.format_exc(limit=6)}
    results[name]["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"[gpu_check] {name}: {json.dumps(results[name])[:400]}", file=sys.stderr, flush=True)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ----------------------------------------------------------------- sections


def cuda_context() -> dict:
    import torch

    if not _cuda():
        return {"skipped": "no CUDA"}
    free0, total = torch.cuda.mem_get_info()  # creates the context; nvml view not needed
    torch.zeros(1, device="cuda")
    import torch.nn.functional as F  # noqa: F401  cuBLAS handle on the first matmul

    torch.ones(64, 64, device="cuda") @ torch.ones(64, 64, device="cuda")
    torch.cuda.synchronize()
    free1, _ = torch.cuda.mem_get_info()
    # mem_get_info's first call already holds the context: report both views.
    return {"total_gib": round(total / GiB, 2), "used_after_init_gib": round((total - free0) / GiB, 3),
            "used_after_cublas_gib": round((total - free1) / GiB, 3),
            "planner_assumption_gib": 0.75}


def smoke(work: Path) -> dict:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from metaapo_nemo.models.arch import load_arch
    from metaapo_nemo.models.convert import export_hf
    from metaapo_nemo.models.decode import sampled_logprobs
    from metaapo_nemo.models.megatron_model import BuildOptions
    from metaapo_nemo.models.policy import MegatronLM
    from metaapo_nemo.models.tiny import TinyModelSpec, build_tiny_checkpoint
    from metaapo_nemo.parallel import state

    hf_dir = build_tiny_checkpoint(TinyModelSpec(arch="llama"), work / "tiny_llama")
    ctx = state.initialize()
    try:
        arch = load_arch(hf_dir)
        lm = MegatronLM(arch, ctx, hf_dir, BuildOptions(dtype="float32"))
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(4, arch.vocab_size, (n,), generator=g).tolist() for n in (9, 17, 30)]
        responses = [torch.randint(4, arch.vocab_size, (n,), generator=g).tolist() for n in (12, 5, 20)]
        ours = sampled_logprobs(lm, prompts, responses, 1.0)
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(ctx.device).eval()
        diff = 0.0
        with torch.no_grad():
            for p, r, o in zip(prompts, responses, ours):
                ids = torch.tensor([p + r], device=ctx.device)
                lp = torch.log_softmax(hf(ids).logits[0, len(p) - 1 : -1].float(), -1)
                want = lp.gather(1, torch.tensor(r, device=ctx.device)[:, None])[:, 0].cpu()
                diff = max(diff, (torch.tensor(o) - want).abs().max().item())
        out = export_hf(lm.chunks, arch, ctx, hf_dir, work / "exported")
        src, dst = load_file(str(hf_dir / "model.safetensors")), load_file(str(Path(out) / "model.safetensors"))
        bad = [k for k in src if k not in dst or not torch.equal(src[k], dst[k])]
        result = {"device": str(ctx.device), "logprob_max_abs_diff_vs_hf": diff, "logprob_ok": diff < 1e-4,
                  "export_tensors": len(src), "export_bitwise_mismatches": bad, "export_bitwise": not bad}
        result |= reference_offload(lm)
        return result
    finally:
        state.destroy()


def reference_offload(lm) -> dict:
    """Moves the frozen model to the CPU and back; the freed bytes vs its parameter bytes."""
    import torch

    param_bytes = sum(p.numel() * p.element_size() for c in lm.chunks for p in c.parameters())
    if not _cuda():
        lm.offload("cpu")  # the same call; nothing to measure
        return {"offload_param_bytes": param_bytes, "offload_freed_bytes": None}
    torch.cuda.synchronize()
    free0 = torch.cuda.mem_get_info()[0]
    lm.offload("cpu")
    torch.cuda.empty_cache()
    free1 = torch.cuda.mem_get_info()[0]
    lm.offload("cuda")
    return {"offload_param_bytes": param_bytes, "offload_freed_bytes": free1 - free0,
            "offload_frees_memory": free1 - free0 >= 0.9 * param_bytes}


def _dpo_args(mod, cpu_dry: bool, work: Path):
    args = mod.parse(["--preset", "tiny" if cpu_dry else "1b", "--steps", "2" if cpu_dry else "5",
                      "--warmup", "1" if cpu_dry else "2", "--cache-dir", str(work / "dpo_models"),
                      "--device", "cpu" if cpu_dry else "cuda"]
                     + ([] if cpu_dry else ["--peak-tflops", str(H200_BF16_MATMUL_TFLOPS)]))
    mod.resolve_device(args)
    return args


def dpo_step(mod, cpu_dry: bool, work: Path, attention: str = "sdpa", extra: tuple[str, ...] = ()) -> dict:
    """gpu_dpo_step's timed recipe steps, with `train.attention` (and `extra` overrides) set."""
    from metaapo_nemo.config import loader

    args = _dpo_args(mod, cpu_dry, work)
    arch = mod.preset_arch(args.preset)
    flops = mod.arch_flops(arch, args.seq_len, args.global_batch)
    model_dir = mod.ensure_model(args.preset, args.cache_dir)
    original = loader.load_config

    def with_attention(path, overrides, *a, **k):
        return original(path, [*overrides, f"train.attention={attention}", *extra], *a, **k)

    loader.load_config = with_attention
    try:
        times, impl = mod.run_steps(args, model_dir)
    finally:
        loader.load_config = original
    return {"preset": args.preset, "params": arch.num_parameters, "seq_len": args.seq_len,
            "global_batch": args.global_batch, "dtype": args.dtype, "layer_spec": impl,
            "attention": attention, "extra": list(extra)} | mod.figures(times, flops, args.global_batch, args.peak_tflops) \
        | mod.peak_memory(args.device)


def attention_compare(mod, cpu_dry: bool, work: Path, sdpa: dict) -> dict:
    local = dpo_step(mod, cpu_dry, work, attention="megatron")
    keys = ("step_time_s_median", "tokens_per_s", "mfu", "cuda_max_allocated_gib", "peak_rss_gib")
    out = {"sdpa": {k: sdpa.get(k) for k in keys}, "megatron_local": {k: local.get(k) for k in keys}}
    if sdpa.get("step_time_s_median") and local.get("step_time_s_median"):
        out["sdpa_speedup"] = round(local["step_time_s_median"] / sdpa["step_time_s_median"], 3)
    return out


def packed_compare(mod, cpu_dry: bool, work: Path, padded: dict) -> dict:
    """The same step with rows packed as THD PackedSeqParams (the H100 recipes' layout; on a
    machine without Transformer Engine the local spec's SDPA core runs its variable-length
    attention on CUDA) beside the padded rows of ``dpo_step``: step time, tokens/s, MFU, peak."""
    packed = dpo_step(mod, cpu_dry, work, extra=("train.batching=pack", "train.pack_format=thd"))
    keys = ("layer_spec", "step_time_s_median", "tokens_per_s", "mfu", "cuda_max_allocated_gib", "peak_rss_gib")
    out = {"padded": {k: padded.get(k) for k in keys}, "pack_thd": {k: packed.get(k) for k in keys}}
    if padded.get("step_time_s_median") and packed.get("step_time_s_median"):
        out["pack_thd_speedup"] = round(padded["step_time_s_median"] / packed["step_time_s_median"], 3)
    return out


def context_parallel(cpu_dry: bool, work: Path) -> dict:
    """The tiny DPO recipe (THD rows) at cp=1 on one rank and cp=2 on two; losses side by side."""
    import subprocess

    import torch

    gpus = torch.cuda.device_count() if not cpu_dry else 0
    if not cpu_dry and gpus < 2:
        return {"skipped": f"context parallelism splits each row over 2 ranks: needs 2 GPUs, this machine "
                           f"has {gpus}"}
    common = ["--config", "conf/tiny_cpu_dpo.yaml", "train.max_steps=3", "train.global_batch_size=8",
              "train.micro_batch_size=2", "data.limit=24", "train.batching=pack", "train.pack_format=thd",
              "train.share_prompt=false", "train.progress_bar=off", "train.save_final_hf=false",
              f"run.output_dir={work / 'cp_runs'}", f"run.cache_dir={work / 'cp_cache'}"]
    out: dict = {}
    for name, nproc, extra in (("cp1", 1, []), ("cp2", 2, ["parallel.cp=2"])):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(REPO / "recipes" / "dpo.py"), *common, *extra, f"run.name={name}"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
        if proc.returncode:
            raise RuntimeError(f"{name} exited {proc.returncode}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        metrics = work / "cp_runs" / name / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        out[name] = {"wall_s": round(time.perf_counter() - t0, 1),
                     "loss": [r["loss"] for r in rows], "grad_norm": [r["grad_norm"] for r in rows]}
    pairs = [(a, b) for key in ("loss", "grad_norm") for a, b in zip(out["cp1"][key], out["cp2"][key])]
    out["max_rel_diff"] = max(abs(a - b) / max(abs(a), 1e-12) for a, b in pairs)
    return out


def planner_check(cpu_dry: bool, work: Path) -> dict:
    """Peak allocated above the resident state for one 4 x 4096 micro-batch (full recompute)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from metaapo_nemo.models.arch import load_arch
    from metaapo_nemo.models.megatron_model import BuildOptions
    from metaapo_nemo.models.microbatch import MicroBatch
    from metaapo_nemo.models.policy import MegatronLM, OptimSettings
    from metaapo_nemo.parallel import state
    from metaapo_nemo.planner import GiB as PG
    from metaapo_nemo.planner import activation_bytes_per_layer

    if cpu_dry:
        shape = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                     vocab_size=512)
        rows, seq = 4, 64
    else:
        shape = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                     vocab_size=128256)
        rows, seq = 4, 4096
    cfg = LlamaConfig(num_hidden_layers=2, max_position_embeddings=seq, tie_word_embeddings=False, **shape)
    hf_dir = work / "planner_model"
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(hf_dir)
    dtype = "float32" if cpu_dry else "bfloat16"
    ctx = state.initialize()
    try:
        arch = load_arch(hf_dir)
        optim = OptimSettings(lr=1e-5, min_lr=1e-6, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95,
                              adam_eps=1e-8, clip_grad=1.0, warmup_steps=0, total_steps=10,
                              schedule="constant")
        lm = MegatronLM(arch, ctx, hf_dir, BuildOptions(dtype=dtype, recompute="full", attention="sdpa"), optim)
        ids = torch.randint(0, arch.vocab_size, (rows, seq))
        mb = MicroBatch(input_ids_NT=ids, labels_NT=ids.roll(-1, 1), loss_mask_NT=torch.ones(rows, seq))

        def loss_fn(m, logps_NT):
            return (-(logps_NT * m.loss_mask_NT.to(logps_NT.device)).sum() / m.loss_mask_NT.numel()), {}

        measured = None
        if _cuda():
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        lm.run([mb], loss_fn, forward_only=False)
        if _cuda():
            torch.cuda.synchronize()
            measured = (torch.cuda.max_memory_allocated() - base) / PG
        per_layer = activation_bytes_per_layer(arch, seq, rows, 1, "full") * (2 if dtype == "float32" else 1)
        logits = 2 * seq * rows * arch.vocab_size * 4
        planned = (2 * per_layer + logits) / PG
        return {"shape": shape | {"layers": 2, "rows": rows, "seq": seq, "dtype": dtype},
                "planner_per_layer_gib": per_layer / PG, "planner_logits_gib": logits / PG,
                "planner_total_gib": planned, "measured_peak_above_resident_gib": measured,
                "ratio_measured_to_planned": None if measured is None else round(measured / planned, 3)}
    finally:
        state.destroy()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-dry", action="store_true", help="toy sizes on the CPU (tests)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "gpu_check.json")
    p.add_argument("--skip", nargs="*", default=[], help="section names to skip")
    args = p.parse_args(argv)
    if args.cpu_dry:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    results: dict = {"benchmark": "gpu_check", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "cpu_dry": args.cpu_dry, "torch": torch.__version__,
                     "device": torch.cuda.get_device_name(0) if _cuda() else "cpu"}
    try:
        import megatron.core

        results["megatron_core"] = megatron.core.__version__
    except ImportError:
        results["megatron_core"] = None
    if not args.cpu_dry and not _cuda():
        raise SystemExit("no CUDA device: run with --cpu-dry on a CPU machine")
    mod = _dpo_step_module()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        steps = [("cuda_context", cuda_context), ("smoke", smoke, work),
                 ("dpo_step", dpo_step, mod, args.cpu_dry, work), ("planner", planner_check, args.cpu_dry, work)]
        for name, fn, *fargs in steps:
            if name not in args.skip:
                _section(results, name, fn, *fargs)
        if "attention" not in args.skip and "error" not in results.get("dpo_step", {"error": 1}):
            _section(results, "attention", attention_compare, mod, args.cpu_dry, work, results["dpo_step"])
        if "packed" not in args.skip and "error" not in results.get("dpo_step", {"error": 1}):
            _section(results, "packed", packed_compare, mod, args.cpu_dry, work, results["dpo_step"])
        if "context_parallel" not in args.skip:
            _section(results, "context_parallel", context_parallel, args.cpu_dry, work)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, dict)} | {"out": str(args.out)}))
    return 0 if not any(isinstance(v, dict) and "error" in v for v in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

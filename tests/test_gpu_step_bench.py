"""benchmarks/gpu_dpo_step.py: the FLOP count by hand, and the script end to end on CPU."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch

from metaapo_nemo.config.loader import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_dpo_step.py"
FIGURES = ("step_time_s_median", "step_time_s_range", "pairs_per_s", "tokens_per_s",
           "flops_per_step", "model_tflops_per_s", "mfu", "date", "device", "command", "config")


def _bench():
    spec = importlib.util.spec_from_file_location("gpu_dpo_step", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _run(tmp_path, *args: str, cuda: bool = False) -> dict:
    from metaapo_nemo.parallel.state import independent_env

    env = independent_env(OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                          PYTHONPATH=str(REPO_ROOT), PYTHONWARNINGS="ignore")
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, str(SCRIPT), "--cache-dir", str(tmp_path / "models"), *args]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_step_flops_against_hand_arithmetic():
    # h=8, L=2, heads=2 (d=4), kv=1, I=16, V=10, s=5, 3 pairs -> 30 tokens.
    # per layer: q 8*8 + k 8*4 + v 8*4 + o 8*8 = 192, SwiGLU 3*8*16 = 384 -> N = 2*576 = 1152
    # per token: 6*1152 = 6912 + attention 12*2*8*5 = 960 + LM head 6*8*10 = 480 = 8352
    f = _bench().step_flops(8, 2, 2, 1, 16, 10, seq_len=5, pairs=3)
    assert f["matmul_params"] == 1152
    assert f["tokens"] == 30
    assert f["policy_fwd_bwd"] == 8352 * 30 == 250560
    assert f["reference_fwd"] == 83520  # 2*1152 + 4*2*8*5 + 2*8*10 = 2784 per token
    assert f["total"] == 334080
    half = _bench().step_flops(8, 2, 2, 1, 16, 10, seq_len=5, pairs=3, causal_factor=0.5)
    assert half["policy_fwd_bwd"] == (6912 + 480 + 480) * 30


def test_1b_preset_is_tinyllama_shaped():
    bench = _bench()
    arch = bench.preset_arch("1b")
    assert arch.num_parameters == 1_100_048_384  # TinyLlama-1.1B
    f = bench.arch_flops(arch, seq_len=2048, pairs=1)
    per_token = 6 * 968_884_224 + 12 * 22 * 2048 * 2048 + 6 * 2048 * 32000
    assert f["matmul_params"] == 968_884_224
    assert f["policy_fwd_bwd"] == per_token * 4096


def test_dry_run_1b_builds_nothing(tmp_path):
    out = _run(tmp_path, "--preset", "1b", "--device", "cpu", "--dry-run")
    assert out["dry_run"] and out["params"] == 1_100_048_384
    assert out["flops_per_step"] > 0 and 0 < out["memory_plan_h100_bf16_gib"]["peak"] < 80
    assert not (tmp_path / "models").exists()


def test_tiny_cpu_end_to_end_with_record(tmp_path):
    record = tmp_path / "results" / "gpu_dpo_step.jsonl"
    out = _run(tmp_path, "--preset", "tiny", "--steps", "2", "--warmup", "1", "--seq-len", "64",
               "--record", str(record))
    for key in FIGURES:
        assert key in out
    assert math.isfinite(out["tokens_per_s"]) and out["tokens_per_s"] > 0
    assert out["config"]["tokens_per_step"] == 4 * 2 * 64 and out["config"]["steps_timed"] == 2
    assert out["device_kind"] == "cpu" and out["mfu"] is None and out["peak_rss_gib"] > 0
    lo, hi = out["step_time_s_range"]
    assert lo <= out["step_time_s_median"] <= hi
    assert json.loads(record.read_text().splitlines()[-1]) == out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16, CUDA memory figures): runs on a GPU machine with `pytest -m gpu`")
def test_tiny_cuda_bf16_step(tmp_path):
    out = _run(tmp_path, "--preset", "tiny", "--device", "cuda", "--steps", "2", "--warmup", "1",
               cuda=True)
    assert out["config"]["dtype"] == "bfloat16" and out["peak_tflops"] == 989.0
    assert 0 < out["mfu"] < 1 and out["cuda_max_allocated_gib"] > 0

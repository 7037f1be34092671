"""benchmarks/gpu_check.py --cpu-dry: the prepared GPU check runs end to end at toy size
(every section, no errors), so it is ready when a session has a GPU.

In the H100 stack's tier (`make test-gpu-stack`, which CI runs), not the default one: the GPU
machine runs Python 3.12 (../shared/notes/gpu-device.md), the stack that tier builds, and the
dry run takes ~40 s of the default tier's budget."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from metaapo_nemo.config.loader import REPO_ROOT

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def test_gpu_check_cpu_dry_runs_every_section(tmp_path):
    from metaapo_nemo.parallel.state import independent_env

    env = independent_env(OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                          PYTHONPATH=str(REPO_ROOT), PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_check.py"), "--cpu-dry",
                           "--out", str(out)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    for section in ("cuda_context", "smoke", "dpo_step", "planner", "attention", "packed", "context_parallel"):
        assert section in r and "error" not in r[section], (section, r.get(section))
    assert r["smoke"]["logprob_ok"] and r["smoke"]["export_bitwise"]
    assert r["dpo_step"]["tokens_per_s"] > 0 and r["dpo_step"]["layer_spec"] == "local"
    assert r["attention"]["sdpa"]["tokens_per_s"] and r["attention"]["megatron_local"]["tokens_per_s"]
    assert r["packed"]["pack_thd"]["tokens_per_s"] and r["packed"]["padded"]["tokens_per_s"]
    cp = r["context_parallel"]  # one rank vs two context-parallel ranks, the same steps
    assert len(cp["cp1"]["loss"]) == len(cp["cp2"]["loss"]) == 3 and cp["max_rel_diff"] < 1e-5
    # per layer (full recompute, fp32): 2 s b h x 2 = 2 * 64 * 4 * 128 * 2 bytes
    assert r["planner"]["planner_per_layer_gib"] * 2**30 == 2 * 64 * 4 * 128 * 2
    assert r["planner"]["planner_logits_gib"] * 2**30 == 2 * 64 * 4 * 512 * 4

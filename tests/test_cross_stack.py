"""Checkpoints across the two stacks: megatron-core 0.16.1 (CPU, Python 3.11, `.venv`) and
0.19.2 (the H100 set, Python 3.12, `.venv-gpu-stack`).

A DP2 run with the distributed optimiser (the cluster recipes' optimiser layout) is written by
one stack; the other resumes it at step 2 and trains to step 4, and exports its last
checkpoint. The resumed steps must reproduce the writer's own uninterrupted run (losses and
grad norms within relative 1e-5, final weights as the layout tests hold them: Adam state,
data position and schedule all carried over; they do not differ at all on this machine), the
export must equal the writer's own export bit for bit, and trainer.json names the writer.

Marked ``stack`` and ``slow``: the Python 3.12 tier (`make test-gpu-stack`) runs it, with
`.venv` built by the CPU tier beside it; the CPU tier does not (it would be the same pair of
runs again). Without the other environment it skips, naming the make target, unless
METAAPO_CROSS_STACK=required (set by .ci/run), where that is a failure.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dist_utils import read_metrics, read_weights, relative_diff, torchrun, weight_mismatches, worker_env

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.dist]

REPO = Path(__file__).resolve().parents[1]
VENVS = {"cpu": REPO / ".venv", "stack": REPO / ".venv-gpu-stack"}
DPO = ("data.limit=32", "train.global_batch_size=8", "train.micro_batch_size=2", "train.max_steps=4",
       "train.progress_bar=off", "optim.lr=0.0005", "optim.warmup_ratio=0", "model.tiny.num_layers=2",
       "parallel.distributed_optimizer=true", "checkpoint.every_steps=2")
REL = 1e-5


def _pythons() -> dict[str, Path]:
    here = "stack" if sys.version_info[:2] == (3, 12) else "cpu"
    other = "cpu" if here == "stack" else "stack"
    python = VENVS[other] / "bin" / "python"
    if not python.exists():
        target = "make venv" if other == "cpu" else "make venv-gpu-stack"
        why = f"the other stack's environment {VENVS[other]} is missing: `{target}` builds it"
        if os.environ.get("METAAPO_CROSS_STACK") == "required":
            pytest.fail(why)
        pytest.skip(why)
    return {here: Path(sys.executable), other: python}


def _version(python: Path) -> str:
    out = subprocess.run([str(python), "-c", "import megatron.core as m; print(m.__version__)"],
                         capture_output=True, text=True, env=worker_env(), check=True)
    return out.stdout.strip().splitlines()[-1]


def _export(python: Path, run: Path, out: Path) -> None:
    proc = subprocess.run([str(python), "-m", "metaapo_nemo.cli", "export", str(run), "--out", str(out)],
                          cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("writer", ["cpu", "stack"])
def test_checkpoint_resumes_and_exports_on_the_other_stack(writer, tmp_path):
    pythons = _pythons()
    reader = "stack" if writer == "cpu" else "cpu"
    recipe = REPO / "recipes" / "dpo.py"
    common = (*DPO, f"run.output_dir={tmp_path}", f"run.cache_dir={tmp_path / 'cache'}")
    torchrun(2, recipe, [*common, "run.name=full"], tmp_path / "full.log", python=pythons[writer])
    full = tmp_path / "full"
    step2 = full / "checkpoints" / "step_00000002"
    written = json.loads((step2 / "trainer.json").read_text())["written_by"]
    assert written["megatron_core"].split("+")[0] == _version(pythons[writer]).split("+")[0]

    torchrun(2, recipe, [*common, "run.name=resumed", f"checkpoint.resume={step2}"],
             tmp_path / "resumed.log", python=pythons[reader])
    assert "resumed from" in (tmp_path / "resumed.log").read_text()
    got, want = read_metrics(tmp_path / "resumed"), read_metrics(full)[2:]
    assert [r["step"] for r in got] == [3, 4] == [r["step"] for r in want]
    for g, w in zip(got, want):
        assert math.isclose(g["loss"], w["loss"], rel_tol=REL), (g["step"], g["loss"], w["loss"])
        assert math.isclose(g["grad_norm"], w["grad_norm"], rel_tol=REL), (g["step"], g["grad_norm"])
    wg, ww = read_weights(tmp_path / "resumed"), read_weights(full)
    assert not weight_mismatches(wg, ww, 3e-5, step_bound=2 * 5e-4 * 2)
    assert max(relative_diff(wg[k], ww[k]) for k in ww) < 1e-3  # and nothing near a reset Adam

    _export(pythons[reader], full, tmp_path / "exported")
    from safetensors.torch import load_file

    mine, theirs = load_file(str(tmp_path / "exported" / "model.safetensors")), read_weights(full)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)

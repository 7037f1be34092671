"""slurm/ scripts parse and match their recipes; every big-model recipe passes the planner."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from metaapo_nemo.config.cli import dry_run_report, read_model_dims
from metaapo_nemo.config.loader import REPO_ROOT, load_config

SBATCH = sorted((REPO_ROOT / "slurm").glob("*.sbatch"))


def _directive(text: str, key: str) -> int:
    m = re.search(rf"^#SBATCH --{key}=(\d+)", text, re.M)
    assert m, f"missing #SBATCH --{key}"
    return int(m.group(1))


def test_there_are_scripts_for_each_scale():
    names = {p.stem for p in SBATCH}
    assert {"metaapo_llama31_8b", "metaapo_qwen25_7b", "metaapo_llama31_70b", "dpo_llama31_8b",
            "dpo_llama31_70b"} <= names


@pytest.mark.parametrize("script", SBATCH + [REPO_ROOT / "slurm" / "launch.sh"], ids=lambda p: p.name)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
def test_script_names_existing_recipe_with_matching_layout(script):
    text = script.read_text()
    recipe = re.search(r"^RECIPE=(\S+)", text, re.M).group(1)
    entry = re.search(r"^SCRIPT=(\S+)", text, re.M).group(1)
    assert (REPO_ROOT / recipe).is_file() and (REPO_ROOT / entry).is_file()
    for needed in ("--signal=USR1@", "--requeue", '\nexec bash slurm/launch.sh "$SCRIPT" "$RECIPE" "$@"'):
        assert needed in text  # the one launcher; it owns the requeue on exit 85
    assert "scontrol requeue" not in text, "the requeue logic lives in slurm/launch.sh only"
    world = _directive(text, "nodes") * _directive(text, "ntasks-per-node")
    if "--gpus-per-node" in text:
        assert _directive(text, "gpus-per-node") == _directive(text, "ntasks-per-node")  # one process per GPU
    else:  # a CPU script (tests/test_slurm_cluster.py runs it): a tiny model
        assert "tiny" in recipe
    cfg = load_config(recipe, method=Path(entry).stem)  # the script runs its config's method
    p = cfg.parallel
    assert world % (p.tp * p.pp * p.cp) == 0, f"{world} GPUs vs tp {p.tp} x pp {p.pp}"
    if cfg.method == "metaapo":
        assert cfg.rollout.tp <= world and world % cfg.rollout.tp == 0
    else:  # the offline method plans no engine and no reward model
        assert cfg.rollout is None and cfg.reward is None and cfg.metaapo is None
    # the full dry run: layout vs the model's heads/layers, batch arithmetic, memory planner
    report = dry_run_report(cfg, world, read_model_dims(cfg))
    assert "fits" in report and "DOES NOT FIT" not in report


def test_launcher_requeues_on_85_once_for_every_script():
    text = (REPO_ROOT / "slurm" / "launch.sh").read_text()
    assert 'REQUEUE_EXIT=${REQUEUE_EXIT:-85}' in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert "--kill-on-bad-exit=1" in text  # a dead rank ends the step (node failure: no hang)
    assert "SLURM_ARRAY_TASK_ID" in text  # array tasks get their own run directories


def test_planner_refuses_a_layout_that_does_not_fit():
    from metaapo_nemo.config.schema import ConfigError

    cfg = load_config("conf/llama31_8b_metaapo.yaml", ["parallel.recompute=null", "parallel.tp=1"])
    with pytest.raises(ConfigError, match="GiB per GPU > 80 GiB"):
        dry_run_report(cfg, 8, read_model_dims(cfg))
    warn = load_config("conf/llama31_8b_metaapo.yaml", ["parallel.recompute=null", "parallel.tp=1",
                                                         "planner.on_exceed=warn"])
    assert "WARNING" in dry_run_report(warn, 8, read_model_dims(warn))


def test_release_hyperparameters_in_big_recipes():
    cfg = load_config("conf/llama31_8b_metaapo.yaml")
    assert (cfg.optim.lr, cfg.optim.adam_beta2, cfg.train.global_batch_size, cfg.data.max_length) == (
        5e-7, 0.95, 128, 4096)
    assert (cfg.rollout.samples_per_prompt, cfg.metaapo.t_meta, cfg.loss.beta) == (8, 8, 0.1)
    qwen = load_config("conf/qwen25_7b_metaapo.yaml")
    assert (qwen.rollout.temperature, qwen.rollout.top_p) == (0.9, 0.95)
    big = load_config("conf/llama31_70b_metaapo.yaml")
    assert (big.parallel.tp, big.parallel.pp, big.model.fp8, big.parallel.recompute) == (8, 4, "hybrid", "full")
    assert big.parallel.distributed_optimizer

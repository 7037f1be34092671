"""--dry-run anywhere: the world size from flags or an sbatch script, every shipped config
planned at its intended size, and configuration errors as one message with exit status 2."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from metaapo_nemo import run as R
from metaapo_nemo.config.loader import CONF_DIR, REPO_ROOT, load_config
from metaapo_nemo.config.schema import ConfigError
from metaapo_nemo.config.world import planned_world_size, read_sbatch, scripts_running

pytestmark = pytest.mark.stack  # in the H100 stack's tier too (make test-gpu-stack)

CONFIGS = sorted(CONF_DIR.glob("*.yaml"))
SBATCH = sorted((REPO_ROOT / "slurm").glob("*.sbatch"))


def _intended(config) -> list[int]:
    """The world sizes a config is meant for: each slurm script that runs it, else the
    "N node(s) x G H100" of its header comment, else its layout's minimum."""
    sizes = [read_sbatch(s).world_size()[0] for s in scripts_running(config)]
    if sizes:
        return sizes
    header = re.search(r"(\d+) nodes? x (\d+)", config.read_text().split("\nmethod:")[0])
    if header:
        return [int(header.group(1)) * int(header.group(2))]
    cfg = load_config(config)
    p = cfg.parallel
    return [max(p.tp * p.pp * p.cp, cfg.rollout.tp if cfg.rollout is not None else 1)]


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "SLURM_NTASKS", "SLURM_NPROCS", "SLURM_PROCID", "SLURM_STEP_ID"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_plans_at_its_intended_world_size(config, capsys):
    method = load_config(config).method
    for world in _intended(config):
        rc = R.main(["--dry-run", "--config", str(config), "--world-size", str(world)], method=method)
        out, err = capsys.readouterr()
        assert rc == 0, err
        assert f"world size {world}: --world-size {world}" in out and "DOES NOT FIT" not in out


@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
def test_every_sbatch_script_plans_its_own_config(script, capsys):
    info = read_sbatch(script)
    method = "dpo" if info.script.endswith("dpo.py") else "metaapo"
    assert R.main(["--dry-run", "--sbatch", str(script.relative_to(REPO_ROOT))], method=method) == 0
    out = capsys.readouterr().out
    world = info.world_size()[0]
    assert re.search(rf"^world size {world}: slurm/{script.name}: ", out, re.M), out[-500:]


def test_a_big_layout_without_a_world_size_says_which_flag_to_pass(capsys):
    rc = R.main(["--dry-run", "--config", "conf/llama31_70b_metaapo.yaml"], method="metaapo")
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "parallel.tp=8 x parallel.pp=4" in err and "--world-size N" in err
    assert "--nodes N --gpus-per-node G" in err and "--sbatch slurm/metaapo_llama31_70b.sbatch" in err


def test_nodes_times_gpus_and_conflicts():
    cfg = load_config("conf/llama31_70b_metaapo.yaml")
    assert planned_world_size(cfg, "conf/llama31_70b_metaapo.yaml", nodes=8, gpus_per_node=8)[0] == 64
    assert planned_world_size(cfg, "x", gpus_per_node=32)[0] == 32  # one node
    with pytest.raises(ConfigError, match="needs --gpus-per-node"):
        planned_world_size(cfg, "x", nodes=8)
    with pytest.raises(ConfigError, match="give one of"):
        planned_world_size(cfg, "x", world_size=64, sbatch="slurm/metaapo_llama31_70b.sbatch")


def test_world_size_from_the_launcher_when_no_flag(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "32")
    monkeypatch.setenv("RANK", "0")
    cfg = load_config("conf/llama31_70b_metaapo.yaml")
    assert planned_world_size(cfg, "conf/llama31_70b_metaapo.yaml") == (32, "torchrun: 32 processes launched")


def test_sbatch_directive_forms(tmp_path):
    s = tmp_path / "x.sbatch"
    s.write_text("#!/bin/bash\n#SBATCH -N 2\n#SBATCH --gres=gpu:h100:4  # four per node\n"
                 "#SBATCH --job-name=x\nRECIPE=conf/llama31_8b_metaapo.yaml\nsrun true\n#SBATCH --nodes=99\n")
    info = read_sbatch(s)
    assert (info.nodes, info.gpus_per_node, info.recipe) == (2, 4, "conf/llama31_8b_metaapo.yaml")
    assert info.world_size()[0] == 8  # directives after the first command are not read (as sbatch)
    s.write_text("#!/bin/bash\n#SBATCH --ntasks 12\n#SBATCH --nodes=3\n#SBATCH --ntasks-per-node=8\n")
    assert read_sbatch(s).world_size()[0] == 12
    s.write_text("#!/bin/bash\n#SBATCH --nodes=2-4\n")
    with pytest.raises(ConfigError, match="not a single count"):
        read_sbatch(s)
    s.write_text("#!/bin/bash\necho hi\n")
    with pytest.raises(ConfigError, match="pass --world-size"):
        read_sbatch(s).world_size()


BAD = [
    (["--config", "conf/nope.yaml", "--dry-run"], "config file not found"),
    (["--dry-run", "optim.lr"], "key=value"),
    (["--dry-run", "optim.lr=abc"], "optim.lr=abc"),
    (["--dry-run", "trian.max_steps=2"], "did you mean: train"),
    (["--dry-run", "parallel.tp=3", "--world-size", "3"], "parallel.tp=3 does not divide"),
    (["--dry-run", "--sbatch", "slurm/nope.sbatch"], "cannot read it"),
    (["--dry-run", "--sbatch", "slurm/dpo_llama31_8b.sbatch"], "runs method=dpo"),
    (["--world-size", "8"], "--dry-run only"),
    (["--dry-run", "metaapo.round_size=60"], "metaapo.round_size=60 is not a multiple of train.global_batch_size=8"),
    (["parallel.tp=3"], "parallel.tp=3 does not divide"),  # a real run: refused before it starts
]


@pytest.mark.parametrize("argv,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_config_errors_are_one_message_and_exit_2(argv, needle, tmp_path, capsys):
    try:
        rc = R.main([*argv, f"run.output_dir={tmp_path}"], method="metaapo")
    except SystemExit as exc:  # argparse's way out, also status 2
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "Traceback" not in err, err


def test_through_the_recipe_script_no_traceback():
    out = subprocess.run([sys.executable, "recipes/metaapo.py", "--dry-run", "--config",
                          "conf/llama31_70b_metaapo.yaml"], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "--world-size" in out.stderr

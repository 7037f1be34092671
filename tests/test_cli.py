"""`metaapo-nemo`: the installed command over train / plan / generate / export."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from metaapo_nemo import cli
from metaapo_nemo.config.loader import CONF_DIR, REPO_ROOT

SCRIPT = Path(sys.executable).parent / "metaapo-nemo"


def test_help_lists_every_shipped_recipe_with_its_method(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in cli.COMMANDS:
        assert command in out
    for path in CONF_DIR.glob("*.yaml"):
        assert f"conf/{path.name}" in out
    assert "conf/tiny_cpu_dpo.yaml" in out and " dpo " in out and " metaapo " in out


def test_plan_picks_the_method_the_config_states(capsys):
    assert cli.main(["plan", "--config", "conf/tiny_cpu_dpo.yaml"]) == 0  # a DPO config, no --method
    assert "method: dpo" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:  # the config parser's exit, as for a recipe
        cli.main(["plan", "--config", "conf/tiny_cpu_dpo.yaml", "--method", "metaapo"])
    assert exc.value.code == 2
    assert "runs method=dpo" in capsys.readouterr().err
    assert cli.main(["plan", "--sbatch", "slurm/dpo_llama31_8b.sbatch"]) == 0  # method from its config
    assert "world size 8: slurm/dpo_llama31_8b.sbatch" in capsys.readouterr().out


def test_unknown_command_and_subcommand_help():
    with pytest.raises(SystemExit) as exc:
        cli.main(["bogus"])
    assert exc.value.code == 2
    for argv in (["train", "--help"], ["generate", "--help"], ["export", "--help"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 0


@pytest.mark.skipif(not SCRIPT.exists(), reason="metaapo-nemo not installed: pip install -e .")
def test_installed_script_and_python_m(tmp_path):
    out = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0 and "conf/llama31_70b_metaapo.yaml" in out.stdout
    out = subprocess.run([str(SCRIPT), "plan", "--sbatch", "slurm/metaapo_llama31_70b.sbatch"],
                         capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    assert "world size 64: slurm/metaapo_llama31_70b.sbatch" in out.stdout
    out = subprocess.run([sys.executable, "-m", "metaapo_nemo", "plan", "--config", "conf/llama31_70b_dpo.yaml"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)  # any cwd
    assert out.returncode == 2 and "--world-size N" in out.stderr and "Traceback" not in out.stderr


def test_train_then_export_equals_the_runs_own_hf_export(tmp_path):
    from safetensors.torch import load_file

    args = ["train", "--config", "conf/tiny_cpu_dpo.yaml", f"run.output_dir={tmp_path}",
            f"run.cache_dir={tmp_path / 'cache'}", "run.name=r", "train.max_steps=2", "data.limit=16",
            "train.progress_bar=off"]
    wandb = importlib.util.find_spec("wandb") is not None
    if wandb:  # the W&B tracker through a real run, offline (no network)
        args += ["logging.trackers=[tensorboard,wandb]", "logging.wandb_mode=offline"]
    assert cli.main(args) == 0
    run = tmp_path / "r"
    assert not wandb or list(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert (run / "checkpoints" / "latest").exists()  # checkpoint.save_at_end
    assert cli.main(["export", str(run), "--out", str(tmp_path / "exported")]) == 0
    ours, theirs = load_file(tmp_path / "exported" / "model.safetensors"), load_file(run / "hf_final" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)
    assert (tmp_path / "exported" / "tokenizer_config.json").exists()
    shutil.rmtree(run / "checkpoints" / "latest", ignore_errors=True)
    assert cli.main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2

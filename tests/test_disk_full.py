"""Disk full during a checkpoint: a real small tmpfs fills up (root; the `cluster` tier).

The save that does not fit ends the run (exit 4) with a message naming the directory, the
free space and what a checkpoint needs; its partial directory is gone; `latest` still names
the previous checkpoint, which verifies; with space again, the same command resumes from it
and ends bitwise equal to an uninterrupted run.
"""

from __future__ import annotations

import os
import subprocess
from functools import partial
from pathlib import Path

import pytest

from metaapo_nemo import run as R
from metaapo_nemo.checkpoint import Checkpointer
from metaapo_nemo.config.loader import REPO_ROOT
from tests.slurm_cluster import assert_same_run

pytestmark = [pytest.mark.cluster,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs")]

FAST = ("data.limit=48", "train.global_batch_size=8", "train.micro_batch_size=4", "train.epochs=2",
        "train.progress_bar=off", "checkpoint.every_steps=4")  # 12 steps; saves at 4, 8, 12


def _args(out: Path, *extra: str) -> list[str]:
    return [f"run.output_dir={out}", f"run.cache_dir={REPO_ROOT / '.cache'}", "run.name=run", *extra]


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    # one tiny-model checkpoint is ~5 MB: the first fits, the second does not
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_checkpoint_fails_clean_and_a_rerun_with_space_resumes(tmp_path, small_fs, capsys):
    dpo = partial(R.main, method="dpo")
    assert dpo(_args(tmp_path / "ref", *FAST)) == 0
    capsys.readouterr()

    assert dpo(_args(small_fs, *FAST)) == R.SAVE_FAILED_EXIT
    err = capsys.readouterr().err
    ckpts = small_fs / "run" / "checkpoints"
    assert f"no space left on the file system of {ckpts}" in err, err[-2000:]
    assert "one checkpoint needs about" in err and "MB free" in err and "latest is still step_00000004" in err
    assert not list(ckpts.glob(".tmp-*")) and not (ckpts / "step_00000008").exists()
    assert (ckpts / "latest").read_text().strip() == "step_00000004"
    assert Checkpointer(ckpts.parent, ctx=None)._verify(ckpts / "step_00000004") is None

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], check=True)
    assert dpo(_args(small_fs, *FAST)) == 0
    assert "resumed from" in capsys.readouterr().out
    assert_same_run(tmp_path / "ref" / "run", small_fs / "run", rounds=False)

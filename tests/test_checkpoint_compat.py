"""The checkpoint format across megatron-core releases, in-process on either stack (the pair
of stacks is tests/test_cross_stack.py): the common-state reader that gives 0.16 the 0.17+
format, what trainer.json records of the writer, and the message when a load fails."""

from __future__ import annotations

import json

import pytest

from metaapo_nemo import run as R
from metaapo_nemo.checkpoint import stack_mismatch_message, written_by
from metaapo_nemo.parallel import compat

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def step2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ck")
    args = [f"run.output_dir={tmp}", "run.name=ck", "data.limit=16", "train.global_batch_size=4",
            "train.micro_batch_size=2", "train.max_steps=2", "train.progress_bar=off",
            "checkpoint.every_steps=2", "train.save_final_hf=false"]
    assert R.main(args, method="dpo") == 0
    return tmp / "ck" / "checkpoints" / "step_00000002"


def test_trainer_json_names_the_writing_stack(step2):
    import platform

    import torch

    recorded = json.loads((step2 / "trainer.json").read_text())["written_by"]
    assert recorded == {"megatron_core": compat.info().version, "torch": torch.__version__,
                        "python": platform.python_version()}


def test_common_state_reader_takes_this_releases_format(step2):
    """What 0.16 reads of a checkpoint's common state equals what megatron itself reads: on
    0.17+ the `common_state` object, read the way the 0.16 fallback reads it; on 0.16 the
    fallback reader on its own common.pt."""
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    policy = step2 / "policy"
    theirs = load_common_state_dict(str(policy))
    if compat.info().series >= (0, 17):
        assert not (policy / "common.pt").exists()
        assert compat.dist_checkpoint_load_kwargs() == {}  # megatron reads both formats itself
        ours = compat.read_common_state_object(str(policy))
    else:
        assert (policy / "common.pt").exists()
        ours = compat.dist_checkpoint_load_kwargs()["common_strategy"].load_common(policy)
    assert ours.keys() == theirs.keys() and repr(ours) == repr(theirs)


def test_common_state_reader_names_both_formats_when_neither_is_there(tmp_path):
    if compat.info().series >= (0, 17):
        pytest.skip("megatron-core 0.17+ reads both formats itself; the fallback reader is 0.16's "
                    "(the CPU tier runs this test)")
    from megatron.core.dist_checkpointing.core import CheckpointingException

    with pytest.raises(CheckpointingException, match=r"common.pt \(megatron-core <= 0.16\).*'common_state'"):
        compat.dist_checkpoint_load_kwargs()["common_strategy"].load_common(tmp_path)


def test_a_failed_load_names_both_stacks_and_the_fix(tmp_path):
    here = written_by()["megatron_core"]
    other = "0.19.2" if not here.startswith("0.19") else "0.16.1"
    msg = stack_mismatch_message(tmp_path, {"written_by": {"megatron_core": other, "torch": "2.14.0",
                                                           "python": "3.12.1"}}, KeyError("optimizer.x"))
    assert f"written by megatron-core {other} (torch 2.14.0, Python 3.12.1)" in msg
    assert f"this is megatron-core {here}" in msg and "make venv" in msg and "KeyError" in msg
    same = stack_mismatch_message(tmp_path, {"written_by": {"megatron_core": here}}, ValueError("x"))
    assert "written by" not in same and "ValueError: x" in same
    old = stack_mismatch_message(tmp_path, {}, ValueError("x"))
    assert "an unrecorded stack" in old

"""Reliability: exact resume after SIGTERM / SIGUSR1 / SIGKILL, atomic and verified
checkpoints with fallback, non-finite steps skipped or stopped, resharding on load."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from metaapo_nemo import run as R
from metaapo_nemo.config.loader import REPO_ROOT
from tests.dist_utils import ROLLOUT

DPO_FAST = ("data.limit=48", "train.global_batch_size=8", "train.micro_batch_size=4", "train.epochs=2",
            "train.progress_bar=off", "optim.warmup_ratio=0.2")  # 12 steps over 2 epochs


def _recipe(name: str):
    """The library entry of one method, as `recipes/<name>.py` calls it."""
    return partial(R.main, method=name)


def _args(tmp: Path, name: str, *extra: str) -> list[str]:
    return [f"run.output_dir={tmp}", f"run.cache_dir={REPO_ROOT / '.cache'}", f"run.name={name}", *extra]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "hf_final" / "model.safetensors"))


def _signal_at(step: int, sig: int):
    """A callback that sends `sig` to this process at the end of optimiser step `step`."""
    class _Kill:
        def on_step_end(self, state) -> None:
            if state.step == step:
                os.kill(os.getpid(), sig)
    return _Kill()


class _Count:
    def __init__(self):
        self.steps = []

    def on_step_end(self, state) -> None:
        self.steps.append(state.step)


def _run_with(recipe, args: list[str], extra_callback=None) -> int:
    """recipe(args), with one more callback added after the run is built."""
    if extra_callback is None:
        return recipe(args)
    return recipe(args, extend=lambda run: run.callbacks.callbacks.append(extra_callback))


def _assert_same_run(a: Path, b: Path) -> None:
    la, lb = _jsonl(a / "metrics.jsonl"), _jsonl(b / "metrics.jsonl")
    assert [r["step"] for r in lb] == [r["step"] for r in la]
    assert [r["loss"] for r in lb] == [r["loss"] for r in la]  # bitwise
    assert [r["grad_norm"] for r in lb] == [r["grad_norm"] for r in la]
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def dpo_baseline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo")
    assert _recipe("dpo")(_args(tmp, "full", *DPO_FAST)) == 0
    return tmp / "full"


@pytest.mark.stack
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_dpo_signal_saves_exits_85_and_resumes_bitwise(dpo_baseline, tmp_path, sig):
    dpo = _recipe("dpo")
    args = _args(tmp_path, "run", *DPO_FAST)
    assert _run_with(dpo, args, _signal_at(5, sig)) == 85  # mid-epoch 1 (6 steps per epoch)
    ck = tmp_path / "run" / "checkpoints"
    assert (ck / "latest").read_text() == "step_00000005"
    assert not (tmp_path / "run" / "hf_final").exists()  # a preempted run exports nothing
    counted = _Count()
    assert _run_with(dpo, args, counted) == 0
    assert counted.steps == [6, 7, 8, 9, 10, 11, 12]  # continued, not restarted
    _assert_same_run(dpo_baseline, tmp_path / "run")


META_FAST = (*ROLLOUT, "data.limit=32", "metaapo.round_size=16", "metaapo.t_meta=2", "rollout.samples_per_prompt=2",
             "rollout.max_new_tokens=16", "train.progress_bar=off", "train.epochs=2")  # 8 steps, 4 rounds


@pytest.fixture(scope="module")
def meta_baseline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("meta")
    assert _recipe("metaapo")(_args(tmp, "full", *META_FAST)) == 0
    return tmp / "full"


def _meta_state(run: Path) -> dict:
    from metaapo_nemo.checkpoint import MANIFEST  # noqa: F401 - the files exist

    latest = (run / "checkpoints" / "latest").read_text()
    return torch.load(run / "checkpoints" / latest / "rank_00000.pt", weights_only=False)["meta_learner"]


@pytest.mark.stack
def test_metaapo_sigterm_mid_round_resumes_bitwise(meta_baseline, tmp_path):
    meta = _recipe("metaapo")
    args = _args(tmp_path, "run", *META_FAST)
    assert _run_with(meta, args, _signal_at(3, signal.SIGTERM)) == 85  # step 1 of round 2 (2 per round)
    counted = _Count()
    assert _run_with(meta, args, counted) == 0
    assert counted.steps == [4, 5, 6, 7, 8]
    _assert_same_run(meta_baseline, tmp_path / "run")
    ra, rb = _jsonl(meta_baseline / "rounds.jsonl"), _jsonl(tmp_path / "run" / "rounds.jsonl")
    keys = ("round", "sampled", "online_pairs", "annotation_ratio", "w_mean", "rm_chosen_mean")
    assert [[r[k] for k in keys] for r in rb] == [[r[k] for k in keys] for r in ra]
    la, lb = _meta_state(meta_baseline), _meta_state(tmp_path / "run")
    assert all(torch.equal(la["net"][k], lb["net"][k]) for k in la["net"])


# ----------------------------------------------------------------- corrupted / partial checkpoints


def _two_checkpoints(tmp: Path) -> Path:
    """A DPO run with checkpoints at steps 6 and 12 (the end)."""
    assert _recipe("dpo")(_args(tmp, "ck", *DPO_FAST, "checkpoint.every_steps=6",
                                     "train.save_final_hf=false")) == 0
    return tmp / "ck"


@pytest.fixture(scope="module")
def ck_run(tmp_path_factory):
    return _two_checkpoints(tmp_path_factory.mktemp("ck"))


def _finder(run: Path):
    from metaapo_nemo.checkpoint import Checkpointer
    from metaapo_nemo.parallel.dims import ParallelDims

    class _Ctx:  # single process: what Checkpointer reads of a ParallelContext
        dims = ParallelDims(world_size=1)
        is_main = True

    return Checkpointer(run, _Ctx())


@pytest.mark.parametrize("damage", ["flip", "truncate", "no_manifest", "delete"])
def test_corrupted_latest_falls_back_to_the_previous_good_one(ck_run, tmp_path, capsys, damage):
    import shutil

    run = tmp_path / "ck"
    shutil.copytree(ck_run, run)
    latest = run / "checkpoints" / "step_00000012"
    assert _finder(run).find() == latest
    victim = sorted((latest / "policy").glob("*.distcp"))[0]
    if damage == "flip":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
        why = "SHA-256"
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:100])
        why = "bytes"
    elif damage == "no_manifest":
        (latest / "manifest.json").unlink()
        why = "manifest.json is missing"
    else:
        victim.unlink()
        why = "is missing"
    assert _finder(run).find() == run / "checkpoints" / "step_00000006"
    err = capsys.readouterr().err
    assert "step_00000012 is unusable" in err and why in err
    # and the recipe resumes from it: steps 7..12 again
    counted = _Count()
    assert _run_with(_recipe("dpo"), _args(tmp_path, "ck", *DPO_FAST, "checkpoint.every_steps=6",
                                           "train.save_final_hf=false"), counted) == 0
    assert counted.steps == list(range(7, 13))


def test_explicit_bad_checkpoint_is_a_clear_error(ck_run, tmp_path, capsys):
    bad = tmp_path / "nothing_here"
    rc = _recipe("dpo")(_args(tmp_path, "x", *DPO_FAST, f"checkpoint.resume={bad}"))
    assert rc == 2 and f"checkpoint {bad} is unusable: no such directory" in capsys.readouterr().err


def test_keep_last_and_atomic_layout(ck_run):
    ck = ck_run / "checkpoints"
    names = sorted(p.name for p in ck.iterdir())
    assert names == ["latest", "step_00000006", "step_00000012"]  # keep_last=2, no temporaries
    manifest = json.loads((ck / "step_00000012" / "manifest.json").read_text())
    for f in ("trainer.json", "config.yaml", "shared.pt", "rank_00000.pt", "policy/.metadata"):
        assert f in manifest["files"], f
    trainer = json.loads((ck / "step_00000012" / "trainer.json").read_text())
    assert trainer["step"] == 12 and trainer["scheduler"]["num_steps"] == 12


# ----------------------------------------------------------------- non-finite steps


class _NaNAt:
    """Wraps a preference loss so that optimiser steps in `steps` see NaN log-probs."""

    def __init__(self, loss, steps: set[int]):
        self.inner, self.steps, self.current = loss, steps, 1

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, logps, *args, **kwargs):
        import dataclasses

        if self.current in self.steps:  # NaN log-probs: NaN loss AND NaN gradients
            logps = dataclasses.replace(logps, policy_chosen_B=logps.policy_chosen_B * float("nan"))
        return self.inner(logps, *args, **kwargs)


def _nan_run(recipe, args, steps: set[int]):
    def extend(c):
        c.loss = wrapped = _NaNAt(c.loss, steps)

        class _Tick:
            def on_step_end(self, state) -> None:
                wrapped.current = state.step + 1
        c.callbacks.callbacks.append(_Tick())

    return recipe(args, extend=extend)


def test_nonfinite_step_is_skipped_counted_and_never_applied(tmp_path):
    rc = _nan_run(_recipe("dpo"), _args(tmp_path, "skip", *DPO_FAST, "train.epochs=1"), {3})
    assert rc == 0
    steps = _jsonl(tmp_path / "skip" / "metrics.jsonl")
    assert [s["update_applied"] for s in steps] == [True, True, False, True, True, True]
    assert steps[2]["loss"] == "nan" and steps[-1]["skipped_steps"] == 1
    w = _weights(tmp_path / "skip")
    assert all(torch.isfinite(v).all() for v in w.values())


def test_nonfinite_stop_saves_the_last_good_state_and_exits_3(tmp_path, capsys):
    rc = _nan_run(_recipe("dpo"), _args(tmp_path, "stop", *DPO_FAST, "train.epochs=1",
                                        "checkpoint.on_nonfinite=stop"), {3})
    assert rc == 3
    err = capsys.readouterr().err
    assert "non-finite loss or gradient at step 3" in err and "step 2" in err
    ck = tmp_path / "stop" / "checkpoints"
    assert (ck / "latest").read_text() == "step_00000002"
    # too many skips in a row stop the run the same way
    rc = _nan_run(_recipe("dpo"), _args(tmp_path, "many", *DPO_FAST, "train.epochs=1",
                                        "checkpoint.max_skips=2"), {2, 3, 4})
    assert rc == 3 and (tmp_path / "many" / "checkpoints" / "latest").read_text() == "step_00000003"


# ----------------------------------------------------------------- SIGKILL, another layout


def _cli(tmp: Path, recipe: str, name: str, *extra: str) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "recipes" / f"{recipe}.py"), *_args(tmp, name, *extra)]


@pytest.mark.slow
def test_metaapo_sigkill_then_resume_is_bitwise(meta_baseline, tmp_path):
    """SIGKILL at a random point after step 2's checkpoint: no handler runs; the resumed run
    starts from the last complete checkpoint and ends identical to the uninterrupted one.

    ``slow`` (~40 s): the default tier kills MetaAPO at DP2, the cluster recipes' layout
    (`test_metaapo_dp2_sigkill_mid_round_resumes_bitwise`); this one adds the CLI entry point."""
    import subprocess
    import time

    from tests.dist_utils import worker_env

    cmd = _cli(tmp_path, "metaapo", "run", *META_FAST, "checkpoint.every_steps=1")
    env = worker_env() | {"OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 600
    while not (ck / "step_00000003").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout
    _assert_same_run(meta_baseline, tmp_path / "run")


@pytest.mark.stack
def test_tp2_checkpoint_resumes_on_tp1(dpo_baseline, tmp_path):
    """A TP2 checkpoint (model + optimiser, sharded tensors) continues on TP1 and ends where
    the uninterrupted TP1 run ends (layouts agree to ~1e-6 in fp32, not bitwise)."""
    from tests.dist_utils import torchrun

    args = _args(tmp_path, "tp2", *DPO_FAST, "parallel.tp=2", "checkpoint.every_steps=6")
    torchrun(2, REPO_ROOT / "recipes" / "dpo.py", args, tmp_path / "tp2.log")
    step6 = tmp_path / "tp2" / "checkpoints" / "step_00000006"
    assert json.loads((step6 / "trainer.json").read_text())["layout"]["tp"] == 2
    counted = _Count()
    rc = _run_with(_recipe("dpo"), _args(tmp_path, "tp1", *DPO_FAST, f"checkpoint.resume={step6}"), counted)
    assert rc == 0 and counted.steps == list(range(7, 13))
    wa, wb = _weights(dpo_baseline), _weights(tmp_path / "tp1")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
    la = [r["loss"] for r in _jsonl(dpo_baseline / "metrics.jsonl")][6:]
    lb = [r["loss"] for r in _jsonl(tmp_path / "tp1" / "metrics.jsonl")]
    assert lb == pytest.approx(la, rel=1e-4)


def _dp2_distopt_runs(tmp_path: Path) -> tuple[Path, Path]:
    from tests.dist_utils import torchrun

    common = (*DPO_FAST, "parallel.distributed_optimizer=true", "checkpoint.every_steps=6")
    torchrun(2, REPO_ROOT / "recipes" / "dpo.py", _args(tmp_path, "a", *common), tmp_path / "a.log")
    step6 = tmp_path / "a" / "checkpoints" / "step_00000006"
    torchrun(2, REPO_ROOT / "recipes" / "dpo.py", _args(tmp_path, "b", *common, f"checkpoint.resume={step6}"),
             tmp_path / "b.log")
    assert "resumed from" in (tmp_path / "b.log").read_text()
    return tmp_path / "a", tmp_path / "b"


@pytest.mark.slow
def test_dp2_distributed_optimizer_checkpoint_restores_the_weights(tmp_path):
    """The distributed optimiser (DP2) saves fully reshardable and resumes: the first step
    after the resume sees exactly the saved weights (same loss, bitwise)."""
    a, b = _dp2_distopt_runs(tmp_path)
    la = {r["step"]: r for r in _jsonl(a / "metrics.jsonl")}
    lb = {r["step"]: r for r in _jsonl(b / "metrics.jsonl")}  # a new run dir: steps 7..12 only
    assert sorted(lb) == list(range(7, 13))
    assert la[7]["loss"] == lb[7]["loss"] and la[7]["grad_norm"] == lb[7]["grad_norm"]


@pytest.mark.stack
@pytest.mark.slow
def test_dp2_distributed_optimizer_resume_is_bitwise(tmp_path):
    """Was a strict xfail: megatron 0.16's torch-Adam load shared one `step` tensor between
    all parameters (compat.untie_adam_steps_after_load; tests/test_distopt_checkpoint.py)."""
    a, b = _dp2_distopt_runs(tmp_path)
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.stack
def test_metaapo_dp2_sigkill_mid_round_resumes_bitwise(tmp_path):
    """DP2 (the cluster recipes' layout): SIGKILL of the whole job after step 3's checkpoint
    (mid-round: 2 steps per round), then the same command again resumes from the last
    complete checkpoint and ends bitwise equal to an uninterrupted DP2 run: losses, grad
    norms, rounds.jsonl, final weights, and the meta-learner of every rank."""
    import os
    import subprocess
    import time

    from tests.dist_utils import torchrun, worker_env

    fast = (*META_FAST[:-1], "train.epochs=1")  # 4 steps, 2 rounds
    recipe = REPO_ROOT / "recipes" / "metaapo.py"
    torchrun(2, recipe, _args(tmp_path, "full", *fast), tmp_path / "full.log")
    args = _args(tmp_path, "run", *fast, "checkpoint.every_steps=1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "--max-restarts=0", str(recipe), *args]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=worker_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    ck = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 600
    while not (ck / "step_00000003").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the agent and both ranks, no handler runs
    proc.wait()
    assert (ck / "step_00000003").exists()
    assert not (tmp_path / "run" / "hf_final").exists()
    torchrun(2, recipe, args, tmp_path / "resumed.log")
    assert "resumed from" in (tmp_path / "resumed.log").read_text()
    _assert_same_run(tmp_path / "full", tmp_path / "run")
    ra, rb = _jsonl(tmp_path / "full" / "rounds.jsonl"), _jsonl(tmp_path / "run" / "rounds.jsonl")
    keys = ("round", "sampled", "selected_sha1", "online_pairs", "w_mean", "annotation_ratio")
    assert [[r[k] for k in keys] for r in rb] == [[r[k] for k in keys] for r in ra]
    for rank in (0, 1):  # the last checkpoint's meta-learner equals on both runs and ranks
        fa = torch.load(ck.parent.parent / "full" / "checkpoints" / (ck.parent.parent / "full" / "checkpoints"
                        / "latest").read_text() / f"rank_{rank:05d}.pt", weights_only=False)["meta_learner"]
        fb = torch.load(ck / (ck / "latest").read_text() / f"rank_{rank:05d}.pt", weights_only=False)["meta_learner"]
        assert all(torch.equal(fa["net"][k], fb["net"][k]) for k in fa["net"])

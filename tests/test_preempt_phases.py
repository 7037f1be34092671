"""Preemption at any moment, through the real entry point (`python recipes/metaapo.py`, one
process per rank with the launch variables srun / torchrun set), at DP2 (the cluster recipes'
layout): wherever SIGUSR1 lands, every rank exits with the requeue status (85) without a
traceback, `latest` names a complete checkpoint, and the requeued job resumes to the same
final weights as an uninterrupted run, bit for bit.

Signals are placed with the test hook ``METAAPO_SIGNAL_AT=<point>`` (metaapo_nemo/preempt.py):
at that point every rank sends itself the signal, as SLURM signals every process of the step;
nothing waits on machine speed.

One run is requeued through the points a run meets in order - the engine build (before
training), a round's margin pass (step 0: nothing to save), a training step (checkpoint, 85),
the next round's refit, its generation and its scoring (the round is abandoned; the last step's
state is checkpointed once), a checkpoint being written, the end-of-run export - and then
finishes: one run directory, compared with an uninterrupted run. The default tier takes one
point of each kind (6 launches); ``slow`` takes every point (9 launches) and sends the signal in
every start-up point (imports, config, data, HF -> Megatron, reference, reward model, the
resume load), checking that nothing on disk changed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dist_utils import ROLLOUT, read_metrics, read_weights, worker_env

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "metaapo.py"
# 2 rounds x 2 optimiser steps at DP2; a periodic checkpoint at step 3 only, so steps 1 and 2
# are saved by the preemption path itself and step 3's save is a periodic one
FAST = (*ROLLOUT, "data.limit=32", "metaapo.round_size=16", "metaapo.t_meta=2", "rollout.samples_per_prompt=2",
        "rollout.max_new_tokens=12", "train.global_batch_size=8", "train.micro_batch_size=2",
        "model.tiny.num_layers=2", "train.progress_bar=off", "train.max_steps=4", "checkpoint.every_steps=3")
NPROC = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp: Path, name: str, signal_at: str | None = None, extra: tuple[str, ...] = ()) -> list[tuple[int, str]]:
    """The recipe as srun starts it: NPROC processes with the launch variables, each its own
    entry point. Returns (exit status, stderr) per rank."""
    port = _free_port()
    args = [sys.executable, str(RECIPE), *FAST, *extra, f"run.output_dir={tmp}", f"run.name={name}",
            f"run.cache_dir={tmp / 'cache'}"]
    procs = []
    for rank in range(NPROC):
        env = worker_env() | {"RANK": str(rank), "WORLD_SIZE": str(NPROC), "LOCAL_RANK": str(rank),
                              "LOCAL_WORLD_SIZE": str(NPROC), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        env.pop("METAAPO_SIGNAL_AT", None)
        if signal_at is not None:
            env["METAAPO_SIGNAL_AT"] = signal_at
        procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    out = []
    for p in procs:
        _, err = p.communicate(timeout=600)
        out.append((p.returncode, err))
    return out


def latest_step(run: Path) -> int | None:
    """The step `latest` names, after the resume path's own verification of that checkpoint
    (every file against its manifest: sizes and checksums)."""
    from metaapo_nemo.checkpoint import Checkpointer, step_of
    from metaapo_nemo.parallel.dims import ParallelDims

    class _Ctx:  # single process: what Checkpointer reads of a ParallelContext
        dims = ParallelDims(world_size=1)
        is_main = True

    ck = run / "checkpoints"
    if not (ck / "latest").exists():
        return None
    named = ck / (ck / "latest").read_text().strip()
    assert Checkpointer(run, _Ctx(), verify="checksum").find(explicit=str(named)) == named
    assert not list(ck.glob(".tmp-*")), "a half-written checkpoint was left beside latest"
    return step_of(named)


def assert_requeued(results: list[tuple[int, str]], where: str) -> None:
    for rank, (rc, err) in enumerate(results):
        assert rc == 85, f"signal at {where}: rank {rank} exited {rc}\n{err[-3000:]}"
        assert "Traceback" not in err, f"signal at {where}: rank {rank}\n{err[-3000:]}"
        assert "SIGUSR1 received" in err, err[-2000:]


# The requeued runs split each round's 16 prompts into chunks of 4 (margins, generation: more
# check points, the same collectives on both ranks); the uninterrupted one runs each round as
# one chunk, so the final equality also shows that chunking changes nothing.
CHUNKED = ("metaapo.prompts_per_chunk=4",)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    results = launch(tmp, "full", extra=("metaapo.prompts_per_chunk=null",))
    assert [rc for rc, _ in results] == [0] * NPROC, results[0][1][-3000:]
    return tmp / "full"


# (where the signal lands, the step `latest` names afterwards)
CHAIN = [
    ("engine", None),            # start-up: nothing trained, nothing written
    ("margins", None),           # round 0's margin pass at step 0: abandoned, nothing to save
    ("step,checkpoint_write:SIGTERM", 1),  # during step 1: it finishes and is checkpointed (a
                                 # second signal, SIGTERM, arrives while that preemption checkpoint
                                 # is written: no effect), 85
    ("refit", 2),                # step 2 trains, round 1's refit: abandoned, step 2 saved, 85
    ("generate", 2),             # round 1's generation: abandoned; latest already holds step 2
    ("score", 2),                # round 1's scoring: the same
    ("checkpoint_write", 3),     # step 3's periodic checkpoint half-written: it completes, 85
    ("export", 4),               # training done and saved; the export is left to the requeue
]


# The default tier's chain: one point of each kind (start-up; a step; a round abandoned with
# the last step checkpointed; a checkpoint being written; the export); `slow` runs them all.
SHORT = [("engine", None), ("step,checkpoint_write:SIGTERM", 1), ("refit", 2), ("checkpoint_write", 3),
         ("export", 4)]


@pytest.mark.parametrize("chain", [SHORT, pytest.param(CHAIN, marks=pytest.mark.slow)], ids=["short", "every_point"])
def test_a_run_requeued_at_every_point_ends_as_the_uninterrupted_run(chain, baseline, tmp_path):
    run = tmp_path / "run"
    for where, step in chain:
        assert_requeued(launch(tmp_path, "run", where, CHUNKED), where)
        assert latest_step(run) == step, (where, latest_step(run))
        assert not (run / "hf_final").exists()
    results = launch(tmp_path, "run", extra=CHUNKED)
    assert [rc for rc, _ in results] == [0] * NPROC, results[0][1][-3000:]
    got, want = read_metrics(run), read_metrics(baseline)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3, 4]
    assert [(r["loss"], r["grad_norm"]) for r in got] == [(r["loss"], r["grad_norm"]) for r in want]
    wg, ww = read_weights(run), read_weights(baseline)
    assert wg.keys() == ww.keys() and all(torch.equal(wg[k], ww[k]) for k in ww)
    rounds = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    full = [json.loads(line) for line in (baseline / "rounds.jsonl").read_text().splitlines()]
    keys = ("round", "sampled", "selected_sha1", "online_pairs", "w_mean", "annotation_ratio")
    assert [[r[k] for k in keys] for r in rounds] == [[r[k] for k in keys] for r in full]


START = ["imports", "config", "data", "model", "reference", "reward", "resume"]


@pytest.mark.slow
@pytest.mark.parametrize("where", START)
def test_a_signal_during_start_up_exits_85_and_changes_nothing(where, baseline, tmp_path):
    run = tmp_path / "run"
    if where == "resume":  # a run with a checkpoint to resume from
        assert_requeued(launch(tmp_path, "run", "step"), "step")
    before = sorted(p.relative_to(run) for p in (run / "checkpoints").rglob("*")) if run.exists() else []
    assert_requeued(launch(tmp_path, "run", where), where)
    after = sorted(p.relative_to(run) for p in (run / "checkpoints").rglob("*")) if run.exists() else []
    assert after == before


def test_the_hook_names_only_points_the_code_reaches():
    """Every point a test can signal at is a `reached(...)` call in the package (no dead names)."""
    from metaapo_nemo import preempt

    source = "\n".join(p.read_text() for p in (REPO / "metaapo_nemo").rglob("*.py"))
    for where in preempt.CHECKPOINTS:
        assert (f'reached("{where}")' in source or f'check(ctx, "{where}")' in source
                or f'check("{where}")' in source), where
    named = {p.split(":")[0] for w, _ in CHAIN for p in w.split(",")}
    assert named | set(START) == set(preempt.CHECKPOINTS)


if os.environ.get("METAAPO_SIGNAL_AT"):  # never inherit a hook into the test process itself
    raise RuntimeError("METAAPO_SIGNAL_AT is set in the test environment")

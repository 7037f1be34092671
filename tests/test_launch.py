"""The one reader of the launch environment (parallel/launch.py): torchrun or SLURM."""

from __future__ import annotations

import os

import pytest

from metaapo_nemo.config.cli import ConfigError, world_size_from_env
from metaapo_nemo.parallel import launch, state
from metaapo_nemo.parallel.launch import LaunchEnvError, export_launch_env, launch_info

# What srun sets for task 3 of 4 on the second of two nodes (2 tasks per node); no torchrun names.
SRUN_TASK = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4",
             "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
             "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_NODELIST": "node[1-2]",
             "SLURM_STEP_NODELIST": "node[1-2]"}


@pytest.fixture
def clean_env(monkeypatch):
    """No launch variable of either kind; os.environ restored after the test (export writes
    it directly, which monkeypatch does not undo)."""
    saved = dict(os.environ)
    for name in (*launch.TORCHRUN_VARS, *launch.SLURM_RANK_VARS, "SLURM_STEP_ID", "SLURM_JOB_ID",
                 "SLURM_TASKS_PER_NODE", "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(launch.shutil, "which", lambda name: None)  # node list parsed in Python
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def test_single_process_defaults(clean_env):
    assert launch_info() == launch.LaunchInfo(0, 1, 0, 1, None, None, "single")
    assert world_size_from_env() == 1


def test_slurm_only_gives_rank_world_and_rendezvous(clean_env):
    for key, value in SRUN_TASK.items():
        clean_env.setenv(key, value)
    info = launch_info()
    assert info == launch.LaunchInfo(rank=3, world_size=4, local_rank=1, local_world_size=2,
                                     master_addr="node1", master_port=20000 + 4242, source="slurm")
    # The two old readers agree now (the cause of "world_size=1 is not divisible by parallel.tp=2").
    assert world_size_from_env() == 4
    assert state.launch_env() == (3, 4, 1)
    export_launch_env()
    assert {k: os.environ[k] for k in launch.TORCHRUN_VARS} == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "node1", "MASTER_PORT": str(20000 + 4242)}


def test_torchrun_names_win_over_slurm(clean_env):
    """torchrun started by srun (one task per node): torchrun's ranks are the real ones."""
    for key, value in {**SRUN_TASK, "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}.items():
        clean_env.setenv(key, value)
    for key, value in {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                       "MASTER_ADDR": "10.9.0.1", "MASTER_PORT": "29500"}.items():
        clean_env.setenv(key, value)
    assert launch_info() == launch.LaunchInfo(5, 8, 1, 4, "10.9.0.1", 29500, "torchrun")


def test_batch_shell_without_a_step_is_one_process(clean_env):
    """`python recipe.py` straight in an sbatch script: SLURM_NTASKS is the job's, not ours."""
    for key, value in SRUN_TASK.items():
        if key != "SLURM_STEP_ID":
            clean_env.setenv(key, value)
    assert launch_info().world_size == 1 and launch_info().rank == 0


def test_bad_values_name_the_variable(clean_env):
    clean_env.setenv("WORLD_SIZE", "four")
    with pytest.raises(ConfigError, match="WORLD_SIZE='four' is not an integer"):
        world_size_from_env()
    clean_env.setenv("WORLD_SIZE", "0")
    with pytest.raises(ConfigError, match="WORLD_SIZE=0 must be >= 1"):
        world_size_from_env()
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("RANK", "2")
    with pytest.raises(LaunchEnvError, match="RANK=2 is not below the world size 2"):
        launch_info()


@pytest.mark.parametrize(("spec", "counts"), [("2", [2]), ("2(x3),1", [2, 2, 2, 1]), ("1,3", [1, 3])])
def test_tasks_per_node_lists(spec, counts):
    assert launch.expand_tasks_per_node(spec) == counts


@pytest.mark.parametrize(("nodelist", "host"), [("node1", "node1"), ("node[03-04,7],gpu1", "node03"),
                                                ("a,b", "a"), ("gpu[2,5]", "gpu2")])
def test_first_host_without_scontrol(clean_env, nodelist, host):
    assert launch.first_host(nodelist) == host


def test_vllm_external_launcher_finds_what_it_reads(clean_env):
    """vLLM's ExecutorWithExternalLauncher (executor "external_launcher") reads RANK and
    LOCAL_RANK from os.environ and initialises with env:// (MASTER_ADDR, MASTER_PORT,
    WORLD_SIZE): under srun, only export_launch_env provides them."""
    uniproc = pytest.importorskip("vllm.v1.executor.uniproc_executor", reason="needs vllm installed")
    for key, value in SRUN_TASK.items():
        clean_env.setenv(key, value)
    export_launch_env()
    method, rank, local_rank = uniproc.ExecutorWithExternalLauncher._distributed_args(None)
    assert (method, rank, local_rank) == ("env://", 3, 1)
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE"):  # what env:// rendezvous reads
        assert os.environ[key]


def test_independent_env_drops_slurm_ranks(clean_env):
    """A separate job started from a SLURM task is not rank N of the step."""
    for key, value in SRUN_TASK.items():
        clean_env.setenv(key, value)
    export_launch_env()
    child = state.independent_env()
    assert launch_info(child) == launch.LaunchInfo(0, 1, 0, 1, None, None, "single")

"""The shipped SLURM path on a real local cluster (slurm/testing/cluster.sh): `make test-cluster`.

Two nodes (each slurmd in its own network + UTS namespace, joined by a bridge only these
namespaces see; the file system is shared), or one node with two tasks where namespaces
cannot be made (the mode is printed and kept in the test report). What runs is the shipped
path, unchanged: `sbatch slurm/tiny_cpu_metaapo.sbatch` -> slurm/launch.sh -> srun -> the
MetaAPO recipe as 2 data-parallel ranks over gloo across the nodes.

- the nodes come up idle; `srun -N2 hostname` answers from two hosts
- the H100 scripts pass `sbatch --test-only` (GPU count and node shape overridden)
- the DP2 run across the nodes finishes (the uninterrupted reference of the tests below)
- preemption: `scancel --signal=USR1` (what `--signal=USR1@N` sends: every process of the
  step) -> one checkpoint, every task exits 85, the job requeues itself, the requeued run
  (SLURM_RESTART_COUNT=1) resumes and ends bitwise equal to the reference
- node failure: SIGKILL of node2's rank mid-step -> the job ends within 60 s, `latest`
  verifies, a resubmission resumes and ends bitwise equal to the reference
- a sweep: `sbatch --array=0-2` over run.seed -> one run directory per array task
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
import yaml

from tests.slurm_cluster import (
    TERMINAL,
    LocalCluster,
    assert_same_run,
    cannot_run_daemons,
    jsonl,
    wait_for_step,
)

pytestmark = [pytest.mark.cluster,
              pytest.mark.skipif(cannot_run_daemons() is not None, reason=str(cannot_run_daemons()))]

CPU_SCRIPT = "slurm/tiny_cpu_metaapo.sbatch"
JOB_NAME = "tiny_cpu_metaapo"
STEPS = 32  # conf/tiny_cpu.yaml: 256 prompts / 8 pairs per step, 4 rounds of 8 steps
QUIET = ("train.progress_bar=off",)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("slurm"), prefix=f"mt{os.getpid()}")
    t0 = time.monotonic()
    mode = c.up()
    print(f"\nlocal SLURM cluster: {mode}, up in {time.monotonic() - t0:.1f} s ({c.state_dir})")
    yield c
    pids = c.daemon_pids()
    c.down()
    alive = [p for p in pids if _alive(p)]
    assert not alive, f"cluster.sh down left daemons running: {alive}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    """The shared run directory of the jobs (every namespace sees the same file system)."""
    return tmp_path_factory.mktemp("runs")


def _submit(cluster: LocalCluster, out: Path, *overrides: str, options=(), env=None) -> int:
    shape = ("--nodes=2", "--ntasks-per-node=1") if cluster.mode == "two-node" else (
        "--nodes=1", "--ntasks-per-node=2")
    return cluster.sbatch(CPU_SCRIPT, *QUIET, *overrides, env={"OUTPUT_DIR": str(out)} | (env or {}),
                          options=(*shape, f"--output={out}/slurm-%j.out", *options))


def test_nodes_come_up_idle_and_answer_from_two_hosts(cluster):
    states = cluster.run("sinfo", "-h", "-N", "-o", "%N %T").stdout.split("\n")
    states = [s for s in states if s]
    if cluster.mode == "two-node":
        assert states == ["node1 idle", "node2 idle"]
        hosts = cluster.run("srun", "-N2", "-n2", "hostname").stdout.split()
        assert sorted(hosts) == ["node1", "node2"]
    else:
        assert len(states) == 1 and states[0].endswith(" idle")
        assert len(cluster.run("srun", "-n2", "hostname").stdout.split()) == 2
    print(f"ran: {cluster.mode}")


GPU_SCRIPTS = sorted(p.name for p in (Path(__file__).parents[1] / "slurm").glob("*.sbatch")
                     if "gpus-per-node" in p.read_text())


@pytest.mark.parametrize("script", GPU_SCRIPTS)
def test_h100_scripts_pass_sbatch_test_only(cluster, script):
    """Everything but the hardware is checked by slurmctld: directives, --time, --signal,
    --requeue, --open-mode, --output. The local cluster has no GPUs and 2 CPUs a node, so the
    GPU count and the node shape are overridden (command-line options win over #SBATCH)."""
    raw = cluster.run("sbatch", "--test-only", f"slurm/{script}", check=False)
    assert "Invalid generic resource" in raw.stderr or "to start at" in raw.stderr, raw.stderr
    fitted = cluster.run("sbatch", "--test-only", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0",
                         "--cpus-per-task=1", f"slurm/{script}", check=False)
    assert fitted.returncode == 0 and "to start at" in fitted.stderr, fitted.stderr


@pytest.fixture(scope="module")
def reference(cluster, out) -> Path:
    """The uninterrupted DP2 job: what every interrupted run must equal."""
    t0 = time.monotonic()
    job = _submit(cluster, out)
    j = cluster.wait(job, timeout=600)
    run = out / f"{JOB_NAME}-{job}"
    log = (out / f"slurm-{job}.out").read_text()
    assert j["JobState"] == "COMPLETED", f"{j['JobState']} {j['ExitCode']}; log tail:\n{log[-3000:]}"
    print(f"\nreference DP2 job {job}: {time.monotonic() - t0:.0f} s")
    return run


def test_dp2_run_across_two_nodes(cluster, reference, out):
    job = reference.name.rsplit("-", 1)[1]
    log = (out / f"slurm-{job}.out").read_text()  # the batch script's output and the tasks'
    nodes = "node[1-2]" if cluster.mode == "two-node" else ""
    launch = re.search(r"launch: job \d+ restart 0: 2 tasks on (\S+), rendezvous (\S+):(\d+)", log)
    assert launch, log[-3000:]
    if cluster.mode == "two-node":
        assert (launch.group(1), launch.group(2)) == (nodes, "node1")  # MASTER_ADDR from the node list
    assert "x dp 2" in log  # data parallel over the two tasks
    assert len(jsonl(reference / "metrics.jsonl")) == STEPS
    assert (reference / "hf_final" / "model.safetensors").is_file()


def test_preemption_checkpoints_exits_85_requeues_and_resumes_bitwise(cluster, out, reference):
    # A periodic checkpoint first (step 8): megatron's checkpoint writer then keeps a helper
    # process for the rest of the run, which SLURM's USR1 killed before the fix
    # (checkpoint_model._signal_safe_results_queue).
    t0 = time.monotonic()
    job = _submit(cluster, out, "checkpoint.every_steps=8")
    run = out / f"{JOB_NAME}-{job}"
    wait_for_step(run, 12, timeout=300)
    cluster.run("scancel", "--signal=USR1", str(job))  # to every process of the step, as --signal=USR1@N
    j = cluster.wait(job, timeout=600, until=lambda j: j["JobState"] == "COMPLETED" or (
        j["JobState"] in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")))
    log = (out / f"slurm-{job}.out").read_text()
    assert j["JobState"] == "COMPLETED" and j["Restarts"] == "1", f"{j}\n{log[-4000:]}"
    assert len(re.findall(r"task \d: Exited with exit code 85", log)) == 2, log[-4000:]
    assert f"requeueing job {job}" in log and "restart 1: 2 tasks" in log
    saved = re.search(r"preempted \(SIGUSR1\): checkpoint at step (\d+) saved", log)
    resumed = re.search(r"resumed from \S+step_0*(\d+) \(step (\d+)\)", log)
    assert saved and resumed and saved.group(1) == resumed.group(1), log[-4000:]
    assert 12 <= int(saved.group(1)) < STEPS
    assert_same_run(reference, run)
    print(f"\npreempted at step {saved.group(1)}, requeued and finished: {time.monotonic() - t0:.0f} s")


def _release(cluster: LocalCluster, job: int, restarts: int) -> None:
    """Waits until the job is requeued for the `restarts`-th time and lets it start now: a
    requeued job waits ~2 min for its BeginTime (what an operator may also skip)."""
    cluster.wait(job, timeout=300, poll=0.2, until=lambda j: j["Restarts"] == str(restarts)
                 and j["JobState"] == "PENDING")
    # Not before the nodes have cleaned up the previous attempt: a start while they complete it
    # fails for good ("Killing non-startable batch job: Job credential revoked", measured).
    deadline = time.monotonic() + 120
    while set(cluster.run("sinfo", "-h", "-N", "-o", "%T").stdout.split()) != {"idle"}:
        assert time.monotonic() < deadline, "the nodes did not return to idle after the requeue"
        time.sleep(0.5)
    time.sleep(2)
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    cluster.wait(job, timeout=120, poll=0.2, until=lambda j: j["JobState"] != "PENDING")


def _ranks_catch_usr1(cluster: LocalCluster) -> bool:
    """Both ranks' python processes exist and catch SIGUSR1 (their first lines have run: the
    SigCgt mask of /proc/<pid>/status). Before that a signal kills the interpreter in its own
    start-up, ~0.1 s, which slurm/launch.sh requeues on too (exit 138), but that is not what
    this test is about."""
    try:
        pids = [_rank_pid(cluster, rank, node) for rank, node in ((0, "node1"), (1, "node2"))]
    except AssertionError:
        return False
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False
        caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M).group(1), 16)
        if not caught >> (signal.SIGUSR1 - 1) & 1:
            return False
    return True


def test_a_signal_while_the_tasks_start_requeues_too_and_the_log_follows_the_run(cluster, out, reference):
    """Issue 30's lost job: after a requeue SLURM signals the tasks again while they are still
    starting (the signal time is only accurate to ~60 s; a requeued job starts its clock
    again). Attempt 0: USR1 mid-training (checkpoint, 85); attempt 1: USR1 as soon as both
    ranks' processes catch it (start-up: 85 at once, latest untouched); attempt 2 runs to the
    end, bitwise equal to the uninterrupted job. run.output_dir on the command line moves the
    run AND launch.sh's train.log."""
    elsewhere = out / "elsewhere"
    job = _submit(cluster, out, "checkpoint.every_steps=8", f"run.output_dir={elsewhere}")
    run = elsewhere / f"{JOB_NAME}-{job}"
    wait_for_step(run, 10, timeout=300)
    cluster.run("scancel", "--signal=USR1", str(job))
    _release(cluster, job, restarts=1)
    deadline = time.monotonic() + 300
    while not _ranks_catch_usr1(cluster):
        assert time.monotonic() < deadline, "the requeued job's ranks did not start"
        time.sleep(0.02)
    latest = (run / "checkpoints" / "latest").read_text()
    cluster.run("scancel", "--signal=USR1", str(job))  # while they import, build, load
    _release(cluster, job, restarts=2)
    j = cluster.wait(job, timeout=600)
    log = (out / f"slurm-{job}.out").read_text()
    assert j["JobState"] == "COMPLETED" and j["Restarts"] == "2", f"{j}\n{log[-4000:]}"
    assert len(re.findall(r"task \d: Exited with exit code 85", log)) == 4, log[-4000:]
    starting = re.findall(r"SIGUSR1 received during (\w+): nothing was trained", log)
    assert len(starting) == 2, log[-4000:]  # both ranks of attempt 1, in a start-up point
    assert log.count("requeueing job") == 2 and "restart 2: 2 tasks" in log
    train_log = (run / "train.log").read_text()
    assert all(f"restart {i}: 2 tasks" in train_log for i in range(3)) and not (out / run.name).exists()
    resumed = re.findall(r"resumed from \S+(step_\d+) \(step (\d+)\)", log)
    assert resumed and resumed[-1][0] == latest  # attempt 1 left latest as it was
    assert_same_run(reference, run)
    print(f"\nUSR1 at start-up of restart 1 (during {starting[0]}): requeued, resumed from {latest}")


@pytest.mark.slow
def test_time_limit_signal_requeues_until_the_run_ends(cluster, out):
    """The issue's literal job: `sbatch --time=2 --signal=USR1@100` over a run longer than one
    allocation, requeued by SLURM's own signal as often as it takes, ends equal to the same run
    uninterrupted (3 epochs, 96 steps)."""
    long = ("train.epochs=3", "train.max_steps=96", "checkpoint.every_steps=8")
    ref_job = _submit(cluster, out, *long)
    assert cluster.wait(ref_job, timeout=1200)["JobState"] == "COMPLETED"
    job = _submit(cluster, out, *long, options=("--time=2", "--signal=USR1@100"))
    restarts = 0
    deadline = time.monotonic() + 3600
    while True:
        j = cluster.job(job)
        if j["JobState"] in TERMINAL:
            break
        if int(j["Restarts"]) > restarts:
            restarts = int(j["Restarts"])
            _release(cluster, job, restarts)
        assert time.monotonic() < deadline, j
        time.sleep(1)
    log = (out / f"slurm-{job}.out").read_text()
    assert j["JobState"] == "COMPLETED" and int(j["Restarts"]) >= 2, f"{j}\n{log[-4000:]}"
    assert_same_run(out / f"{JOB_NAME}-{ref_job}", out / f"{JOB_NAME}-{job}")
    print(f"\n--time=2 --signal=USR1@100: {j['Restarts']} requeues, finished equal to the uninterrupted run")


def test_node_failure_ends_the_job_and_a_resubmission_resumes_bitwise(cluster, out, reference):
    job = _submit(cluster, out, "checkpoint.every_steps=8")
    run = out / f"{JOB_NAME}-{job}"
    wait_for_step(run, 12, timeout=300)
    victim = _rank_pid(cluster, rank=1)
    os.kill(victim, signal.SIGKILL)
    t_kill = time.monotonic()
    j = cluster.wait(job, timeout=120, poll=0.5)
    ended_s = time.monotonic() - t_kill
    log = (out / f"slurm-{job}.out").read_text()
    assert j["JobState"] == "FAILED", f"{j}\n{log[-3000:]}"
    assert ended_s < 60, f"job took {ended_s:.0f} s to end after the SIGKILL"
    ckpts = run / "checkpoints"
    latest = (ckpts / "latest").read_text().strip()
    assert latest == "step_00000008" and not list(ckpts.glob(".tmp-*"))
    _verify(ckpts / latest)
    again = _submit(cluster, out, "checkpoint.every_steps=8", env={"RUN_NAME": run.name})
    j2 = cluster.wait(again, timeout=600)
    log2 = (out / f"slurm-{again}.out").read_text()
    assert j2["JobState"] == "COMPLETED", log2[-3000:]
    assert "resumed from" in log2 and "step_00000008 (step 8)" in log2
    assert_same_run(reference, run)
    print(f"\nnode failure: job ended {ended_s:.1f} s after SIGKILL of rank 1; "
          "the resubmission resumed at step 8")


def _rank_pid(cluster: LocalCluster, rank: int, node: str = "node2") -> int:
    """The python process of `rank` (on `node`'s namespace in the two-node layout)."""
    candidates = []
    pids = cluster.namespace_pids(node) if cluster.mode == "two-node" else [
        int(p) for p in os.listdir("/proc") if p.isdigit()]
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        # the interpreter running the recipe (not srun, whose arguments name it too, on node1)
        if (len(cmd) > 1 and Path(cmd[0].decode()).name.startswith("python") and cmd[1].endswith(b"recipes/metaapo.py")
                and f"SLURM_PROCID={rank}".encode() in env):
            candidates.append(pid)
    assert candidates, "rank process not found"
    return min(candidates)  # the rank itself, not a helper it spawned later


def _verify(directory: Path) -> None:
    """The checkpoint's manifest holds (sizes and checksums), as a resume checks it."""
    from metaapo_nemo.checkpoint import Checkpointer

    problem = Checkpointer(directory.parents[1], ctx=None)._verify(directory)
    assert problem is None, f"{directory}: {problem}"


def test_array_sweep_writes_one_run_dir_per_task(cluster, out):
    # OmegaConf resolves ${oc.env:...} in overrides: the seed is the array task id; the run
    # directory is <job name>-<array job id>_<task id> (slurm/launch.sh)
    job = _submit(cluster, out, "train.max_steps=2", "checkpoint.save_at_end=false",
                  "run.seed=${oc.env:SLURM_ARRAY_TASK_ID}", options=("--array=0-2",))
    deadline = time.monotonic() + 600
    while True:
        out_s = cluster.run("squeue", "-h", "-j", str(job), check=False).stdout.strip()
        if not out_s:
            break
        assert time.monotonic() < deadline, out_s
        time.sleep(2)
    runs = sorted(out.glob(f"{JOB_NAME}-{job}_*"))
    assert [r.name for r in runs] == [f"{JOB_NAME}-{job}_{i}" for i in range(3)]
    seeds = [yaml.safe_load((r / "config.yaml").read_text())["run"]["seed"] for r in runs]
    assert seeds == [0, 1, 2]
    assert all(len(jsonl(r / "metrics.jsonl")) == 2 for r in runs)

"""A handle on the local SLURM cluster of slurm/testing/cluster.sh, for the `cluster` tests.

`LocalCluster.up()` starts it (munged, slurmctld, two slurmd in namespaces of their own, or
one node where namespaces cannot be made) in a private state directory with a private
namespace prefix, so it cannot collide with another cluster on the machine; `down()` stops
exactly what `up()` started. Client commands run where slurmctld is reachable (`run`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SH = REPO / "slurm" / "testing" / "cluster.sh"
# Launch variables of the pytest process (a test under torchrun) must not reach the jobs.
_DROP = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
         "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID", "SLURM_CONF")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


def cannot_run_daemons() -> str | None:
    """Why this machine cannot run the cluster, or None (the only reason to skip)."""
    if os.geteuid() != 0:
        return "needs root to start munged, slurmctld and slurmd (and network namespaces)"
    return None


class LocalCluster:
    def __init__(self, state_dir: Path, prefix: str):
        self.state_dir, self.prefix = Path(state_dir), prefix
        self.env = {k: v for k, v in os.environ.items() if k not in _DROP}
        self.env |= {"SLURM_TEST_DIR": str(self.state_dir), "SLURM_TEST_PREFIX": prefix}
        self.mode: str | None = None

    def _sh(self, *args: str, timeout: float = 300, env: dict | None = None, check: bool = True):
        return subprocess.run([str(CLUSTER_SH), *args], cwd=REPO, env=env or self.env, text=True,
                              capture_output=True, timeout=timeout, check=check)

    def up(self) -> str:
        out = self._sh("up", timeout=600)
        self.mode = out.stdout.strip().splitlines()[-1]
        return self.mode

    def down(self) -> None:
        self._sh("down", timeout=120)

    def daemon_pids(self) -> list[int]:
        files = [*self.state_dir.glob("slurmd-*.pid"), self.state_dir / "slurmctld.pid",
                 self.state_dir / "munge" / "munged.pid"]
        return [int(f.read_text()) for f in files if f.is_file() and f.read_text().strip()]

    def run(self, *cmd: str, timeout: float = 120, check: bool = True, env: dict | None = None):
        """A client command (sinfo, srun, sbatch, scontrol, scancel) in the cluster."""
        return self._sh("run", *cmd, timeout=timeout, check=check, env=self.env | (env or {}))

    def sbatch(self, script: str, *overrides: str, options: tuple[str, ...] = (),
               env: dict | None = None) -> int:
        out = self.run("sbatch", "--parsable", *options, script, *overrides, env=env)
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: int, timeout: float, until=lambda j: j["JobState"] in TERMINAL,
             poll: float = 1.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            j = self.job(job_id)
            if until(j):
                return j
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} after {timeout:.0f} s: "
                                   f"{j.get('JobState')} {j.get('Reason')}")
            time.sleep(poll)

    def namespace_pids(self, node: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", f"{self.prefix}-{node}"], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]


def steps_logged(run_dir: Path) -> int:
    """Optimiser steps in the run's metrics.jsonl so far (0 when it does not exist yet)."""
    try:
        return sum(1 for _ in open(run_dir / "metrics.jsonl"))
    except FileNotFoundError:
        return 0


def wait_for_step(run_dir: Path, step: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while steps_logged(run_dir) < step:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{run_dir} has {steps_logged(run_dir)} steps after {timeout:.0f} s")
        time.sleep(0.2)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def _timing(key: str) -> bool:
    return key in ("time", "step_time") or key.endswith("_s") or key.endswith("per_s")


def assert_same_run(reference: Path, run: Path, rounds: bool = True) -> None:
    """Bitwise: every non-timing metric of every step, every non-timing rounds.jsonl field
    (MetaAPO), and every tensor of the final HF checkpoint."""
    import torch
    from safetensors.torch import load_file

    for name in ("metrics.jsonl", "rounds.jsonl") if rounds else ("metrics.jsonl",):
        a, b = jsonl(reference / name), jsonl(run / name)
        strip = lambda rows: [{k: v for k, v in r.items() if not _timing(k)} for r in rows]  # noqa: E731
        assert strip(b) == strip(a), f"{name} differs between {reference} and {run}"
    wa = load_file(reference / "hf_final" / "model.safetensors")
    wb = load_file(run / "hf_final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"final weights differ: {different[:5]}"

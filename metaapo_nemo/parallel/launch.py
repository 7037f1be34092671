"""The ONE reader of the launch environment: torchrun's variables or SLURM's.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT.
`srun` sets none of them; it sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID /
SLURM_STEP_TASKS_PER_NODE (+ SLURM_NODEID) and the node list. `launch_info()` reads either
(torchrun's names win, so torchrun started by srun works too); `export_launch_env()` writes
the torchrun names back into `os.environ`, because other code reads them directly: torch's
`env://` rendezvous and vLLM's external-launcher executor (`os.environ["RANK"]`,
`os.environ["LOCAL_RANK"]`).

Rendezvous under SLURM: MASTER_ADDR = first host of the step's node list
(`scontrol show hostnames`), MASTER_PORT = 20000 + job id % 20000, unless already set
(slurm/launch.sh sets both the same way).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# What a separate job started from inside a SLURM task must not inherit (it is not rank N
# of the step): see `parallel.state.independent_env`.
SLURM_RANK_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_NPROCS", "SLURM_LOCALID", "SLURM_NODEID",
                   "SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE")


class LaunchEnvError(ValueError):
    """A launch variable with an unusable value; the message names the variable and value."""


@dataclass(frozen=True)
class LaunchInfo:
    """Where this process sits in the launch. master_* are None when nothing set them
    (a single process picks 127.0.0.1 and a free port itself)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str | None
    master_port: int | None
    source: str  # "torchrun", "slurm" or "single"


def _int(env: dict[str, str], name: str, minimum: int) -> int | None:
    raw = env.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise LaunchEnvError(f"environment {name}={raw!r} is not an integer") from None
    if value < minimum:
        raise LaunchEnvError(f"environment {name}={value} must be >= {minimum}")
    return value


def _first(env: dict[str, str], names: tuple[str, ...], minimum: int) -> tuple[int | None, str | None]:
    for name in names:
        value = _int(env, name, minimum)
        if value is not None:
            return value, name
    return None, None


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM's compressed count list: "2(x3),1" -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise LaunchEnvError(f"cannot read SLURM tasks-per-node list {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def first_host(nodelist: str) -> str:
    """First host name of a SLURM node list ("node[03-04,7],gpu1" -> "node03").

    `scontrol show hostnames` when it is on PATH (the authority), else a small parser for
    the common forms.
    """
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise LaunchEnvError(f"cannot read SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]  # keeps zero padding


def _slurm_local_world(env: dict[str, str]) -> int | None:
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if spec:
        counts = expand_tasks_per_node(spec)
        node = _int(env, "SLURM_NODEID", 0) or 0
        return counts[min(node, len(counts) - 1)]
    return _int(env, "SLURM_NTASKS_PER_NODE", 1)


def launch_info(env: dict[str, str] | None = None) -> LaunchInfo:
    """Reads rank / world size / local rank / rendezvous from `env` (default os.environ).

    Raises:
        LaunchEnvError: a variable is not an integer, or out of range (names it).
    """
    env = dict(os.environ if env is None else env)
    world, world_name = _first(env, ("WORLD_SIZE", "SLURM_NTASKS", "SLURM_NPROCS"), 1)
    rank, rank_name = _first(env, ("RANK", "SLURM_PROCID"), 0)
    local, _ = _first(env, ("LOCAL_RANK", "SLURM_LOCALID"), 0)
    if world is None:
        world, world_name = 1, None
    # An sbatch script's own shell (no srun step) has SLURM_NTASKS of the whole job but is
    # ONE process: only a step (SLURM_STEP_ID set) is rank N of SLURM_NTASKS.
    if world_name in ("SLURM_NTASKS", "SLURM_NPROCS") and "SLURM_STEP_ID" not in env and rank_name != "RANK":
        world, world_name, rank, local = 1, None, None, None
    source = "torchrun" if world_name == "WORLD_SIZE" else ("slurm" if world_name else "single")
    rank = 0 if rank is None else rank
    local = 0 if local is None else local
    if rank >= world:
        raise LaunchEnvError(f"environment {rank_name}={rank} is not below the world size {world} "
                             f"({world_name}); the launcher's variables disagree")

    local_world = _int(env, "LOCAL_WORLD_SIZE", 1)
    if local_world is None:
        local_world = (_slurm_local_world(env) if source == "slurm" else None) or (world if source == "single" else 1)

    addr = env.get("MASTER_ADDR") or None
    port = _int(env, "MASTER_PORT", 1)
    if source == "slurm":
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if addr is None and nodelist:
            addr = first_host(nodelist)
        job = _int(env, "SLURM_JOB_ID", 0)
        if port is None and job is not None:
            port = 20000 + job % 20000
    return LaunchInfo(rank, world, local, local_world, addr, port, source)


def export_launch_env(info: LaunchInfo | None = None) -> LaunchInfo:
    """Writes the torchrun names of `info` (default: `launch_info()`) into os.environ.

    MASTER_ADDR / MASTER_PORT only when known (a single process chooses its own).
    """
    info = launch_info() if info is None else info
    os.environ.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(info.local_rank),
                      LOCAL_WORLD_SIZE=str(info.local_world_size))
    if info.master_addr is not None:
        os.environ["MASTER_ADDR"] = info.master_addr
    if info.master_port is not None:
        os.environ["MASTER_PORT"] = str(info.master_port)
    return info

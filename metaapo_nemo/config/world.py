"""The world size a dry run plans for, from flags, an sbatch script or the launcher.

A run's world size is what torchrun or srun launched (`parallel.launch`). A dry run on a
login node has neither, so it takes the size from, in this order:

- ``--world-size N``;
- ``--nodes N --gpus-per-node G`` (one process per GPU);
- ``--sbatch slurm/x.sbatch``: its ``#SBATCH`` lines (``--ntasks``, or ``--nodes`` x
  ``--ntasks-per-node``, or ``--nodes`` x ``--gpus-per-node``); the script's ``RECIPE=`` is
  the config when ``--config`` is not given;
- the launcher's variables (torchrun / srun), else one process.

A layout that needs more processes than that fails with the flags to pass (and the sbatch
scripts in slurm/ that run the config), never with a traceback.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from metaapo_nemo.config.loader import REPO_ROOT, display_path, resolve_repo_path
from metaapo_nemo.config.schema import Config, ConfigError

SLURM_DIR = REPO_ROOT / "slurm"

# sbatch option -> our field; short forms as sbatch spells them
_OPTIONS = {"--nodes": "nodes", "-N": "nodes", "--ntasks-per-node": "tasks_per_node",
            "--ntasks": "ntasks", "-n": "ntasks", "--gpus-per-node": "gpus_per_node", "--gres": "gres"}


@dataclass(frozen=True)
class SbatchLayout:
    """What an sbatch script asks for (None: not stated) and what it runs."""

    path: Path
    nodes: int | None = None
    tasks_per_node: int | None = None
    ntasks: int | None = None
    gpus_per_node: int | None = None
    script: str | None = None  # SCRIPT=recipes/x.py
    recipe: str | None = None  # RECIPE=conf/x.yaml

    def world_size(self) -> tuple[int, str]:
        """(processes, how they were counted)."""
        where = display_path(self.path)
        nodes = self.nodes or 1
        if self.ntasks is not None:
            return self.ntasks, f"{where}: --ntasks={self.ntasks}"
        if self.tasks_per_node is not None:
            return nodes * self.tasks_per_node, (f"{where}: --nodes={nodes} x --ntasks-per-node="
                                                 f"{self.tasks_per_node}")
        if self.gpus_per_node is not None:
            return nodes * self.gpus_per_node, (f"{where}: --nodes={nodes} x --gpus-per-node="
                                                f"{self.gpus_per_node} (one process per GPU)")
        if self.nodes is not None:
            return nodes, f"{where}: --nodes={nodes} (one task per node, sbatch's default)"
        raise ConfigError(f"{where} has no #SBATCH --nodes, --ntasks, --ntasks-per-node or --gpus-per-node "
                          "line; pass --world-size N instead")


def _count(path: Path, option: str, value: str) -> int:
    if option == "--gres":  # gpu:8 or gpu:h100:8
        m = re.fullmatch(r"gpu(?::[\w-]+)?:(\d+)", value.split(",")[0])
        if not m:
            raise ConfigError(f"{display_path(path)}: cannot read #SBATCH --gres={value}; pass --world-size N")
        return int(m.group(1))
    m = re.fullmatch(r"(?:[\w-]+:)?(\d+)", value)  # --gpus-per-node=h100:8
    if not m:
        raise ConfigError(f"{display_path(path)}: #SBATCH {option}={value} is not a single count (a range "
                          f"or an expression); pass --world-size N")
    return int(m.group(1))


def read_sbatch(path: str | Path) -> SbatchLayout:
    """Reads the #SBATCH lines (up to the first command, as sbatch does) and SCRIPT= / RECIPE=.

    Raises:
        ConfigError: The file is missing, or a count is unreadable (names the line).
    """
    p = resolve_repo_path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        scripts = ", ".join(display_path(s) for s in sorted(SLURM_DIR.glob("*.sbatch")))
        raise ConfigError(f"--sbatch {path}: cannot read it ({exc.strerror}); scripts in slurm/: {scripts}") from None
    found: dict[str, int] = {}
    for line in text.splitlines():
        s = line.strip()
        if s and not s.startswith("#"):
            break  # sbatch reads directives only before the first command
        if not s.startswith("#SBATCH"):
            continue
        words = shlex.split(s[len("#SBATCH"):], comments=True)
        for i, word in enumerate(words):
            option, _, value = word.partition("=")
            if option not in _OPTIONS:
                m = re.fullmatch(r"(-[Nn])(\d+)", word)  # -N8
                if not m:
                    continue
                option, value = m.group(1), m.group(2)
            if not value and i + 1 < len(words):
                value = words[i + 1]
            field = _OPTIONS[option]
            count = _count(p, option, value)
            found["gpus_per_node" if field == "gres" else field] = count
    script = re.search(r"^SCRIPT=(\S+)", text, re.M)
    recipe = re.search(r"^RECIPE=(\S+)", text, re.M)
    return SbatchLayout(p, **found, script=script and script.group(1), recipe=recipe and recipe.group(1))


def scripts_running(config_path: str | Path) -> list[Path]:
    """The sbatch scripts in slurm/ whose RECIPE= is this config."""
    target = resolve_repo_path(config_path).resolve()
    out = []
    for script in sorted(SLURM_DIR.glob("*.sbatch")):
        recipe = read_sbatch(script).recipe
        if recipe is not None and resolve_repo_path(recipe).resolve() == target:
            out.append(script)
    return out


def planned_ranks_per_node(world: int, *, gpus_per_node: int | None = None,
                           sbatch: str | Path | None = None) -> int:
    """Ranks that share one node's host memory: the sbatch script's tasks (or GPUs) per node,
    --gpus-per-node, the launcher's LOCAL_WORLD_SIZE / SLURM_NTASKS_PER_NODE, else
    min(world, 8) (one process per GPU of an 8-GPU node)."""
    import os

    if gpus_per_node:
        return min(gpus_per_node, world)
    if sbatch is not None:
        layout = read_sbatch(sbatch)
        per_node = layout.tasks_per_node or layout.gpus_per_node
        if per_node is None and layout.ntasks is not None:
            per_node = -(-layout.ntasks // (layout.nodes or 1))
        if per_node:
            return min(per_node, world)
    for var in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return min(int(value), world)
    return min(world, 8)


def planned_world_size(cfg: Config, config_path: str | Path, *, world_size: int | None = None,
                       nodes: int | None = None, gpus_per_node: int | None = None,
                       sbatch: str | Path | None = None) -> tuple[int, str]:
    """The dry run's world size and where it came from (see the module docstring).

    Raises:
        ConfigError: Conflicting flags, an unreadable script, or (nothing given) a layout
            that needs more than the one process this is, naming the flags that plan it.
    """
    given = [name for name, v in (("--world-size", world_size), ("--nodes/--gpus-per-node", nodes or gpus_per_node),
                                  ("--sbatch", sbatch)) if v]
    if len(given) > 1:
        raise ConfigError(f"give one of --world-size, --nodes x --gpus-per-node or --sbatch (got {' and '.join(given)})")
    if world_size is not None:
        if world_size < 1:
            raise ConfigError(f"--world-size {world_size} must be >= 1")
        return world_size, f"--world-size {world_size}"
    if nodes or gpus_per_node:
        if gpus_per_node is None:
            raise ConfigError(f"--nodes {nodes} needs --gpus-per-node G too (one process per GPU)")
        n = nodes or 1
        if n < 1 or gpus_per_node < 1:
            raise ConfigError(f"--nodes {n} and --gpus-per-node {gpus_per_node} must be >= 1")
        return n * gpus_per_node, f"--nodes {n} x --gpus-per-node {gpus_per_node}"
    if sbatch is not None:
        return read_sbatch(sbatch).world_size()
    from metaapo_nemo.parallel.launch import LaunchEnvError, launch_info

    try:
        launched = launch_info()
    except LaunchEnvError as exc:
        raise ConfigError(str(exc)) from None
    if launched.world_size > 1:
        return launched.world_size, f"{launched.source}: {launched.world_size} processes launched"
    p = cfg.parallel
    needed = p.tp * p.pp * p.cp
    if cfg.rollout is not None and cfg.method == "metaapo":
        needed = max(needed, cfg.rollout.tp)
    if needed > 1:
        scripts = scripts_running(config_path)
        hint = "".join(f"; or --sbatch {display_path(s)} (it runs this config)" for s in scripts)
        raise ConfigError(
            f"this layout needs {needed} processes or a multiple (parallel.tp={p.tp} x parallel.pp={p.pp} x "
            f"parallel.cp={p.cp}), but no world size was given and this is one process (not launched by "
            f"torchrun or srun); plan it with --world-size N, or --nodes N --gpus-per-node G{hint}")
    return 1, "one process (no --world-size, --nodes or --sbatch; not launched by torchrun or srun)"

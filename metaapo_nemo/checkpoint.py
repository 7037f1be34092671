"""Checkpoints that lose nothing: atomic, verified, resharding, with the whole trainer state.

Layout of run_dir/checkpoints/:

    step_00000012/
        policy/            megatron distributed checkpoint: model + optimiser (sharded tensors,
                           so it loads onto another TP/PP layout; tests: TP2 -> TP1)
        reference/         the same for a reference that moves (MetaAPO's per-round reference)
        trainer.json       position (step, epoch, round, ...), scheduler, counters, last metrics
        shared.pt          rank-independent tensors (e.g. the current round's online pairs)
        rank_00000.pt ...  per-rank state: RNG states, meta-learner buffer, reference cache
        config.yaml        the resolved config of the run that wrote it
        manifest.json      size + SHA-256 of every file above; written LAST
    latest                 the name of the newest good checkpoint; updated after the rename

Writing: every file goes into `.tmp-step_N/`, is flushed and fsynced, the manifest is
written, the directory is renamed to `step_N/` and only then `latest` is replaced (atomic
rename). A crash at any point leaves either the previous `latest` or the new one, never a
half checkpoint under a final name. Loading verifies the manifest (sizes always; SHA-256
with `checkpoint.verify=checksum`, the files split over all ranks) and falls back to the
previous good checkpoint with a message naming the bad file.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from metaapo_nemo.parallel.state import ParallelContext

MANIFEST = "manifest.json"
LATEST = "latest"
FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the directory and the file."""


@dataclass
class Restored:
    """What `Checkpointer.load` hands back to the recipe (models are loaded in place)."""

    path: Path
    trainer: dict[str, Any]  # trainer.json
    shared: dict[str, Any]  # shared.pt
    rank: dict[str, Any]  # this rank's rank_<r>.pt


# ----------------------------------------------------------------- small pieces


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def sha256(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def rng_state() -> dict[str, Any]:
    """Every RNG a step may draw from (torch CPU/CUDA, numpy, python, megatron's TP tracker)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
        try:
            from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

            state["megatron_tracker"] = get_cuda_rng_tracker().get_states()
        except Exception:  # noqa: BLE001 - tracker not initialised: nothing to keep
            pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "megatron_tracker" in state:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(state["megatron_tracker"])


def truncate_jsonl(path: Path, keep) -> int:
    """Keeps the JSON lines for which `keep(record)` is true (atomic rewrite); returns kept."""
    if not path.exists():
        return 0
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = []
    for ln in lines:
        try:
            if keep(json.loads(ln)):
                kept.append(ln)
        except json.JSONDecodeError:  # a line cut by a kill: drop it
            continue
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in kept))
    tmp.replace(path)
    return len(kept)


# ----------------------------------------------------------------- model state


def _model_sharded(model) -> dict[str, Any]:
    """The megatron sharded state dict of all chunks (keys carry global layer offsets)."""
    return {f"model{i}": m.sharded_state_dict() for i, m in enumerate(model.modules())}


# The distributed optimiser's state in the canonical per-parameter form: loadable onto any
# TP/PP/DP layout (megatron's `dp_reshardable` default only reshards along DP).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _save_model(model, directory: Path, with_optimizer: bool) -> None:
    from megatron.core import dist_checkpointing

    sd = _model_sharded(model)
    if with_optimizer:
        sd["optimizer"] = model.optimizer.sharded_state_dict(sd, metadata=OPTIMIZER_METADATA)
    dist_checkpointing.save(sd, str(directory))


def _materialise_optimizer_state(optimizer) -> None:
    """A fresh distributed optimiser has no Adam state yet, and megatron 0.16 builds its
    sharded state dict from that state: create it (zero-gradient step; every value,
    parameters included, is replaced by the load that follows)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def _load_model(model, directory: Path, with_optimizer: bool) -> None:
    from megatron.core import dist_checkpointing

    sd = _model_sharded(model)
    if with_optimizer:
        _materialise_optimizer_state(model.optimizer)
        sd["optimizer"] = model.optimizer.sharded_state_dict(sd, is_loading=True, metadata=OPTIMIZER_METADATA)
    loaded = dist_checkpointing.load(sd, str(directory))
    for i, m in enumerate(model.modules()):
        m.load_state_dict(loaded[f"model{i}"])
    if with_optimizer:
        from metaapo_nemo.parallel.compat import (
            keep_adam_step_on_reshardable_load,
            untie_adam_steps_after_load,
        )

        keep_adam_step_on_reshardable_load(model.optimizer)
        model.optimizer.load_state_dict(loaded["optimizer"])
        untie_adam_steps_after_load(model.optimizer)  # else a resume is not bitwise


# ----------------------------------------------------------------- the manager


class Checkpointer:
    """Saves and finds checkpoints of one run directory; every method is collective."""

    def __init__(self, run_dir: Path, ctx: ParallelContext, keep_last: int = 2, verify: str = "checksum",
                 config_yaml: str = ""):
        self.root = Path(run_dir) / "checkpoints"
        self.ctx, self.keep_last, self.verify, self.config_yaml = ctx, keep_last, verify, config_yaml
        self.last_saved_step: int | None = None

    # ------------------------------------------------------------- save
    def save(self, step: int, policy, trainer: dict[str, Any], rank: dict[str, Any],
             shared: dict[str, Any] | None = None, reference=None) -> Path:
        """Writes step_<step> atomically on every rank, then points `latest` at it."""
        ctx = self.ctx
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{step_dir_name(step)}"
        if ctx.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):  # a save killed half-way
                shutil.rmtree(stale, ignore_errors=True)
            (tmp / "policy").mkdir(parents=True)
            if reference is not None:
                (tmp / "reference").mkdir()
        _barrier(ctx)
        _save_model(policy, tmp / "policy", with_optimizer=True)
        if reference is not None:
            _save_model(reference, tmp / "reference", with_optimizer=False)
        _torch_save(rank, tmp / f"rank_{dist.get_rank() if dist.is_initialized() else 0:05d}.pt")
        _barrier(ctx)
        if ctx.is_main:
            body = {"format": FORMAT, "step": step, "world_size": ctx.dims.world_size,
                    "layout": {"tp": ctx.dims.tp, "pp": ctx.dims.pp, "dp": ctx.dims.dp}, **trainer}
            _write_bytes(tmp / "trainer.json", json.dumps(body, indent=1).encode())
            _torch_save(shared or {}, tmp / "shared.pt")
            _write_bytes(tmp / "config.yaml", self.config_yaml.encode())
            self._write_manifest(tmp, step)
            if final.exists():  # the same step saved again (e.g. end after a preemption save)
                shutil.rmtree(final)
            tmp.rename(final)
            _fsync_dir(self.root)
            latest_tmp = self.root / (LATEST + ".tmp")
            _write_bytes(latest_tmp, final.name.encode())
            latest_tmp.replace(self.root / LATEST)
            _fsync_dir(self.root)
            self._prune(keep=final.name)
        _barrier(ctx)
        self.last_saved_step = step
        return final

    def _write_manifest(self, directory: Path, step: int) -> None:
        files = {}
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            _fsync_file(path)
            files[str(path.relative_to(directory))] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
        _write_bytes(directory / MANIFEST, json.dumps({"format": FORMAT, "step": step, "files": files},
                                                      indent=1).encode())

    def _prune(self, keep: str) -> None:
        good = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for old in good[: max(0, len(good) - self.keep_last)]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------- find + load
    def candidates(self) -> list[Path]:
        """`latest` first, then every other step_* newest first."""
        if not self.root.exists():
            return []
        dirs = sorted((p for p in self.root.glob("step_*") if p.is_dir()), reverse=True)
        pointer = self.root / LATEST
        if pointer.exists():
            name = pointer.read_text().strip()
            dirs.sort(key=lambda p: p.name != name)  # stable: latest first
        return dirs

    def find(self, explicit: str | None = None) -> Path | None:
        """The newest checkpoint that verifies (same answer on every rank), or None.

        Each bad candidate is reported on stderr with the reason; with `explicit` (a path
        given by the user) a bad checkpoint is an error instead.
        """
        cands = [Path(explicit)] if explicit else self.candidates()
        for cand in cands:
            problem = self._verify(cand)
            if problem is None:
                return cand
            msg = f"checkpoint {cand} is unusable: {problem}"
            if explicit:
                raise CheckpointError(msg + "; give another checkpoint.resume path or checkpoint.resume=never")
            if self.ctx.is_main:
                import sys

                print(f"warning: {msg}; trying the previous checkpoint", file=sys.stderr, flush=True)
        return None

    def _verify(self, directory: Path) -> str | None:
        """None if `directory` matches its manifest; else the first problem found (all ranks agree)."""
        problem = None
        manifest = directory / MANIFEST
        if not directory.is_dir():
            problem = "no such directory"
        elif not manifest.exists():
            problem = f"{MANIFEST} is missing (an interrupted or foreign write)"
        else:
            try:
                files = json.loads(manifest.read_text())["files"]
            except (json.JSONDecodeError, KeyError) as exc:
                problem = f"{MANIFEST} is unreadable ({exc})"
            else:
                rank = dist.get_rank() if dist.is_initialized() else 0
                world = dist.get_world_size() if dist.is_initialized() else 1
                for i, (name, meta) in enumerate(sorted(files.items())):
                    path = directory / name
                    if not path.exists():
                        problem = problem or f"{name} is missing"
                    elif path.stat().st_size != meta["bytes"]:
                        problem = problem or f"{name} has {path.stat().st_size} bytes, the manifest says {meta['bytes']}"
                    elif self.verify == "checksum" and i % world == rank and sha256(path) != meta["sha256"]:
                        problem = problem or f"{name} fails its SHA-256 check (corrupted)"
        if dist.is_initialized() and dist.get_world_size() > 1:
            found: list[str | None] = [None] * dist.get_world_size()
            dist.all_gather_object(found, problem)
            problem = next((p for p in found if p is not None), None)
        return problem

    def load(self, directory: Path, policy, reference=None) -> Restored:
        """Loads models (any layout) and returns the trainer, shared and this rank's state."""
        trainer = json.loads((directory / "trainer.json").read_text())
        if trainer.get("format") != FORMAT:
            raise CheckpointError(f"{directory}/trainer.json has format {trainer.get('format')}, "
                                  f"this code reads format {FORMAT}")
        _load_model(policy, directory / "policy", with_optimizer=True)
        if reference is not None and (directory / "reference").exists():
            _load_model(reference, directory / "reference", with_optimizer=False)
        shared = torch.load(directory / "shared.pt", weights_only=False)
        rank = dist.get_rank() if dist.is_initialized() else 0
        rank_file = directory / f"rank_{rank:05d}.pt"
        same_world = trainer["world_size"] == self.ctx.dims.world_size
        if same_world and rank_file.exists():
            rank_state = torch.load(rank_file, weights_only=False)
        else:  # another layout: per-rank state that is not layout-bound comes from rank 0
            rank_state = torch.load(directory / "rank_00000.pt", weights_only=False)
            rank_state["layout_changed"] = True
        self.last_saved_step = int(trainer["step"])
        return Restored(directory, trainer, shared, rank_state)


def _barrier(ctx: ParallelContext) -> None:
    if dist.is_initialized() and ctx.dims.world_size > 1:
        dist.barrier()


def step_of(path: Path | None) -> int | None:
    """The step a checkpoint directory holds (from its manifest), or None."""
    if path is None:
        return None
    return int(json.loads((path / MANIFEST).read_text())["step"])


def describe(paths: Sequence[Path]) -> str:
    return ", ".join(p.name for p in paths) or "none"

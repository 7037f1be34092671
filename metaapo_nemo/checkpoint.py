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
        manifest.json      size + checksum (checkpoint.checksum, SHA-256 by default) of every
                           file above, each hashed by the rank that wrote it; written LAST
    latest                 the name of the newest good checkpoint; updated after the rename

Writing: every file goes into `.tmp-step_N/`, is flushed and fsynced, the manifest is
written, the directory is renamed to `step_N/` and only then `latest` is replaced (atomic
rename). A crash at any point leaves either the previous `latest` or the new one, never a
half checkpoint under a final name. Loading verifies the manifest (sizes always; checksums
with `checkpoint.verify=checksum`, the files split over all ranks by bytes) and falls back to
the previous good checkpoint with a message naming the bad file.

Scale (70B: ~1.1 TB per checkpoint, docs/checkpoint_sizing.md): every rank writes a share
(replicated shards spread over DP, `checkpoint_model._parallel_save_strategy`), then fsyncs and
hashes the files IT wrote, in parallel (`checkpoint_io.owner_rank`); rank 0 only merges the
per-rank entries. The barriers of a save are gloo `monitored_barrier`s whose timeout is
`checkpoint.barrier_timeout_s`, or, when that is null, sized from the largest per-rank state
and `checkpoint.fs_write_gbps` (`checkpoint_io.barrier_timeout`); a rank that misses it is
named.
"""

from __future__ import annotations

import datetime
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException as DCPCheckpointException

from metaapo_nemo import checksum as _checksum
from metaapo_nemo import preempt
from metaapo_nemo.checkpoint_io import (
    MANIFEST,
    _entry_checksum,
    _fsync_dir,
    _torch_save,
    _write_bytes,
    assign_by_bytes,
    barrier_timeout,
    hash_own_files,
    state_bytes,
)
from metaapo_nemo.checkpoint_model import _load_model, _save_model
from metaapo_nemo.parallel.state import ParallelContext

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


# ----------------------------------------------------------------- the manager


class Checkpointer:
    """Saves and finds checkpoints of one run directory; every method is collective."""

    def __init__(self, run_dir: Path, ctx: ParallelContext, keep_last: int = 2, verify: str = "checksum",
                 config_yaml: str = "", checksum: str = "sha256", barrier_timeout_s: float | None = None,
                 fs_write_gbps: float = 0.5):
        """
        Args:
            checksum: Manifest checksum (`checkpoint.checksum`).
            barrier_timeout_s: Save barrier timeout (`checkpoint.barrier_timeout_s`); None:
                sized from the checkpoint (`barrier_timeout`).
            fs_write_gbps: Stated per-rank write bandwidth (`checkpoint.fs_write_gbps`).
        """
        self.root = Path(run_dir) / "checkpoints"
        self.ctx, self.keep_last, self.verify, self.config_yaml = ctx, keep_last, verify, config_yaml
        _checksum.new(checksum)  # unknown names fail here, not at the first save
        self.checksum, self.barrier_timeout_s, self.fs_write_gbps = checksum, barrier_timeout_s, fs_write_gbps
        self.last_saved_step: int | None = None
        self.last_save_timings: dict[str, float] = {}
        self._gloo: Any = None

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
        error = None
        try:  # a failed write (disk full, quota, I/O) must not strand the other ranks
            _save_model(policy, tmp / "policy", with_optimizer=True)
            preempt.reached("checkpoint_write")  # half-written: nothing is committed yet
            if reference is not None:
                _save_model(reference, tmp / "reference", with_optimizer=False)
            _torch_save(rank, tmp / f"rank_{dist.get_rank() if dist.is_initialized() else 0:05d}.pt")
            if ctx.is_main:
                body = {"format": FORMAT, "step": step, "world_size": ctx.dims.world_size,
                        "layout": {"tp": ctx.dims.tp, "pp": ctx.dims.pp, "cp": ctx.dims.cp, "dp": ctx.dims.dp},
                        "written_by": written_by(), **trainer}
                _write_bytes(tmp / "trainer.json", json.dumps(body, indent=1).encode())
                _torch_save(shared or {}, tmp / "shared.pt")
                _write_bytes(tmp / "config.yaml", self.config_yaml.encode())
        except (Exception, DCPCheckpointException) as exc:  # noqa: BLE001 - torch's is a BaseException
            error = exc
        self._timed_barrier("writing its share of the checkpoint", policy, reference)
        self._fail_together(error, tmp, step, policy, reference)
        self._write_manifest(tmp, step)  # collective: every rank hashes the files it wrote
        error = None
        if ctx.is_main:
            try:
                if final.exists():  # the same step saved again (e.g. end after a preemption save)
                    shutil.rmtree(final)
                tmp.rename(final)
                _fsync_dir(self.root)
                latest_tmp = self.root / (LATEST + ".tmp")
                _write_bytes(latest_tmp, final.name.encode())
                latest_tmp.replace(self.root / LATEST)
                _fsync_dir(self.root)
            except OSError as exc:
                error = exc
        self._fail_together(error, final if final.exists() and error else tmp, step, policy, reference)
        if ctx.is_main:
            self._prune(keep=final.name)
        _barrier(ctx)
        self.last_saved_step = step
        return final

    def _fail_together(self, error: BaseException | None, partial: Path, step: int, policy,
                       reference=None) -> None:
        """Collective: if any rank's write failed, rank 0 removes the partial directory and
        every rank raises the same CheckpointError (`latest` still names the previous good
        checkpoint). Disk full / quota: the message names the directory, the free space and
        what one checkpoint needs."""
        mine = None if error is None else f"{type(error).__name__}: {error}"
        local_bytes = state_bytes(policy) + state_bytes(reference)
        parts = [(mine, local_bytes)]
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (mine, local_bytes), group=self._gloo_group())
        errors = [(r, e) for r, (e, _) in enumerate(parts) if e]
        if not errors:
            return
        need = self._checkpoint_bytes() or sum(b for _, b in parts)
        # torch.save reports a full disk as "unexpected pos" without an errno: judge by the
        # space left before the partial directory is removed
        free_at_failure = shutil.disk_usage(self.root).free
        full = free_at_failure < min(need, 64 << 20) or any(
            s in e for _, e in errors for s in ("No space left", "Errno 28", "Disk quota", "Errno 122"))
        _barrier(self.ctx)  # every rank has looked at the free space
        latest_name = (self.root / LATEST).read_text().strip() if (self.root / LATEST).exists() else None
        if self.ctx.is_main and partial.name != latest_name:
            shutil.rmtree(partial, ignore_errors=True)
        _barrier(self.ctx)
        rank, first = errors[0][0], errors[0][1].strip().splitlines()[-1].strip()[:200]  # the root cause
        latest = self.root / LATEST
        kept = f"latest is still {latest.read_text().strip()}" if latest.exists() else "no earlier checkpoint"
        where = f"{self.root} (removed the partial {partial.name}; {kept})"
        if full:
            free = shutil.disk_usage(self.root).free
            raise CheckpointError(
                f"checkpoint step {step} did not fit: no space left on the file system of {where}. "
                f"It has {_size(free)} free; one checkpoint needs about {_size(need)} (keep_last="
                f"{self.keep_last} of them, plus one being written). Free at least {_size(need - free)} "
                f"there or set run.output_dir to a larger file system, then rerun the same command "
                f"to resume. (rank {rank}: {first})")
        raise CheckpointError(f"checkpoint step {step} could not be written in {where}: rank {rank}: {first}")

    def _checkpoint_bytes(self) -> int:
        """Size of the newest complete checkpoint (what the next one will need), or 0."""
        for d in self.candidates():
            if (d / MANIFEST).exists():
                return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        return 0

    def _write_manifest(self, directory: Path, step: int) -> None:
        """Every rank fsyncs + hashes the files it wrote (in parallel); rank 0 writes the
        merged manifest. Raises CheckpointError on every rank if any rank failed."""
        rank, world = _rank_world()
        t0 = time.perf_counter()
        try:
            mine, error = hash_own_files(directory, rank, world, self.checksum), None
        except OSError as exc:
            mine, error = {}, f"rank {rank}: {exc}"
        seconds = time.perf_counter() - t0
        parts = [(mine, error, seconds)]
        if world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, (mine, error, seconds), group=self._gloo_group())
        errors = [e for _, e, _ in parts if e]
        if errors:
            raise CheckpointError(f"hashing {directory} failed: " + "; ".join(errors))
        self.last_save_timings["hash_s_max"] = max(t for _, _, t in parts)
        if not self.ctx.is_main:
            return
        files = {name: meta for part, _, _ in parts for name, meta in part.items()}
        body = {"format": FORMAT, "step": step, "checksum": self.checksum, "hashed_by_ranks": world,
                "files": dict(sorted(files.items()))}
        _write_bytes(directory / MANIFEST, json.dumps(body, indent=1).encode())

    def _gloo_group(self):
        """A gloo group over the world (created once, collectively): the checkpoint's object
        gathers and monitored barriers run on the CPU, never staging through GPU memory."""
        if self._gloo is None:
            if dist.get_backend() == "gloo":
                self._gloo = dist.group.WORLD
            else:
                self._gloo = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=6))
        return self._gloo

    def save_timeout(self, policy, reference=None) -> float:
        """The save barrier timeout: `barrier_timeout_s`, or sized from the largest rank's state
        (collective when sized: an all-reduce MAX of every rank's bytes)."""
        if self.barrier_timeout_s is not None:
            return float(self.barrier_timeout_s)
        local = state_bytes(policy) + state_bytes(reference)
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([local], dtype=torch.int64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._gloo_group())
            local = int(t.item())
        return barrier_timeout(local, self.fs_write_gbps, self.checksum)

    def _timed_barrier(self, doing: str, policy, reference=None) -> None:
        """A monitored barrier with the sized timeout; names the ranks that missed it."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return
        timeout = self.save_timeout(policy, reference)
        self.last_save_timings["barrier_timeout_s"] = timeout
        try:
            dist.monitored_barrier(group=self._gloo_group(), timeout=datetime.timedelta(seconds=timeout),
                                   wait_all_ranks=True)
        except RuntimeError as exc:
            raise CheckpointError(
                f"a checkpoint save waited {timeout:.0f} s for every rank to finish {doing}: {exc}; "
                "raise checkpoint.barrier_timeout_s, or lower checkpoint.fs_write_gbps to the "
                "file system's real per-rank bandwidth"
            ) from exc

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
                rank, world = _rank_world()
                mine = assign_by_bytes({n: int(m["bytes"]) for n, m in files.items()}, world)
                for name, meta in sorted(files.items()):
                    path = directory / name
                    recorded = _entry_checksum(meta)
                    if not path.exists():
                        problem = problem or f"{name} is missing"
                    elif path.stat().st_size != meta["bytes"]:
                        problem = problem or f"{name} has {path.stat().st_size} bytes, the manifest says {meta['bytes']}"
                    elif self.verify == "checksum" and mine[name] == rank and recorded is not None:
                        algorithm, want = recorded
                        if _checksum.file_checksum(path, algorithm) != want:
                            problem = problem or (f"{name} fails its {_checksum.DISPLAY[algorithm]} "
                                                  "check (corrupted)")
        if dist.is_initialized() and dist.get_world_size() > 1:
            found: list[str | None] = [None] * dist.get_world_size()
            dist.all_gather_object(found, problem, group=self._gloo_group())
            problem = next((p for p in found if p is not None), None)
        return problem

    def load(self, directory: Path, policy, reference=None) -> Restored:
        """Loads models (any layout) and returns the trainer, shared and this rank's state."""
        trainer = json.loads((directory / "trainer.json").read_text())
        if trainer.get("format") != FORMAT:
            raise CheckpointError(f"{directory}/trainer.json has format {trainer.get('format')}, "
                                  f"this code reads format {FORMAT}")
        try:
            _load_model(policy, directory / "policy", with_optimizer=True)
            if reference is not None and (directory / "reference").exists():
                _load_model(reference, directory / "reference", with_optimizer=False)
        except Exception as exc:  # noqa: BLE001 - megatron's load errors, named with both stacks
            raise CheckpointError(stack_mismatch_message(directory, trainer, exc)) from exc
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


def written_by() -> dict[str, str]:
    """The stack that writes a checkpoint (trainer.json), for the reader's messages."""
    import platform

    from metaapo_nemo.parallel import compat

    return {"megatron_core": compat.info().version, "torch": torch.__version__,
            "python": platform.python_version()}


def stack_mismatch_message(directory: Path, trainer: dict[str, Any], exc: BaseException) -> str:
    """Why a checkpoint's model state did not load, naming the writing and the reading stack."""
    here, there = written_by(), trainer.get("written_by") or {}
    writer = (f"megatron-core {there['megatron_core']} (torch {there.get('torch')}, Python "
              f"{there.get('python')})" if "megatron_core" in there else "an unrecorded stack (before 2026-12)")
    fix = ("" if there.get("megatron_core") == here["megatron_core"] else
           f"; it was written by {writer} and this is megatron-core {here['megatron_core']}: resume or "
           f"export it with the writing stack (`make venv` for 0.16 on Python 3.11, `make venv-gpu-stack` "
           f"or the H100 environment for 0.19), or report the format difference")
    return (f"{directory}: the model state did not load ({type(exc).__name__}: {exc})" + fix)


def _size(n: int) -> str:
    n = max(n, 0)
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.1f} GB"


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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

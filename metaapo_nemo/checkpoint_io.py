"""A checkpoint's files: durable writes, who hashes which file (in parallel over the ranks),
the save barriers' timeout, the RNG states every rank keeps, and the cut of the run's JSON-line
logs back to a checkpoint. Used by `checkpoint.Checkpointer` (see its module docstring)."""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metaapo_nemo import checksum as _checksum

MANIFEST = "manifest.json"


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
    return _checksum.file_checksum(path, "sha256", chunk)


# ----------------------------------------------------------------- parallel hashing, timeouts

# Conservative single-core checksum rates (GB/s), about half of what
# benchmarks/results/checksum_bench.json measured on a shared 2-core CPU machine.
HASH_GBPS = {"sha256": 0.45, "blake2b": 0.24, "crc32": 0.95, "adler32": 0.7}
MIN_BARRIER_TIMEOUT_S = 600.0
_DCP_FILE = re.compile(r"__(\d+)_\d+\.distcp$")
_RANK_FILE = re.compile(r"rank_(\d+)\.pt$")


def owner_rank(relpath: str, world: int) -> int:
    """The rank that wrote a checkpoint file, hence hashes it at save time.

    torch DCP names its data files ``__<global rank>_<n>.distcp`` and we name per-rank state
    ``rank_<r>.pt``; everything else (DCP ``.metadata``, megatron's ``common.pt`` and
    ``metadata.json``, trainer.json, shared.pt, config.yaml) is written by rank 0.
    """
    name = relpath.rsplit("/", 1)[-1]
    m = _DCP_FILE.search(name) or _RANK_FILE.search(name)
    rank = int(m.group(1)) if m else 0
    return rank if rank < world else 0


def assign_by_bytes(sizes: dict[str, int], world: int) -> dict[str, int]:
    """Files -> rank for verification at load: largest first onto the least-loaded rank
    (deterministic, so every rank derives the same split from the same manifest)."""
    load = [0] * world
    out = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = min(range(world), key=lambda i: (load[i], i))
        out[name] = r
        load[r] += sizes[name]
    return out


def barrier_timeout(rank_bytes: int, fs_write_gbps: float, checksum: str) -> float:
    """Seconds a save's barriers wait: 3x (write + fsync-free hash) of the largest rank share.

    timeout = max(600, 3 * (B / W + B / H)) with B the largest per-rank bytes, W the stated
    per-rank file-system write bandwidth (`checkpoint.fs_write_gbps`) and H the checksum's
    single-core rate (`HASH_GBPS`). Example 70B (B = 22 GB, W = 0.5, SHA-256): 3 x (44 + 49)
    = 279 s -> 600 s floor; at W = 0.1 GB/s: 3 x (220 + 49) = 807 s.
    """
    gb = rank_bytes / 1e9
    return max(MIN_BARRIER_TIMEOUT_S, 3.0 * (gb / fs_write_gbps + gb / HASH_GBPS[checksum]))


def state_bytes(model) -> int:
    """Bytes of this rank's model parameters plus its optimiser state (an upper bound of
    what it writes: replicated shards are counted on every replica)."""
    if model is None:
        return 0
    total = sum(p.numel() * p.element_size() for m in model.modules() for p in m.parameters())
    optimizer = getattr(model, "optimizer", None)
    for opt in getattr(optimizer, "chained_optimizers", [optimizer] if optimizer else []):
        inner = getattr(opt, "optimizer", None)
        for group in getattr(inner, "param_groups", []):
            total += sum(p.numel() * p.element_size() for p in group["params"])
        for st in getattr(inner, "state", {}).values():
            total += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
    return total


def hash_own_files(directory: Path, rank: int, world: int, algorithm: str) -> dict[str, dict]:
    """fsync + size + checksum of the files of `directory` this rank wrote (`owner_rank`)."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = str(path.relative_to(directory))
        if rel == MANIFEST or owner_rank(rel, world) != rank:
            continue
        _fsync_file(path)
        files[rel] = {"bytes": path.stat().st_size, algorithm: _checksum.file_checksum(path, algorithm),
                      "hashed_by": rank}
    return files


def _entry_checksum(meta: dict) -> tuple[str, str] | None:
    """(algorithm, hex) recorded for a manifest entry (old manifests: sha256)."""
    for name in _checksum.ALGORITHMS:
        if name in meta:
            return name, meta[name]
    return None


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

"""Checksum throughput for checkpoint manifests: SHA-256 vs cheaper checksums, in GB/s.

    python benchmarks/checksum_bench.py [--mib 512] [--repeats 3] [--out benchmarks/results/checksum_bench.json]

Measures, on one core: (1) in-memory hashing of a random buffer in 8 MiB blocks, (2) hashing
a file through `metaapo_nemo.checksum.file_checksum` (the manifest's code path) with the
file in the page cache, i.e. what a rank pays for the files it just wrote. Best of
`repeats`. Prints a table and the time one rank needs for its share of the 8B / 70B
checkpoints (planned sizes from docs/checkpoint_sizing.md) and writes one JSON record.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from metaapo_nemo.checksum import ALGORITHMS, file_checksum, new

# Planned checkpoint bytes per rank (docs/checkpoint_sizing.md): 8B on 8 GPUs, 70B on 64.
PLANNED_PER_RANK_GB = {"llama31_8b (8 ranks)": 120.5 / 8, "llama31_70b (64 ranks)": 1129.0 / 64}


def _optional() -> dict:
    try:
        import xxhash  # not a dependency: shown for comparison where installed
    except ImportError:
        return {}
    return {"xxh3_64 (xxhash, not stdlib)": xxhash.xxh3_64}


def bench_memory(make, data: memoryview, repeats: int, chunk: int = 8 << 20) -> float:
    best = float("inf")
    for _ in range(repeats):
        h = make()
        t0 = time.perf_counter()
        for off in range(0, len(data), chunk):
            h.update(data[off : off + chunk])
        h.hexdigest()
        best = min(best, time.perf_counter() - t0)
    return len(data) / best / 1e9


def bench_file(algorithm: str, path: Path, repeats: int) -> float:
    size = path.stat().st_size
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        file_checksum(path, algorithm)
        best = min(best, time.perf_counter() - t0)
    return size / best / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "checksum_bench.json"))
    args = p.parse_args()
    data = memoryview(os.urandom(args.mib << 20))
    record = {
        "bench": "checksum_bench",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)",
        "python": platform.python_version(),
        "bytes": len(data),
        "memory_GBps": {},
        "file_page_cache_GBps": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "blob.bin"
        path.write_bytes(data)
        for name in ALGORITHMS:
            record["memory_GBps"][name] = round(bench_memory(lambda n=name: new(n), data, args.repeats), 3)
            record["file_page_cache_GBps"][name] = round(bench_file(name, path, args.repeats), 3)
        for name, make in _optional().items():
            record["memory_GBps"][name] = round(bench_memory(make, data, args.repeats), 3)
    record["seconds_per_rank_share"] = {
        ckpt: {name: round(gb / rate, 1) for name, rate in record["file_page_cache_GBps"].items()}
        for ckpt, gb in PLANNED_PER_RANK_GB.items()
    }
    print(f"{'algorithm':28s} {'memory GB/s':>12s} {'file GB/s':>10s}")
    for name, rate in record["memory_GBps"].items():
        f = record["file_page_cache_GBps"].get(name)
        print(f"{name:28s} {rate:12.2f} {'' if f is None else f'{f:10.2f}'}")
    for ckpt, secs in record["seconds_per_rank_share"].items():
        print(f"one rank's share of {ckpt}: " + ", ".join(f"{k} {v:.0f} s" for k, v in secs.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

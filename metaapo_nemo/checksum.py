"""File checksums for checkpoint manifests (stdlib only; measured in benchmarks/checksum_bench.py).

A checkpoint manifest records every file's size and a checksum. At 70B a checkpoint is about
1.1 TB, so the checksum's speed matters: each rank hashes the files it wrote, in parallel,
and the algorithm is `checkpoint.checksum` (sha256 | blake2b | crc32). Measured on this
project's CPU machine (one core of 2, shared with other jobs; file in the page cache;
benchmarks/results/checksum_bench.json): SHA-256 (OpenSSL, SHA-NI) 0.91 GB/s, BLAKE2b 0.48,
CRC-32 (zlib 1.2.13) 1.93, Adler-32 1.46. The manifest guards against truncated, torn or
bit-rotted files, not against an adversary, so CRC-32 is enough where hashing is the
bottleneck; SHA-256 stays the default: hashed in parallel, one rank's share of the 70B
checkpoint (~18-22 GB) takes ~20-25 s, well under the time to write it.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable
from pathlib import Path

CHUNK = 8 << 20  # bytes per read


class _Zlib:
    """hashlib-like wrapper of zlib's running checksums (crc32 / adler32)."""

    def __init__(self, fn: Callable[[bytes, int], int], start: int):
        self._fn, self._value = fn, start

    def update(self, data: bytes) -> None:
        self._value = self._fn(data, self._value)

    def hexdigest(self) -> str:
        return f"{self._value & 0xFFFFFFFF:08x}"


ALGORITHMS: dict[str, Callable[[], object]] = {
    "sha256": hashlib.sha256,
    "blake2b": hashlib.blake2b,
    "crc32": lambda: _Zlib(zlib.crc32, 0),
    "adler32": lambda: _Zlib(zlib.adler32, 1),
}


DISPLAY = {"sha256": "SHA-256", "blake2b": "BLAKE2b", "crc32": "CRC-32", "adler32": "Adler-32"}


def new(algorithm: str):
    """A fresh running checksum (``update(bytes)``, ``hexdigest()``)."""
    try:
        return ALGORITHMS[algorithm]()
    except KeyError:
        raise ValueError(
            f"checksum {algorithm!r} is unknown; choose one of {', '.join(ALGORITHMS)}"
        ) from None


def file_checksum(path: Path, algorithm: str = "sha256", chunk: int = CHUNK) -> str:
    """Hex checksum of a file's bytes, read in `chunk`-byte blocks."""
    h = new(algorithm)
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()

"""Checkpoint hashing that scales (issue 19, finding 6): who hashes what, the sized barrier
timeout, and the checksums themselves (hand arithmetic; the DP2 save is in
tests/test_distopt_checkpoint.py)."""

from __future__ import annotations

import hashlib
import zlib

import pytest

from metaapo_nemo import checksum
from metaapo_nemo.checkpoint_io import assign_by_bytes, barrier_timeout, owner_rank


def test_each_file_is_hashed_by_the_rank_that_wrote_it():
    assert owner_rank("policy/__3_0.distcp", 8) == 3
    assert owner_rank("policy/__3_1.distcp", 8) == 3
    assert owner_rank("reference/__7_0.distcp", 8) == 7
    assert owner_rank("rank_00005.pt", 8) == 5
    for rank0 in ("policy/.metadata", "policy/common.pt", "policy/metadata.json", "trainer.json",
                  "shared.pt", "config.yaml"):
        assert owner_rank(rank0, 8) == 0
    assert owner_rank("policy/__9_0.distcp", 8) == 0  # written by a larger world: rank 0


def test_verification_split_by_bytes_is_balanced_and_deterministic():
    sizes = {"a": 10, "b": 9, "c": 5, "d": 4, "e": 1, "f": 1}
    split = assign_by_bytes(sizes, 2)
    assert split == assign_by_bytes(dict(reversed(sizes.items())), 2)
    load = [sum(n for k, n in sizes.items() if split[k] == r) for r in range(2)]
    assert load == [15, 15]  # a + d + e = 15, b + c + f = 15
    assert set(assign_by_bytes(sizes, 1).values()) == {0}


def test_barrier_timeout_hand_arithmetic():
    # 22 GB per rank at 0.5 GB/s write and SHA-256 at 0.45 GB/s: 3 x (44 + 48.9) < 600 floor
    assert barrier_timeout(22 * 10**9, 0.5, "sha256") == 600.0
    # at 0.1 GB/s: 3 x (220 + 22 / 0.45) = 3 x 268.89 = 806.7 s
    assert barrier_timeout(22 * 10**9, 0.1, "sha256") == pytest.approx(3 * (220 + 22 / 0.45))
    assert barrier_timeout(22 * 10**9, 0.1, "crc32") == pytest.approx(3 * (220 + 22 / 0.95))


@pytest.mark.parametrize("name", sorted(checksum.ALGORITHMS))
def test_file_checksums_equal_the_reference_implementations(tmp_path, name):
    data = bytes(range(256)) * 40_000  # 10 MB: several 8 MiB reads
    path = tmp_path / "blob"
    path.write_bytes(data)
    want = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "blake2b": hashlib.blake2b(data).hexdigest(),
        "crc32": f"{zlib.crc32(data):08x}",
        "adler32": f"{zlib.adler32(data):08x}",
    }[name]
    assert checksum.file_checksum(path, name) == want
    with pytest.raises(ValueError, match="unknown"):
        checksum.new("md4")

"""Two real mounts: big files stored with several StoreData calls in flight
(and chunk files written behind) still give close-to-open exactly.

A writes files of several MAX_IO runs (unaligned sizes, rewrites that
shrink and grow them, an fsync in the middle); once A's close() returns,
B's open() reads exactly A's bytes, and A reads them back too.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from protocol.limits import MAX_IO

pytestmark = pytest.mark.mount


def blob(n: int, seed: int) -> bytes:
    out = bytearray()
    block = hashlib.sha256(str(seed).encode()).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:n])


def test_big_write_then_b_reads_exactly_the_bytes(dirs):
    da, db = dirs
    for seed, size in enumerate((5 * MAX_IO + 12345, 3 * MAX_IO - 7, 6 * MAX_IO + 1)):
        data = blob(size, seed)
        with open(da / "big", "wb") as f:
            for off in range(0, size, 100_000):  # unaligned application writes
                f.write(data[off : off + 100_000])
        # close() on A has returned: every byte is on the server.
        assert (db / "big").read_bytes() == data
        assert (da / "big").read_bytes() == data


def test_fsync_in_the_middle_then_more_writes(dirs):
    da, db = dirs
    first, second = blob(4 * MAX_IO, 10), blob(2 * MAX_IO + 99, 11)
    with open(da / "f", "wb") as f:
        f.write(first)
        f.flush()
        os.fsync(f.fileno())
        assert (db / "f").read_bytes() == first  # fsync stored it all
        f.seek(MAX_IO // 2)
        f.write(second)  # overlaps what is already stored
    want = first[: MAX_IO // 2] + second + first[MAX_IO // 2 + len(second) :]
    assert (db / "f").read_bytes() == want
    assert (da / "f").read_bytes() == want

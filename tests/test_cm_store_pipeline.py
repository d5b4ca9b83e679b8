"""Pipelined StoreData (afsfuse/write.py): several calls in flight per file.

Each test runs the cache manager against the in-memory fake server with a
small ``MAX_IO``, so a file of a few chunks is stored in several calls; the
fake is made to hold, reorder or fail those calls.  What is asserted is
what users rely on: after close the server holds exactly the bytes written,
a failed call is reported and never leaves the client claiming bytes the
server lacks, another client's change in the middle is not taken for our
own, and writes or truncates that come while stores are in flight win.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import trio

import afsfuse.write as write_mod
from protocol.errors import RpcError
from tests.test_cm_fakeserver import FakeServer, running

CS = 4096
RUN = 2 * CS  # MAX_IO in these tests: two chunks a call


@pytest.fixture(autouse=True)
def small_max_io(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(write_mod, "MAX_IO", RUN)


def pattern(n: int, seed: int) -> bytes:
    return bytes((seed + i * 13) % 251 for i in range(n))


class SlowStores(FakeServer):
    """StoreData that takes a while before it lands (``delay(offset)``
    seconds), counting how many calls are in the server at once."""

    def __init__(self, delay: Any = lambda off: 0.01) -> None:
        super().__init__()
        self.delay = delay
        self.inside = 0
        self.most_inside = 0
        self.fail_at: dict[int, str] = {}  # offset -> error code, once
        self.landed: list[int] = []  # offsets, in the order they landed

    async def FS_StoreData(self, conn, cred, fid, offset, data, new_length, mtime) -> Any:
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        try:
            await trio.sleep(self.delay(offset))
            code = self.fail_at.pop(offset, None)
            if code is not None:
                raise RpcError(code, "refused by the test")
            self.landed.append(offset)
            return await super().FS_StoreData(conn, cred, fid, offset, data, new_length, mtime)
        finally:
            self.inside -= 1


async def new_file(cm: Any, name: bytes) -> tuple[Any, Any]:
    """A new file in the volume root, open for writing: (vnode, handle)."""
    root = await cm.mount_volume("test", "root.cell")
    f = await cm.create(root, name, 0o644)
    return f, await cm.open(f, flags=2)


async def write_file(cm: Any, name: bytes, data: bytes) -> tuple[Any, Any]:
    f, h = await new_file(cm, name)
    await cm.write(h, 0, data)
    return f, h


async def read_all(cm: Any, f: Any, n: int) -> bytes:
    h = await cm.open(f)
    try:
        return await cm.read(h, 0, n)
    finally:
        await cm.release(h)


async def test_stores_are_pipelined_and_land_whole(tmp_path):
    fake = SlowStores()
    data = pattern(10 * RUN + 123, 1)
    async with running(tmp_path, fake) as (_net, fake, cm):
        f, h = await write_file(cm, b"big", data)
        await cm.flush(h)
        await cm.release(h)
        node = fake.node(f.fid.to_wire())
        assert bytes(node.data) == data
        assert fake.most_inside == write_mod.STORE_DEPTH  # several, never more
        # Our own DV bumps were recognised as ours: the chunks were kept and
        # re-labelled, so reading back costs no FetchData.
        assert f.data_version == node.dv
        fetched = cm.stats.rpc["FS.FetchData"]
        assert await read_all(cm, f, len(data) + 10) == data
        assert cm.stats.rpc["FS.FetchData"] == fetched


async def test_replies_out_of_order_are_still_our_own(tmp_path):
    # The first calls take longest: the server runs (and numbers) them last.
    fake = SlowStores(delay=lambda off: 0.5 - off / (40 * RUN))
    data = pattern(8 * RUN, 2)
    async with running(tmp_path, fake) as (_net, fake, cm):
        f, h = await write_file(cm, b"f", data)
        await cm.flush(h)
        await cm.release(h)
        assert fake.landed != sorted(fake.landed)  # the test did reorder them
        node = fake.node(f.fid.to_wire())
        assert bytes(node.data) == data and f.data_version == node.dv
        fetched = cm.stats.rpc["FS.FetchData"]
        assert await read_all(cm, f, len(data)) == data
        assert cm.stats.rpc["FS.FetchData"] == fetched


async def test_refused_call_is_reported_and_the_server_view_comes_back(tmp_path):
    fake = SlowStores()
    data = pattern(6 * RUN, 3)
    async with running(tmp_path, fake) as (_net, fake, cm):
        f, h = await write_file(cm, b"f", data)
        fake.fail_at[2 * RUN] = "ENOSPC"
        with pytest.raises(RpcError) as exc:
            await cm.flush(h)
        assert exc.value.code == "ENOSPC"
        await cm.release(h)
        # The other calls landed; the refused range did not.  The client
        # shows the server's file, not the bytes it could not store.
        node = fake.node(f.fid.to_wire())
        assert bytes(node.data[2 * RUN : 3 * RUN]) != data[2 * RUN : 3 * RUN]
        assert await read_all(cm, f, len(data) + 10) == bytes(node.data)


async def test_call_failing_for_now_keeps_the_writes_for_the_next_close(tmp_path):
    fake = SlowStores()
    data = pattern(6 * RUN, 4)
    async with running(tmp_path, fake) as (_net, fake, cm):
        f, h = await write_file(cm, b"f", data)
        fake.fail_at[4 * RUN] = "EAGAIN"
        with pytest.raises(RpcError):
            await cm.fsync(h)
        # Not refused for good: still dirty, stored by the next fsync.
        await cm.fsync(h)
        await cm.release(h)
        node = fake.node(f.fid.to_wire())
        assert bytes(node.data) == data
        assert await read_all(cm, f, len(data)) == data


async def test_foreign_change_during_stores_is_not_taken_for_ours(tmp_path):
    fake = SlowStores()
    data = pattern(8 * RUN, 5)
    async with running(tmp_path, fake) as (_net, fake, cm):
        f, h = await write_file(cm, b"f", data + bytes(RUN))
        node = fake.node(f.fid.to_wire())
        other = pattern(RUN, 99)

        async def someone_else_writes(conn, cred, fid, offset, *rest) -> None:
            if offset == 0:
                # Another client stores the last run while ours are in flight:
                # a DV bump that is not ours, and a break for us.
                fake.hooks.pop("FS.StoreData")
                n = fake.node(fid)
                n.data[8 * RUN : 9 * RUN] = other
                n.dv += 1
                await fake.break_fids([n.fid])

        fake.hooks["FS.StoreData"] = someone_else_writes
        # Only the first eight runs are ours to store (the ninth, zeros,
        # too; it may land before or after the other client's).
        await cm.flush(h)
        await cm.release(h)
        got = await read_all(cm, f, 9 * RUN)
        assert got == bytes(node.data)  # whatever the server ended with
        assert got[: 8 * RUN] == data


async def test_write_during_stores_in_flight_wins(tmp_path):
    fake = SlowStores(delay=lambda off: 0.2)
    data = pattern(6 * RUN, 6)
    newer = pattern(RUN, 77)
    async with running(tmp_path, fake) as (_net, fake, cm):
        f, h = await write_file(cm, b"f", data)
        async with trio.open_nursery() as n:
            n.start_soon(cm.flush, h)
            await trio.sleep(0.05)
            assert fake.inside > 0  # stores in flight
            # The same range again: must not be overtaken by the older store.
            await cm.write(h, RUN, newer)
        await cm.flush(h)
        await cm.release(h)
        want = data[:RUN] + newer + data[2 * RUN :]
        assert bytes(fake.node(f.fid.to_wire()).data) == want
        assert await read_all(cm, f, len(want)) == want


async def test_truncate_during_stores_in_flight_comes_after_them(tmp_path):
    fake = SlowStores(delay=lambda off: 0.2)
    data = pattern(6 * RUN, 7)
    async with running(tmp_path, fake) as (_net, fake, cm):
        f, h = await write_file(cm, b"f", data)
        async with trio.open_nursery() as n:
            n.start_soon(cm.flush, h)
            await trio.sleep(0.05)
            assert fake.inside > 0
            await cm.setattr(f, size=RUN + 5)
        await cm.release(h)
        assert bytes(fake.node(f.fid.to_wire()).data) == data[: RUN + 5]
        assert await read_all(cm, f, len(data)) == data[: RUN + 5]


async def test_memory_bound_respected_while_writing_big_files(tmp_path):
    fake = SlowStores(delay=lambda off: 0)
    bound = 8 * CS
    data = pattern(40 * CS, 8)
    async with running(tmp_path, fake, cache_mem_bytes=bound) as (_net, fake, cm):
        f, h = await new_file(cm, b"f")
        for off in range(0, len(data), 3000):
            await cm.write(h, off, data[off : off + 3000])
            assert cm.datacache.stats()["mem_bytes"] <= bound
        await cm.flush(h)
        await cm.release(h)
        assert cm.datacache.stats()["mem_bytes"] <= bound
        assert bytes(fake.node(f.fid.to_wire()).data) == data
        assert await read_all(cm, f, len(data)) == data


# -- write-behind: runs stored while the application is still writing ---------------


async def write_in_pieces(cm: Any, h: Any, data: bytes, piece: int = CS, start: int = 0) -> None:
    for off in range(0, len(data), piece):
        await cm.write(h, start + off, data[off : off + piece])


async def test_write_behind_stores_full_runs_before_close(tmp_path):
    fake = SlowStores(delay=lambda off: 0)
    data = pattern(6 * RUN + 100, 10)
    async with running(tmp_path, fake) as (_net, fake, cm):
        f, h = await new_file(cm, b"f")
        await write_in_pieces(cm, h, data)
        await trio.sleep(0.1)
        assert fake.calls["FS.StoreData"] >= 5  # runs 0..4 went while writing
        await cm.flush(h)
        await cm.release(h)
        node = fake.node(f.fid.to_wire())
        assert bytes(node.data) == data and f.data_version == node.dv
        fetched = cm.stats.rpc["FS.FetchData"]
        assert await read_all(cm, f, len(data)) == data
        assert cm.stats.rpc["FS.FetchData"] == fetched  # kept as our own


async def test_write_behind_chunk_written_again_while_in_flight(tmp_path):
    fake = SlowStores(delay=lambda off: 0.3 if off == 0 else 0)
    data = pattern(4 * RUN, 11)
    newer = pattern(CS, 12)
    async with running(tmp_path, fake) as (_net, fake, cm):
        f, h = await new_file(cm, b"f")
        await write_in_pieces(cm, h, data[: 2 * RUN])  # run 0 goes behind
        await trio.sleep(0.05)
        assert 0 in cm.writer._behind[f].inflight
        await cm.write(h, CS, newer)  # the same bytes again, while in flight
        await write_in_pieces(cm, h, data[2 * RUN :], start=2 * RUN)
        await cm.flush(h)
        await cm.release(h)
        want = data[:CS] + newer + data[2 * CS :]
        assert bytes(fake.node(f.fid.to_wire()).data) == want
        assert await read_all(cm, f, len(want)) == want


async def test_write_behind_refused_call_is_reported_at_close(tmp_path):
    fake = SlowStores(delay=lambda off: 0)
    data = pattern(4 * RUN, 13)
    async with running(tmp_path, fake) as (_net, fake, cm):
        f, h = await new_file(cm, b"f")
        fake.fail_at[RUN] = "EDQUOT"
        await write_in_pieces(cm, h, data)
        with pytest.raises(RpcError) as exc:
            await cm.flush(h)
        assert exc.value.code == "EDQUOT"
        await cm.release(h)
        node = fake.node(f.fid.to_wire())
        assert bytes(node.data[RUN : 2 * RUN]) != data[RUN : 2 * RUN]
        # The client shows what the server has, not the bytes it refused.
        assert await read_all(cm, f, len(data) + 10) == bytes(node.data)


async def test_write_behind_foreign_change_means_everything_is_sent_again(tmp_path):
    fake = SlowStores(delay=lambda off: 0.05)
    data = pattern(8 * RUN, 14)
    async with running(tmp_path, fake) as (_net, fake, cm):
        f, h = await new_file(cm, b"f")

        async def someone_else_writes(conn, cred, fid, offset, *rest) -> None:
            if offset == RUN:
                # Another client's store lands between two of ours, over a
                # range we already stored: not our DV bump.
                fake.hooks.pop("FS.StoreData")
                n = fake.node(fid)
                n.data[0:CS] = b"X" * CS
                n.dv += 1
                await fake.break_fids([n.fid])

        fake.hooks["FS.StoreData"] = someone_else_writes
        await write_in_pieces(cm, h, data)
        await cm.flush(h)
        await cm.release(h)
        # Last closer wins: A's whole file, and A's cache agrees with the server.
        assert bytes(fake.node(f.fid.to_wire()).data) == data
        assert await read_all(cm, f, len(data)) == data


async def test_write_behind_truncate_drains_first(tmp_path):
    fake = SlowStores(delay=lambda off: 0.2)
    data = pattern(3 * RUN, 15)
    async with running(tmp_path, fake) as (_net, fake, cm):
        f, h = await new_file(cm, b"f")
        await write_in_pieces(cm, h, data)
        assert fake.inside > 0 or cm.writer._behind[f].calls > 0  # in flight
        await cm.setattr(f, size=RUN + 5)
        await cm.flush(h)
        await cm.release(h)
        assert bytes(fake.node(f.fid.to_wire()).data) == data[: RUN + 5]
        assert await read_all(cm, f, len(data)) == data[: RUN + 5]


async def test_write_behind_then_o_trunc_reopen(tmp_path):
    fake = SlowStores(delay=lambda off: 0.2)
    data = pattern(3 * RUN, 16)
    async with running(tmp_path, fake) as (_net, fake, cm):
        f, h = await new_file(cm, b"f")
        await write_in_pieces(cm, h, data)
        h2 = await cm.open(f, flags=os.O_WRONLY | os.O_TRUNC)
        await cm.write(h2, 0, b"short")
        await cm.flush(h2)
        await cm.release(h2)
        await cm.release(h)
        assert bytes(fake.node(f.fid.to_wire()).data) == b"short"
        assert await read_all(cm, f, 100) == b"short"

"""What FetchData returns is always a committed version of the file.

Small stores and truncations are committed as redo records and applied to the
data file after the commit; large stores are written beside other commits.
FetchData reads the data file outside its SQLite snapshot, so every window
between a commit and its data file is checked here: a threaded stress of
stores, truncations and reads against the real server (every (DV, bytes) pair
a reader gets must be the bytes of that DV), and one deterministic test per
window the stress found or the review did: a post-commit step that fails
(every job of the batch is still acknowledged, the file is repaired from its
redo records, never served wrongly), a read that fell back to the commit
thread beside a store of its file, a store that failed half-written, a file
removed under a read, and recovery after a large store overtook redo records.
"""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from afsfuse.lab.server import fs_client, running_server, server_and_two_clients
from fileserver.store import VolumeHandle
from fileserver.volume import Volume
from protocol.errors import RpcError
from protocol.records import Fid, FileType

# A hang guard, not a speed assertion.
HANG = 30
SIZE, DV = 3, 4  # FileStatus fields on the wire


def _versions(ops: list[tuple[int, str, int, bytes]]) -> dict[int, bytes]:
    """Contents by DV from the acknowledged changes (dv, kind, offset/size, data)."""
    content = b""
    out = {1: b""}
    for dv, kind, arg, data in sorted(ops):
        if kind == "trunc" and dv == max(out):  # to the size it had: no change
            assert len(content) == arg
            continue
        assert dv == max(out) + 1, f"DV {dv} after {max(out)}: a change is missing"
        if kind == "trunc":
            content = content[:arg] + bytes(max(0, arg - len(content)))
        else:  # a store at offset ``arg`` whose new length is offset + len(data)
            end = arg + len(data)
            content = (content + bytes(max(0, arg - len(content))))[:arg] + data
            content = content[:end]
        out[dv] = content
    return out


async def test_fetch_data_returns_only_committed_versions_under_stores(tmp_path):
    """Writers store tokens of distinct lengths (small ones as redo records,
    large ones beside the commits, in place or whole) and truncate; readers
    fetch all the while.  Bounded by count, not time."""
    rng = random.Random(1234)
    ops: list[tuple[int, str, int, bytes]] = []
    seen: list[tuple[int, bytes]] = []
    writes_each, readers = 150, 3
    async with running_server(tmp_path / "fs") as srv:
        async with fs_client(srv.host, srv.port) as x:
            root = await x.root_fid()
            fid = (await x.call("FS.CreateFile", None, root, b"f", 0o644))["fid"]
        done = trio.Event()

        async def writer(w: int) -> None:
            async with fs_client(srv.host, srv.port) as c:
                for i in range(writes_each):
                    k = rng.random()
                    token = f"w{w}.{i}".encode() * (1 + rng.randrange(3))
                    if k < 0.15:
                        size = rng.randrange(0, 40)
                        r = await c.call("FS.StoreStatus", None, fid, {"size": size})
                        ops.append((r["status"][DV], "trunc", size, b""))
                        continue
                    if k < 0.25:  # large: beside the commits, whole (renamed over)
                        token = (token * (70_000 // len(token) + 1))[: 70_000 + w * 7 + i]
                    off = 0 if k < 0.85 else rng.randrange(1, 20)
                    r = await c.call("FS.StoreData", None, fid, off, token, off + len(token), None)
                    ops.append((r["status"][DV], "store", off, token))

        async def reader() -> None:
            async with fs_client(srv.host, srv.port) as c:
                while not done.is_set():
                    r = await c.call("FS.FetchData", None, fid, 0, 1 << 20)
                    seen.append((r["status"][DV], r["data"]))
                    assert len(r["data"]) == r["status"][SIZE]

        async with trio.open_nursery() as nursery:
            for _ in range(readers):
                nursery.start_soon(reader)
            with trio.fail_after(HANG * 4):
                async with trio.open_nursery() as writers:
                    for w in range(2):
                        writers.start_soon(writer, w)
            done.set()
        assert srv.store.get(root[0]).vol.check() == []
    versions = _versions(ops)
    bad = [(dv, data[:40]) for dv, data in seen if versions.get(dv) != data]
    assert not bad, f"{len(bad)} of {len(seen)} reads match no committed version: {bad[:5]}"
    assert len({dv for dv, _ in seen}) > 5  # the readers really ran beside the stores


# -- a post-commit step that fails ------------------------------------------------


async def _until(pred: Any) -> None:
    """Wait for a state another task reaches (polled: it has no event)."""
    while not pred():  # noqa: ASYNC110
        await trio.sleep(0.01)


def _park_batches(h: VolumeHandle) -> tuple[threading.Event, threading.Event, Any]:
    """Park the next group commit's COMMIT in its thread until released (jobs
    queue meanwhile): what a slow sync does."""
    parked, release = threading.Event(), threading.Event()
    real = h.vol.commit_batch

    def parking(batch: Any) -> Any:
        if not release.is_set():
            parked.set()
            release.wait(HANG)
        return real(batch)

    h.vol.commit_batch = parking  # type: ignore[method-assign]
    return parked, release, real


async def test_failed_post_commit_step_still_acknowledges_the_batch(tmp_path, monkeypatch):
    """Three changes share a commit; applying one's redo record fails.  All
    three are acknowledged and broken to the holder, and the file whose
    record failed is served from its replayed records, never its old bytes
    under the new DV."""
    async with (
        running_server(tmp_path / "fs") as srv,
        fs_client(srv.host, srv.port) as x,
        fs_client(srv.host, srv.port) as y,
        fs_client(srv.host, srv.port) as holder,
    ):
        root = await x.root_fid()
        a = (await x.call("FS.CreateFile", None, root, b"a", 0o644))["fid"]
        b = (await x.call("FS.CreateFile", None, root, b"b", 0o644))["fid"]
        # Stored as a large store, so a has a data file (small files' bytes are inline).
        await x.call("FS.StoreData", None, a, 0, b"old a contents" + bytes(70_000), 14, None)
        for f in (a, b):
            await holder.call("FS.FetchStatus", None, f)
        h = srv.store.get(root[0])
        real_apply = Volume._redo_applied

        def failing_apply(self: Volume, seq: Any, vnode: int, *args: Any) -> None:
            if vnode == a[1]:
                raise OSError(5, "injected: the data file cannot be written")
            real_apply(self, seq, vnode, *args)

        monkeypatch.setattr(Volume, "_redo_applied", failing_apply)
        parked, release, real_batch = _park_batches(h)
        got: dict[str, Any] = {}

        async def call(key: str, c: Any, *args: Any) -> None:
            got[key] = await c.call(*args)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, "first", y, "FS.CreateFile", None, root, b"first", 0o644)
            assert await trio.to_thread.run_sync(parked.wait, HANG)
            nursery.start_soon(call, "a", x, "FS.StoreData", None, a, 0, b"NEW", 3, None)
            nursery.start_soon(call, "b", y, "FS.StoreData", None, b, 0, b"bee", None, None)
            nursery.start_soon(call, "c", holder, "FS.CreateFile", None, root, b"c", 0o644)
            await _until(lambda: len(h._queue) >= 3)
            release.set()
        h.vol.commit_batch = real_batch  # type: ignore[method-assign]
        assert set(got) == {"first", "a", "b", "c"}  # every change acknowledged
        assert got["a"]["status"][DV] == 3 and got["a"]["status"][SIZE] == 3
        assert {Fid(*a), Fid(*b)} <= set(holder.breaks)
        assert a[1] in h.vol.broken
        # Still failing: an error, not the old bytes labelled with the new DV.
        monkeypatch.setattr(Volume, "_write", _failing_write(a[1]))
        with pytest.raises(RpcError) as ei:
            await y.call("FS.FetchData", None, a, 0, 100)
        assert ei.value.code == "EIO"
        assert (await y.call("FS.FetchData", None, b, 0, 100))["data"] == b"bee"
        monkeypatch.undo()
        r = await y.call("FS.FetchData", None, a, 0, 100)  # repaired from its records
        assert (r["status"][DV], r["data"]) == (3, b"NEW")
        assert a[1] not in h.vol.broken
        # Later stores build on the repaired file.
        await x.call("FS.StoreData", None, a, 1, b"ew!", 4, None)
        assert (await y.call("FS.FetchData", None, a, 0, 100))["data"] == b"New!"
        await trio.to_thread.run_sync(h.vol.sync_redo)
        assert h.vol.check() == []


def _failing_write(vnode: int) -> Any:
    real = Volume._write

    def write(self: Volume, vn: int, *args: Any) -> None:
        if vn == vnode:
            raise OSError(5, "injected: the data file cannot be written")
        real(self, vn, *args)

    return write


def _volume_with_a_file(path: Path) -> tuple[Volume, Any]:
    vol = Volume.create(path, 7, "v")
    f, _ = vol.create_vnode(1, 1, b"f", FileType.FILE, 0o644, 0, 0)
    vol.store_data(f.vnode, f.unique, 0, b"old contents", None, None)
    return vol, f


def test_broken_file_replays_at_recovery_and_truncation_repairs_it(tmp_path, monkeypatch):
    vol, f = _volume_with_a_file(tmp_path / "v")
    monkeypatch.setattr(Volume, "_write", _failing_write(f.vnode))
    v = vol.store_small(f.vnode, f.unique, 4, b"NEW", None, None)  # committed: acknowledged
    assert v.dv == 3 and f.vnode in vol.broken
    with pytest.raises(RpcError) as ei:
        vol.fetch_data(f.vnode, f.unique, 0, 100)
    assert ei.value.code == "EIO"
    v = vol.store_status(f.vnode, f.unique, {"size": 9})  # also committed, also unapplied
    assert v.dv == 4 and f.vnode in vol.broken
    monkeypatch.undo()
    vol.store_status(f.vnode, f.unique, {"size": 8})  # its step replays all three records
    assert f.vnode not in vol.broken
    assert vol.fetch_data(f.vnode, f.unique, 0, 100)[1] == b"old NEWt"
    vol.db.close()  # a crash: the records replay at the next start
    vol = Volume(tmp_path / "v")
    assert vol.fetch_data(f.vnode, f.unique, 0, 100)[1] == b"old NEWt"
    assert vol.check() == []
    vol.close()


@pytest.mark.parametrize("offset", [0, 5])
def test_large_store_after_redo_records_survives_a_crash(tmp_path, offset):
    """Redo records of small stores are dropped lazily; a large store written
    after them must not be overwritten when a crash replays them."""
    vol, f = _volume_with_a_file(tmp_path / "v")
    vol.store_small(f.vnode, f.unique, 0, b"tiny", 4, None)
    vol.store_status(f.vnode, f.unique, {"size": 2})
    big = os.urandom(100_000)
    v = vol.store_data(f.vnode, f.unique, offset, big, offset + len(big), None)
    want = (b"ti" + bytes(3))[:offset] + big
    assert vol.fetch_data(f.vnode, f.unique, 0, 200_000) == (v, want)
    vol.db.close()  # kill -9 before the records went
    vol = Volume(tmp_path / "v")
    v2, data = vol.fetch_data(f.vnode, f.unique, 0, 200_000)
    assert data == want and v2.dv >= v.dv
    assert vol.check() == []
    vol.close()


# -- reads beside changes ----------------------------------------------------------


async def test_read_falling_back_to_the_commit_thread_waits_for_a_store(tmp_path):
    """A FetchData that keeps racing changes reads in the commit thread; a
    small store of its file queued in the same batch must not let it see the
    new DV before the data file has the new bytes."""
    vol, f = _volume_with_a_file(tmp_path / "v")
    h = VolumeHandle(vol)
    h._changed_since = lambda seq, keys: True  # type: ignore[method-assign]
    parked, release, real_batch = _park_batches(h)
    eighth, go = threading.Event(), threading.Event()
    calls = [0]

    def read() -> tuple[int, bytes]:
        calls[0] += 1
        if calls[0] == 8:  # the last read beside the changes: the store starts now
            eighth.set()
            go.wait(HANG)
        v, data = vol.fetch_data(f.vnode, f.unique, 0, 100)
        return v.dv, data

    got: list[tuple[int, bytes]] = []

    async def reader() -> None:
        got.append(await h.read(read, lambda _: (f.vnode,), file=f.vnode))

    async def store() -> None:
        async with h.file_lock(f.vnode):
            with h.writing(f.vnode):
                await h.commit(lambda: vol.store_small(f.vnode, f.unique, 0, b"NEW!", 4, None))

    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(h.commit, lambda: None)  # parks the commit thread
            assert await trio.to_thread.run_sync(parked.wait, HANG)
            nursery.start_soon(reader)
            assert await trio.to_thread.run_sync(eighth.wait, HANG)
            nursery.start_soon(store)
            await _until(lambda: bool(h._queue))
            go.set()
            await trio.sleep(0.2)  # the reader queues (or waits) behind the store
            release.set()
    vol.commit_batch = real_batch  # type: ignore[method-assign]
    assert got and got[0] in {(2, b"old contents"), (3, b"NEW!")}
    vol.close()


async def test_store_failing_half_written_is_settled_before_reads(tmp_path, monkeypatch):
    """A large store whose bytes land half-way and then fail: a FetchData
    meanwhile gets the old version or the settled one (new DV), never the
    half-written bytes under the old DV."""
    async with server_and_two_clients(tmp_path / "fs") as (srv, x, y):
        root = await x.root_fid()
        fid = (await x.call("FS.CreateFile", None, root, b"f", 0o644))["fid"]
        old = b"o" * 100_000
        await x.call("FS.StoreData", None, fid, 0, old, None, None)
        h = srv.store.get(root[0])
        real_write, real_failed = h.vol._write, h.vol.store_failed
        settling, settle = threading.Event(), threading.Event()

        def half_write(vn: int, uq: int, off: int, data: bytes, *args: Any) -> None:
            real_write(vn, uq, off, data[: len(data) // 2], off + len(data) // 2, *args[1:])
            raise OSError(28, "injected: no space left half-way")

        def slow_settle(vn: int) -> None:
            settling.set()
            settle.wait(HANG)
            real_failed(vn)

        h.vol._write = half_write  # type: ignore[method-assign]
        h.vol.store_failed = slow_settle  # type: ignore[method-assign]
        got: list[tuple[int, bytes]] = []

        async def store() -> None:
            with pytest.raises(RpcError):
                await x.call("FS.StoreData", None, fid, 50_000, b"n" * 100_000, None, None)

        async def read() -> None:
            r = await y.call("FS.FetchData", None, fid, 0, 1 << 20)
            got.append((r["status"][DV], r["data"]))

        with trio.fail_after(HANG):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store)
                assert await trio.to_thread.run_sync(settling.wait, HANG)
                h.vol._write = real_write  # type: ignore[method-assign]
                nursery.start_soon(read)
                await trio.sleep(0.2)
                settle.set()
        h.vol.store_failed = real_failed  # type: ignore[method-assign]
        dv, data = got[0]
        assert (dv, data) == (2, old) or dv == 3, (dv, data[49_990:50_010])
        assert h.vol.check() == []


def test_file_removed_under_a_read_is_stale_not_zeros(tmp_path):
    vol, f = _volume_with_a_file(tmp_path / "v")
    snapshot, removed = threading.Event(), threading.Event()
    out: list[Any] = []

    def reader() -> None:
        with vol.reading():
            vol.get(f.vnode, f.unique)  # the snapshot: the file exists
            snapshot.set()
            removed.wait(HANG)
            try:
                out.append(vol.fetch_data(f.vnode, f.unique, 0, 100))
            except RpcError as exc:
                out.append(exc.code)

    t = threading.Thread(target=reader)
    t.start()
    assert snapshot.wait(HANG)
    vol.remove_file(1, 1, b"f")  # committed, data file unlinked
    removed.set()
    t.join(HANG)
    assert out == ["ESTALE"]
    vol.close()

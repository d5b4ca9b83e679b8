"""Small files' bytes inline in the volume database (``inline_data``).

A store that leaves a file at most ``inline_max`` long commits its bytes with
its metadata: one WAL sync, no data file.  Growing past the limit moves the
bytes to a data file that is durable before the commit dropping the blob.
Reads, truncation, removal, salvage, recovery and counters all see them.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import trio

from afsfuse.lab.server import ServerProcess, fs_client, running_server
from fileserver.config import ServerConfig
from fileserver.salvage import salvage
from fileserver.volume import Volume
from protocol.errors import RpcError
from protocol.records import FileType


def _data_file(vol: Volume, f: Any) -> Path:
    return vol._data_path(f.vnode, f.unique)


def _new(path: Path, inline_max: int = 100) -> tuple[Volume, Any]:
    vol = Volume.create(path, 7, "v")
    vol.inline_max = inline_max
    f, _ = vol.create_vnode(1, 1, b"f", FileType.FILE, 0o644, 0, 0)
    return vol, f


def _read(vol: Volume, f: Any) -> bytes:
    return vol.fetch_data(f.vnode, f.unique, 0, 1 << 20)[1]


def test_small_store_is_one_commit_and_no_data_file(tmp_path):
    vol, f = _new(tmp_path / "v")
    before = vol.stats.snapshot()
    v = vol.store_small(f.vnode, f.unique, 0, b"hello", None, None)
    v = vol.store_small(f.vnode, f.unique, 3, b"p me", 10, None)
    after = vol.stats.snapshot()
    assert after["group_commits"] - before["group_commits"] == 2
    # Nothing but the WAL syncs: no data fsync, no directory sync.
    assert after["fsync_calls"] == {"wal": before["fsync_calls"].get("wal", 0) + 2}
    assert not _data_file(vol, f).exists() and vol.redo_unsynced == 0
    assert (v.size, v.dv) == (10, 3) and vol.bytes_used == 10
    assert _read(vol, f) == b"help me\0\0\0"
    assert vol.fetch_data(f.vnode, f.unique, 2, 3)[1] == b"lp "
    assert vol.check() == []
    vol.db.close()  # kill -9: no clean close
    vol = Volume(tmp_path / "v")
    assert _read(vol, f) == b"help me\0\0\0" and vol.get(f.vnode, f.unique).size == 10
    assert vol.check() == [] and not _data_file(vol, f).exists()
    vol.close()


def test_growing_past_the_limit_moves_the_bytes_to_a_data_file(tmp_path):
    vol, f = _new(tmp_path / "v")
    vol.store_small(f.vnode, f.unique, 0, b"a" * 90, None, None)
    v = vol.store_small(f.vnode, f.unique, 90, b"b" * 20, None, None)
    assert v.size == 110 and not vol.is_inline(f.vnode)
    assert _data_file(vol, f).read_bytes() == b"a" * 90 + b"b" * 20
    assert _read(vol, f) == b"a" * 90 + b"b" * 20
    assert vol.check() == []
    # Shrunk again, it stays in its data file (and small stores go by redo records).
    vol.store_status(f.vnode, f.unique, {"size": 5})
    vol.store_small(f.vnode, f.unique, 0, b"X", None, None)
    assert _read(vol, f) == b"Xaaaa" and not vol.is_inline(f.vnode)
    vol.close()
    vol = Volume(tmp_path / "v")
    assert _read(vol, f) == b"Xaaaa" and vol.check() == []
    vol.close()


def test_a_large_store_into_an_inline_file_keeps_its_other_bytes(tmp_path):
    vol, f = _new(tmp_path / "v")
    vol.store_small(f.vnode, f.unique, 0, b"head", None, None)
    vol.store_data(f.vnode, f.unique, 200, b"z" * 300, None, None)  # the data-file path
    assert not vol.is_inline(f.vnode)
    assert _read(vol, f) == b"head" + bytes(196) + b"z" * 300
    assert vol.bytes_used == 500 and vol.check() == []
    vol.close()


def test_truncating_an_inline_file(tmp_path):
    vol, f = _new(tmp_path / "v")
    vol.store_small(f.vnode, f.unique, 0, b"0123456789", None, None)
    v = vol.store_status(f.vnode, f.unique, {"size": 4})
    assert v.size == 4 and vol.is_inline(f.vnode) and _read(vol, f) == b"0123"
    v = vol.store_status(f.vnode, f.unique, {"size": 8})
    assert _read(vol, f) == b"0123\0\0\0\0" and vol.is_inline(f.vnode)
    v = vol.store_status(f.vnode, f.unique, {"size": 1000})  # past the limit: a data file
    assert v.size == 1000 and not vol.is_inline(f.vnode)
    assert _read(vol, f) == b"0123" + bytes(996) and vol.bytes_used == 1000
    assert vol.check() == []
    vol.close()


def test_removing_an_inline_file_drops_its_bytes_and_counters(tmp_path):
    vol, f = _new(tmp_path / "v")
    vol.store_small(f.vnode, f.unique, 0, b"x" * 50, None, None)
    assert vol.bytes_used == 50 and vol.files == 2
    vol.remove_file(1, 1, b"f")
    assert vol.bytes_used == 0 and vol.files == 1
    assert vol.db.execute("SELECT COUNT(*) FROM inline_data").fetchone()[0] == 0
    assert vol.check() == []
    vol.close()


def test_a_spill_that_did_not_commit_leaves_the_blob(tmp_path, monkeypatch):
    vol, f = _new(tmp_path / "v")
    vol.store_small(f.vnode, f.unique, 0, b"old", None, None)

    def power_cut(ops: list[str]) -> None:
        raise SystemExit("power cut before the COMMIT")

    monkeypatch.setattr(vol, "_commit", power_cut)
    with pytest.raises(SystemExit):
        vol.store_small(f.vnode, f.unique, 0, b"n" * 150, None, None)
    assert _data_file(vol, f).exists()  # written, synced, never committed
    vol.db.close()
    monkeypatch.undo()
    vol = Volume(tmp_path / "v")  # recovery: the blob wins, the data file goes
    assert _read(vol, f) == b"old" and vol.is_inline(f.vnode)
    assert not _data_file(vol, f).exists() and vol.check() == []
    vol.close()


def test_salvage_sees_inline_sizes_and_orphan_blobs(tmp_path):
    vol, f = _new(tmp_path / "v")
    vol.store_small(f.vnode, f.unique, 0, b"abc", None, None)
    vol.db.execute("UPDATE vnodes SET size = 7 WHERE vnode = ?", (f.vnode,))
    vol.db.execute("INSERT INTO inline_data VALUES (999, 1, x'00')")
    vol.close()
    vol = Volume(tmp_path / "v", recover=False)
    kinds = sorted(x.kind for x in vol.check(repair=True))
    assert kinds == ["data-size", "orphan-inline"]
    assert vol.check() == [] and _read(vol, f) == b"abc"
    vol.close()


def test_an_empty_file_with_a_pending_truncation_is_not_inlined(tmp_path, monkeypatch):
    vol, f = _new(tmp_path / "v")
    monkeypatch.setattr(vol, "_redo_applied", lambda *a: None)  # dies after the commits
    vol.store_status(f.vnode, f.unique, {"size": 30})
    vol.store_status(f.vnode, f.unique, {"size": 0})
    vol.db.close()
    monkeypatch.undo()
    vol = Volume(tmp_path / "v", recover=False)  # records committed, not replayed yet
    vol.inline_max = 100
    vol.store_small(f.vnode, f.unique, 0, b"hi", None, None)
    # A file with committed redo records goes on by redo records, in order with them.
    assert not vol.is_inline(f.vnode) and _read(vol, f) == b"hi"
    vol.db.close()
    vol = Volume(tmp_path / "v")
    assert _read(vol, f) == b"hi" and vol.check() == []
    vol.close()


async def test_the_inline_limit_is_a_server_knob(tmp_path):
    with pytest.raises(ValueError):
        ServerConfig(data_dir=tmp_path, inline_max=-1)
    for limit, inline in ((0, False), (8, False), (64 * 1024, True)):
        async with (
            running_server(tmp_path / f"fs{limit}", inline_max=limit) as srv,
            fs_client(srv.host, srv.port) as c,
        ):
            root = await c.root_fid()
            fid = (await c.call("FS.CreateFile", None, root, b"f", 0o644))["fid"]
            await c.call("FS.StoreData", None, fid, 0, b"ten bytes!", None, None)
            h = srv.store.get(root[0])
            assert h.vol.is_inline(fid[1]) is inline
            assert (await c.call("FS.FetchData", None, fid, 0, 100))["data"] == b"ten bytes!"


# -- kill -9 of a real server ---------------------------------------------------


async def _read_all(c: Any, fid: Any, size: int) -> bytes:
    got = b""
    while len(got) < size:
        chunk = (await c.call("FS.FetchData", None, fid, len(got), 65536))["data"]
        assert chunk
        got += chunk
    return got


async def _sigkill_run(tmp_path: Path, plan: list[list[tuple[int, bytes]]]) -> None:
    """Files stored by ``plan`` (per file: (offset, data) steps) from many
    sessions at once, the server killed -9 mid-way: each file then holds its
    last acknowledged content or the one in flight, nothing else; salvage clean."""
    data_dir = tmp_path / "fs"
    srv = ServerProcess(data_dir)
    srv.start()
    acked: dict[int, bytes] = {}
    in_flight: dict[int, bytes] = {}
    fids: dict[int, Any] = {}
    try:
        async with fs_client(srv.host, srv.port) as c0:
            root = await c0.root_fid()
            d = (await c0.call("FS.MakeDir", None, root, b"d", 0o755))["fid"]
            for i in range(len(plan)):
                fids[i] = (await c0.call("FS.CreateFile", None, d, b"f%d" % i, 0o644))["fid"]
                acked[i] = b""
        started = trio.Event()

        async def session(i: int) -> None:
            async with fs_client(srv.host, srv.port) as c:
                for off, data in plan[i]:
                    buf = bytearray(acked[i])
                    buf.extend(bytes(max(0, off + len(data) - len(buf))))
                    buf[off : off + len(data)] = data
                    in_flight[i] = bytes(buf)
                    try:
                        await c.call("FS.StoreData", None, fids[i], off, data, None, None)
                    except (RpcError, OSError, trio.BrokenResourceError):
                        return
                    acked[i] = in_flight.pop(i)
                    started.set()

        async with trio.open_nursery() as nursery:
            for i in range(len(plan)):
                nursery.start_soon(session, i)
            with trio.fail_after(60):
                await started.wait()
            await trio.sleep(random.uniform(0.01, 0.06))
            await trio.to_thread.run_sync(srv.kill)
            nursery.cancel_scope.deadline = trio.current_time() + 10
    finally:
        srv.kill()
    srv.start()
    try:
        async with fs_client(srv.host, srv.port) as c:
            root = await c.root_fid()
            d = (await c.call("FS.Lookup", None, root, b"d"))["fid"]
            for i in range(len(plan)):
                r = await c.call("FS.Lookup", None, d, b"f%d" % i)
                got = await _read_all(c, r["fid"], r["status"][3])
                assert got == acked[i] or got == in_flight.get(i), i
    finally:
        assert srv.stop() == 0
    assert salvage(data_dir) == []


async def test_sigkill_during_inline_stores(tmp_path):
    # 4 KiB stores, each file staying well under the inline limit.
    plan = [[(0, bytes([65 + i]) * 4096)] + [((j * 512) % 8192, b"%03d" % j) for j in range(200)]
            for i in range(12)]  # fmt: skip
    await _sigkill_run(tmp_path, plan)


async def test_sigkill_during_inline_to_file_migration(tmp_path):
    # Files grow through the 64 KiB limit by small appends (spilled in the
    # store's own commit) and by large stores (spilled by a commit of its own).
    plan = []
    for i in range(10):
        steps = [(k * 8192, bytes([97 + i]) * 8192) for k in range(7)]  # 56 KiB inline
        if i % 2:
            steps += [(57344 + k * 8192, b"%d" % k * 8192) for k in range(30)]
        else:
            steps += [(0, bytes([48 + k]) * 200_000) for k in range(10)]
        plan.append(steps)
    await _sigkill_run(tmp_path, plan)


def test_inline_stores_count_against_the_quota(tmp_path):
    vol = Volume.create(tmp_path / "v", 7, "v", quota_bytes=100)
    f, _ = vol.create_vnode(1, 1, b"f", FileType.FILE, 0o644, 0, 0)
    vol.store_small(f.vnode, f.unique, 0, b"x" * 60, None, None)
    with pytest.raises(RpcError) as ei:
        vol.store_small(f.vnode, f.unique, 60, b"x" * 41, None, None)
    assert ei.value.code == "EDQUOT"
    assert vol.is_inline(f.vnode) and vol.bytes_used == 60
    assert vol.volume_status()["bytes_used"] == 60 and vol.check() == []
    vol.close()

"""Cache-manager pieces: cells file, client UUID, the rwlock, the
invalidation queue, CB probes, error mapping, data paths and admin info."""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable

import pytest
import trio
from test_cm_fakeserver import ROOT, VOL, FakeServer, make_cm, running, until

from afsfuse.cache_manager import load_client_uuid
from afsfuse.cells import CellDB, parse_address
from afsfuse.invalidation import Invalidate, InvalidationQueue
from afsfuse.rwlock import RWLock
from protocol.errors import RpcError
from protocol.logfmt import parse
from protocol.records import Fid


def test_cells_file_aliases_and_default(tmp_path):
    p = tmp_path / "cells.toml"
    p.write_text(
        'default = "b"\n'
        '[cells.a]\nvlservers = ["h1:7001", "h2"]\n'
        '[cells.b]\nalias = "a"\n'
        '[cells.c]\nalias = "b"\n'
    )
    db = CellDB.load(p)
    assert db.get(None).name == "b"
    assert db.get("a").vlservers == (("h1", 7001), ("h2", 7000))
    assert db.get("c").vlservers == db.get("a").vlservers and db.get("c").alias_of == "a"
    with pytest.raises(ValueError):
        CellDB.from_dict({"cells": {"x": {"alias": "nope"}}})
    with pytest.raises(ValueError):
        CellDB.from_dict({"cells": {"x": {"alias": "y"}, "y": {"alias": "x"}}})
    assert CellDB.single("srv:9").get(None).vlservers == (("srv", 9),)
    assert parse_address("[::1]:80") == ("::1", 80)


def test_client_uuid_is_persistent(tmp_path):
    u = load_client_uuid(tmp_path / "client-uuid")
    assert load_client_uuid(tmp_path / "client-uuid") == u
    (tmp_path / "other").write_text("garbage")
    assert load_client_uuid(tmp_path / "other") != u


async def test_rwlock_readers_share_writer_excludes_and_is_preferred(autojump_clock):
    lock = RWLock()
    order = []

    async def reader(name, hold):
        async with lock.read():
            order.append(f"{name}+")
            await trio.sleep(hold)
            order.append(f"{name}-")

    async def writer():
        async with lock.write():
            order.append("w+")
            await trio.sleep(1)
            order.append("w-")

    async with trio.open_nursery() as n:
        n.start_soon(reader, "r1", 2)
        await trio.sleep(0.1)
        n.start_soon(writer)
        await trio.sleep(0.1)
        n.start_soon(reader, "r2", 0)  # queued behind the waiting writer
    assert order == ["r1+", "r1-", "w+", "w-", "r2+", "r2-"]
    # A cancelled waiting writer lets readers through.
    async with lock.read():
        with trio.move_on_after(0.1):
            await lock.acquire_write()
        async with lock.read():
            pass
    assert lock.try_acquire_write()
    lock.release_write()


async def test_invalidation_queue_coalesces_and_degrades_without_blocking():
    q = InvalidationQueue(maxlen=3)
    a, b = object(), object()
    q.put(Invalidate("inode", vnode=a))
    q.put(Invalidate("inode", vnode=a))  # coalesced
    q.put(Invalidate("inode", vnode=b))
    assert len(q) == 2
    q.put(Invalidate("entry", parent=a, name=b"x"))
    q.put(Invalidate("entry", parent=a, name=b"y"))  # full: degrade
    assert len(q) == 1
    assert (await q.get()).kind == "all"
    q.close()
    assert [ev async for ev in q] == []


async def test_cb_reply_never_waits_for_a_full_queue(tmp_path, autojump_clock):
    async with running(tmp_path, invalidation_queue_size=4) as (_net, fake, cm):
        nodes = [fake.add(ROOT, f"f{i}".encode()) for i in range(20)]
        root = await cm.mount_volume("test", "root.cell")
        await cm.readdir(root)
        t0 = trio.current_time()
        await fake.break_fids([n.fid for n in nodes])  # nobody drains the queue
        assert trio.current_time() - t0 < 0.1
        assert cm.stats.breaks == 20 and cm.stats.invalidations_degraded >= 1
        assert len(cm.invalidations) <= 4


async def test_probes(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        await cm.mount_volume("test", "root.cell")
        conn = fake.clients[cm.uuid]
        assert await conn.call("CB.Probe") is None
        assert await conn.call("CB.ProbeUuid", cm.uuid) is True
        assert await conn.call("CB.ProbeUuid", "00000000-0000-0000-0000-000000000000") is False


async def test_deleted_vnode_is_estale_and_lookup_enoent(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        fake.add(ROOT, b"f")
        root = await cm.mount_volume("test", "root.cell")
        f = await cm.lookup(root, b"f")
        # Another client removes it; the server breaks our promises.
        fid = fake.nodes[ROOT].entries.pop(b"f")
        del fake.nodes[fid]
        fake.nodes[ROOT].dv += 1
        await fake.break_fids([ROOT, fid])
        with pytest.raises(RpcError) as e:
            await cm.getattr(f)
        assert e.value.errno == errno.ESTALE and f.deleted
        with pytest.raises(RpcError) as e:
            await cm.lookup(root, b"f")
        assert e.value.errno == errno.ENOENT
        # The negative answer is cached while the directory's DV holds.
        lookups = fake.calls["FS.Lookup"]
        with pytest.raises(RpcError):
            await cm.lookup(root, b"f")
        assert fake.calls["FS.Lookup"] == lookups
        with pytest.raises(RpcError) as e:
            await cm.lookup(root, b"a/b")
        assert e.value.errno == errno.EINVAL


async def test_server_down_gives_enotconn_then_recovers(tmp_path, autojump_clock):
    async with running(tmp_path) as (net, fake, cm):
        fake.add(ROOT, b"f")
        root = await cm.mount_volume("test", "root.cell")
        f = await cm.lookup(root, b"f")
        net.down.add("fs1")
        await net.drop_all()
        f.promise = None
        with pytest.raises(RpcError) as e:
            await cm.getattr(f)
        assert e.value.errno == errno.ENOTCONN
        net.down.clear()
        await until(lambda: root.volume.server.conn is not None)
        assert (await cm.getattr(f)).type == 1


async def test_read_only_call_retried_across_a_dropped_connection(tmp_path, autojump_clock):
    async with running(tmp_path) as (net, fake, cm):
        fake.add(ROOT, b"f")
        root = await cm.mount_volume("test", "root.cell")
        f = await cm.lookup(root, b"f")
        f.promise = None
        gate = fake.gate("FS.FetchStatus")
        async with trio.open_nursery() as n:
            n.start_soon(cm.getattr, f)
            await gate.entered.wait()
            del fake.gates["FS.FetchStatus"]
            await net.drop_all()  # the reply is lost with the connection
            gate.release.set()
        assert f.promise is not None  # the retry after reconnect succeeded
        assert fake.calls["FS.FetchStatus"] >= 3


async def test_sequential_reads_read_ahead_and_share_fetches(tmp_path, autojump_clock):
    data = bytes(range(256)) * 256  # 64 KiB = 16 chunks of 4 KiB
    async with running(tmp_path, readahead_chunks=4) as (_net, fake, cm):
        fake.add(ROOT, b"big", data=data)
        root = await cm.mount_volume("test", "root.cell")
        f = await cm.lookup(root, b"big")
        out = b""
        while len(out) < len(data):
            out += await cm.read(f, len(out), 4096)
        assert out == data
        assert fake.calls["FS.FetchData"] <= 5  # not one per chunk
        # Concurrent readers of the same missing chunk share one fetch.
        cm.datacache.drop(f.fid, keep_dirty=False)
        f.next_read = -1
        before = fake.calls["FS.FetchData"]
        gate = fake.gate("FS.FetchData")
        results = []

        async def rd():
            results.append(await cm.read(f, 8192, 100))

        async with trio.open_nursery() as n:
            for _ in range(3):
                n.start_soon(rd)
            await gate.entered.wait()
            await trio.sleep(0.5)
            gate.release.set()
        assert results == [data[8192:8292]] * 3
        assert fake.calls["FS.FetchData"] == before + 1


async def test_read_ahead_fetches_in_the_background_ahead_of_a_sequential_reader(
    tmp_path, autojump_clock
):
    data = bytes(range(256)) * 256  # 64 KiB = 16 chunks of 4 KiB
    cs = 4096
    async with running(tmp_path, readahead_chunks=2) as (_net, fake, cm):
        fake.add(ROOT, b"big", data=data)
        root = await cm.mount_volume("test", "root.cell")
        f = await cm.lookup(root, b"big")

        def missing() -> list[int]:
            return cm.datacache.missing(f.fid, f.data_version, 0, len(data), len(data))

        for k in range(6):
            assert await cm.read(f, k * cs, cs) == data[k * cs : (k + 1) * cs]
            await trio.testing.wait_all_tasks_blocked()
        # Two windows (4 chunks) ahead of the reader are cached before it
        # asks, fetched a window (2 chunks) per call.
        assert missing() == list(range(10, 16))
        assert fake.calls["FS.FetchData"] == 5
        # Hold the next background fetch (chunks 10-11, started when the
        # reader is at chunk 8) and read chunk 10 out of order: the reader
        # waits for the chunk in flight instead of fetching it again.
        gate = fake.gate("FS.FetchData")
        for k in (6, 7):
            assert await cm.read(f, k * cs, cs) == data[k * cs : (k + 1) * cs]
        await gate.entered.wait()
        assert sorted(f.inflight) == [(f.data_version, 10), (f.data_version, 11)]
        got: list[bytes] = []
        async with trio.open_nursery() as n:
            n.start_soon(lambda: _append(got, cm.read(f, 10 * cs, cs)))
            await trio.sleep(1)
            assert got == []
            gate.release.set()
        assert got == [data[10 * cs : 11 * cs]]
        assert fake.calls["FS.FetchData"] == 6
        assert missing() == list(range(12, 16))


async def test_read_ahead_landing_after_a_local_truncate_is_not_cached(tmp_path, autojump_clock):
    data = b"old!" * 4096  # 16 KiB = 4 chunks of 4 KiB
    cs = 4096
    async with running(tmp_path, readahead_chunks=1) as (_net, fake, cm):
        fake.add(ROOT, b"f", data=data)
        root = await cm.mount_volume("test", "root.cell")
        f = await cm.lookup(root, b"f")
        assert await cm.read(f, 0, cs) == data[:cs]
        gate = fake.gate("FS.FetchData")
        async with trio.open_nursery() as n:
            n.start_soon(cm.read, f, cs, cs)  # sequential: chunks 2-3 read ahead
            await gate.entered.wait()
            await trio.testing.wait_all_tasks_blocked()
            h = await cm.open(f, flags=2 | 0o1000)  # O_WRONLY | O_TRUNC, local
            gate.release.set()
        await trio.testing.wait_all_tasks_blocked()
        # A write past a hole: the hole reads as zeros, not as the old bytes
        # the read-ahead brought back after the truncation.
        await cm.write(h, 2 * cs + 4, b"new")
        assert await cm.read(h, 0, 4 * cs) == bytes(2 * cs + 4) + b"new"
        await cm.release(h)
        assert bytes(fake.nodes[f.fid].data) == bytes(2 * cs + 4) + b"new"


async def _append(out: list[bytes], aw: Awaitable[bytes]) -> None:
    out.append(await aw)


async def test_truncate_and_extend_through_setattr(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        n = fake.add(ROOT, b"f", data=b"x" * 10000)
        root = await cm.mount_volume("test", "root.cell")
        f = await cm.lookup(root, b"f")
        assert await cm.read(f, 0, 20000) == b"x" * 10000
        st = await cm.setattr(f, size=5000)
        assert st.size == 5000 and len(n.data) == 5000 and f.data_version == n.dv
        fetches = fake.calls["FS.FetchData"]
        assert await cm.read(f, 0, 20000) == b"x" * 5000  # rekeyed, not refetched
        assert fake.calls["FS.FetchData"] == fetches
        st = await cm.setattr(f, mode=0o600)
        assert st.mode == 0o600
        h = await cm.open(f, flags=2 | 0o1000)  # O_TRUNC: local until close
        assert (await cm.getattr(f)).size == 0 and len(n.data) == 5000
        await cm.write(h, 100, b"tail")  # a hole, then data
        await cm.release(h)
        assert bytes(n.data) == bytes(100) + b"tail"


async def test_volsync_creation_change_voids_volume_promises(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        fake.add(ROOT, b"f")
        root = await cm.mount_volume("test", "root.cell")
        f = await cm.lookup(root, b"f")
        fake.vsync = lambda: [2, 0]  # the volume was restored
        root.promise = None
        await cm.getattr(root)
        assert root.volume.cb_v_break == 1
        assert f.promise_state(trio.current_time()) == "volume_break"


async def test_examine_stats_and_flush(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        fake.add(ROOT, b"f", data=b"abc")
        root = await cm.mount_volume("test", "root.cell")
        f = await cm.lookup(root, b"f")
        await cm.read(f, 0, 10)
        info = cm.examine(f)
        assert info["fid"] == str(f.fid) and info["promise"] == "ok"
        assert info["cached_chunks"] == 1 and info["server"] == fake.uuid
        s = cm.stats_dict()
        assert s["rpc"]["FS.FetchData"] == 1 and s["validations_slow"] >= 1
        assert s["servers"][fake.uuid]["cb_s_break"] >= 1
        cm.flush_vnode(f)
        assert cm.examine(f)["promise"] == "no_promise" and cm.examine(f)["cached_chunks"] == 0
        cm.flush_volume(root.volume)
        assert root.promise_state(trio.current_time()) == "volume_break"
        vs = await cm.statfs(root)
        assert vs["volume_id"] == VOL
        assert cm.find_vnode("test", Fid(VOL, 999, 9)) is None


async def test_two_servers_are_two_records(tmp_path, autojump_clock):
    async with trio.open_nursery() as nursery:
        from test_cm_fakeserver import Network

        net = Network(nursery)
        net.add(FakeServer())
        other = net.add(FakeServer(uuid="22222222-2222-2222-2222-222222222222",
                                   volumes={VOL + 5: "vol2"}, addr=("fs2", 7000)))  # fmt: skip
        cells = CellDB.from_dict({"cells": {"test": {"vlservers": ["fs1:7000"]},
                                            "two": {"vlservers": ["fs2:7000"]}}})  # fmt: skip
        async with make_cm(net, tmp_path, cells=cells) as cm:
            r1 = await cm.mount_volume("test", "root.cell")
            r2 = await cm.mount_volume("two", "vol2")
            assert len(cm.servers) == 2 and r1.volume.server is not r2.volume.server
            await other.init_state(other.clients[cm.uuid])
            now = trio.current_time()
            assert r1.promise_state(now) == "ok" and r2.promise_state(now) == "server_break"
        nursery.cancel_scope.cancel()


async def test_unstored_chunks_of_a_previous_run_are_never_stored(tmp_path, autojump_clock):
    async with running(tmp_path) as (net, fake, cm):
        n = fake.add(ROOT, b"f", data=b"server data")
        root = await cm.mount_volume("test", "root.cell")
        f = await cm.lookup(root, b"f")
        h = await cm.open(f, flags=2)
        await cm.write(h, 0, b"LOST")
        net.down.add("fs1")
        await net.drop_all()
        await cm.close()  # cannot store: the chunk stays dirty on disk
    assert bytes(n.data) == b"server data"
    async with running(tmp_path, fake) as (_net, fake, cm2):
        assert cm2.datacache.stats()["dirty_chunks"] == 1
        root = await cm2.mount_volume("test", "root.cell")
        f = await cm2.lookup(root, b"f")
        assert cm2.datacache.stats()["dirty_chunks"] == 0
        h = await cm2.open(f)
        assert await cm2.read(h, 0, 100) == b"server data"
        await cm2.release(h)
    assert bytes(n.data) == b"server data" and fake.calls["FS.StoreData"] == 0


async def test_writes_to_a_file_removed_elsewhere_are_dropped(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        fake.add(ROOT, b"f", data=b"x")
        root = await cm.mount_volume("test", "root.cell")
        f = await cm.lookup(root, b"f")
        h = await cm.open(f, flags=2)
        await cm.write(h, 0, b"doomed")
        fid = fake.nodes[ROOT].entries.pop(b"f")  # another client removes it
        del fake.nodes[fid]
        with pytest.raises(RpcError) as e:
            await cm.flush(h)
        assert e.value.errno == errno.ESTALE
        await cm.release(h)  # never raises
        assert f.deleted and f.local_size is None
        assert cm.datacache.dirty_chunks(f.fid) == []


async def test_mounting_again_skips_vl_and_unmount_counts(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        r1 = await cm.mount_volume("test", "root.cell")
        r2 = await cm.mount_volume("test", "root.cell")
        assert r1 is r2 and fake.calls["VL.GetEntryByName"] == 1
        assert r1.volume.mounts == 2
        cm.unmount_volume(r1.volume)
        assert r1.volume.server.interests  # still mounted once
        cm.unmount_volume(r1.volume)
        assert not r1.volume.servers and cm.volumes == {}
        r3 = await cm.mount_volume("test", "root.cell")  # a fresh instance
        assert r3 is not r1 and fake.calls["VL.GetEntryByName"] == 2
        with pytest.raises(RpcError) as e:
            await cm.mount_volume("nocell", "x")
        assert e.value.errno == errno.ENOENT
        with pytest.raises(RpcError) as e:
            await cm.mount_volume("test", "novolume")
        assert e.value.errno == errno.ENOENT


async def test_event_log_lines(tmp_path, autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="afsfuse.events")
    async with running(tmp_path) as (_net, fake, cm):
        n = fake.add(ROOT, b"f")
        root = await cm.mount_volume("test", "root.cell")
        f = await cm.lookup(root, b"f")
        await cm.getattr(f)
        await fake.break_fids([n.fid, Fid(VOL, 0, 0)])
        await fake.init_state(fake.clients[cm.uuid])
    text = caplog.text
    for name in ("validate_fast", "validate_slow", "promise_installed", "break_received",
                 "volume_break", "mass_break"):  # fmt: skip
        assert f"event={name} " in text, name
    # Parsed, not matched as text: the shared writer puts t= after the name.
    lines = [parse(line) for line in caplog.messages]
    assert any(f.get("event") == "break_received" and f.get("fid") == str(n.fid) for f in lines)


async def test_volume_moved_to_another_server_is_found_through_vl(tmp_path, autojump_clock):
    async with trio.open_nursery() as nursery:
        from test_cm_fakeserver import Network

        net = Network(nursery)
        old = net.add(FakeServer())
        new = net.add(FakeServer(uuid="33333333-3333-3333-3333-333333333333", addr=("fs2", 7000)))
        n = old.add(ROOT, b"f", data=b"moved data")
        async with make_cm(net, tmp_path) as cm:
            root = await cm.mount_volume("test", "root.cell")
            f = await cm.lookup(root, b"f")
            rec_old = root.volume.server
            # The volume moves: its vnodes now live on fs2, VL says so.
            new.nodes = {fid: node for fid, node in old.nodes.items()}
            new.next_vnode = old.next_vnode
            old.nodes = {}
            old.vl_moved[VOL] = (new.uuid, new.addr)
            await old.break_fids([Fid(VOL, 0, 0)])
            await trio.sleep(11)
            st = await cm.getattr(f)
            assert st.size == len(n.data) and not f.deleted
            assert root.volume.server.uuid == new.uuid
            assert not rec_old.interests and new.calls["FS.FetchStatus"] == 1
            h = await cm.open(f)
            assert await cm.read(h, 0, 100) == b"moved data"
            await cm.release(h)
        nursery.cancel_scope.cancel()


async def test_tiny_cache_still_reads_and_writes_correctly(tmp_path, autojump_clock):
    data = bytes(range(256)) * 64  # 16 KiB, 4 chunks of 4 KiB
    async with running(tmp_path, cache_bytes=4096) as (_net, fake, cm):
        n = fake.add(ROOT, b"f", data=data)
        root = await cm.mount_volume("test", "root.cell")
        f = await cm.lookup(root, b"f")
        assert await cm.read(f, 0, len(data)) == data  # more than the cache holds
        h = await cm.open(f, flags=2)
        await cm.write(h, 4000, b"XY" * 100)  # straddles chunks 0 and 1
        await cm.release(h)
        assert bytes(n.data) == data[:4000] + b"XY" * 100 + data[4200:]

"""Two cache managers against a real fileserver (in-process, TCP on
127.0.0.1): close-to-open consistency and promise breaks end to end."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from test_cm_fakeserver import until

from afsfuse.cache_manager import CacheConfig, CacheManager
from afsfuse.cells import CellDB
from afsfuse.lab.server import running_server
from fileserver.config import ServerConfig
from fileserver.server import FileServer
from protocol.tls import tcp_connect, tls_connector


def make(tmp_path, name, server, **kw) -> CacheManager:
    cfg = CacheConfig(
        cells=CellDB.single((server.host, server.port), name="localcell"),
        cache_dir=tmp_path / name,
        chunk_size=64 * 1024,
        rpc_timeout=10.0,
        connect_timeout=5.0,
        key=server.auth.key,
        # TLS with the server's own certificate (a client one of its cell CA).
        connector=tls_connector(server.client_tls),
        **kw,
    )
    return CacheManager(cfg)


@asynccontextmanager
async def two_clients(tmp_path) -> AsyncIterator[tuple[Any, ...]]:
    """A real fileserver and two cache managers with root.cell mounted:
    ``(a, a's root, b, b's root)``, all within 30 s."""
    with trio.fail_after(30):
        async with (
            running_server(tmp_path / "fs") as server,
            make(tmp_path, "a", server) as a,
            make(tmp_path, "b", server) as b,
        ):
            ra = await a.mount_volume(None, "root.cell")
            yield a, ra, b, await b.mount_volume(None, "root.cell")


async def test_two_clients_close_to_open_and_breaks(tmp_path):
    with trio.fail_after(30):
        async with running_server(tmp_path / "fs") as server:
            async with make(tmp_path, "a", server) as a, make(tmp_path, "b", server) as b:
                ra = await a.mount_volume(None, "root.cell")
                rb = await b.mount_volume(None, "root.cell")
                # A writes a file and closes it.
                fa = await a.create(ra, b"hello.txt", 0o644)
                h = await a.open(fa, flags=2)
                await a.write(h, 0, b"first version")
                await a.flush(h)
                await a.release(h)
                # B opens it after A's close: it sees A's data.
                fb = await b.lookup(rb, b"hello.txt")
                hb = await b.open(fb)
                assert await b.read(hb, 0, 100) == b"first version"
                await b.release(hb)
                assert fb.promise is not None
                breaks_before = fb.cb_break
                # A changes it again: the server breaks B's promise before
                # answering A's store, so B's next read fetches the new data.
                h = await a.open(fa, flags=2)
                await a.write(h, 0, b"SECOND")
                await a.release(h)
                assert fb.cb_break == breaks_before + 1
                assert fb.promise is None
                assert b.stats.breaks >= 1
                hb = await b.open(fb)
                assert hb.keep_cache is False
                assert await b.read(hb, 0, 100) == b"SECONDversion"
                await b.release(hb)
                # Directory changes reach B the same way.
                await a.unlink(ra, b"hello.txt")
                names = [e.name for e in await b.readdir(rb)]
                assert b"hello.txt" not in names
                assert a.stats.rpc["FS.StoreData"] == 2
            # Each client gave its promises up once, at close.
            assert a.stats.rpc["FS.GiveUpAllCallBacks"] == 1
            assert b.stats.rpc["FS.GiveUpAllCallBacks"] == 1


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def test_server_restart_is_one_cb_s_break_and_loses_nothing(tmp_path):
    port = free_port()
    cfg = ServerConfig(data_dir=tmp_path / "fs", host="127.0.0.1", port=port)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            server = FileServer(cfg)
            await nursery.start(server.serve)
            async with make(tmp_path, "a", server) as a:
                root = await a.mount_volume(None, "root.cell")
                f = await a.create(root, b"kept", 0o644)
                h = await a.open(f, flags=2)
                await a.write(h, 0, b"acknowledged")
                await a.release(h)
                rec = root.volume.server
                s0, epoch0, connects0 = rec.cb_s_break, rec.epoch, rec.connects
                server.stop()  # the server goes away ...
                await until(lambda: rec.conn is None)
                server = FileServer(cfg)  # ... and comes back, new epoch
                await nursery.start(server.serve)
                await until(lambda: rec.connects > connects0 and rec.conn is not None)
                assert rec.epoch != epoch0
                assert rec.cb_s_break > s0  # every promise from it is void, in O(1)
                assert f.promise_state(trio.current_time()) == "server_break"
                h = await a.open(f)
                assert await a.read(h, 0, 100) == b"acknowledged"
                await a.release(h)
                assert f.promise is not None
            server.stop()


async def test_breaks_missed_while_disconnected_arrive_at_reconnect(tmp_path):
    blocked = False

    async def connector(host, port):
        if blocked:
            raise OSError(111, "blocked by the test")
        return await tcp_connect(host, port, server.client_tls)

    with trio.fail_after(30):
        async with running_server(tmp_path / "fs", break_timeout=0.5) as server:
            b_cfg = make(tmp_path, "b", server).config
            b_cfg.connector = connector
            async with make(tmp_path, "a", server) as a, CacheManager(b_cfg) as b:
                ra = await a.mount_volume(None, "root.cell")
                rb = await b.mount_volume(None, "root.cell")
                fa = await a.create(ra, b"f", 0o644)
                fb = await b.lookup(rb, b"f")
                hb = await b.open(fb)
                assert await b.read(hb, 0, 100) == b""
                await b.release(hb)
                rec = rb.volume.server
                blocked = True
                await rec.conn.aclose()  # B drops off the network
                await until(lambda: rec.conn is None)
                h = await a.open(fa, flags=2)
                await a.write(h, 0, b"changed while B was away")
                await a.release(h)  # the server keeps B's break as delayed
                assert fb.promise is not None  # B has not heard of it yet
                blocked = False
                await until(lambda: rec.conn is not None)
                # Delivered before the Hello reply: broken by the time we are back.
                assert fb.promise_state(trio.current_time()) != "ok"
                hb = await b.open(fb)
                assert await b.read(hb, 0, 100) == b"changed while B was away"
                await b.release(hb)


async def test_large_chunk_io_runs_off_the_trio_thread_and_stays_exact(tmp_path):
    """Big reads and store payloads from the disk cache go through worker
    threads (no memory layer here: with one, they come from memory); the
    bytes a second client reads are exactly the ones written."""
    data = bytes(range(256)) * 4096  # 1 MiB, 16 chunks of 64 KiB
    with trio.fail_after(60):
        async with (
            running_server(tmp_path / "fs") as server,
            make(tmp_path, "a", server, cache_mem_bytes=0) as a,
            make(tmp_path, "b", server, cache_mem_bytes=0) as b,
        ):
            ra = await a.mount_volume(None, "root.cell")
            rb = await b.mount_volume(None, "root.cell")
            fa = await a.create(ra, b"big", 0o644)
            h = await a.open(fa, flags=2)
            for off in range(0, len(data), 200_000):
                await a.write(h, off, data[off : off + 200_000])
            await a.release(h)  # the store reads its payload on a thread
            assert a.stats.chunk_io_threaded >= 1
            fb = await b.lookup(rb, b"big")
            hb = await b.open(fb)
            got = b""
            while len(got) < len(data):
                piece = await b.read(hb, len(got), 128 * 1024)
                assert piece
                got += piece
            await b.release(hb)
            assert got == data
            threaded = b.stats.chunk_io_threaded
            assert threaded >= 1
            # A warm reread of the same range comes from the cache, exactly.
            assert await b.read(fb, 300_000, 100_000) == data[300_000:400_000]
            assert b.stats.chunk_io_threaded == threaded + 1


def _drain(cm: CacheManager) -> list[Any]:
    return [cm.invalidations.get_nowait() for _ in range(len(cm.invalidations))]


async def test_own_removal_leaves_the_kernel_alone_and_a_break_still_reaches_others(tmp_path):
    """The client that removed a file's last name tells its kernel nothing
    more (the kernel did the unlink itself); a client that merely cached the
    file hears of it through the break and invalidates its kernel's inode."""
    async with two_clients(tmp_path) as (a, ra, b, rb):
        f1 = await a.create(ra, b"f1", 0o644)
        f2 = await a.create(ra, b"f2", 0o644)
        await a.link(f2, ra, b"h")
        d = await a.mkdir(ra, b"d", 0o755)
        b_f1 = await b.lookup(rb, b"f1")
        assert (await b.getattr(b_f1)).nlink == 1  # B holds a promise on it
        _drain(a)
        _drain(b)
        await a.unlink(ra, b"f1")
        await a.rmdir(ra, b"d")
        await a.unlink(ra, b"f2")  # "h" still names it: not a removal
        assert f1.deleted and d.deleted and not f2.deleted
        assert a.stats.kernel_notify_skipped == 2
        gone = [ev.vnode for ev in _drain(a) if ev.kind == "inode"]
        assert f1 not in gone and d not in gone
        assert (await a.getattr(await a.lookup(ra, b"h"))).nlink == 1
        # B's promise on f1 was broken before A's unlink returned.
        await until(lambda: any(ev.kind == "inode" and ev.vnode is b_f1 for ev in _drain(b)))
        assert b.stats.kernel_notify_skipped == 0

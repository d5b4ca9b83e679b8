"""Limits on what one peer may cost: each violation gets a clear error (or
the connection is dropped, for stalls), a log line, and nothing else is
affected: another client keeps working throughout."""

from __future__ import annotations

import logging

import msgpack
import pytest
import trio

from afsfuse.lab.server import fs_client, running_server, tls_for
from protocol.connection import ConnectionLost
from protocol.errors import RpcError
from protocol.tls import tcp_connect


async def expect(code: str, coro: object) -> None:
    with pytest.raises(RpcError) as ei:
        await coro  # type: ignore[misc]
    assert ei.value.code == code, ei.value


async def still_serves(srv) -> None:
    async with fs_client(srv.host, srv.port) as c:
        root = await c.root_fid()
        assert (await c.call("FS.FetchStatus", None, root, timeout=10))["status"][0] == 2


async def test_size_limits(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    limits = {"max_name": 10, "max_dir_entries": 3, "max_file_size": 1000}
    async with running_server(tmp_path / "fs", **limits) as srv, fs_client(srv.host, srv.port) as c:
        root = await c.root_fid()
        d = (await c.call("FS.MakeDir", None, root, b"d", 0o777))["fid"]
        await expect("ENAMETOOLONG", c.call("FS.CreateFile", None, d, b"x" * 11, 0o644))
        await expect("EINVAL", c.call("FS.CreateFile", None, d, b"a/b", 0o644))
        await expect("EINVAL", c.call("FS.CreateFile", None, d, b"a\0b", 0o644))
        fids = [
            (await c.call("FS.CreateFile", None, d, b"f%d" % i, 0o644))["fid"] for i in range(3)
        ]
        await expect("ENOSPC", c.call("FS.CreateFile", None, d, b"f3", 0o644))
        await expect("ENOSPC", c.call("FS.MakeDir", None, d, b"f3", 0o755))
        await expect("ENOSPC", c.call("FS.Link", None, d, b"f3", fids[0]))
        await c.call("FS.RemoveFile", None, d, b"f2")
        await c.call("FS.CreateFile", None, d, b"f3", 0o644)  # room again
        f = fids[0]
        await c.call("FS.StoreData", None, f, 0, b"x" * 1000, None, None)
        await expect("EFBIG", c.call("FS.StoreData", None, f, 990, b"x" * 11, None, None))
        await expect("EFBIG", c.call("FS.StoreData", None, f, 0, b"", 1001, None))
        await expect("EFBIG", c.call("FS.StoreStatus", None, f, {"size": 1001}))
        assert (await c.call("FS.FetchStatus", None, f))["status"][3] == 1000
        await still_serves(srv)
    text = caplog.text
    assert "ENAMETOOLONG" in text and "ENOSPC" in text and "EFBIG" in text


async def test_frame_and_calls_in_flight(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    async with (
        running_server(tmp_path / "fs", max_frame=64 * 1024, max_calls_in_flight=4) as srv,
        fs_client(srv.host, srv.port) as bystander,
    ):
        root = await bystander.root_fid()
        async with fs_client(srv.host, srv.port) as c:
            f = (await c.call("FS.CreateFile", None, root, b"f", 0o644))["fid"]
            await expect("EMSGSIZE", c.call("FS.StoreData", None, f, 0, b"x" * 70_000, None, None))
            with trio.fail_after(5):
                await c.conn.wait_closed()
        assert "frame over" in caplog.text
        # A burst of 40 calls on one connection: 4 run, the rest get EAGAIN.
        async with fs_client(srv.host, srv.port) as c:
            codes: list[str | None] = []

            async def one() -> None:
                try:
                    await c.call("FS.FetchData", None, f, 0, 10)
                    codes.append(None)
                except RpcError as exc:
                    codes.append(exc.code)

            async with trio.open_nursery() as n:
                for _ in range(40):
                    n.start_soon(one)
            assert codes.count("EAGAIN") > 0 and codes.count(None) >= 4
            assert set(codes) <= {None, "EAGAIN"}
            assert (await c.call("FS.FetchStatus", None, f))["status"][0] == 1
        assert "calls in flight" in caplog.text
        # The bystander never noticed.
        assert (await bystander.call("FS.FetchStatus", None, root))["status"][0] == 2


async def test_connection_limits(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    async with running_server(tmp_path / "fs", max_connections_per_peer=2) as srv:
        async with fs_client(srv.host, srv.port) as a, fs_client(srv.host, srv.port) as b:
            async with fs_client(srv.host, srv.port, auth=False, hello=False) as c:
                await expect("EAGAIN", c.call("VL.ListEntries"))
                with trio.fail_after(5):
                    await c.conn.wait_closed()
            assert "connection refused" in caplog.text
            root = await a.root_fid()
            await b.call("FS.FetchStatus", None, root)
        await still_serves(srv)  # the slots were given back
    async with (
        running_server(tmp_path / "fs", max_connections=1) as srv,
        fs_client(srv.host, srv.port) as a,
    ):
        async with fs_client(srv.host, srv.port, auth=False, hello=False) as c:
            await expect("EAGAIN", c.call("VL.ListEntries"))
        await a.call("FS.FetchStatus", None, await a.root_fid())


async def test_idle_and_stalled_frames_are_dropped(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    async with running_server(tmp_path / "fs", idle_timeout=1.5, frame_timeout=0.3) as srv:
        async with fs_client(srv.host, srv.port) as c:
            with trio.fail_after(5):
                await c.conn.wait_closed()  # said nothing for 1.5 s
            with pytest.raises(ConnectionLost):
                await c.call("FS.GetCapabilities")
            assert srv.breaker.clients[c.uuid].down  # its session ended
        # Half a frame, then silence (but the TCP connection stays open).
        with trio.fail_after(5):
            s = await tcp_connect(srv.host, srv.port, tls_for(srv.host, srv.port))
            frame = msgpack.packb([0, 1, "VL.ListEntries", []])
            await s.send_all(frame[:5])
            t0 = trio.current_time()
            assert await s.receive_some(100) == b""
            assert trio.current_time() - t0 < 1.2  # the frame bound, not the idle one
            await s.aclose()
        assert "partial message stalled" in caplog.text
        # A client that keeps talking stays.
        async with fs_client(srv.host, srv.port) as c:
            for _ in range(10):
                await trio.sleep(0.25)
                await c.call("FS.GetCapabilities")
            assert not c.conn.closed

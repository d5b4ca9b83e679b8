"""Who may connect: the cell key handshake and the gate, against a real server.

Unauthenticated, wrong-key, replayed and pre-handshake attempts each get one
EACCES and lose the connection, and nothing they sent reaches a handler;
admin calls are refused on a client connection; a client refuses a server
that does not know the key; VL lookups stay readable without a key.
"""

from __future__ import annotations

import os
import stat
from functools import partial
from typing import Any

import msgpack
import pytest
import trio

from afsfuse.cache_manager import CacheConfig, CacheManager
from afsfuse.cells import CellDB
from afsfuse.lab.server import ServerProcess, fs_client, running_server, tls_for
from afsfuse.server_record import ServerRecord
from afsfuse.stats import Stats
from fileserver.admin import ADMIN_AUTH
from protocol.auth import (
    AUTH_CHALLENGE,
    AUTH_PROVE,
    KEY_FILE,
    client_handshake,
    new_nonce,
    proof,
)
from protocol.connection import Connection, ConnectionLost, open_connection
from protocol.errors import RpcError
from protocol.tls import tcp_connect, tls_connector

HELLO = {"uuid": "6f0e5a4e-1f6a-4b7e-9d35-0c1d2e3f4a5b", "version": 1, "capabilities": []}


async def refused(conn: Connection, method: str, *params: object) -> None:
    """One EACCES, then the connection is gone."""
    with pytest.raises(RpcError) as ei:
        await conn.call(method, *params, timeout=10)
    assert ei.value.code == "EACCES", ei.value
    with trio.fail_after(5):
        await conn.wait_closed()
    with pytest.raises(ConnectionLost):
        await conn.call("VL.ListEntries", timeout=5)


def rpcs(srv) -> dict[str, int]:
    return srv.stats()["rpcs"]


async def tls_stream(srv: Any) -> trio.abc.Stream:
    """A raw byte stream to ``srv`` inside TLS (with the lab's client bundle)."""
    return await tcp_connect(srv.host, srv.port, tls_for(srv.host, srv.port))


async def test_key_file_created_private(tmp_path):
    async with running_server(tmp_path / "fs") as srv:
        path = tmp_path / "fs" / KEY_FILE
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert len(srv.auth.key) == 32
    # Kept across restarts.
    async with running_server(tmp_path / "fs") as srv2:
        assert srv2.auth.key == srv.auth.key


async def test_calls_before_the_handshake_are_refused(tmp_path):
    async with running_server(tmp_path / "fs") as srv:
        root = None
        for method, params in [
            ("FS.Hello", (HELLO,)),
            ("FS.FetchStatus", (None, [1, 1, 1])),
            ("CB.CallBack", ([],)),
            ("VL.RegisterServer", ("x", [], [])),
            ("No.Such", ()),
        ]:
            async with fs_client(srv.host, srv.port, auth=False, hello=False) as c:
                if root is None:
                    root = await c.root_fid()  # VL lookups need no key
                await refused(c.conn, method, *params)
        assert rpcs(srv).get("FS.Hello", 0) == 0 and rpcs(srv).get("FS.FetchStatus", 0) == 0
        assert srv.breaker.clients == {}
        # A client that authenticated is served.
        async with fs_client(srv.host, srv.port) as c:
            assert (await c.call("FS.FetchStatus", None, root))["status"][0] == 2


async def test_wrong_key_is_refused(tmp_path):
    async with running_server(tmp_path / "fs") as srv:
        async with fs_client(srv.host, srv.port, auth=False, hello=False) as c:
            # The client notices first: the server's proof does not match its key.
            with pytest.raises(RpcError) as ei:
                await client_handshake(c.conn, b"k" * 32, timeout=10)
            assert ei.value.code == "EACCES"
        async with fs_client(srv.host, srv.port, auth=False, hello=False) as c:
            # A client that ignores the server's proof and sends a bad one.
            cn = new_nonce()
            r = await c.call(AUTH_CHALLENGE, cn)
            await refused(c.conn, AUTH_PROVE, proof(b"k" * 32, "client", r["nonce"], cn))
        async with fs_client(srv.host, srv.port, auth=False, hello=False) as c:
            await refused(c.conn, AUTH_PROVE, b"\0" * 32)  # no challenge first
        async with fs_client(srv.host, srv.port, auth=False, hello=False) as c:
            await refused(c.conn, AUTH_CHALLENGE, b"short")
        assert srv.breaker.clients == {}


async def test_replayed_handshake_fails(tmp_path):
    async with running_server(tmp_path / "fs") as srv:
        key = srv.auth.key
        cn = new_nonce()
        # An eavesdropper records a good handshake...
        async with fs_client(srv.host, srv.port, auth=False, hello=False) as c:
            r = await c.call(AUTH_CHALLENGE, cn)
            recorded = proof(key, "client", r["nonce"], cn)
            await c.call(AUTH_PROVE, recorded)
            await c.say_hello()
        # ...and replays it, same client nonce and all: the server's nonce is new.
        async with fs_client(srv.host, srv.port, auth=False, hello=False) as c:
            r2 = await c.call(AUTH_CHALLENGE, cn)
            assert r2["nonce"] != r["nonce"]
            await refused(c.conn, AUTH_PROVE, recorded)
        # A second challenge on one connection is refused too.
        async with fs_client(srv.host, srv.port, auth=False, hello=False) as c:
            await c.call(AUTH_CHALLENGE, new_nonce())
            await refused(c.conn, AUTH_CHALLENGE, new_nonce())


async def test_raw_bytes_and_silence_before_handshake(tmp_path):
    async with running_server(tmp_path / "fs", handshake_timeout=0.5) as srv:
        # A peer that says nothing is dropped after the handshake timeout,
        # before TLS (no ClientHello) and inside it.
        with trio.fail_after(5):
            s = await trio.open_tcp_stream(srv.host, srv.port)
            assert await s.receive_some(100) == b""
            await s.aclose()
        with trio.fail_after(5):
            s = await tls_stream(srv)
            assert await s.receive_some(100) == b""
            await s.aclose()
        # A notification before the handshake closes the connection, no reply.
        with trio.fail_after(5):
            s = await tls_stream(srv)
            await s.send_all(msgpack.packb([2, "FS.GiveUpAllCallBacks", []]))
            assert await s.receive_some(100) == b""
            await s.aclose()
        # A request: exactly one EACCES reply, then EOF.
        with trio.fail_after(5):
            s = await tls_stream(srv)
            await s.send_all(msgpack.packb([0, 7, "FS.GetCapabilities", []]))
            data = b""
            while True:
                chunk = await s.receive_some(1000)
                if not chunk:
                    break
                data += chunk
            await s.aclose()
        msg = msgpack.unpackb(data)
        assert msg[0] == 1 and msg[1] == 7 and msg[2][0] == "EACCES"
        assert rpcs(srv).get("FS.GetCapabilities", 0) == 0


async def test_admin_refused_on_client_connection_and_vice_versa(tmp_path):
    async with running_server(tmp_path / "fs") as srv, fs_client(srv.host, srv.port) as c:
        with pytest.raises(RpcError) as ei:
            await c.call(ADMIN_AUTH, srv.admin_secret)
        assert ei.value.code == "EPERM"
        with pytest.raises(RpcError) as ei:
            await c.call("Admin.Clients")
        assert ei.value.code == "EACCES"
        async with open_connection(srv.host, srv.port, tls=tls_for(srv.host, srv.port)) as adm:
            await adm.call(ADMIN_AUTH, srv.admin_secret)
            with pytest.raises(RpcError) as ei:
                await adm.call("FS.Hello", HELLO)
            assert ei.value.code == "EPERM"
            # The cell key does not open admin calls, nor the admin secret FS calls.
            with pytest.raises(RpcError) as ei:
                await adm.call("FS.FetchStatus", None, [1, 1, 1])
            assert ei.value.code == "EPROTO"


async def test_vl_registration_needs_the_key(tmp_path):
    async with running_server(tmp_path / "vl") as vl:
        async with fs_client(vl.host, vl.port, auth=False, hello=False) as c:
            assert [e["name"] for e in await c.call("VL.ListEntries")] == ["root.cell"]
            await refused(c.conn, "VL.RegisterServer", "x", [["127.0.0.1", 1]], [[9, "evil"]])
        assert [e["name"] for e in await vl.vl.list_entries(None)] == ["root.cell"]


async def test_cache_manager_refuses_a_server_with_another_key(tmp_path):
    async with running_server(tmp_path / "fs") as srv:
        cfg = CacheConfig(
            cells=CellDB.single((srv.host, srv.port), name="localcell"),
            cache_dir=tmp_path / "c",
            key=os.urandom(32),
            connector=tls_connector(tls_for(srv.host, srv.port)),
            rpc_timeout=5.0,
            connect_timeout=2.0,
        )
        async with CacheManager(cfg) as cm:
            with pytest.raises(RpcError) as ei:
                await cm.mount_volume(None, "root.cell")
            assert ei.value.code in ("ENOTCONN", "EACCES")
            rec = next(iter(cm.servers.values()))
            assert "EACCES" in rec.last_error
        # The server never saw a Hello from it.
        assert srv.breaker.clients == {}


async def test_client_gate_refuses_callbacks_before_server_proof(tmp_path):
    """A fake 'server' that calls CB.* on the client before proving the key."""
    got: list[str] = []
    closed = trio.Event()
    key = os.urandom(32)

    async def never_answer(conn: Connection, nonce: bytes) -> None:
        await trio.sleep_forever()

    async def fake_server(stream: trio.SocketStream) -> None:
        conn = Connection(stream, {AUTH_CHALLENGE: never_answer})
        async with trio.open_nursery() as n:
            await n.start(conn.run)
            try:
                await conn.call("CB.InitCallBackState3", "x", timeout=5)
            except RpcError as exc:
                got.append(exc.code)
            await conn.wait_closed()
            closed.set()
            n.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, fake_server, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        cfg = CacheConfig(
            cells=CellDB.single(("127.0.0.1", port)),
            cache_dir=tmp_path / "c",
            key=key,
            rpc_timeout=3.0,
            connect_timeout=1.0,
        )
        inits: list[str] = []
        rec = ServerRecord(
            "00000000-0000-4000-8000-000000000000",
            [("127.0.0.1", port)],
            client_uuid="00000000-0000-4000-8000-000000000001",
            connector=cfg.connector,
            handlers=lambda r: {"CB.InitCallBackState3": lambda c, u: inits.append(u)},
            stats=Stats(),
            rpc_timeout=3.0,
            connect_timeout=1.0,
            key=key,
        )
        nursery.start_soon(rec.run)
        with trio.fail_after(10):
            await closed.wait()
        await rec.destroy()
        nursery.cancel_scope.cancel()
    assert got[0] == "EACCES" and inits == []


def test_mount_with_wrong_key_fails(tmp_path, require_fuse):
    import subprocess
    import sys

    from afsfuse.lab.server import REPO

    bad = tmp_path / "bad.key"
    bad.write_text(os.urandom(32).hex())
    bad.chmod(0o600)
    with ServerProcess(tmp_path / "fs") as srv:
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        res = subprocess.run(
            [sys.executable, "-m", "afsfuse.cli", "mount", f"{srv.host}:{srv.port}", str(mnt),
             "--cache-dir", str(tmp_path / "c"), "--key-file", str(bad), "--rpc-timeout", "3"],
            capture_output=True, text=True, cwd=REPO, timeout=120,
        )  # fmt: skip
        try:
            assert res.returncode != 0
            assert not os.path.ismount(mnt)
        finally:
            if os.path.ismount(mnt):
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], timeout=30)
        print(res.stderr)
        assert "mount failed" in res.stderr
        daemon_log = (tmp_path / "c" / "daemon.log").read_text()
        assert "server failed to prove the cell key" in daemon_log

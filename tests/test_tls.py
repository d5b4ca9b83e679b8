"""Mutual TLS bound to the cell (issue 17, SECURITY.md "TLS").

What a network peer sees and can do: a capture of a mount's traffic holds
no file content (and does with --insecure, so the check can fail); one
flipped byte kills the connection and nothing reaches the volume.  What a
client needs: a certificate of the cell's CA, not expired, not revoked
(refused with a clear error at mount, and a revocation closes live
sessions); plaintext and TLS peers are told apart with a clear error.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest
import trio
import trio.testing

from afsfuse.lab.mount import ClientMount
from afsfuse.lab.server import (
    REPO,
    ServerProcess,
    fs_client,
    issue_bundle,
    key_for,
    running_server,
    tls_for,
    wait_until,
)
from protocol.connection import ConnectionLost, open_connection
from protocol.errors import RpcError
from protocol.tls import (
    CellCA,
    TLSRefused,
    client_context,
    read_bundle,
    revoke,
    server_context,
    wrap_client,
)

MARKER = b"TLS-MARKER-7c1f3a-plaintext-file-content-"


class Proxy:
    """A TCP relay on 127.0.0.1 that keeps every byte it relays and can flip
    one byte of the next large client-to-server chunk."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.target: tuple[str, int] | None = None
        self.captured = bytearray()
        self.tampered = 0
        self._arm = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    def start(self, target: tuple[str, int]) -> Proxy:
        self.target = target
        self._spawn(self._accept)
        return self

    def arm(self) -> None:
        self._arm = True

    def _spawn(self, fn, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                down, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            assert self.target is not None
            up = socket.create_connection(self.target)
            self._socks += [down, up]
            self._spawn(self._relay, down, up, True)
            self._spawn(self._relay, up, down, False)

    def _relay(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if upstream and self._arm and len(data) > 1000:
                    self._arm = False
                    data = bytearray(data)
                    data[len(data) // 2] ^= 0x01
                    self.tampered += 1
                with self._lock:
                    self.captured += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        for s in self._socks:
            s.close()
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def via(proxy: Proxy, srv: ServerProcess) -> types.SimpleNamespace:
    """What ClientMount needs to mount ``srv`` through ``proxy``."""
    return types.SimpleNamespace(host="127.0.0.1", port=proxy.port, key_file=srv.key_file,
                                 cert_file=srv.cert_file, insecure=srv.insecure,
                                 data_dir=srv.data_dir)  # fmt: skip


def capture_of_a_write(tmp_path: Path, insecure: bool) -> tuple[bytes, bytes]:
    """Write a marker file through a mount whose every connection (VL and
    fileserver: the server advertises the proxy) crosses the proxy."""
    content = MARKER * 200
    with Proxy() as proxy:
        extra = ["--advertise", f"127.0.0.1:{proxy.port}"] + (["--insecure"] if insecure else [])
        with ServerProcess(tmp_path / "fs", extra_args=extra) as srv:
            proxy.start(srv.address)
            with ClientMount(via(proxy, srv), tmp_path / "a") as a:
                (a.mnt / "f").write_bytes(content)  # stored at close
                with open(a.mnt / "f", "rb") as f:
                    os.fsync(f.fileno())
            with ClientMount(srv, tmp_path / "b") as b:  # directly: it did land
                assert (b.mnt / "f").read_bytes() == content
        return bytes(proxy.captured), content


def test_a_capture_shows_no_file_content(tmp_path, require_fuse):
    captured, content = capture_of_a_write(tmp_path / "tls", insecure=False)
    assert len(captured) > len(content)  # the data did cross the proxy
    assert MARKER not in captured and MARKER[:16] not in captured
    # The same run in plaintext shows it: the check above can fail.
    captured, _ = capture_of_a_write(tmp_path / "plain", insecure=True)
    assert MARKER in captured


async def test_a_tampered_record_kills_the_connection_and_nothing_lands(tmp_path):
    async with running_server(tmp_path / "fs") as srv:
        with Proxy() as proxy:
            proxy.start((srv.host, srv.port))
            key, tls = key_for(srv.host, srv.port), tls_for(srv.host, srv.port)
            async with fs_client("127.0.0.1", proxy.port, key=key, tls=tls) as c:
                root = await c.root_fid()
                r = await c.call("FS.CreateFile", None, root, b"f", 0o644)
                fid = r["fid"]
                stores = srv.metrics.rpcs["FS.StoreData"]
                proxy.arm()
                with pytest.raises(ConnectionLost):
                    await c.call("FS.StoreData", None, fid, 0, MARKER * 100, None, None)
                assert proxy.tampered == 1
                with trio.fail_after(10):
                    await c.conn.wait_closed()
        assert srv.metrics.rpcs["FS.StoreData"] == stores  # no handler ran
        async with fs_client(srv.host, srv.port) as d:
            f = await d.call("FS.FetchData", None, fid, 0, 100_000)
            assert f["data"] == b"" and f["status"][4] == r["status"][4]


async def test_plaintext_and_tls_peers_get_a_clear_error(tmp_path):
    async with running_server(tmp_path / "tls") as srv:
        async with open_connection(srv.host, srv.port) as conn:  # plaintext
            with pytest.raises(RpcError) as ei:
                await conn.call("VL.ListEntries")
        assert ei.value.code == "EPROTO" and "requires TLS" in ei.value.message
        ctx = tls_for(srv.host, srv.port)
    async with running_server(tmp_path / "plain", insecure=True) as srv:
        with pytest.raises(TLSRefused) as ei:
            async with open_connection(srv.host, srv.port, tls=ctx):
                pass
        assert "--insecure" in ei.value.message
        async with fs_client(srv.host, srv.port) as c:  # the lab knows: plaintext
            assert await c.call("VL.ListEntries")


async def test_server_refuses_expired_revoked_and_foreign_certificates(tmp_path):
    async with running_server(tmp_path / "fs") as srv:
        ca_file = srv.config.ca_file
        # Expired: the client's own check says so first; past it, the server does.
        old = issue_bundle(ca_file, tmp_path / "old.pem", days=-1 / 1440)
        with pytest.raises(TLSRefused, match="expired"):
            client_context(old)
        async with open_connection(
            srv.host, srv.port, tls=client_context(old, check_expiry=False)
        ) as conn:
            with pytest.raises(RpcError) as ei:
                await conn.call("VL.ListEntries")
        assert ei.value.code == "EACCES" and "expired" in ei.value.message
        # Another cell's bundle: the server is not of its CA.
        other = CellCA.create(tmp_path / "other-ca.pem", "other")
        foreign = tmp_path / "foreign.pem"
        from protocol.tls import write_client_bundle

        write_client_bundle(other, foreign)
        with pytest.raises(TLSRefused, match="not from this cell's CA"):
            async with open_connection(srv.host, srv.port, tls=client_context(foreign)):
                pass
        # Revoked while connected: the live session is closed, a new one refused.
        good = issue_bundle(ca_file, tmp_path / "good.pem")
        async with fs_client(srv.host, srv.port, tls=client_context(good)) as c:
            assert await c.call("VL.ListEntries")
            assert revoke(CellCA.load(ca_file).revoked_file, read_bundle(good).serial)
            with trio.fail_after(10):
                await c.conn.wait_closed()
        async with open_connection(srv.host, srv.port, tls=client_context(good)) as conn:
            with pytest.raises(RpcError) as ei:
                await conn.call("VL.ListEntries")
        assert ei.value.code == "EACCES" and "revoked" in ei.value.message
        # Others are unaffected.
        async with fs_client(srv.host, srv.port) as c:
            assert await c.call("VL.ListEntries")


async def test_a_client_certificate_cannot_serve(tmp_path):
    """Client certificates lack the serverAuth purpose: a client bundle holder
    cannot pose as a fileserver of the cell."""
    ca = CellCA.create(tmp_path / "ca.pem", "c")
    bundle = issue_bundle(ca.path, tmp_path / "client.pem")
    assert stat.S_IMODE(os.stat(bundle).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(ca.path).st_mode) == 0o600
    a, b = trio.testing.memory_stream_pair()
    rogue = trio.SSLStream(b, server_context(bundle, ca), server_side=True)
    async with trio.open_nursery() as n:

        async def serve() -> None:
            try:
                await rogue.do_handshake()
            except trio.BrokenResourceError:
                pass

        n.start_soon(serve)
        with pytest.raises(TLSRefused, match="not from this cell's CA"):
            await wrap_client(a, client_context(bundle), "rogue")


def mount_cli(srv: ServerProcess, tmp_path: Path, name: str, *args: str):
    mnt = tmp_path / name
    mnt.mkdir()
    res = subprocess.run(
        [sys.executable, "-m", "afsfuse.cli", "mount", f"{srv.host}:{srv.port}", str(mnt),
         "--cache-dir", str(tmp_path / f"{name}.cache"), "--key-file", str(srv.key_file),
         "--rpc-timeout", "5", *args],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    if os.path.ismount(mnt):
        subprocess.run(["fusermount3", "-u", str(mnt)], timeout=30)
        pytest.fail(f"mounted with {args}")
    return res


def test_mount_refuses_wrong_cell_expired_and_revoked(tmp_path, require_fuse):
    with ServerProcess(tmp_path / "fs") as srv:
        ca_file = srv.data_dir / "cell-ca.pem"
        CellCA.create(tmp_path / "other-ca.pem", "other")
        foreign = issue_bundle(tmp_path / "other-ca.pem", tmp_path / "foreign.pem")
        expired = issue_bundle(ca_file, tmp_path / "expired.pem", days=-1 / 1440)
        revoked = issue_bundle(ca_file, tmp_path / "revoked.pem")
        out = subprocess.run(
            [sys.executable, "-m", "fileserver.cli", "revoke-client-cert", "--data-dir",
             str(srv.data_dir), f"{read_bundle(revoked).serial:x}"],
            capture_output=True, text=True, cwd=REPO, timeout=60, check=True,
        )  # fmt: skip
        assert "revoked" in out.stdout
        for name, args, says in [
            ("foreign", ["--cert", str(foreign)], "not from this cell's CA"),
            ("expired", ["--cert", str(expired)], "expired on"),
            ("revoked", ["--cert", str(revoked)], "is revoked"),
            ("insecure", ["--insecure"], "requires TLS"),
        ]:
            res = mount_cli(srv, tmp_path, name, *args)
            assert res.returncode != 0, (name, res.stdout, res.stderr)
            assert says in res.stderr, (name, res.stderr)
        # The lab's own bundle still mounts (nothing above broke the server).
        with ClientMount(srv, tmp_path / "ok") as ok:
            assert (ok.mnt).is_dir() and os.listdir(ok.mnt) == []


async def test_a_server_of_another_ca_cannot_register_with_the_vl(tmp_path):
    """The cell key alone is not enough: a second server needs the cell CA."""
    async with running_server(tmp_path / "vl") as vl:
        key = vl.config.key_file
        async with running_server(
            tmp_path / "fs2", vl=(vl.host, vl.port), key_file=key, ca_file=tmp_path / "own-ca.pem"
        ) as fs2:
            await fs2.store.create("vol2")
            await wait_until(lambda: "not from this cell's CA" in fs2.registrar.last_error, 10)
            assert not fs2.registrar.registered.is_set()
        assert "vol2" not in [e["name"] for e in await vl.vl.list_entries(None)]


def test_bench_crypto_floor_runs_records_through_the_production_contexts(tmp_path: Path) -> None:
    """``make bench``'s TLS floor: a real TLS 1.3 session between the server
    and client contexts, every record decrypted (a failed one would raise)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import bench_tls

    f = bench_tls.crypto_floor(tmp_path, mib=4)
    tls13 = {"TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256", "TLS_CHACHA20_POLY1305_SHA256"}
    assert f["cipher"] in tls13
    assert f["encrypt_ms_per_mib"] > 0 and f["decrypt_ms_per_mib"] > 0

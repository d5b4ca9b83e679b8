"""Crash safety: a SIGKILLed server loses no acknowledged store; salvage is clean."""

from __future__ import annotations

import sqlite3

import trio

from afsfuse.lab.server import ServerProcess, fs_client
from fileserver.cli import main as cli_main
from fileserver.salvage import salvage
from protocol.errors import RpcError


def _expected_after(old: bytes, offset: int, data: bytes, new_length: int | None) -> bytes:
    buf = bytearray(old)
    if len(buf) < offset + len(data):
        buf.extend(bytes(offset + len(data) - len(buf)))
    buf[offset : offset + len(data)] = data
    if new_length is not None:
        buf = buf[:new_length] + bytes(max(0, new_length - len(buf)))
    return bytes(buf)


async def test_sigkill_after_acknowledged_stores(tmp_path):
    data_dir = tmp_path / "fs"
    srv = ServerProcess(data_dir)
    srv.start()
    acked: dict[bytes, bytes] = {}
    in_flight: dict[bytes, bytes] = {}  # not acknowledged: old or new content both fine
    fids: dict[bytes, list[int]] = {}
    try:
        async with fs_client(srv.host, srv.port) as c:
            root = await c.root_fid()
            d = (await c.call("FS.MakeDir", None, root, b"dir", 0o755))["fid"]
            for i in range(20):
                name = b"file%02d" % i
                fid = (await c.call("FS.CreateFile", None, d, name, 0o644))["fid"]
                fids[name] = fid
                content = b""
                # whole writes, partial overwrites, extension, truncation
                last = (0, b"", 3000 + i) if i % 3 == 0 else (10, b"x", None)
                steps = [(0, bytes([65 + i]) * (1000 * i + 1), None), (i * 7, b"PATCH", None),
                         (5000, b"tail", None), last]  # fmt: skip
                for off, data, nl in steps:
                    await c.call("FS.StoreData", None, fid, off, data, nl, None)
                    content = _expected_after(content, off, data, nl)
                acked[name] = content
            await c.call("FS.RemoveFile", None, d, b"file00")
            del acked[b"file00"]
            await c.call("FS.Rename", None, d, b"file01", root, b"moved", 0)
            acked[b"moved"] = acked.pop(b"file01")

            async def store_one(j: int) -> None:
                name = b"file%02d" % (2 + j)
                data = bytes([97 + j]) * 200_000
                in_flight[name] = _expected_after(acked[name], 0, data, None)
                try:
                    await c.call("FS.StoreData", None, fids[name], 0, data, None, None)
                except RpcError:
                    return  # in flight when the server died: either outcome is fine
                acked[name] = in_flight.pop(name)

            async with trio.open_nursery() as nursery:
                for j in range(15):
                    nursery.start_soon(store_one, j)
                await trio.sleep(0.02)
                await trio.to_thread.run_sync(srv.kill)
    finally:
        srv.kill()

    srv.start()
    try:
        async with fs_client(srv.host, srv.port) as c:
            root = await c.root_fid()
            d = (await c.call("FS.Lookup", None, root, b"dir"))["fid"]
            for name, content in acked.items():
                parent = root if name == b"moved" else d
                r = await c.call("FS.Lookup", None, parent, name)
                size = r["status"][3]
                got = b""
                while len(got) < size:
                    chunk = (await c.call("FS.FetchData", None, r["fid"], len(got), 65536))["data"]
                    assert chunk
                    got += chunk
                assert got == content or got == in_flight.get(name), name
            try:
                await c.call("FS.Lookup", None, d, b"file00")
            except RpcError as exc:
                assert exc.code == "ENOENT"
            else:
                raise AssertionError("removed file came back")
    finally:
        assert srv.stop() == 0
    assert salvage(data_dir) == []
    assert cli_main(["salvage", "--data-dir", str(data_dir)]) == 0


def test_salvage_finds_and_repairs(tmp_path):
    data_dir = tmp_path / "fs"
    with ServerProcess(data_dir):
        pass
    assert salvage(data_dir) == []
    vol_dir = next((data_dir / "volumes").iterdir())
    (vol_dir / "data" / "999.999").write_bytes(b"orphan")
    db = sqlite3.connect(vol_dir / "volume.db")
    db.execute("INSERT INTO dirents (dir, name, vnode) VALUES (1, x'6768', 4242)")
    db.execute("UPDATE vnodes SET nlink = 9 WHERE vnode = 1")
    db.commit()
    db.close()
    kinds = sorted(f.kind for f in salvage(data_dir))
    assert kinds == ["dangling-entry", "nlink", "orphan-data"]
    assert cli_main(["salvage", "--data-dir", str(data_dir)]) == 1
    assert cli_main(["salvage", "--data-dir", str(data_dir), "--repair"]) == 0
    assert salvage(data_dir) == []
    assert not (vol_dir / "data" / "999.999").exists()


async def test_salvage_refuses_repair_under_running_server(tmp_path):
    with ServerProcess(tmp_path / "fs") as srv:
        async with fs_client(srv.host, srv.port) as c:
            root = await c.root_fid()
            fid = (await c.call("FS.CreateFile", None, root, b"f", 0o644))["fid"]
            await c.call("FS.StoreData", None, fid, 0, b"data", None, None)
        assert cli_main(["salvage", "--data-dir", str(tmp_path / "fs"), "--repair"]) == 2
        assert cli_main(["salvage", "--data-dir", str(tmp_path / "fs")]) == 0
    assert salvage(tmp_path / "fs") == []  # a clean stop leaves no redo records


def test_sigterm_stops_cleanly(tmp_path):
    srv = ServerProcess(tmp_path / "fs").start()
    assert (tmp_path / "fs" / "address").exists()
    assert srv.stop() == 0
    assert not (tmp_path / "fs" / "address").exists()
    assert "listening on 127.0.0.1:" in srv.log_text()
    mode = (tmp_path / "fs" / "admin.secret").stat().st_mode & 0o777
    assert mode == 0o600

"""Special files: FIFOs, unix sockets, character and block devices (issue 14 item 1).

They are vnodes with a type, a mode and an rdev and no data (FS.MakeNode).
Through two real mounts: B sees what A made with the right type and rdev, a
FIFO and a unix socket work on one client (the kernel does their I/O), and
rename/link/chmod/chown/utimens/unlink treat them like any file.  Bad input
at the protocol level, where no kernel filters it first: an unknown type is
EINVAL, a device node by a non-root caller EPERM, and neither reaches the
volume.  Old volumes get the rdev column on open.
"""

from __future__ import annotations

import errno
import os
import socket
import sqlite3
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from afsfuse.lab.server import fs_client, running_server
from fileserver.volume import Volume
from protocol.errors import RpcError
from protocol.records import FileStatus, FileType
from tests.conftest import two_mounts
from tests.posix_support import as_user, eventually

U1 = 1001
CHR = os.makedev(1, 3)  # /dev/null's numbers
BLK = os.makedev(7, 5)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    with two_mounts(tmp_path_factory.mktemp("special"), ("-o", "allow_other")) as ab:
        yield ab


def _bind(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    return s


@pytest.mark.mount
def test_b_sees_a_fifo_socket_and_devices_with_type_and_rdev(pair):
    a, b = pair
    (a.mnt / "kinds").mkdir()
    os.listdir(b.mnt / "kinds")  # B caches the empty listing under its promise
    os.mkfifo(a.mnt / "kinds/fifo", 0o640)
    _bind(a.mnt / "kinds/sock").close()
    os.mknod(a.mnt / "kinds/chr", stat.S_IFCHR | 0o600, CHR)
    os.mknod(a.mnt / "kinds/blk", stat.S_IFBLK | 0o660, BLK)
    want = {"fifo": (stat.S_IFIFO, 0), "sock": (stat.S_IFSOCK, 0),
            "chr": (stat.S_IFCHR, CHR), "blk": (stat.S_IFBLK, BLK)}  # fmt: skip
    assert eventually(lambda: sorted(os.listdir(b.mnt / "kinds")) == sorted(want))
    for name, (fmt, rdev) in want.items():
        for m in (a, b):
            st = os.lstat(m.mnt / "kinds" / name)
            assert stat.S_IFMT(st.st_mode) == fmt, (m.mnt, name)
            assert st.st_rdev == rdev and st.st_size == 0
    # Mounted nodev (the default): the numbers show, the node opens as no device.
    with pytest.raises(OSError) as ei:
        open(b.mnt / "kinds/chr", "rb").close()
    assert ei.value.errno == errno.EACCES
    um = os.umask(0)
    os.umask(um)
    assert stat.S_IMODE(os.lstat(b.mnt / "kinds/fifo").st_mode) == 0o640 & ~um
    assert stat.S_IMODE(os.lstat(b.mnt / "kinds/blk").st_mode) == 0o660 & ~um


@pytest.mark.mount
def test_fifo_open_write_read_on_one_client(pair):
    a, _ = pair
    p = a.mnt / "pipe"
    os.mkfifo(p)
    got: list[bytes] = []

    def reader() -> None:
        with open(p, "rb") as f:  # blocks until the writer opens
            got.append(f.read())

    t = threading.Thread(target=reader)
    t.start()
    with open(p, "wb") as f:
        f.write(b"through the kernel, not the server")
    t.join(30)
    assert got == [b"through the kernel, not the server"]
    assert os.stat(p).st_size == 0  # nothing was stored


@pytest.mark.mount
def test_unix_socket_bind_connect_in_the_mount(pair):
    a, _ = pair
    p = a.mnt / "agent.sock"
    srv = _bind(p)
    try:
        srv.listen(1)
        cli = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        cli.connect(str(p))
        conn, _ = srv.accept()
        cli.sendall(b"ping")
        assert conn.recv(4) == b"ping"
        conn.close()
        cli.close()
    finally:
        srv.close()
    assert stat.S_ISSOCK(os.lstat(p).st_mode)
    os.unlink(p)
    assert not p.exists()


@pytest.mark.mount
def test_rename_link_chmod_chown_utimens_unlink_like_any_file(pair):
    a, b = pair
    os.mknod(a.mnt / "node", stat.S_IFCHR | 0o644, CHR)
    os.rename(a.mnt / "node", a.mnt / "node2")
    os.link(a.mnt / "node2", a.mnt / "node3")
    os.chmod(a.mnt / "node2", 0o600)
    os.chown(a.mnt / "node2", U1, U1)
    os.utime(a.mnt / "node2", ns=(1_000_000_000, 1_234_000_000_000))

    def b_view() -> Any:
        st = os.lstat(b.mnt / "node3")
        return (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_nlink,
                st.st_rdev, st.st_mtime_ns)  # fmt: skip

    want = (stat.S_IFCHR, 0o600, U1, 2, CHR, 1_234_000_000_000)
    assert eventually(lambda: b_view() == want), b_view()
    assert not (b.mnt / "node").exists()
    os.unlink(a.mnt / "node2")
    os.unlink(a.mnt / "node3")
    assert eventually(lambda: not (b.mnt / "node3").exists())


@pytest.mark.mount
def test_mount_refuses_unknown_type_and_non_root_devices(pair):
    a, _ = pair
    with pytest.raises(OSError) as ei:
        os.mknod(a.mnt / "weird", 0o170000 | 0o644)
    assert ei.value.errno == errno.EINVAL  # the kernel's may_mknod
    assert as_user(a.mnt, U1, lambda: os.mknod("dev", stat.S_IFCHR | 0o644, CHR)) == "EPERM"
    assert as_user(a.mnt, U1, lambda: os.mkfifo("u1fifo")) == "ok"  # no privilege needed
    assert os.lstat(a.mnt / "u1fifo").st_uid == U1
    assert not (a.mnt / "weird").exists() and not (a.mnt / "dev").exists()


# -- the server alone (no kernel filtering first) -------------------------------


def cred(uid: int) -> list[Any]:
    return [uid, uid, []]


async def _code(coro: Any) -> str:
    with pytest.raises(RpcError) as ei:
        await coro
    return ei.value.code


async def test_make_node_checks_before_the_volume_and_refuses_data(tmp_path):
    async with running_server(tmp_path / "fs") as srv, fs_client(srv.host, srv.port) as c:
        root = await c.root_fid()
        before = FileStatus.from_wire((await c.call("FS.FetchStatus", None, root))["status"])
        for bad in (0, 1, 2, 3, 8, 99, -1, "4", None):
            assert await _code(c.call("FS.MakeNode", None, root, b"x", bad, 0o644, 0)) == "EINVAL"
        for dev in (FileType.CHARDEV, FileType.BLOCKDEV):
            code = await _code(c.call("FS.MakeNode", cred(U1), root, b"d", int(dev), 0o644, CHR))
            assert code == "EPERM"
        after = FileStatus.from_wire((await c.call("FS.FetchStatus", None, root))["status"])
        assert after.data_version == before.data_version  # nothing reached the volume
        assert await _code(c.call("FS.Lookup", None, root, b"d")) == "ENOENT"
        # A FIFO by anyone; its rdev is dropped as Linux drops it.
        r = await c.call("FS.MakeNode", cred(U1), root, b"f", int(FileType.FIFO), 0o644, 77)
        st = FileStatus.from_wire(r["status"])
        assert (st.type, st.mode, st.rdev, st.owner, st.size) == (FileType.FIFO, 0o644, 0, U1, 0)
        r = await c.call("FS.MakeNode", None, root, b"b", int(FileType.BLOCKDEV), 0o600, BLK)
        assert FileStatus.from_wire(r["status"]).rdev == BLK
        fifo = (await c.call("FS.Lookup", None, root, b"f"))["fid"]
        assert await _code(c.call("FS.StoreData", None, fifo, 0, b"x", None, None)) == "EINVAL"
        assert await _code(c.call("FS.FetchData", None, fifo, 0, 10)) == "EINVAL"
        assert await _code(c.call("FS.StoreStatus", None, fifo, {"size": 5})) == "EINVAL"
        caps = (await c.call("FS.GetCapabilities"))["capabilities"]
        assert "special-files" in caps


def test_rdev_is_durable_and_old_volumes_get_the_column(tmp_path):
    vol = Volume.create(tmp_path / "v", 7, "v")
    v, _ = vol.create_vnode(1, 1, b"blk", FileType.BLOCKDEV, 0o600, 0, 0, rdev=BLK)
    vol.close()
    vol = Volume(tmp_path / "v")
    assert vol.get(v.vnode, v.unique).status().rdev == BLK
    vol.close()
    # A volume made before special files: no rdev column.
    db = sqlite3.connect(tmp_path / "v" / "volume.db")
    db.execute("DELETE FROM vnodes WHERE vnode = ?", (v.vnode,))
    db.execute("DELETE FROM dirents WHERE vnode = ?", (v.vnode,))
    db.execute("ALTER TABLE vnodes DROP COLUMN rdev")
    db.commit()
    db.close()
    vol = Volume(tmp_path / "v")
    try:
        assert vol.get(1, 1).status().rdev == 0
        f, _ = vol.create_vnode(1, 1, b"c", FileType.CHARDEV, 0o600, 0, 0, rdev=CHR)
        assert vol.get(f.vnode, f.unique).rdev == CHR
    finally:
        vol.close()

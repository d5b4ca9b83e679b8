"""User extended attributes (issue 14 item 4).

``user.*`` attributes live on the server with the file: set on client A,
read on client B (whose cached copy is void once the server's break
reached it), removed, bounded as Linux bounds them (ERANGE for a long name,
E2BIG for a large value, ENOSPC past the per-file total), with
XATTR_CREATE/XATTR_REPLACE semantics; ``security.*`` and ``trusted.*``
stay unsupported; ``cp -a`` carries them in and out.  At the protocol
level: the change breaks the other holders before its reply, permissions
and file types are checked, and the rows go with their vnode.  In the cache manager: attributes are
answered from the copy fetched under the promise until a break.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from afsfuse.lab.server import server_and_two_clients
from fileserver.volume import Volume
from protocol.errors import RpcError
from protocol.limits import MAX_XATTR_TOTAL, MAX_XATTR_VALUE
from protocol.records import Fid, FileStatus, FileType
from tests.conftest import two_mounts
from tests.posix_support import as_user
from tests.test_cm_integration import two_clients

U1, U2 = 1001, 1002


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    with two_mounts(tmp_path_factory.mktemp("xattr"), ("-o", "allow_other")) as ab:
        yield ab


def errno_of(fn: Any, *args: Any) -> int:
    with pytest.raises(OSError) as ei:
        fn(*args)
    return ei.value.errno


def user_names(p: Path) -> list[str]:
    return sorted(n for n in os.listxattr(p) if n.startswith("user."))


@pytest.mark.mount
def test_set_on_a_get_on_b_then_remove(pair):
    a, b = pair
    (a.mnt / "f").write_text("data")
    assert errno_of(os.getxattr, b.mnt / "f", "user.color") == errno.ENODATA  # B caches "none"
    ctime = os.stat(b.mnt / "f").st_ctime_ns
    os.setxattr(a.mnt / "f", "user.color", b"blue")
    assert os.getxattr(b.mnt / "f", "user.color") == b"blue"
    assert user_names(b.mnt / "f") == ["user.color"]
    assert os.stat(b.mnt / "f").st_ctime_ns > ctime  # a change of the file's status
    os.setxattr(b.mnt / "f", "user.color", b"green")
    assert os.getxattr(a.mnt / "f", "user.color") == b"green"
    os.removexattr(b.mnt / "f", "user.color")
    assert errno_of(os.getxattr, a.mnt / "f", "user.color") == errno.ENODATA
    assert user_names(a.mnt / "f") == []
    assert errno_of(os.removexattr, a.mnt / "f", "user.color") == errno.ENODATA
    assert (b.mnt / "f").read_text() == "data"  # the data is untouched


@pytest.mark.mount
def test_create_and_replace_flags(pair):
    a, b = pair
    (a.mnt / "flags").write_text("")
    p = a.mnt / "flags"
    assert errno_of(os.setxattr, p, "user.k", b"1", os.XATTR_REPLACE) == errno.ENODATA
    os.setxattr(p, "user.k", b"1", os.XATTR_CREATE)
    assert errno_of(os.setxattr, b.mnt / "flags", "user.k", b"2", os.XATTR_CREATE) == errno.EEXIST
    os.setxattr(b.mnt / "flags", "user.k", b"2", os.XATTR_REPLACE)
    assert os.getxattr(p, "user.k") == b"2"


@pytest.mark.mount
def test_limits(pair):
    a, _ = pair
    p = a.mnt / "limits"
    p.write_text("")
    assert errno_of(os.setxattr, p, "user." + "n" * 251, b"v") == errno.ERANGE  # 256 bytes
    os.setxattr(p, "user." + "n" * 250, b"v")  # 255 bytes
    assert errno_of(os.setxattr, p, "user.big", bytes(MAX_XATTR_VALUE + 1)) == errno.E2BIG
    os.setxattr(p, "user.v0", bytes(MAX_XATTR_VALUE))
    n = 1
    with pytest.raises(OSError) as ei:
        while n < 10:
            os.setxattr(p, f"user.v{n}", bytes(MAX_XATTR_VALUE))
            n += 1
    assert ei.value.errno == errno.ENOSPC
    # user.v0..v2 fit; the 4th 64 KiB value overflows the total (names count too).
    assert n == MAX_XATTR_TOTAL // MAX_XATTR_VALUE - 1 == 3
    assert errno_of(os.getxattr, p, f"user.v{n}") == errno.ENODATA
    # A too-small buffer is ERANGE (getxattr(2) with a size), not a short value.
    out = subprocess.run(
        ["python3", "-c", f"import ctypes,os; b=ctypes.create_string_buffer(10); "
         f"r=ctypes.CDLL(None,use_errno=True).getxattr(b'{p}', b'user.v0', b, 10); "
         f"print(r, ctypes.get_errno())"], capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.split() == ["-1", str(errno.ERANGE)]


@pytest.mark.mount
def test_other_namespaces_unsupported_and_permissions(pair):
    a, _ = pair
    p = a.mnt / "ns"
    p.write_text("")
    for name in ("security.x", "trusted.x"):
        assert errno_of(os.setxattr, p, name, b"v") == errno.EOPNOTSUPP
        assert errno_of(os.getxattr, p, name) == errno.EOPNOTSUPP
    assert errno_of(os.setxattr, p, "afs.fid", b"v") == errno.EOPNOTSUPP  # read-only
    assert os.getxattr(p, "afs.fid")  # as before
    os.chmod(p, 0o644)
    assert as_user(a.mnt, U1, lambda: os.setxattr("ns", "user.x", b"1")) == "EACCES"
    os.chown(p, U1, U1)
    assert as_user(a.mnt, U1, lambda: os.setxattr("ns", "user.x", b"1")) == "ok"
    assert os.getxattr(p, "user.x") == b"1"


@pytest.mark.mount
def test_cp_a_carries_them_in_and_out(pair, tmp_path):
    a, b = pair
    src = tmp_path / "src"
    src.write_text("payload")
    os.setxattr(src, "user.origin", b"local")
    subprocess.run(["cp", "-a", str(src), str(a.mnt / "copied")], check=True)
    assert os.getxattr(b.mnt / "copied", "user.origin") == b"local"
    os.setxattr(b.mnt / "copied", "user.second", b"2")
    out = tmp_path / "out"
    subprocess.run(["cp", "-a", str(b.mnt / "copied"), str(out)], check=True)
    assert os.getxattr(out, "user.origin") == b"local"
    assert os.getxattr(out, "user.second") == b"2"
    assert out.read_text() == "payload"
    (a.mnt / "dir").mkdir()
    os.setxattr(a.mnt / "dir", "user.d", b"on a directory")
    assert os.getxattr(b.mnt / "dir", "user.d") == b"on a directory"


# -- the server alone -------------------------------------------------------------


def cred(uid: int) -> list[Any]:
    return [uid, uid, []]


async def _code(coro: Any) -> str:
    with pytest.raises(RpcError) as ei:
        await coro
    return ei.value.code


async def test_server_breaks_before_reply_and_checks(tmp_path):
    async with server_and_two_clients(tmp_path / "fs") as (_srv, c, holder):
        root = await c.root_fid()
        f = (await c.call("FS.CreateFile", cred(U1), root, b"f", 0o640))["fid"]
        r = await holder.call("FS.FetchXattrs", None, f)
        assert r["names"] == [] and r["values"] == [] and r["callback"]
        r = await c.call("FS.SetXattr", cred(U1), f, b"user.a", b"1", 0)
        assert Fid.from_wire(f) in holder.breaks  # broken before the reply
        r = await holder.call("FS.FetchXattrs", cred(U1), f)
        assert (r["names"], r["values"]) == ([b"user.a"], [b"1"])
        # A caller who may not read the file gets the names only.
        r = await holder.call("FS.FetchXattrs", cred(U2), f)
        assert (r["names"], r["values"]) == ([b"user.a"], None)
        assert await _code(c.call("FS.SetXattr", cred(U2), f, b"user.b", b"", 0)) == "EACCES"
        assert await _code(c.call("FS.SetXattr", None, f, b"user.a", b"2", 1)) == "EEXIST"
        assert await _code(c.call("FS.SetXattr", None, f, b"user.z", b"2", 2)) == "ENODATA"
        assert await _code(c.call("FS.SetXattr", None, f, b"user.z", b"2", 3)) == "EINVAL"
        assert await _code(c.call("FS.SetXattr", None, f, b"trusted.z", b"", 0)) == "EOPNOTSUPP"
        assert await _code(c.call("FS.SetXattr", None, f, b"user.", b"", 0)) == "EINVAL"
        assert await _code(c.call("FS.SetXattr", None, f, "user.s", b"", 0)) == "EINVAL"
        assert await _code(c.call("FS.RemoveXattr", None, f, b"user.z")) == "ENODATA"
        fifo = await c.call("FS.MakeNode", None, root, b"p", int(FileType.FIFO), 0o666, 0)
        assert await _code(c.call("FS.SetXattr", None, fifo["fid"], b"user.a", b"", 0)) == "EPERM"
        before = FileStatus.from_wire((await c.call("FS.FetchStatus", None, f))["status"])
        r = await c.call("FS.RemoveXattr", None, f, b"user.a")
        assert FileStatus.from_wire(r["status"]).ctime_ns > before.ctime_ns
        assert (await holder.call("FS.FetchXattrs", None, f))["names"] == []


def test_attributes_go_with_the_vnode_and_survive_a_restart(tmp_path):
    vol = Volume.create(tmp_path / "v", 7, "v")
    v, _ = vol.create_vnode(1, 1, b"f", FileType.FILE, 0o644, 0, 0)
    vol.set_xattr(v.vnode, v.unique, b"user.a", b"1")
    vol.close()
    vol = Volume(tmp_path / "v")
    try:
        assert vol.xattrs(v.vnode, v.unique)[1] == {b"user.a": b"1"}
        vol.remove_file(1, 1, b"f")
        rows = vol.db.execute("SELECT COUNT(*) FROM xattrs").fetchone()[0]
        assert rows == 0
    finally:
        vol.close()


# -- the cache manager's cache (no kernel) ------------------------------------------


async def test_client_caches_under_the_promise_and_refetches_after_a_break(tmp_path):
    async with two_clients(tmp_path) as (a, ra, b, rb):
        fa = await a.create(ra, b"f", 0o644)
        await a.xattrs.set(fa, b"user.k", b"1")
        fb = await b.lookup(rb, b"f")
        assert await b.xattrs.get(fb, b"user.k") == b"1"
        fetches = b.stats.rpc["FS.FetchXattrs"]
        assert await b.xattrs.get(fb, b"user.k") == b"1"  # from the cache
        assert await b.xattrs.list(fb) == [b"user.k"]
        assert b.stats.rpc["FS.FetchXattrs"] == fetches
        await a.xattrs.set(fa, b"user.k", b"2")  # breaks B before it returns
        assert await b.xattrs.get(fb, b"user.k") == b"2"
        assert b.stats.rpc["FS.FetchXattrs"] == fetches + 1
        await b.xattrs.remove(fb, b"user.k")  # B's own change drops its copy
        with pytest.raises(RpcError) as ei:
            await b.xattrs.get(fb, b"user.k")
        assert ei.value.code == "ENODATA"
        with pytest.raises(RpcError) as ei:
            await a.xattrs.get(fa, b"user.k")
        assert ei.value.code == "ENODATA"


async def test_a_server_without_xattrs_lists_none_and_refuses_the_rest(tmp_path):
    """A fileserver from before extended attributes (no FS.*Xattr* methods):
    listing shows none (so ``cp -a`` goes on), the rest is EOPNOTSUPP."""
    from tests.test_cm_fakeserver import running

    async with running(tmp_path) as (_net, _fake, cm):
        root = await cm.mount_volume("test", "root.cell")
        assert await cm.xattrs.list(root) == []
        for coro in (cm.xattrs.get(root, b"user.a"), cm.xattrs.set(root, b"user.a", b"1"),
                     cm.xattrs.remove(root, b"user.a")):  # fmt: skip
            with pytest.raises(RpcError) as ei:
                await coro
            assert ei.value.code == "EOPNOTSUPP"

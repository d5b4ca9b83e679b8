"""Every file operation through a real mount, with its error cases.

One fileserver subprocess and one client daemon for the module; the test
process works on the mount from outside as any application would.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys

import pytest

from afsfuse.lab.mount import ClientMount
from afsfuse.lab.server import ServerProcess

pytestmark = pytest.mark.mount


@pytest.fixture(scope="module")
def mount(tmp_path_factory):
    from tests.conftest import fuse_problem

    if fuse_problem():
        pytest.fail(f"FUSE IS NOT AVAILABLE: {fuse_problem()}", pytrace=False)
    base = tmp_path_factory.mktemp("ops")
    with ServerProcess(base / "fs") as srv, ClientMount(srv, base / "a") as m:
        yield m


@pytest.fixture
def d(mount, request):
    """A fresh directory per test inside the mount."""
    path = mount.mnt / request.node.name[:60]
    path.mkdir()
    return path


def raises_errno(num, fn, *args):
    with pytest.raises(OSError) as exc:
        fn(*args)
    assert exc.value.errno == num, f"{fn.__name__}{args}: {exc.value}"


def test_create_write_read_stat(d):
    p = d / "f"
    p.write_bytes(b"hello world")
    assert p.read_bytes() == b"hello world"
    st = p.stat()
    assert stat.S_ISREG(st.st_mode) and st.st_size == 11 and st.st_nlink == 1
    with open(p, "r+b") as f:
        f.seek(6)
        f.write(b"WORLD")
    assert p.read_bytes() == b"hello WORLD"
    with open(p, "ab") as f:
        f.write(b"!")
    assert p.read_bytes() == b"hello WORLD!"


def test_o_excl_and_o_trunc(d):
    p = d / "x"
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
    os.write(fd, b"abc")
    os.close(fd)
    assert stat.S_IMODE(p.stat().st_mode) == 0o640
    raises_errno(errno.EEXIST, os.open, p, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert p.stat().st_size == 0 and p.read_bytes() == b""


def test_sparse_and_truncate(d):
    p = d / "sparse"
    with open(p, "wb") as f:
        f.seek(1_000_000)
        f.write(b"end")
    data = p.read_bytes()
    assert len(data) == 1_000_003 and data[:1_000_000] == bytes(1_000_000)
    os.truncate(p, 10)
    assert p.read_bytes() == bytes(10)
    os.truncate(p, 20)
    assert p.stat().st_size == 20 and p.read_bytes() == bytes(20)


def test_mkdir_readdir_rmdir(d):
    names = {f"n{i}" for i in range(30)}
    for n in names:
        (d / n).write_text(n)
    (d / "sub").mkdir(mode=0o750)
    assert set(os.listdir(d)) == names | {"sub"}
    assert stat.S_IMODE((d / "sub").stat().st_mode) == 0o750
    raises_errno(errno.EEXIST, os.mkdir, d / "sub")
    (d / "sub" / "inner").write_text("x")
    raises_errno(errno.ENOTEMPTY, os.rmdir, d / "sub")
    raises_errno(errno.ENOTDIR, os.rmdir, d / "n1")
    raises_errno(errno.ENOTDIR, os.listdir, d / "n1")
    os.unlink(d / "sub" / "inner")
    os.rmdir(d / "sub")
    assert not (d / "sub").exists()
    # ls -l: readdirplus hands out attributes that match stat
    out = subprocess.run(["ls", "-ln", str(d)], capture_output=True, text=True, check=True)
    assert out.stdout.count("\n") == len(names) + 1


def test_unlink_and_missing(d):
    p = d / "gone"
    p.write_text("x")
    os.unlink(p)
    assert not p.exists()
    raises_errno(errno.ENOENT, os.unlink, p)
    raises_errno(errno.ENOENT, os.stat, d / "never")
    raises_errno(errno.ENOENT, open, d / "never")
    (d / "dir").mkdir()
    with pytest.raises(OSError) as exc:
        os.unlink(d / "dir")
    assert exc.value.errno in (errno.EISDIR, errno.EPERM)
    raises_errno(errno.EISDIR, open, d / "dir", "w")


def test_open_unlinked_file_keeps_data(d):
    p = d / "held"
    p.write_bytes(b"still here")
    with open(p, "rb") as f:
        os.unlink(p)
        assert not p.exists() and "held" not in os.listdir(d)
        assert f.read() == b"still here"
    assert os.listdir(d) == []  # the hidden name went at the last close


def test_rename_semantics(d):
    (d / "a").write_text("A")
    (d / "b").write_text("B")
    os.rename(d / "a", d / "b")  # replace a file
    assert (d / "b").read_text() == "A" and not (d / "a").exists()
    (d / "d1").mkdir()
    (d / "d2").mkdir()
    (d / "d2" / "x").write_text("x")
    raises_errno(errno.ENOTEMPTY, os.rename, d / "d1", d / "d2")
    os.rename(d / "b", d / "d1" / "moved")  # across directories
    assert (d / "d1" / "moved").read_text() == "A"
    raises_errno(errno.EINVAL, os.rename, d / "d1", d / "d1" / "under")
    raises_errno(errno.ENOTDIR, os.rename, d / "d2", d / "d1" / "moved")
    raises_errno(errno.EISDIR, os.rename, d / "d1" / "moved", d / "d2")
    os.rename(d / "d2", d / "d3")
    assert (d / "d3" / "x").read_text() == "x"
    raises_errno(errno.ENOENT, os.rename, d / "nope", d / "other")


def test_rename_noreplace(d):
    (d / "p").write_text("p")
    (d / "q").write_text("q")
    res = subprocess.run(
        ["mv", "--no-clobber", "--", str(d / "p"), str(d / "q")], capture_output=True
    )
    assert (d / "q").read_text() == "q" and (d / "p").exists(), res


def test_symlink_and_hardlink(d):
    (d / "target").write_text("T")
    os.symlink("target", d / "sl")
    assert os.readlink(d / "sl") == "target"
    assert (d / "sl").read_text() == "T"
    assert stat.S_ISLNK(os.lstat(d / "sl").st_mode)
    os.symlink("/nonexistent/abs", d / "dangling")
    assert os.readlink(d / "dangling") == "/nonexistent/abs"
    os.link(d / "target", d / "hard")
    assert (d / "hard").stat().st_nlink == 2
    assert (d / "target").stat().st_ino == (d / "hard").stat().st_ino
    os.unlink(d / "target")
    assert (d / "hard").stat().st_nlink == 1 and (d / "hard").read_text() == "T"
    (d / "adir").mkdir()
    with pytest.raises(OSError) as exc:
        os.link(d / "adir", d / "dirlink")
    assert exc.value.errno in (errno.EPERM, errno.EISDIR)


def test_setattr(d):
    p = d / "attrs"
    p.write_text("x")
    os.chmod(p, 0o600)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    os.chown(p, 1234, 5678)
    st = p.stat()
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.utime(p, ns=(1_000_000_000, 2_000_000_123))
    assert p.stat().st_mtime_ns == 2_000_000_123
    os.chmod(d, 0o711)
    assert stat.S_IMODE(d.stat().st_mode) == 0o711


def test_name_limits(d):
    raises_errno(errno.ENAMETOOLONG, open, d / ("x" * 256), "w")
    (d / ("y" * 255)).write_text("ok")
    assert (d / ("y" * 255)).read_text() == "ok"
    odd = os.fsencode(str(d)) + b"/\xff\xfe-not-utf8"
    with open(odd, "wb") as f:
        f.write(b"bytes name")
    assert b"\xff\xfe-not-utf8" in os.listdir(os.fsencode(str(d)))


def test_statfs(mount):
    st = os.statvfs(mount.mnt)
    assert st.f_bsize > 0 and st.f_blocks > 0 and st.f_namemax == 255


def test_fsync_stores_before_close(mount, d):
    before = mount.rpc_count("FS.StoreData")
    with open(d / "synced", "wb") as f:
        f.write(b"durable")
        f.flush()
        os.fsync(f.fileno())
        assert mount.rpc_count("FS.StoreData") > before


def test_xattrs_and_fs_commands(mount, d):
    p = d / "x"
    p.write_text("x")
    fid = os.getxattr(p, "afs.fid").decode()
    vol, vnode, uniq = (int(x, 16) for x in fid.split(":"))
    assert vnode > 1 and uniq > 0
    assert os.getxattr(p, "afs.volume") == b"root.cell"
    assert os.getxattr(p, "afs.cell")
    info = mount.examine(p)
    assert info["fid"] == f"{vol}.{vnode}.{uniq}" and info["promise"] == "ok"
    cli = [sys.executable, "-m", "afsfuse.cli", "fs"]
    out = subprocess.run([*cli, "examine", str(p), "--json"], capture_output=True, text=True)
    assert out.returncode == 0 and json.loads(out.stdout)["fid"] == info["fid"]
    out = subprocess.run([*cli, "stats", str(mount.mnt), "--json"], capture_output=True, text=True)
    stats = json.loads(out.stdout)
    for key in ("rpc", "validations_fast", "validations_slow", "breaks", "volume_breaks",
                "mass_breaks", "cache_hits", "cache_misses"):  # fmt: skip
        assert key in stats
    # Where the time went: per method and per kind of FUSE request, the same
    # names as the counts, and the write above waited for its create's reply.
    assert set(stats["rpc_ms"]) <= set(stats["rpc"])
    assert stats["rpc_ms"]["FS.CreateFile"] > 0
    assert set(stats["kernel_request_ms"]) <= set(stats["kernel_requests"])
    # Every FS.CreateFile is awaited inside a create handler.
    assert stats["kernel_request_ms"]["create"] >= stats["rpc_ms"]["FS.CreateFile"]
    out = subprocess.run([*cli, "whereis", str(p), "--json"], capture_output=True, text=True)
    assert json.loads(out.stdout)["servers"]
    out = subprocess.run([*cli, "checkservers", str(p), "--json"], capture_output=True, text=True)
    servers = json.loads(out.stdout)
    assert len(servers) == 1 and all(s["up"] and s["rtt_ms"] >= 0 for s in servers.values())
    assert subprocess.run([*cli, "flush", str(p)]).returncode == 0
    assert p.read_text() == "x"
    raises_errno(errno.ENODATA, os.getxattr, p, "afs.nothing")
    raises_errno(errno.ENODATA, os.getxattr, p, "user.nothing")  # stored (test_posix_xattr)
    # Other namespaces are not supported at all (as in the kernel AFS
    # client), which is what lets `ls -l` stop asking for labels and ACLs.
    for name in ("trusted.x", "security.selinux", "system.posix_acl_access"):
        raises_errno(errno.EOPNOTSUPP, os.getxattr, p, name)


def test_ls_l_asks_no_xattrs_after_the_first_file(mount, d):
    for i in range(20):
        (d / f"f{i}").write_text("x")
    os.listdir(d)  # warm the kernel's entry and attribute caches
    before = mount.fuse_requests()
    out = subprocess.run(["ls", "-l", str(d)], capture_output=True, text=True, check=True)
    assert out.stdout.count(" f") == 20
    after = mount.fuse_requests()
    # ls gets EOPNOTSUPP for the first file's label and ACL and skips them
    # for the rest of the device (with ENODATA it would ask twice for each of
    # the 20 files); one more is this stats read itself.
    assert after["getxattr"] - before["getxattr"] <= 4


def test_large_io_sizes(d):
    data = os.urandom(3 * 1024 * 1024 + 12345)
    (d / "big").write_bytes(data)
    assert (d / "big").read_bytes() == data
    with open(d / "big", "rb") as f:
        f.seek(1_500_000)
        assert f.read(700_000) == data[1_500_000:2_200_000]


def test_rename_over_open_file_keeps_it_readable(d):
    """The "atomic save" pattern: write a temp file, rename it over the old
    one while a reader still has the old one open."""
    (d / "doc").write_bytes(b"old contents")
    with open(d / "doc", "rb") as reader:
        (d / "doc.tmp").write_bytes(b"new contents")
        os.rename(d / "doc.tmp", d / "doc")
        assert (d / "doc").read_bytes() == b"new contents"
        assert reader.read() == b"old contents"
        assert os.fstat(reader.fileno()).st_size == len(b"old contents")
    assert os.listdir(d) == ["doc"]  # the hidden name went at the last close

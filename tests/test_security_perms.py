"""Permission enforcement: POSIX owner/group/mode rules for two users.

Through real mounts: a forked child drops to uid 1001 or 1002 (setgroups,
setresgid, setresuid) inside the mount (it chdirs there first, as root, since
the test's tmp dirs are private) and reports each operation's outcome over a
pipe.  The kernel checks mode bits too (default_permissions), so the same
rules are also checked at the protocol level, where only the server decides.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from afsfuse.lab.mount import ClientMount
from afsfuse.lab.server import ServerProcess, fs_client, running_server
from protocol.errors import RpcError
from tests.posix_support import as_user

U1, U2, G_SHARED, G_U1_EXTRA = 1001, 1002, 1003, 1004


def _read(p: str) -> Callable[[], Any]:
    return lambda: Path(p).read_bytes()


def _write(p: str) -> Callable[[], Any]:
    def f() -> None:
        with open(p, "r+b") as fh:
            fh.write(b"x")

    return f


def _create(p: str) -> Callable[[], Any]:
    return lambda: Path(p).write_bytes(b"new")


def _exec(p: str) -> Callable[[], Any]:
    def f() -> None:
        rc = subprocess.run([f"./{p}"], timeout=20).returncode
        if rc != 7:
            raise OSError(errno.EIO, f"exit {rc}")

    return f


def _setup(m: Path) -> None:
    """As root: files and directories of U1 with the modes under test."""
    for name, mode, group in [("f600", 0o600, U1), ("f640", 0o640, G_SHARED), ("f644", 0o644, U1)]:
        (m / name).write_bytes(b"secret " + name.encode())
        os.chown(m / name, U1, group)
        os.chmod(m / name, mode)
    (m / "f700").write_text("#!/bin/sh\nexit 7\n")
    os.chown(m / "f700", U1, U1)
    os.chmod(m / "f700", 0o700)
    for name, mode, owner in [
        ("d755", 0o755, U1),
        ("d777", 0o777, U1),
        ("d700", 0o700, U1),
        ("d1777", 0o1777, 0),
    ]:
        (m / name).mkdir()
        os.chown(m / name, owner, owner)
        os.chmod(m / name, mode)
    for d in ("d755", "d777", "d1777", "d700"):
        (m / d / "u1file").write_bytes(b"u1")
        os.chown(m / d / "u1file", U1, U1)
        os.chmod(m / d / "u1file", 0o644)


def test_permission_matrix_two_users_one_client(tmp_path, require_fuse):
    with (
        ServerProcess(tmp_path / "fs") as srv,
        ClientMount(srv, tmp_path / "a", extra_args=("-o", "allow_other")) as a,
    ):
        m = a.mnt
        _setup(m)
        u2 = [G_SHARED]  # U2 is in the shared group
        cases: list[tuple[str, int, list[int], Callable[[], Any], str]] = [
            # reading and writing files
            ("owner reads 0600", U1, [], _read("f600"), "ok"),
            ("owner writes 0600", U1, [], _write("f600"), "ok"),
            ("other reads 0600", U2, u2, _read("f600"), "EACCES"),
            ("other writes 0600", U2, u2, _write("f600"), "EACCES"),
            ("group reads 0640", U2, u2, _read("f640"), "ok"),
            ("group writes 0640", U2, u2, _write("f640"), "EACCES"),
            ("non-member reads 0640", U2, [], _read("f640"), "EACCES"),
            ("other reads 0644", U2, u2, _read("f644"), "ok"),
            ("other writes 0644", U2, u2, _write("f644"), "EACCES"),
            ("owner executes 0700", U1, [], _exec("f700"), "ok"),
            ("other executes 0700", U2, u2, _exec("f700"), "EACCES"),
            # directories: search, list, create, delete
            ("other lists 0700 dir", U2, u2, lambda: os.listdir("d700"), "EACCES"),
            ("other stats in 0700 dir", U2, u2, lambda: os.stat("d700/u1file"), "EACCES"),
            ("owner lists 0700 dir", U1, [], lambda: os.listdir("d700"), "ok"),
            ("other creates in 0755", U2, u2, _create("d755/u2"), "EACCES"),
            ("other unlinks in 0755", U2, u2, lambda: os.unlink("d755/u1file"), "EACCES"),
            ("other mkdirs in 0755", U2, u2, lambda: os.mkdir("d755/x"), "EACCES"),
            ("owner creates in 0755", U1, [], _create("d755/u1new"), "ok"),
            ("other creates in 0777", U2, u2, _create("d777/u2"), "ok"),
            ("other renames in 0777", U2, u2, lambda: os.rename("d777/u2", "d777/u2b"), "ok"),
            ("other unlinks in 0777", U2, u2, lambda: os.unlink("d777/u1file"), "ok"),
            ("other creates in 1777", U2, u2, _create("d1777/u2"), "ok"),
            ("other unlinks in 1777", U2, u2, lambda: os.unlink("d1777/u1file"), "EPERM"),
            (
                "other renames in 1777",
                U2,
                u2,
                lambda: os.rename("d1777/u1file", "d1777/stolen"),
                "EPERM",
            ),
            ("owner unlinks own in 1777", U2, u2, lambda: os.unlink("d1777/u2"), "ok"),
            ("file owner unlinks in 1777", U1, [], lambda: os.unlink("d1777/u1file"), "ok"),
            # chmod / chown / chgrp
            ("other chmods", U2, u2, lambda: os.chmod("f644", 0o666), "EPERM"),
            ("other chowns", U2, u2, lambda: os.chown("f644", U2, -1), "EPERM"),
            ("owner chowns away", U1, [], lambda: os.chown("f644", U2, -1), "EPERM"),
            (
                "owner chgrps to a foreign group",
                U1,
                [],
                lambda: os.chown("f644", -1, G_SHARED),
                "EPERM",
            ),
            (
                "owner chgrps to own group",
                U1,
                [G_U1_EXTRA],
                lambda: os.chown("f644", -1, G_U1_EXTRA),
                "ok",
            ),
            ("owner chmods", U1, [], lambda: os.chmod("f644", 0o600), "ok"),
            ("other reads after chmod 0600", U2, u2, _read("f644"), "EACCES"),
        ]
        got = {}
        for label, uid, groups, fn, _ in cases:
            got[label] = as_user(m, uid, fn, tuple(groups))
        want = {label: expect for label, _, _, _, expect in cases}
        assert got == want
        # Root sees what the users did.
        st = os.stat(m / "f644")
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_gid == G_U1_EXTRA
        assert (m / "d777" / "u2b").exists() and not (m / "d777" / "u1file").exists()


def test_private_files_across_two_clients(tmp_path, require_fuse):
    with (
        ServerProcess(tmp_path / "fs") as srv,
        ClientMount(srv, tmp_path / "a", extra_args=("-o", "allow_other")) as a,
        ClientMount(srv, tmp_path / "b", extra_args=("-o", "allow_other")) as b,
    ):
        (a.mnt / "home1").mkdir()
        os.chown(a.mnt / "home1", U1, U1)
        os.chmod(a.mnt / "home1", 0o755)

        def u1_writes() -> None:
            fd = os.open("home1/private", os.O_CREAT | os.O_WRONLY, 0o600)
            os.write(fd, b"u1 only")
            os.close(fd)

        assert as_user(a.mnt, U1, u1_writes) == "ok"
        # U2 on the other client can neither read nor change it, nor add to home1.
        assert as_user(b.mnt, U2, _read("home1/private")) == "EACCES"
        assert as_user(b.mnt, U2, _write("home1/private")) == "EACCES"
        assert as_user(b.mnt, U2, lambda: os.unlink("home1/private")) == "EACCES"
        assert as_user(b.mnt, U2, lambda: os.chmod("home1/private", 0o644)) == "EPERM"
        # U1 on the other client reads it.
        assert as_user(b.mnt, U1, _read("home1/private")) == "ok"
        assert (b.mnt / "home1" / "private").read_bytes() == b"u1 only"
        assert os.stat(b.mnt / "home1" / "private").st_uid == U1


# -- the server alone decides (no kernel in the way) ----------------------------


def cred(uid: int, *groups: int) -> list[Any]:
    return [uid, uid, list(groups)]


async def expect(code: str, coro: Any) -> None:
    with pytest.raises(RpcError) as ei:
        await coro
    assert ei.value.code == code, ei.value


async def test_server_enforces_modes_for_each_cred(tmp_path):
    async with running_server(tmp_path / "fs") as srv, fs_client(srv.host, srv.port) as c:
        root = await c.root_fid()
        u1, u2 = cred(U1), cred(U2, G_SHARED)
        home = (await c.call("FS.MakeDir", u1, root, b"home", 0o755))["fid"]
        r = await c.call("FS.CreateFile", u1, home, b"f", 0o600)
        f = r["fid"]
        assert r["status"][5:7] == [U1, U1] and r["status"][11] == 6  # owner: rw-
        await c.call("FS.StoreData", u1, f, 0, b"private", None, None)
        assert (await c.call("FS.FetchStatus", u2, f))["status"][11] == 0
        await expect("EACCES", c.call("FS.FetchData", u2, f, 0, 10))
        await expect("EACCES", c.call("FS.StoreData", u2, f, 0, b"x", None, None))
        await expect("EACCES", c.call("FS.StoreStatus", u2, f, {"size": 0}))
        await expect("EPERM", c.call("FS.StoreStatus", u2, f, {"mode": 0o666}))
        await expect("EPERM", c.call("FS.StoreStatus", u1, f, {"owner": U2}))
        await expect("EPERM", c.call("FS.StoreStatus", u1, f, {"group": G_SHARED}))
        await expect("EACCES", c.call("FS.CreateFile", u2, home, b"g", 0o644))
        await expect("EACCES", c.call("FS.MakeDir", u2, home, b"g", 0o755))
        await expect("EACCES", c.call("FS.Symlink", u2, home, b"g", b"f", 0o777))
        await expect("EACCES", c.call("FS.Link", u2, home, b"g", f))
        await expect("EACCES", c.call("FS.RemoveFile", u2, home, b"f"))
        await expect("EACCES", c.call("FS.Rename", u2, home, b"f", root, b"f2", 0))
        # Search and list need x and r on the directory.
        await c.call("FS.StoreStatus", u1, home, {"mode": 0o700})
        await expect("EACCES", c.call("FS.Lookup", u2, home, b"f"))
        await expect("EACCES", c.call("FS.ReadDir", u2, home, None, 10, True))
        assert (await c.call("FS.Lookup", u1, home, b"f"))["status"][11] == 6
        # Group bits apply to a member of the group.
        await c.call("FS.StoreStatus", u1, home, {"mode": 0o755})
        await c.call("FS.StoreStatus", None, f, {"group": G_SHARED, "mode": 0o640})
        assert (await c.call("FS.FetchData", u2, f, 0, 10))["data"] == b"private"
        assert (await c.call("FS.FetchStatus", u2, f))["status"][11] == 4
        await expect("EACCES", c.call("FS.FetchData", cred(U2), f, 0, 10))
        # Root (nil cred or uid 0) may do anything.
        assert (await c.call("FS.FetchData", cred(0), f, 0, 10))["data"] == b"private"
        await c.call("FS.StoreStatus", cred(0), f, {"owner": U2})


async def test_server_enforces_the_sticky_bit_on_removals(tmp_path):
    async with running_server(tmp_path / "fs") as srv, fs_client(srv.host, srv.port) as c:
        root = await c.root_fid()
        u1, u2 = cred(U1), cred(U2)
        tmp = (await c.call("FS.MakeDir", None, root, b"tmp", 0o1777))["fid"]
        await c.call("FS.CreateFile", u1, tmp, b"f", 0o644)
        await c.call("FS.MakeDir", u1, tmp, b"d", 0o755)
        await expect("EPERM", c.call("FS.RemoveFile", u2, tmp, b"f"))
        await expect("EPERM", c.call("FS.RemoveDir", u2, tmp, b"d"))
        await expect("ENOENT", c.call("FS.RemoveFile", u2, tmp, b"nothing"))
        await c.call("FS.RemoveFile", u1, tmp, b"f")  # the entry's owner may
        await c.call("FS.RemoveDir", u1, tmp, b"d")


async def test_root_squash(tmp_path):
    async with (
        running_server(tmp_path / "fs", root_squash=True) as srv,
        fs_client(srv.host, srv.port) as c,
    ):
        root = await c.root_fid()
        r = await c.call("FS.CreateFile", cred(U1), root, b"f", 0o600)
        await c.call("FS.StoreData", cred(U1), r["fid"], 0, b"mine", None, None)
        await expect("EACCES", c.call("FS.FetchData", None, r["fid"], 0, 10))
        await expect("EACCES", c.call("FS.FetchData", cred(0), r["fid"], 0, 10))
        await expect("EPERM", c.call("FS.StoreStatus", cred(0), r["fid"], {"owner": 0}))
        # Squashed root creates files owned by nobody.
        r2 = await c.call("FS.CreateFile", cred(0), root, b"g", 0o644)
        assert r2["status"][5] == 65534


def test_children_do_not_leak(tmp_path):
    # as_user reports failures and exits; a crash in fn is reported, not raised.
    assert as_user(tmp_path, 0, lambda: time.sleep(0)) == "ok"
    assert as_user(tmp_path, 0, lambda: open("/nonexistent/x")) == "ENOENT"  # noqa: SIM115

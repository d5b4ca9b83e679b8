"""Setuid and setgid are cleared as Linux clears them (issue 14 item 2).

A write or truncation by a caller without privilege clears S_ISUID (and
S_ISGID when the group may execute), and so does any change of owner or
group; the fileserver applies it with the store, so every client's cached
status follows (the change breaks their promises).  Through two real mounts
with users forked off as uid 1001/1002, and at the protocol level, where no
kernel sends its own "kill privileges" chmod first.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from afsfuse.lab.server import server_and_two_clients
from protocol.errors import RpcError
from protocol.records import Fid
from tests.conftest import two_mounts
from tests.posix_support import as_user, eventually

U1, U2 = 1001, 1002
pytestmark = pytest.mark.mount


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    with two_mounts(tmp_path_factory.mktemp("suid"), ("-o", "allow_other")) as ab:
        yield ab


def u1_file(m: Path, name: str, mode: int) -> None:
    """As root: a file of U1's with ``mode`` (chmod after chown: chown clears)."""
    (m / name).write_bytes(b"#!/bin/sh\nexit 0\n")
    os.chown(m / name, U1, U1)
    os.chmod(m / name, mode)
    assert stat.S_IMODE(os.stat(m / name).st_mode) == mode


def mode_of(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def b_sees(p: Path, mode: int) -> bool:
    return eventually(lambda: mode_of(p) == mode)


def append(p: str):
    def f() -> None:
        with open(p, "ab") as fh:
            fh.write(b"# U2 was here\n")

    return f


def test_non_owner_write_clears_both_bits_on_both_clients(pair):
    a, b = pair
    u1_file(a.mnt, "w6777", 0o6777)
    assert mode_of(b.mnt / "w6777") == 0o6777  # B caches the old status
    assert as_user(a.mnt, U2, append("w6777")) == "ok"
    assert mode_of(a.mnt / "w6777") == 0o777
    assert b_sees(b.mnt / "w6777", 0o777)
    assert (b.mnt / "w6777").read_bytes().endswith(b"# U2 was here\n")


def test_non_owner_truncate_clears_setuid(pair):
    a, b = pair
    u1_file(a.mnt, "t4777", 0o4777)
    assert mode_of(b.mnt / "t4777") == 0o4777
    assert as_user(a.mnt, U2, lambda: os.truncate("t4777", 3)) == "ok"
    assert mode_of(a.mnt / "t4777") == 0o777
    assert b_sees(b.mnt / "t4777", 0o777)
    assert os.stat(b.mnt / "t4777").st_size == 3


def test_setgid_without_group_execute_stays(pair):
    # Setgid without group execute marks mandatory locking: Linux keeps it.
    a, b = pair
    u1_file(a.mnt, "g2766", 0o2766)
    assert as_user(a.mnt, U2, append("g2766")) == "ok"
    assert mode_of(a.mnt / "g2766") == 0o2766
    assert b_sees(b.mnt / "g2766", 0o2766)


def test_root_write_keeps_the_bits(pair):
    a, b = pair
    u1_file(a.mnt, "r4755", 0o4755)
    with open(a.mnt / "r4755", "ab") as f:
        f.write(b"# root\n")
    assert mode_of(a.mnt / "r4755") == 0o4755
    assert mode_of(b.mnt / "r4755") == 0o4755


def test_chown_clears_setuid_even_by_root(pair):
    a, b = pair
    u1_file(a.mnt, "c4755", 0o4755)
    assert mode_of(b.mnt / "c4755") == 0o4755
    os.chown(a.mnt / "c4755", U2, -1)
    assert mode_of(a.mnt / "c4755") == 0o755
    assert b_sees(b.mnt / "c4755", 0o755)
    assert os.stat(b.mnt / "c4755").st_uid == U2


def test_non_owner_still_cannot_chmod(pair):
    a, _ = pair
    u1_file(a.mnt, "n0666", 0o4666)
    assert as_user(a.mnt, U2, lambda: os.chmod("n0666", 0o666 | 0o4000 | 0o111)) == "EPERM"
    assert as_user(a.mnt, U2, lambda: os.chmod("n0666", 0o644)) == "EPERM"
    assert mode_of(a.mnt / "n0666") == 0o4666


# -- the server alone (no kernel clearing the bits first) -------------------------


def cred(uid: int) -> list[Any]:
    return [uid, uid, []]


async def test_server_clears_with_the_store_and_breaks(tmp_path):
    async with server_and_two_clients(tmp_path / "fs") as (_srv, writer, holder):
        root = await writer.root_fid()
        f = (await writer.call("FS.CreateFile", cred(U1), root, b"f", 0o644))["fid"]
        await writer.call("FS.StoreStatus", cred(U1), f, {"mode": 0o6777})
        r = await holder.call("FS.FetchStatus", None, f)  # holds a promise
        assert r["status"][1] == 0o6777
        # U2's store (no chmod before it) leaves the file without both bits.
        r = await writer.call("FS.StoreData", cred(U2), f, 0, b"new", None, None)
        assert r["status"][1] == 0o777
        assert Fid.from_wire(f) in holder.breaks  # broken before the reply
        assert (await holder.call("FS.FetchStatus", None, f))["status"][1] == 0o777
        # Truncation by a non-owner, and a chown by root, clear setuid too.
        await writer.call("FS.StoreStatus", cred(U1), f, {"mode": 0o4777})
        r = await writer.call("FS.StoreStatus", cred(U2), f, {"size": 1})
        assert r["status"][1] == 0o777 and r["status"][3] == 1
        await writer.call("FS.StoreStatus", cred(U1), f, {"mode": 0o4777})
        r = await writer.call("FS.StoreStatus", cred(0), f, {"owner": U2})
        assert r["status"][1] == 0o777
        # A writer may drop the bits by chmod (the kernel's way), nothing more.
        await writer.call("FS.StoreStatus", cred(U2), f, {"mode": 0o6777})  # U2 owns it now
        r = await writer.call("FS.StoreStatus", cred(U1), f, {"mode": 0o777})
        assert r["status"][1] == 0o777
        with pytest.raises(RpcError) as ei:
            await writer.call("FS.StoreStatus", cred(U1), f, {"mode": 0o700})
        assert ei.value.code == "EPERM"

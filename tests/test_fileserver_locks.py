"""Server locks (fileserver/locks.py, SPEC "Locks"): conflicts, upgrades,
expiry, a restarted client daemon superseding its predecessor, the grace
period and reclaims after a server restart, and the RPCs' errors."""

from __future__ import annotations

import pytest

from afsfuse.lab.server import fs_client, running_server
from fileserver.admin import admin_call
from fileserver.locks import MARKER, LockTable
from protocol.errors import RpcError
from protocol.records import Fid

F = Fid(1, 2, 3)
A, A2, B = ("a-uuid", 1), ("a-uuid", 2), ("b-uuid", 7)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def code(fn, *args) -> str:
    with pytest.raises(RpcError) as ei:
        fn(*args)
    return ei.value.code


def test_exclusive_excludes_and_shared_locks_coexist() -> None:
    t = LockTable(60, clock=Clock())
    t.set(F, A, exclusive=True)
    assert code(t.set, F, B, False) == "EAGAIN"
    assert code(t.set, F, B, True) == "EAGAIN"
    t.release(F, A)
    t.set(F, A, exclusive=False)
    t.set(F, B, exclusive=False)
    assert {r["client"] for r in t.listing()} == {"a-uuid", "b-uuid"}
    # Upgrading needs the holder to be alone; downgrading always works.
    assert code(t.set, F, A, True) == "EAGAIN"
    t.release(F, B)
    t.set(F, A, exclusive=True)
    assert code(t.set, F, B, False) == "EAGAIN"
    t.set(F, A, exclusive=False)
    t.set(F, B, exclusive=False)
    t.release(F, A)
    t.release(F, A)  # releasing twice is harmless
    t.release(F, B)
    assert t.listing() == [] and t.locks == {}


def test_a_lock_expires_one_lifetime_after_its_last_extension() -> None:
    clock = Clock()
    t = LockTable(60, clock=clock)
    t.set(F, A, exclusive=True)
    clock.t += 50
    t.extend(F, A, True)
    clock.t += 50  # 100 s after the set, 50 after the extension: still held
    assert code(t.set, F, B, True) == "EAGAIN"
    clock.t += 11
    t.set(F, B, exclusive=True)  # expired: B gets it
    assert code(t.extend, F, A, True) == "ENOLCK"  # A learns it lost it
    assert t.stats["expired"] == 1


def test_a_restarted_client_daemon_supersedes_its_predecessor() -> None:
    t = LockTable(60, clock=Clock())
    t.set(F, A, exclusive=True)
    other = Fid(1, 4, 5)
    t.set(other, A2, exclusive=False)  # same uuid, new daemon run
    assert [r["holder"] for r in t.listing()] == [2]
    t.set(F, B, exclusive=True)


def test_grace_refuses_new_locks_and_admits_consistent_reclaims() -> None:
    clock = Clock()
    t = LockTable(60, grace=True, clock=clock)
    assert code(t.set, F, A, True) == "EAGAIN"
    t.extend(F, A, True)  # A held it before the restart: reclaimed
    assert code(t.extend, F, B, True) == "ENOLCK"  # never two exclusive holders
    assert code(t.extend, F, B, False) == "ENOLCK"
    t.set(F, A, exclusive=False)  # a holder may still change its own lock
    t.extend(F, B, False)  # shared with shared: fine
    clock.t += 61
    assert not t.in_grace()
    assert code(t.extend, Fid(1, 9, 9), A, True) == "ENOLCK"  # no reclaims after grace
    t.set(Fid(1, 9, 9), A, exclusive=True)


async def test_lock_rpcs_conflict_between_clients_and_list_in_admin(tmp_path) -> None:
    async with (
        running_server(tmp_path / "fs", lock_lifetime=30) as srv,
        fs_client(srv.host, srv.port) as a,
        fs_client(srv.host, srv.port) as b,
    ):
        root = await a.root_fid()
        fid = (await a.call("FS.CreateFile", None, root, b"f", 0o644))["fid"]
        r = await a.call("FS.SetLock", None, fid, 1, 11)
        assert r["expires_in"] == 30
        with pytest.raises(RpcError) as ei:
            await b.call("FS.SetLock", None, fid, 0, 22)
        assert ei.value.code == "EAGAIN"
        assert (await a.call("FS.ExtendLock", fid, 1, 11))["expires_in"] == 30
        listed = await admin_call(tmp_path / "fs", "Admin.Locks")
        assert [(x["client"], x["type"]) for x in listed["locks"]] == [(a.uuid, "exclusive")]
        await a.call("FS.ReleaseLock", fid, 11)
        await b.call("FS.SetLock", None, fid, 0, 22)
        for bad in (
            ("FS.SetLock", None, fid, 2, 22),
            ("FS.SetLock", None, fid, 0, -1),
            ("FS.SetLock", None, [1, 2], 0, 22),
            ("FS.ExtendLock", fid, "x", 22),
        ):
            with pytest.raises(RpcError) as ei:
                await b.call(*bad)
            assert ei.value.code == "EINVAL", bad
        with pytest.raises(RpcError) as ei:
            await b.call("FS.SetLock", None, root, 0, 22)
        assert ei.value.code == "EISDIR"
        with pytest.raises(RpcError) as ei:  # not writable by this caller
            await b.call("FS.SetLock", [1000, 1000, []], fid, 1, 22)
        assert ei.value.code == "EACCES"
        with pytest.raises(RpcError) as ei:
            await b.call("FS.ExtendLock", fid, 1, 99)
        assert ei.value.code == "ENOLCK"
    assert (tmp_path / "fs" / MARKER).exists()


async def test_a_lock_outlives_its_holders_connection(tmp_path) -> None:
    """A dropped connection may be a network blip: the lock stays until it
    expires (or the client's next daemon run takes a lock)."""
    async with running_server(tmp_path / "fs", lock_lifetime=30) as srv:
        async with fs_client(srv.host, srv.port) as a:
            root = await a.root_fid()
            fid = (await a.call("FS.CreateFile", None, root, b"f", 0o644))["fid"]
            await a.call("FS.SetLock", None, fid, 1, 11)
        async with fs_client(srv.host, srv.port) as b:
            with pytest.raises(RpcError) as ei:
                await b.call("FS.SetLock", None, fid, 0, 22)
            assert ei.value.code == "EAGAIN"
        async with fs_client(srv.host, srv.port, uuid=a.uuid) as a2:
            await a2.call("FS.ExtendLock", fid, 1, 11)  # the same run reconnected: still its


async def test_a_restarted_server_holds_a_grace_period(tmp_path) -> None:
    async with (
        running_server(tmp_path / "fs", lock_lifetime=30) as srv,
        fs_client(srv.host, srv.port) as a,
    ):
        root = await a.root_fid()
        fid = (await a.call("FS.CreateFile", None, root, b"f", 0o644))["fid"]
        await a.call("FS.SetLock", None, fid, 1, 11)
    async with (
        running_server(tmp_path / "fs", lock_lifetime=30) as srv,
        fs_client(srv.host, srv.port, uuid=a.uuid) as a2,
        fs_client(srv.host, srv.port) as b,
    ):
        with pytest.raises(RpcError) as ei:
            await b.call("FS.SetLock", None, fid, 1, 22)
        assert ei.value.code == "EAGAIN"
        await a2.call("FS.ExtendLock", fid, 1, 11)  # the old holder reclaims
        listed = await admin_call(tmp_path / "fs", "Admin.Locks")
        assert listed["grace_remaining"] > 0
        assert [x["client"] for x in listed["locks"]] == [a.uuid]

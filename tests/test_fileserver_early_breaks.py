"""A removal's breaks go out while its commit syncs, and nothing is left on
the state before it.

The reply still waits for both (the design's rule: every other holder is
broken before the reply), but the break's round trip no longer follows the
sync.  While the commit is under way, reads by other clients are answered
from the committed state without a promise (``CallBackType.DROPPED``): a
promise on that state, granted after the break went out, would never be
broken.  Each test parks the real server's commit thread just before its
COMMIT (``Volume._commit``).
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import trio

from afsfuse.lab.server import server_and_two_clients
from protocol.connection import ConnectionLost
from protocol.errors import RemoteError
from protocol.records import CallBack, CallBackType, Fid

# A hang guard, not a speed assertion.
HANG = 30


def _park_commits(h: Any, fail: bool = False) -> tuple[threading.Event, threading.Event]:
    """Make the volume's next COMMIT wait (in the commit thread) until
    released; with ``fail``, that COMMIT raises instead of committing."""
    parked, release = threading.Event(), threading.Event()
    real = h.vol._commit

    def parking_commit(ops: list[str]) -> None:
        h.vol._commit = real  # only the next one
        parked.set()
        release.wait(HANG)
        if fail:
            raise OSError(5, "injected commit failure")
        real(ops)

    h.vol._commit = parking_commit
    return parked, release


async def _remove_noting_error(client: Any, d: Any, name: bytes, errors: list[Any]) -> None:
    """FS.RemoveFile by ``client``; an error reply (a failed COMMIT) goes
    into ``errors`` instead of ending the test's nursery."""
    try:
        await client.call("FS.RemoveFile", None, d, name)
    except RemoteError as exc:
        errors.append(exc)


def _cb(reply_cb: Any) -> CallBack:
    return CallBack.from_wire(reply_cb)


def _on_break(client: Any, fid: Any) -> trio.Event:
    """An event set when ``client`` is told of a break of ``fid``."""
    seen = trio.Event()
    note = client._note

    def noting(kind: str, what: Any) -> None:
        note(kind, what)
        if kind == "break" and Fid(*fid) in what:
            seen.set()

    client._note = noting
    return seen


async def test_a_removal_breaks_other_holders_while_its_commit_syncs(tmp_path):
    async with server_and_two_clients(tmp_path / "fs") as (srv, x, y):
        root = await x.root_fid()
        fid = (await x.call("FS.CreateFile", None, root, b"f", 0o644))["fid"]
        await x.call("FS.CreateFile", None, root, b"g", 0o644)
        looked = await y.call("FS.Lookup", None, root, b"f")  # Y holds f and the root
        assert _cb(looked["callback"]).type == CallBackType.SHARED
        h = srv.store.get(root[0])
        parked, release = _park_commits(h)
        broken = _on_break(y, fid)
        done: dict[str, Any] = {}

        async def remove() -> None:
            done["r"] = await x.call("FS.RemoveFile", None, root, b"f")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(remove)
            assert await trio.to_thread.run_sync(parked.wait, HANG)
            with trio.fail_after(HANG):
                await broken.wait()  # told while the COMMIT is parked
            assert Fid(*root) in y.breaks
            assert "r" not in done  # the reply waits for the sync
            # Y asks again meanwhile: the committed state, without a promise.
            st = await y.call("FS.FetchStatus", None, fid)
            assert _cb(st["callback"]).type == CallBackType.DROPPED
            again = await y.call("FS.Lookup", None, root, b"f")
            assert _cb(again["callback"]).type == CallBackType.DROPPED
            assert _cb(again["dir_callback"]).type == CallBackType.DROPPED
            # A file the removal does not change keeps its promises.
            other = await y.call("FS.Lookup", None, root, b"g")
            assert _cb(other["callback"]).type == CallBackType.SHARED
            release.set()
        # The remover itself keeps its promise on the directory.
        assert _cb(done["r"]["dir_callback"]).type == CallBackType.SHARED
        assert _cb(done["r"]["dir_callback"]).expires_in > 0
        with pytest.raises(RemoteError, match="ENOENT"):
            await y.call("FS.Lookup", None, root, b"f")
        # Once committed, promises are granted again.
        st = await y.call("FS.FetchStatus", None, root)
        assert _cb(st["callback"]).type == CallBackType.SHARED
        assert srv.fsops._telling == {}


async def test_a_failed_removal_tells_nobody_and_raises_its_own_error(tmp_path):
    async with server_and_two_clients(tmp_path / "fs") as (srv, x, y):
        root = await x.root_fid()
        d = (await x.call("FS.MakeDir", None, root, b"d", 0o755))["fid"]
        await x.call("FS.CreateFile", None, d, b"inside", 0o644)
        await y.call("FS.FetchStatus", None, root)
        await y.call("FS.FetchStatus", None, d)
        with pytest.raises(RemoteError, match="ENOENT"):
            await x.call("FS.RemoveFile", None, root, b"absent")
        with pytest.raises(RemoteError, match="ENOTEMPTY"):
            await x.call("FS.RemoveDir", None, root, b"d")
        assert y.breaks == []
        st = await y.call("FS.FetchStatus", None, d)
        assert _cb(st["callback"]).type == CallBackType.SHARED
        assert srv.fsops._telling == {}


async def test_a_commit_failing_after_the_breaks_leaves_the_file_and_grants_again(tmp_path):
    async with server_and_two_clients(tmp_path / "fs") as (srv, x, y):
        root = await x.root_fid()
        fid = (await x.call("FS.CreateFile", None, root, b"f", 0o644))["fid"]
        await y.call("FS.FetchStatus", None, fid)
        h = srv.store.get(root[0])
        parked, release = _park_commits(h, fail=True)
        broken = _on_break(y, fid)
        errors: list[BaseException] = []

        async with trio.open_nursery() as nursery:
            nursery.start_soon(_remove_noting_error, x, root, b"f", errors)
            assert await trio.to_thread.run_sync(parked.wait, HANG)
            with trio.fail_after(HANG):
                await broken.wait()
            release.set()
        assert len(errors) == 1  # the remover hears of the failure
        # Only a spurious break: the file is there, and promised again.
        st = await y.call("FS.FetchStatus", None, fid)
        assert _cb(st["callback"]).type == CallBackType.SHARED
        assert (await y.call("FS.Lookup", None, root, b"f"))["fid"] == fid
        assert srv.fsops._telling == {}


async def test_a_failing_holder_check_breaks_after_the_commit_instead(tmp_path, monkeypatch):
    """The check in the commit thread (does anyone else hold these fids?)
    failing must not fail the removal, whose SQL already ran: the breaks
    then follow the commit, as for other changes."""
    async with server_and_two_clients(tmp_path / "fs") as (srv, x, y):
        root = await x.root_fid()
        fid = (await x.call("FS.CreateFile", None, root, b"f", 0o644))["fid"]
        await y.call("FS.FetchStatus", None, fid)

        def broken_check(*_: Any) -> bool:
            raise RuntimeError("injected")

        monkeypatch.setattr(srv.fsops.table, "others_hold", broken_check)
        await x.call("FS.RemoveFile", None, root, b"f")
        assert Fid(*fid) in y.breaks  # broken before the reply all the same
        with pytest.raises(RemoteError, match="ENOENT"):
            await y.call("FS.Lookup", None, root, b"f")
        assert srv.fsops._telling == {}


def _slow_breaks(srv: Any, seconds: float) -> trio.Event:
    """Hold every CB.CallBack ``seconds`` before it is sent (a slow path to
    the holder); the returned event is set when the first one starts."""
    started = trio.Event()
    nem = srv.breaker.nemesis
    real = nem.before_break

    async def slow(client: str, fids: Any, remaining: float) -> None:
        started.set()
        await trio.sleep(seconds)
        await real(client, fids, remaining)

    nem.before_break = slow
    return started


async def test_a_commit_failing_while_its_break_is_on_the_way_still_tells_the_holder(tmp_path):
    """The table drops a holder's promise when its break starts; if the break
    were then cut short because the commit failed, the holder would trust a
    promise nothing breaks any more (a later real change would skip it)."""
    async with server_and_two_clients(tmp_path / "fs") as (srv, x, y):
        root = await x.root_fid()
        fid = (await x.call("FS.CreateFile", None, root, b"f", 0o644))["fid"]
        await y.call("FS.FetchStatus", None, fid)
        h = srv.store.get(root[0])
        started = _slow_breaks(srv, 0.5)
        parked, release = _park_commits(h, fail=True)
        errors: list[BaseException] = []

        with trio.fail_after(HANG):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_remove_noting_error, x, root, b"f", errors)
                assert await trio.to_thread.run_sync(parked.wait, HANG)
                await started.wait()
                release.set()  # the COMMIT fails while the break waits to go out
        assert len(errors) == 1
        assert Fid(*fid) in y.breaks  # told (spuriously) before the error reply


async def test_a_changer_that_disconnects_does_not_cut_its_breaks_short(tmp_path):
    """A committed change's breaks go out even when the changer's connection
    closes meanwhile (which cancels its request on the server)."""
    async with server_and_two_clients(tmp_path / "fs") as (srv, x, y):
        root = await x.root_fid()
        fid = (await x.call("FS.CreateFile", None, root, b"f", 0o644))["fid"]
        await y.call("FS.FetchStatus", None, fid)
        started = _slow_breaks(srv, 0.5)
        assert x.conn is not None

        async def remove() -> None:
            with pytest.raises(ConnectionLost):  # closed under it by this end
                await x.call("FS.RemoveFile", None, root, b"f")

        with trio.fail_after(HANG):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(remove)
                await started.wait()
                await x.conn.aclose("the changer goes away")
            await y.wait_for(lambda: Fid(*fid) in y.breaks, timeout=HANG)
        # The removal committed: the name is gone for everyone.
        with pytest.raises(RemoteError):
            await y.call("FS.Lookup", None, root, b"f")

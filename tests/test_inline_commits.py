"""Where a light batch's COMMIT runs: on the trio thread while one client
alone is working (``fileserver.activity``), in the commit thread whenever
someone else could be served meanwhile.  Either way the change is durable
when the reply leaves."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from afsfuse.lab.server import server_and_two_clients, wait_until
from fileserver.activity import Activity
from fileserver.store import VolumeHandle
from fileserver.volume import CHEAP_UNLINK_BYTES, Volume
from protocol.records import Fid, FileType
from protocol.tls import SocketTLSStream

HANG = 30  # a hang guard, not a speed assertion


async def test_activity_is_quiet_only_while_one_connection_alone_is_busy() -> None:
    t = [0.0]
    a = Activity(window=0.05, now=lambda: t[0])
    one, two = object(), object()
    a.started(one)
    assert not a.quiet(1)  # it only just started talking
    t[0] = 0.06
    assert a.quiet(1)
    a.started(one)  # a second request of the same connection, in progress
    assert not a.quiet(1) and a.quiet(2)
    a.ended(one)
    a.heard(two)  # the first bytes of another connection's request
    assert not a.quiet(1)
    t[0] = 0.2
    # Still not: the connection heard last has no request in progress (one's
    # request has been waiting while two sends, say, request after request).
    assert not a.quiet(1)
    a.started(two)
    a.ended(two)
    assert not a.quiet(1)
    a.heard(one)
    t[0] = 0.3
    assert a.quiet(1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep, 0)  # a task waiting to run (a break on its way)
        assert not a.quiet(1)
    assert a.quiet(1)
    a.ended(one)
    assert a.in_progress == 0 and not a.quiet(1)


def _volume(tmp_path: Any) -> tuple[Volume, VolumeHandle, list[str]]:
    """A volume whose COMMITs record the thread they ran in, with one
    client alone at work."""
    vol = Volume.create(tmp_path / "v", 7, "v")
    quiet = Activity(window=0.0)
    quiet.started(object())  # the one request in progress
    h = VolumeHandle(vol, quiet)
    threads: list[str] = []
    real = vol.commit_batch

    def commit_batch(batch: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real(batch)

    vol.commit_batch = commit_batch  # type: ignore[method-assign]
    return vol, h, threads


async def test_a_quiet_client_s_light_change_commits_here_and_durably(tmp_path) -> None:
    vol, h, threads = _volume(tmp_path)
    with trio.fail_after(HANG):
        await h.commit(
            lambda: vol.create_vnode(1, 1, b"f", FileType.FILE, 0o644, 0, 0),
            op="FS.CreateFile", light=True,
        )  # fmt: skip
        # Not light (its work has files to write): the commit thread, always.
        await h.commit(
            lambda: vol.create_vnode(1, 1, b"g", FileType.FILE, 0o644, 0, 0), op="FS.CreateFile"
        )
    assert threads == [threading.current_thread().name, "commit-v"]
    assert vol.stats.inline_commits == 1 and vol.stats.group_commits == 2
    vol.close()
    again = Volume(tmp_path / "v")  # durable: a fresh open finds both
    assert {n for n, _ in again.readdir(1, 1, None, 10)[0]} >= {b"f", b"g"}
    again.close()


async def test_a_removal_that_frees_a_big_data_file_commits_in_the_thread(tmp_path) -> None:
    vol, h, threads = _volume(tmp_path)
    for name, size in ((b"small", 100_000), (b"big", CHEAP_UNLINK_BYTES + 1)):
        v, _dv = vol.create_vnode(1, 1, name, FileType.FILE, 0o644, 0, 0)
        vol.store_data(v.vnode, v.unique, 0, b"x" * size, None, None)  # a data file
    with trio.fail_after(HANG):
        for name in (b"small", b"big"):
            await h.commit(lambda name=name: vol.remove_file(1, 1, name), op="FS.RemoveFile",
                           light=True)  # fmt: skip
    # Unlinking the small file is cheap; freeing the big one's blocks is not.
    assert threads == [threading.current_thread().name, "commit-v"]
    assert vol.readdir(1, 1, None, 10)[0] == []
    vol.close()


async def test_one_client_alone_commits_inline_until_another_one_talks(tmp_path) -> None:
    async with server_and_two_clients(tmp_path / "fs") as (srv, x, y):
        act, stats = srv.store.activity, srv.store.sync_stats
        t = [0.0]
        act.window, act.now = 1.0, lambda: t[0]  # a clock the test moves
        root = await x.root_fid()
        with trio.fail_after(HANG):
            await x.call("FS.CreateFile", None, root, b"a", 0o644)
            t[0] = 10.0  # x alone for 10 s
            inline = stats.inline_commits
            await x.call("FS.CreateFile", None, root, b"b", 0o644)
            assert stats.inline_commits == inline + 1
            # Another client talks: commits go back to the thread (so the
            # server can serve it while the WAL syncs) for the window.
            await y.call("FS.FetchStatus", None, root)
            await x.call("FS.CreateFile", None, root, b"c", 0o644)
            t[0] = 10.5
            await x.call("FS.CreateFile", None, root, b"d", 0o644)
            assert stats.inline_commits == inline + 1
            t[0] = 12.0  # y quiet for longer than the window
            await x.call("FS.CreateFile", None, root, b"e", 0o644)
            assert stats.inline_commits == inline + 2
        listing = await y.call("FS.ReadDir", None, root, None, 10, False)
        assert {bytes(e[0]) for e in listing["entries"]} >= {b"a", b"b", b"c", b"d", b"e"}


async def test_a_request_still_arriving_keeps_commits_in_the_thread(tmp_path) -> None:
    """y's 4 MiB store takes many chunks to arrive; x, creating files in a
    loop meanwhile, must stop committing inline at y's first chunk (each
    inline COMMIT would hold up the next one), not once y's request starts."""
    async with server_and_two_clients(tmp_path / "fs") as (srv, x, y):
        act, stats = srv.store.activity, srv.store.sync_stats
        t = [0.0]
        act.window, act.now = 1.0, lambda: t[0]
        root = await x.root_fid()
        fid = (await y.call("FS.CreateFile", None, root, b"big", 0o644))["fid"]
        stop = trio.Event()

        async def creating() -> None:
            i = 0
            while not stop.is_set():
                await x.call("FS.CreateFile", None, root, b"f%d" % i, 0o644)
                i += 1

        with trio.fail_after(HANG):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(creating)
                await trio.sleep(0.02)
                t[0] = 10.0  # x alone since: its commits go inline
                before = stats.inline_commits
                await wait_until(lambda: stats.inline_commits >= before + 3, timeout=HANG)
                at_send = stats.inline_commits
                await y.call("FS.StoreData", None, fid, 0, b"z" * (4 << 20), None, None)
                stop.set()
        # At most the commit x had under way when y's first chunk came.
        assert stats.inline_commits - at_send <= 1


async def test_a_removal_with_breaks_to_send_sends_them_then_commits_inline(
    tmp_path, monkeypatch
) -> None:
    """The break to y is handed to the socket first, so it crosses the wire
    while the WAL syncs; then the COMMIT runs here, without waiting for y's
    answer; the reply waits for both.  (y takes 50 ms to answer, as a client
    in another process would take its time.)"""
    order: list[str] = []
    send_nowait, send_all = SocketTLSStream.send_nowait, SocketTLSStream.send_all

    def sending_now(self: SocketTLSStream, data: bytes) -> int:
        if b"CB.CallBack" in data:
            order.append("break sent")
        return send_nowait(self, data)

    async def sending(self: SocketTLSStream, data: Any) -> None:
        if b"CB.CallBack" in bytes(data):
            order.append("break sent")
        await send_all(self, data)

    monkeypatch.setattr(SocketTLSStream, "send_nowait", sending_now)
    monkeypatch.setattr(SocketTLSStream, "send_all", sending)
    async with server_and_two_clients(tmp_path / "fs") as (srv, x, y):
        act, stats = srv.store.activity, srv.store.sync_stats
        root = await x.root_fid()
        vol = srv.store.get(root[0]).vol
        real = vol.commit_batch

        def commit_batch(batch: Any) -> Any:
            order.append(f"COMMIT in {threading.current_thread().name}")
            return real(batch)

        assert y.conn is not None
        answer = y.conn.handlers["CB.CallBack"]

        async def slow_answer(conn: Any, fids: Any) -> Any:
            await trio.sleep(0.05)
            out = await answer(conn, fids)
            order.append("y answers")
            return out

        y.conn.handlers["CB.CallBack"] = slow_answer
        with trio.fail_after(HANG):
            held = (await x.call("FS.CreateFile", None, root, b"held", 0o644))["fid"]
            await x.call("FS.CreateFile", None, root, b"free", 0o644)
            await y.call("FS.FetchStatus", None, held)  # y holds a promise on it
            act.window = 0.0
            await x.call("FS.FetchStatus", None, root)  # x alone is the latest
            vol.commit_batch = commit_batch  # type: ignore[method-assign]
            inline = stats.inline_commits
            await x.call("FS.RemoveFile", None, root, b"free")
            await x.call("FS.RemoveFile", None, root, b"held")
            order.append("x has the reply")
            assert stats.inline_commits == inline + 2
            assert [p for kind, p, _ in y.log if kind == "break"] == [[Fid.from_wire(held)]]
        here = f"COMMIT in {threading.current_thread().name}"
        assert order == [here, "break sent", here, "y answers", "x has the reply"]


async def test_a_data_file_that_cannot_be_examined_leaves_the_commit_to_the_thread(
    tmp_path, monkeypatch
) -> None:
    """Whether unlinking is cheap cannot be told: the thread commits (and
    logs what its unlink meets); the change is never rolled back for it."""
    vol, h, threads = _volume(tmp_path)
    v, _dv = vol.create_vnode(1, 1, b"f", FileType.FILE, 0o644, 0, 0)
    vol.store_data(v.vnode, v.unique, 0, b"x" * 1000, None, None)
    real_stat = Path.stat

    def stat(self: Path, *args: Any, **kw: Any) -> Any:
        if self.name.partition(".")[0] == str(v.vnode):
            raise PermissionError(13, "denied", str(self))
        return real_stat(self, *args, **kw)

    monkeypatch.setattr(Path, "stat", stat)
    with trio.fail_after(HANG):
        await h.commit(lambda: vol.remove_file(1, 1, b"f"), op="FS.RemoveFile", light=True)
    monkeypatch.undo()
    assert threads == ["commit-v"]
    assert vol.readdir(1, 1, None, 10)[0] == []
    vol.close()


async def test_an_inline_commit_that_fails_fails_its_changes_and_is_not_counted(
    tmp_path,
) -> None:
    vol, h, threads = _volume(tmp_path)
    real_commit = vol._commit

    def failing(ops: Any) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    vol._commit = failing  # type: ignore[method-assign]
    with pytest.raises(sqlite3.OperationalError), trio.fail_after(HANG):
        await h.commit(
            lambda: vol.create_vnode(1, 1, b"lost", FileType.FILE, 0o644, 0, 0),
            op="FS.CreateFile", light=True,
        )  # fmt: skip
    vol._commit = real_commit  # type: ignore[method-assign]
    assert threads == [threading.current_thread().name]  # it was inline
    assert vol.stats.inline_commits == 0 and vol.stats.group_commits == 0
    assert not vol.db.in_transaction
    with trio.fail_after(HANG):
        await h.commit(
            lambda: vol.create_vnode(1, 1, b"next", FileType.FILE, 0o644, 0, 0),
            op="FS.CreateFile", light=True,
        )  # fmt: skip
    assert {n for n, _ in vol.readdir(1, 1, None, 10)[0]} == {b"next"}
    assert vol.stats.inline_commits == 1
    vol.close()


async def test_breaks_that_do_not_settle_leave_the_commit_to_the_thread(tmp_path) -> None:
    """A task that never stops running (a sweep yielding after each step)
    keeps a held removal from settling: after ``SETTLE_S`` its COMMIT goes
    to the thread, and the wait is counted."""
    async with server_and_two_clients(tmp_path / "fs") as (srv, x, y):
        act, stats = srv.store.activity, srv.store.sync_stats
        root = await x.root_fid()
        with trio.fail_after(HANG):
            held = (await x.call("FS.CreateFile", None, root, b"held", 0o644))["fid"]
            await y.call("FS.FetchStatus", None, held)
            act.window = 0.0
            await x.call("FS.FetchStatus", None, root)
            inline, timeouts = stats.inline_commits, stats.settle_timeouts

            async def busy() -> None:
                for _ in range(10_000_000):  # ended by the cancel below
                    await trio.lowlevel.checkpoint()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(busy)
                await x.call("FS.RemoveFile", None, root, b"held")
                nursery.cancel_scope.cancel()
        assert stats.inline_commits == inline
        assert stats.settle_timeouts == timeouts + 1
        assert [p for kind, p, _ in y.log if kind == "break"] == [[Fid.from_wire(held)]]

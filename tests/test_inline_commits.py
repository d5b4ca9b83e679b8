"""Where a light batch's COMMIT runs: on the trio thread while one client
alone is working (``fileserver.activity``), in the commit thread whenever
someone else could be served meanwhile.  Either way the change is durable
when the reply leaves."""

from __future__ import annotations

import threading
from typing import Any

import trio

from afsfuse.lab.server import server_and_two_clients
from fileserver.activity import Activity
from fileserver.store import VolumeHandle
from fileserver.volume import CHEAP_UNLINK_BYTES, Volume
from protocol.records import FileType

HANG = 30  # a hang guard, not a speed assertion


async def test_activity_is_quiet_only_while_one_connection_alone_is_busy(autojump_clock) -> None:
    a = Activity(window=0.05)
    one, two = object(), object()
    a.started(one)
    assert not a.quiet(1)  # it only just started talking
    await trio.sleep(0.05)
    assert a.quiet(1)
    a.started(one)  # a second request of the same connection, in progress
    assert not a.quiet(1) and a.quiet(2)
    a.ended()
    a.started(two)  # another connection talks: not alone any more
    assert not a.quiet(2)
    a.ended()
    assert not a.quiet(1)
    await trio.sleep(0.05)
    assert a.quiet(1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep, 0)  # a task waiting to run (a break on its way)
        assert not a.quiet(1)
    assert a.quiet(1)


def _volume(tmp_path: Any) -> tuple[Volume, VolumeHandle, list[str]]:
    """A volume whose COMMITs record the thread they ran in, whose one
    client is quiet (no request has even started)."""
    vol = Volume.create(tmp_path / "v", 7, "v")
    h = VolumeHandle(vol, Activity())
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
        act.window = 0.0  # alone as soon as it is the latest to talk
        root = await x.root_fid()
        with trio.fail_after(HANG):
            await x.call("FS.CreateFile", None, root, b"a", 0o644)
            inline = stats.inline_commits
            await x.call("FS.CreateFile", None, root, b"b", 0o644)
            assert stats.inline_commits == inline + 1
            # Another client talking: commits go back to the thread, so the
            # server can serve it while the WAL syncs.
            act.window = 3600.0
            await y.call("FS.FetchStatus", None, root)
            await x.call("FS.CreateFile", None, root, b"c", 0o644)
            assert stats.inline_commits == inline + 1
        names = {
            bytes(e[0])
            for e in (await y.call("FS.ReadDir", None, root, None, 10, False))["entries"]
        }
        assert names >= {b"a", b"b", b"c"}


async def test_a_removal_with_breaks_to_send_commits_in_the_thread(tmp_path) -> None:
    async with server_and_two_clients(tmp_path / "fs") as (srv, x, y):
        act, stats = srv.store.activity, srv.store.sync_stats
        root = await x.root_fid()
        with trio.fail_after(HANG):
            held = (await x.call("FS.CreateFile", None, root, b"held", 0o644))["fid"]
            await x.call("FS.CreateFile", None, root, b"free", 0o644)
            await y.call("FS.FetchStatus", None, held)  # y holds a promise on it
            act.window = 0.0
            await x.call("FS.FetchStatus", None, root)  # x alone is the latest
            inline = stats.inline_commits
            await x.call("FS.RemoveFile", None, root, b"free")
            assert stats.inline_commits == inline + 1
            # The break to y goes out while the COMMIT syncs in the thread.
            await x.call("FS.RemoveFile", None, root, b"held")
            assert stats.inline_commits == inline + 1

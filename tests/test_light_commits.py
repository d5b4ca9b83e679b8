"""Where a group commit's work runs (``VolumeHandle.commit(light=...)``).

A batch of light changes (SQL only) runs them in the trio thread and only
its COMMIT in the commit thread; any other batch runs whole in the commit
thread.  Either way the sync is off the trio thread, a decided change is
announced before its COMMIT, and the change is durable when ``commit``
returns."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import trio

from afsfuse.lab.server import server_and_two_clients
from fileserver.store import VolumeHandle
from fileserver.volume import Volume
from protocol.records import FileType

HANG = 30  # a hang guard, not a speed assertion


def _volume(tmp_path: Any) -> tuple[Volume, VolumeHandle, list[tuple[str, str]]]:
    """A volume whose COMMITs record the thread they ran in."""
    vol = Volume.create(tmp_path / "v", 7, "v")
    h = VolumeHandle(vol)
    seen: list[tuple[str, str]] = []
    real = vol.commit_batch

    def commit_batch(batch: Any) -> Any:
        seen.append(("COMMIT", threading.current_thread().name))
        return real(batch)

    vol.commit_batch = commit_batch  # type: ignore[method-assign]
    return vol, h, seen


def _create(vol: Volume, name: bytes, seen: list[tuple[str, str]]) -> Any:
    seen.append((name.decode(), threading.current_thread().name))
    return vol.create_vnode(1, 1, name, FileType.FILE, 0o644, 0, 0)


async def test_a_light_change_runs_here_and_only_its_commit_in_the_thread(tmp_path) -> None:
    vol, h, seen = _volume(tmp_path)
    here = threading.current_thread().name
    with trio.fail_after(HANG):
        await h.commit(lambda: _create(vol, b"light", seen), op="FS.CreateFile", light=True)
        await h.commit(lambda: _create(vol, b"heavy", seen), op="FS.CreateFile")
    assert seen[0] == ("light", here)
    assert seen[1][0] == "COMMIT" and seen[1][1] == "commit-v"
    assert seen[2] == ("heavy", "commit-v")  # not light: the whole batch in the thread
    assert seen[3] == ("COMMIT", "commit-v")
    vol.close()
    again = Volume(tmp_path / "v")  # both durable: a fresh open finds them
    assert {n for n, _ in again.readdir(1, 1, None, 10)[0]} >= {b"light", b"heavy"}
    again.close()


async def test_a_batch_with_one_change_not_light_runs_whole_in_the_thread(tmp_path) -> None:
    vol, h, seen = _volume(tmp_path)
    parked, release = threading.Event(), threading.Event()
    real = vol.commit_batch

    def parking(batch: Any) -> Any:  # the first COMMIT waits: the others queue
        if not release.is_set():
            parked.set()
            release.wait(HANG)
        return real(batch)

    vol.commit_batch = parking  # type: ignore[method-assign]

    async def change(name: bytes, light: bool) -> None:
        await h.commit(lambda: _create(vol, name, seen), op="FS.CreateFile", light=light)

    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(change, b"first", True)
            assert await trio.to_thread.run_sync(parked.wait, HANG)
            nursery.start_soon(change, b"a", True)
            nursery.start_soon(change, b"b", False)
            while len(h._queue) < 2:  # noqa: ASYNC110 - no event marks a queued job
                await trio.sleep(0.01)
            release.set()
    by_name = dict(seen)
    assert by_name["first"] == threading.current_thread().name
    assert by_name["a"] == by_name["b"] == "commit-v"  # one batch, in the thread
    vol.close()


async def test_a_light_change_is_announced_before_its_commit(tmp_path) -> None:
    vol, h, seen = _volume(tmp_path)
    announced: list[Any] = []
    at_commit: list[int] = []
    real = vol.commit_batch

    def commit_batch(batch: Any) -> Any:
        at_commit.append(len(announced))
        return real(batch)

    vol.commit_batch = commit_batch  # type: ignore[method-assign]
    with trio.fail_after(HANG):
        v, _dv = await h.commit(
            lambda: _create(vol, b"told", seen), op="FS.RemoveFile",
            decided=announced.append, light=True,
        )  # fmt: skip
        await h.commit(
            lambda: _create(vol, b"quiet", seen), op="FS.RemoveFile",
            decided=announced.append, decided_if=lambda _: False, light=True,
        )  # fmt: skip
    assert at_commit == [1, 1]  # the first was told before its COMMIT; the second never
    assert announced[0][0].vnode == v.vnode
    vol.close()


async def test_a_commit_thread_that_cannot_start_leaves_no_transaction_open(tmp_path) -> None:
    """The light path BEGINs in the trio thread; when the COMMIT cannot even
    be handed over, that transaction must be rolled back, or every later
    change would fail ("cannot start a transaction within a transaction")."""
    vol, h, seen = _volume(tmp_path)
    real_run = h._committer.run

    async def cannot_start(fn: Any) -> Any:
        raise RuntimeError("can't start new thread")

    h._committer.run = cannot_start  # type: ignore[method-assign]
    with pytest.raises(RuntimeError), trio.fail_after(HANG):
        await h.commit(lambda: _create(vol, b"lost", seen), op="FS.CreateFile", light=True)
    h._committer.run = real_run  # type: ignore[method-assign]
    assert not vol.db.in_transaction
    with trio.fail_after(HANG):
        await h.commit(lambda: _create(vol, b"next", seen), op="FS.CreateFile", light=True)
    names = {n for n, _ in vol.readdir(1, 1, None, 10)[0]}
    assert b"next" in names and b"lost" not in names
    vol.close()


async def test_a_small_store_that_spills_an_inline_file_is_not_light(tmp_path) -> None:
    """A file stored inline under a larger ``--inline-max`` than today's
    moves to a data file at its next store (written and synced): that work
    must run in the commit thread, never in the trio thread."""
    async with server_and_two_clients(tmp_path / "fs", inline_max=4096) as (_srv, x, _y):
        root = await x.root_fid()
        fid = (await x.call("FS.CreateFile", None, root, b"f", 0o644))["fid"]
        await x.call("FS.StoreData", None, fid, 0, b"a" * 3000, None, None)
    async with server_and_two_clients(tmp_path / "fs", inline_max=1000) as (srv, x, _y):
        vol = srv.store.get(fid[0]).vol
        assert vol.is_inline(fid[1])
        spilled_in: list[str] = []
        real = vol._spill

        def spill(*args: Any, **kw: Any) -> Any:
            spilled_in.append(threading.current_thread().name)
            return real(*args, **kw)

        vol._spill = spill  # type: ignore[method-assign]
        with trio.fail_after(HANG):
            await x.call("FS.StoreData", None, fid, 0, b"b" * 10, None, None)
        assert spilled_in and threading.current_thread().name not in spilled_in
        assert not vol.is_inline(fid[1])
        got = await x.call("FS.FetchData", None, fid, 0, 4000)
        assert bytes(got["data"]) == b"b" * 10 + b"a" * 2990

"""Where a group commit's work runs (``VolumeHandle.commit(light=...)``).

A batch of light changes (SQL only) runs them in the trio thread and only
its COMMIT in the commit thread; any other batch runs whole in the commit
thread.  Either way the sync is off the trio thread, a decided change is
announced before its COMMIT, and the change is durable when ``commit``
returns."""

from __future__ import annotations

import threading
from typing import Any

import trio

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

"""The durability counters (``fileserver.durability.SyncStats``): a group
commit shared by N changes costs each 1/N of its sync, and the time commits
took is counted (``afs-fileserver stats --json``, ``durability``)."""

from __future__ import annotations

import threading
from typing import Any

import trio

from fileserver.durability import SyncStats
from fileserver.store import VolumeHandle
from fileserver.volume import Volume
from protocol.records import FileType

HANG = 30  # a hang guard, not a speed assertion


def test_a_shared_commit_is_split_between_its_operations() -> None:
    s = SyncStats()
    s.batch(["FS.CreateFile"] * 3 + ["FS.RemoveFile"], wal_syncs=1, dir_syncs=0, seconds=0.004)
    s.batch(["FS.RemoveFile"], wal_syncs=1, dir_syncs=1, seconds=0.002)
    snap = s.snapshot()
    assert snap["group_commits"] == 2 and snap["committed_ops"] == 5
    assert snap["largest_batch"] == 4 and snap["ops_per_commit"] == 2.5
    assert snap["by_op"]["FS.CreateFile"] == {"ops": 3, "commits": 0.75, "fsyncs": 0.75,
                                              "fsyncs_per_op": 0.25}  # fmt: skip
    assert snap["by_op"]["FS.RemoveFile"]["fsyncs"] == 2.25  # 1/4 + the whole of 2
    assert snap["fsync_calls"] == {"dir": 1, "wal": 2}
    assert abs(snap["commit_seconds"] - 0.006) < 1e-9


async def test_concurrent_changes_share_one_commit(tmp_path) -> None:
    vol = Volume.create(tmp_path / "v", 7, "v")
    h = VolumeHandle(vol)
    parked, release = threading.Event(), threading.Event()
    real = vol.run_batch

    def parking(jobs: Any) -> Any:
        if not release.is_set():
            parked.set()
            release.wait(HANG)
        return real(jobs)

    vol.run_batch = parking  # type: ignore[method-assign]
    before = vol.stats.snapshot()

    def create(name: bytes) -> Any:
        return vol.create_vnode(1, 1, name, FileType.FILE, 0o644, 0, 0)

    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial_commit, h, create, b"first")
            assert await trio.to_thread.run_sync(parked.wait, HANG)
            for i in range(4):
                nursery.start_soon(partial_commit, h, create, b"f%d" % i)
            while len(h._queue) < 4:  # noqa: ASYNC110 - no event marks a queued job
                await trio.sleep(0.01)
            release.set()
    after = vol.stats.snapshot()
    assert after["group_commits"] - before["group_commits"] == 2  # "first", then the 4
    assert after["largest_batch"] == 4
    assert after["by_op"]["FS.CreateFile"]["fsyncs"] == 2.0  # 1 + 4 * 1/4
    assert after["commit_seconds"] > before["commit_seconds"]
    assert sorted(n for n, _ in vol.readdir(1, 1, None, 10)[0]) == [
        b"f0", b"f1", b"f2", b"f3", b"first"]  # fmt: skip
    vol.close()


async def partial_commit(h: VolumeHandle, create: Any, name: bytes) -> None:
    await h.commit(lambda: create(name), op="FS.CreateFile")

"""Concurrency on one volume: reads beside a store, renames that cross, random
concurrent namespace mixes against a model, and kill -9 in a group commit."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from afsfuse.lab.server import (
    FsTestClient,
    ServerProcess,
    fs_client,
    server_and_two_clients,
)
from fileserver.salvage import salvage
from protocol.errors import RpcError
from protocol.records import Fid

# A hang guard, not a speed assertion: a read that waited for the parked
# store would never finish.
HANG = 30


async def _listing(c: FsTestClient, d: list[int]) -> dict[bytes, list[int]]:
    r = await c.call("FS.ReadDir", None, d, None, 1000, False)
    assert r["next"] is None
    return {name: fid for name, fid, _type in r["entries"]}


async def test_reads_and_changes_complete_while_a_store_is_parked(tmp_path):
    """A large store parked while its bytes go in: reads of every kind, and
    changes of other files, complete meanwhile."""
    parked, release = threading.Event(), threading.Event()
    new = b"new data" * 20_000  # large: written beside the commits, not in one
    async with server_and_two_clients(tmp_path / "fs") as (srv, x, y):
        root = await x.root_fid()
        fid = (await x.call("FS.CreateFile", None, root, b"big", 0o644))["fid"]
        other = (await x.call("FS.CreateFile", None, root, b"other", 0o644))["fid"]
        await x.call("FS.StoreData", None, fid, 0, b"old", None, None)
        await x.call("FS.StoreData", None, other, 0, b"other data", None, None)
        h = srv.store.get(root[0])
        real = h.vol.store_write

        def parking_write(vnode: int, *args: Any) -> None:
            if vnode == fid[1]:
                parked.set()
                release.wait(HANG)
            real(vnode, *args)

        h.vol.store_write = parking_write  # type: ignore[method-assign]
        stored: dict[str, Any] = {}

        async def store() -> None:
            stored["r"] = await x.call("FS.StoreData", None, fid, 0, new, None, None)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(store)
            assert await trio.to_thread.run_sync(parked.wait, HANG)
            with trio.fail_after(HANG):
                st = await y.call("FS.FetchStatus", None, fid)
                assert st["status"][4] == 2  # the committed DV: the store is not done
                assert (await y.call("FS.FetchData", None, other, 0, 100))["data"] == (
                    b"other data"
                )
                assert (await y.call("FS.Lookup", None, root, b"big"))["fid"] == fid
                assert set(await _listing(y, root)) == {b"big", b"other"}
                bulk = await y.call("FS.InlineBulkStatus", None, [fid, other])
                assert [res[0] for res in bulk["results"]] == [None, None]
                # Changes to other files are not held up either.
                await y.call("FS.CreateFile", None, root, b"meanwhile", 0o644)
                await y.call("FS.StoreData", None, other, 0, b"OTHER", None, None)
            assert "r" not in stored  # the store really was parked all along
            release.set()
        h.vol.store_write = real  # type: ignore[method-assign]
        assert stored["r"]["status"][4] == 3
        # Y held a promise on the file from the read while parked: broken.
        assert Fid(*fid) in y.breaks
        assert (await y.call("FS.FetchData", None, fid, 0, len(new)))["data"] == new
        assert h.vol.check() == []


async def test_reads_complete_while_a_group_commit_is_parked(tmp_path):
    """The commit thread itself parked (a slow fsync): reads do not queue behind it."""
    parked, release = threading.Event(), threading.Event()
    async with server_and_two_clients(tmp_path / "fs") as (srv, x, y):
        root = await x.root_fid()
        fid = (await x.call("FS.CreateFile", None, root, b"f", 0o644))["fid"]
        g = (await x.call("FS.CreateFile", None, root, b"g", 0o644))["fid"]
        await x.call("FS.StoreData", None, fid, 0, b"small", None, None)
        await x.call("FS.StoreData", None, g, 0, b"gee", None, None)
        h = srv.store.get(root[0])
        real = h.vol.commit_batch

        def parking_batch(batch: Any) -> Any:
            parked.set()
            release.wait(HANG)
            return real(batch)

        h.vol.commit_batch = parking_batch  # type: ignore[method-assign]
        done: dict[str, Any] = {}

        async def store() -> None:
            done["r"] = await x.call("FS.StoreData", None, fid, 0, b"SMALL!", None, None)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(store)
            assert await trio.to_thread.run_sync(parked.wait, HANG)
            with trio.fail_after(HANG):
                assert (await y.call("FS.FetchStatus", None, fid))["status"][4] == 2
                assert (await y.call("FS.FetchData", None, g, 0, 100))["data"] == b"gee"
                assert set(await _listing(y, root)) == {b"f", b"g"}
                await y.call("FS.InlineBulkStatus", None, [fid, g])
            assert "r" not in done
            release.set()
        h.vol.commit_batch = real  # type: ignore[method-assign]
        assert Fid(*fid) in y.breaks
        assert (await y.call("FS.FetchData", None, fid, 0, 100))["data"] == b"SMALL!"


async def test_renames_in_opposite_directions_finish(tmp_path):
    async with server_and_two_clients(tmp_path / "fs") as (srv, x, y):
        root = await x.root_fid()
        a = (await x.call("FS.MakeDir", None, root, b"A", 0o755))["fid"]
        b = (await x.call("FS.MakeDir", None, root, b"B", 0o755))["fid"]
        await x.call("FS.CreateFile", None, a, b"fa", 0o644)
        await x.call("FS.CreateFile", None, b, b"fb", 0o644)
        rounds = 40

        async def shuttle(c: FsTestClient, name: bytes, src: list[int], dst: list[int]) -> None:
            for _ in range(rounds):
                await c.call("FS.Rename", None, src, name, dst, name, 0)
                src, dst = dst, src

        with trio.fail_after(HANG):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(shuttle, x, b"fa", a, b)  # A -> B first
                nursery.start_soon(shuttle, y, b"fb", b, a)  # B -> A first
        # An even number of moves each: both back where they started.
        assert set(await _listing(x, a)) == {b"fa"}
        assert set(await _listing(x, b)) == {b"fb"}
        assert srv.store.get(root[0]).vol.check() == []


# -- random concurrent mixes against a model ----------------------------------------

OP = st.tuples(st.sampled_from(["create", "link", "rename", "unlink"]), st.integers(0, 2),
               st.integers(0, 2), st.integers(0, 1), st.integers(0, 1))  # fmt: skip


class _Model:
    """One client's names: (dir index, name) -> file key; file key -> links."""

    def __init__(self) -> None:
        self.entries: dict[tuple[int, bytes], int] = {}
        self.next = 0

    def apply(self, op: str, n1: bytes, n2: bytes, d1: int, d2: int) -> str | None:
        """The outcome the server must give (None: success, else an errno)."""
        src, dst = (d1, n1), (d2, n2)
        if op == "create":
            if src in self.entries:
                return "EEXIST"
            self.entries[src] = self.next
            self.next += 1
        elif op == "link":
            if src not in self.entries:
                return "ENOENT"
            if dst in self.entries:
                return "EEXIST"
            self.entries[dst] = self.entries[src]
        elif op == "rename":
            if src not in self.entries:
                return "ENOENT"
            if self.entries.get(dst) != self.entries[src]:  # same file: POSIX does nothing
                self.entries[dst] = self.entries.pop(src)
        elif op == "unlink":
            if src not in self.entries:
                return "ENOENT"
            del self.entries[src]
        return None


async def _mix(srv: ServerProcess, tag: str, plans: list[list[tuple[Any, ...]]]) -> None:
    async with fs_client(srv.host, srv.port) as admin:
        root = await admin.root_fid()
        dirs = [(await admin.call("FS.MakeDir", None, root, f"{tag}-{i}".encode(), 0o777))["fid"]
                for i in range(2)]  # fmt: skip
        models = [_Model() for _ in plans]

        async def client(i: int, plan: list[tuple[Any, ...]]) -> None:
            async with fs_client(srv.host, srv.port) as c:
                m = models[i]
                fids: dict[int, list[int]] = {}
                for op, a, b, d1, d2 in plan:
                    n1, n2 = b"c%d-%d" % (i, a), b"c%d-%d" % (i, b)
                    key = m.entries.get((d1, n1))
                    want = m.apply(op, n1, n2, d1, d2)
                    if op == "link" and key is None:
                        continue  # nothing to link to (and no fid to name it by)
                    try:
                        if op == "create":
                            r = await c.call("FS.CreateFile", None, dirs[d1], n1, 0o644)
                            fids[m.next - 1] = r["fid"]
                        elif op == "link":
                            await c.call("FS.Link", None, dirs[d2], n2, fids[key])
                        elif op == "rename":
                            await c.call("FS.Rename", None, dirs[d1], n1, dirs[d2], n2, 0)
                        else:
                            await c.call("FS.RemoveFile", None, dirs[d1], n1)
                        got = None
                    except RpcError as exc:
                        got = exc.code
                    assert got == want, (i, op, n1, n2, d1, d2, got, want)

        async with trio.open_nursery() as nursery:
            for i, plan in enumerate(plans):
                nursery.start_soon(client, i, plan)
        for d in range(2):
            listing = await _listing(admin, dirs[d])
            want = {n for (dd, n), _ in (e for m in models for e in m.entries.items()) if dd == d}
            assert set(listing) == want
            for name, fid in listing.items():
                i = int(name[1 : name.index(b"-")])
                k = models[i].entries[(d, name)]
                links = sum(1 for v in models[i].entries.values() if v == k)
                st_ = (await admin.call("FS.FetchStatus", None, fid))["status"]
                assert st_[2] == links, (name, st_[2], links)  # nlink
            dst = (await admin.call("FS.FetchStatus", None, dirs[d]))["status"]
            assert dst[3] == len(listing)  # a directory's size is its entry count


def test_random_concurrent_namespace_mixes_match_a_model(tmp_path):
    srv = ServerProcess(tmp_path / "fs", events=False).start()
    runs = [0]
    try:
        slow = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]

        @settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=slow)
        @given(st.lists(st.lists(OP, min_size=5, max_size=25), min_size=2, max_size=5))
        def check(plans: list[list[tuple[Any, ...]]]) -> None:
            runs[0] += 1
            trio.run(_mix, srv, f"run{runs[0]}", plans)

        check()
    finally:
        assert srv.stop() == 0
    assert salvage(tmp_path / "fs") == []


# -- kill -9 with many sessions in a group commit -------------------------------------


async def _load(srv: ServerProcess, sessions: int, acked: dict[bytes, Any],
                tried: dict[bytes, Any], kill_after: int) -> None:  # fmt: skip
    """Each session: create, store (whole contents), rename into ``done``;
    the server is killed once ``kill_after`` changes were acknowledged."""
    count = [0]
    killed = trio.Event()

    async def session(i: int, root: list[int], work: list[int], done: list[int]) -> None:
        try:
            async with fs_client(srv.host, srv.port) as c:
                for k in range(10_000):
                    name = b"s%d-%d" % (i, k)
                    data = bytes([65 + i % 26]) * (100 + 37 * k)
                    tried[name] = ("created", data)
                    fid = (await c.call("FS.CreateFile", None, work, name, 0o644))["fid"]
                    acked[name] = ("created", b"")
                    await c.call("FS.StoreData", None, fid, 0, data, None, None)
                    acked[name] = ("stored", data)
                    await c.call("FS.Rename", None, work, name, done, name, 0)
                    acked[name] = ("moved", data)
                    count[0] += 3
                    if count[0] >= kill_after:
                        killed.set()
        except Exception:  # a group, from the connection's nursery
            if not killed.is_set():
                raise
            return  # the server died under it

    async with fs_client(srv.host, srv.port) as c:
        root = await c.root_fid()
        work = (await c.call("FS.MakeDir", None, root, b"work", 0o777))["fid"]
        done = (await c.call("FS.MakeDir", None, root, b"done", 0o777))["fid"]
    async with trio.open_nursery() as nursery:
        for i in range(sessions):
            nursery.start_soon(session, i, root, work, done)
        with trio.fail_after(120):
            await killed.wait()
        await trio.sleep(random.uniform(0, 0.01))
        await trio.to_thread.run_sync(srv.kill)


async def test_kill9_during_group_commits_keeps_every_acknowledged_change(tmp_path):
    data_dir = tmp_path / "fs"
    srv = ServerProcess(data_dir, events=False).start()
    acked: dict[bytes, Any] = {}
    tried: dict[bytes, Any] = {}
    try:
        await _load(srv, 24, acked, tried, kill_after=600)
    finally:
        srv.kill()
    assert acked
    srv.start()
    try:
        async with fs_client(srv.host, srv.port) as c:
            root = await c.root_fid()
            work = (await c.call("FS.Lookup", None, root, b"work"))["fid"]
            done = (await c.call("FS.Lookup", None, root, b"done"))["fid"]
            in_work, in_done = await _listing(c, work), await _listing(c, done)
            assert not set(in_work) & set(in_done)  # no rename half-applied
            for name in tried:
                where = in_done.get(name) or in_work.get(name)
                state = acked.get(name, ("absent", b""))[0]
                if state == "moved":
                    assert name in in_done, name
                elif state in ("stored", "created"):
                    assert where is not None, name
                if where is None:
                    continue
                r = await c.call("FS.FetchStatus", None, where)
                data = (await c.call("FS.FetchData", None, where, 0, 1 << 20))["data"]
                full = tried[name][1]
                if state in ("stored", "moved"):
                    assert data == full, name
                else:  # an unacknowledged store: all of it or none of it
                    assert data in (b"", full), (name, len(data), r["status"])
    finally:
        assert srv.stop() == 0
    assert salvage(Path(data_dir)) == []

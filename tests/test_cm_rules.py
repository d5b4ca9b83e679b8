"""The callback rules P1..P6 and C1/C2 of DESIGN.md section 3, one test (or
more) each, on memory streams with a fake fileserver and a mock clock."""

from __future__ import annotations

import dataclasses

import trio
from test_cm_fakeserver import ROOT, VOL, FakeServer, running

from afsfuse.vnode import Promise
from protocol.records import CallBackType, Fid, FileStatus, FileType


class CountingDict(dict):
    """A vnode index that counts every walk over it (P4 instrumentation)."""

    walks = 0

    def __iter__(self):
        CountingDict.walks += 1
        return super().__iter__()

    def values(self):
        CountingDict.walks += 1
        return super().values()

    def items(self):
        CountingDict.walks += 1
        return super().items()

    def keys(self):
        CountingDict.walks += 1
        return super().keys()


async def test_p1_forget_sends_nothing(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        fake.add(ROOT, b"f", data=b"x")
        root = await cm.mount_volume("test", "root.cell")
        f = await cm.lookup(root, b"f")
        before = sum(fake.calls.values())
        cm.forget(f)
        await trio.sleep(5)
        assert cm.find_vnode("test", f.fid) is None
        assert sum(fake.calls.values()) == before  # nothing given back (P1)
        assert not fake.give_ups
        # The server still thinks we hold it and may break it: costs nothing.
        await fake.break_fids([f.fid])
        assert cm.find_vnode("test", f.fid) is None


async def test_p2_give_up_only_when_record_destroyed_once(tmp_path, autojump_clock):
    async with running(tmp_path, idle_record_lifetime=60) as (_net, fake, cm):
        root = await cm.mount_volume("test", "root.cell")
        rec = root.volume.server
        await trio.sleep(600)  # in use: never destroyed, never gives up
        assert not fake.give_ups and not rec.destroyed
        cm.unmount_volume(root.volume)
        await trio.sleep(30)  # idle, but not for long enough
        assert not fake.give_ups and not rec.destroyed
        await trio.sleep(60)
        assert rec.destroyed
        assert fake.give_ups[cm.uuid] == 1
        assert cm.stats.rpc["FS.GiveUpAllCallBacks"] == 1
    assert fake.give_ups[cm.uuid] == 1  # close() does not send it again


async def test_p2_unmount_destroys_every_record_once(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        await cm.mount_volume("test", "root.cell")
        assert not fake.give_ups
        await cm.close()
        await cm.close()
        assert fake.give_ups[cm.uuid] == 1


async def test_p3_break_reaches_only_matching_instances(tmp_path, autojump_clock):
    VOL2 = VOL + 1
    fake = FakeServer(volumes={VOL: "root.cell", VOL2: "other"})
    async with running(tmp_path, fake) as (_net, fake, cm):
        r1 = await cm.mount_volume("test", "root.cell")
        r2 = await cm.mount_volume("test", "other")
        assert r1.volume.server is r2.volume.server  # one record, two interests
        rec = r1.volume.server
        assert rec.instances(VOL) == {r1.volume} and rec.instances(VOL2) == {r2.volume}
        # Both roots are vnode 1.1: only the one in the broken volume breaks.
        await fake.break_fids([Fid(VOL2, 1, 1)])
        assert r2.cb_break == 1 and r1.cb_break == 0
        assert r2.promise is None and r1.promise is not None
        # A fid we do not cache creates nothing and touches nothing.
        n1, n2 = len(r1.volume.vnodes), len(r2.volume.vnodes)
        touched = cm.cb.vnodes_touched
        await fake.break_fids([Fid(VOL, 77, 1), Fid(VOL2, 78, 1), Fid(999, 5, 5)])
        assert (len(r1.volume.vnodes), len(r2.volume.vnodes)) == (n1, n2)
        assert cm.find_vnode("test", Fid(VOL, 77, 1)) is None
        assert cm.cb.vnodes_touched == touched


async def test_p4_init_callback_state_is_o1(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        real = [fake.add(ROOT, f"f{i}".encode(), data=b"abc") for i in range(3)]
        root = await cm.mount_volume("test", "root.cell")
        vol = root.volume
        for n in real:
            await cm.lookup(root, next(k for k, v in fake.nodes[ROOT].entries.items()
                                   if v == n.fid))  # fmt: skip
        # Fill the cache to 100,000 promised vnodes without RPC.
        template = next(iter(vol.vnodes.values()))
        st = FileStatus(FileType.FILE, 0o644, 1, 0, 1, 0, 0, 0, 0, 1, 1)
        rec = vol.server
        now = trio.current_time()
        for i in range(100_000 - len(vol.vnodes)):
            v = vol.get(Fid(VOL, 1000 + i, 1))
            v.status = st
            v.promise = Promise(1, CallBackType.SHARED, now + 3600, rec, rec.cb_s_break,
                                vol.cb_v_break)  # fmt: skip
        assert len(vol.vnodes) == 100_000 and template.promise_state(now) == "ok"
        vol.vnodes = CountingDict(vol.vnodes)
        CountingDict.walks = 0
        touched = cm.cb.vnodes_touched
        s0, mass0 = rec.cb_s_break, cm.stats.mass_breaks
        await fake.init_state(fake.clients[cm.uuid])
        assert rec.cb_s_break == s0 + 1 and cm.stats.mass_breaks == mass0 + 1
        assert CountingDict.walks == 0 and cm.cb.vnodes_touched == touched  # O(1)
        # Every one of them is now void: the next validate fetches.
        fetches = fake.calls["FS.FetchStatus"]
        for n in real:
            v = cm.find_vnode("test", n.fid)
            assert v.promise_state(trio.current_time()) == "server_break"
            await cm.getattr(v)
        assert fake.calls["FS.FetchStatus"] == fetches + 3
        assert vol.find(Fid(VOL, 5000, 1)).promise_state(trio.current_time()) == "server_break"


async def test_p5_break_during_fetch_leaves_promise_uninstalled(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        n = fake.add(ROOT, b"f", data=b"v1")
        root = await cm.mount_volume("test", "root.cell")
        f = await cm.lookup(root, b"f")
        f.promise = None  # force the slow path
        n.dv += 1  # the server's file changed
        gate = fake.gate("FS.FetchStatus")
        result = {}

        async def fetch():
            result["st"] = await cm.getattr(f)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch)
            await gate.entered.wait()
            await fake.break_fids([f.fid])  # arrives while the fetch is in flight
            assert f.cb_break == 1
            gate.release.set()
        del fake.gates["FS.FetchStatus"]
        assert result["st"].data_version == n.dv  # status applied regardless
        assert f.promise is None  # promise not installed (P5)
        assert cm.stats.promises_discarded >= 1
        before = fake.calls["FS.FetchStatus"]
        await cm.getattr(f)  # next validate fetches and now installs
        assert fake.calls["FS.FetchStatus"] == before + 1 and f.promise is not None


async def test_p6_reader_never_sees_new_status_with_old_promise(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        n = fake.add(ROOT, b"f", data=b"v1")
        root = await cm.mount_volume("test", "root.cell")
        f = await cm.lookup(root, b"f")
        old_promise = f.promise
        await trio.sleep(fake.cb_expires + 1)  # promise expired
        n.dv += 1
        gate = fake.gate("FS.FetchStatus")
        seen = []

        async def getattr_():
            st = await cm.getattr(f)
            seen.append((st.data_version, f.promise))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(getattr_)
            await gate.entered.wait()
            # The validator holds the write lock: a reader waits, it does not
            # see a half-applied update.
            with trio.move_on_after(1) as cs:
                async with f.lock.read():
                    pass
            assert cs.cancelled_caught
            for _ in range(3):  # concurrent validations collapse into one fetch
                nursery.start_soon(getattr_)
            await trio.sleep(1)
            gate.release.set()
        assert fake.calls["FS.FetchStatus"] == 2  # mount's + one shared
        assert len(seen) == 4
        for dv, promise in seen:
            assert dv == n.dv and promise is not None and promise is not old_promise
        async with f.lock.read():
            assert f.status.data_version == n.dv and f.promise is not old_promise


async def test_p6_a_valid_promise_is_not_read_past_a_writer(tmp_path, autojump_clock):
    """The fast validation (promise intact) reads without the lock only when
    no writer holds or waits for it: a change in progress under the write
    lock (a store, a directory change awaiting its reply) is waited out."""
    async with running(tmp_path) as (_net, fake, cm):
        fake.add(ROOT, b"f", data=b"v1")
        root = await cm.mount_volume("test", "root.cell")
        f = await cm.lookup(root, b"f")
        assert f.promise_state(trio.current_time()) == "ok"
        fetches = fake.calls["FS.FetchStatus"]
        seen: list[int] = []
        release = trio.Event()

        async def writer(task_status=trio.TASK_STATUS_IGNORED):
            async with f.lock.write():
                task_status.started()
                await release.wait()
                f.status = dataclasses.replace(f.status, size=99)  # applied at the end

        async def reader():
            seen.append((await cm.getattr(f)).size)

        async with trio.open_nursery() as nursery:
            await nursery.start(writer)
            nursery.start_soon(reader)
            await trio.sleep(1)
            assert seen == []  # waiting for the writer, not reading past it
            release.set()
        assert seen == [99]
        assert fake.calls["FS.FetchStatus"] == fetches  # still no RPC: the promise held


async def test_c1_dv_change_zaps_data_c2_same_dv_keeps_it(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        n = fake.add(ROOT, b"f", data=b"old contents")
        root = await cm.mount_volume("test", "root.cell")
        f = await cm.lookup(root, b"f")
        assert await cm.read(f, 0, 100) == b"old contents"
        assert (await cm.open(f)).keep_cache is False  # first open: nothing cached
        assert (await cm.open(f)).keep_cache is True  # same DV: kernel pages are good
        dv1 = f.data_version
        assert cm.datacache.get(f.fid, dv1, 0) is not None
        # C2: promise expires, DV unchanged: data kept, no refetch.
        await trio.sleep(fake.cb_expires + 1)
        fetches = fake.calls["FS.FetchData"]
        assert await cm.read(f, 0, 100) == b"old contents"
        assert fake.calls["FS.FetchData"] == fetches
        assert cm.datacache.get(f.fid, dv1, 0) is not None
        # C1: another client changes it and the server breaks our promise.
        n.data[:] = b"new!"
        n.dv += 1
        await fake.break_fids([f.fid])
        assert await cm.read(f, 0, 100) == b"new!"
        assert cm.datacache.get(f.fid, dv1, 0) is None  # old DV dropped
        assert (await cm.open(f)).keep_cache is False  # C1: kernel pages are stale
        assert f.kernel_dv == f.data_version

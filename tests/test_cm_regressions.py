"""Regressions the kernel's callback overhaul fixed, and the cache manager's
other promises: volume breaks, mass breaks during fetches, expiry from issue
time, stale bulk statuses, aliases, reconnects, directory edits, write-on-close."""

from __future__ import annotations

import trio
from test_cm_fakeserver import ROOT, VOL, running, until

from afsfuse.cells import CellDB
from protocol.records import CallBack, CallBackType, Fid


async def test_whole_volume_break_is_honoured(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        for i in range(5):
            fake.add(ROOT, f"f{i}".encode())
        root = await cm.mount_volume("test", "root.cell")
        kids = [e.vnode for e in await cm.readdir(root)]
        assert len(kids) == 5 and all(k.promise is not None for k in kids)
        touched = cm.cb.vnodes_touched
        await fake.break_fids([Fid(VOL, 0, 0)])
        assert root.volume.cb_v_break == 1 and cm.stats.volume_breaks == 1
        assert cm.cb.vnodes_touched == touched  # O(1), nothing walked
        now = trio.current_time()
        assert all(k.promise_state(now) == "volume_break" for k in [*kids, root])
        before = fake.calls["FS.FetchStatus"]
        for k in kids:
            await cm.getattr(k)
        assert fake.calls["FS.FetchStatus"] == before + 5
        ev = [cm.invalidations.get_nowait() for _ in range(len(cm.invalidations))]
        assert any(e.kind == "volume" and e.volume is root.volume for e in ev)


async def test_init_state_during_fetch_does_not_refetch_forever(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        fake.add(ROOT, b"f")
        root = await cm.mount_volume("test", "root.cell")
        f = await cm.lookup(root, b"f")
        f.promise = None
        gate = fake.gate("FS.FetchStatus")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cm.getattr, f)
            await gate.entered.wait()
            await fake.init_state(fake.clients[cm.uuid])
            gate.release.set()
        del fake.gates["FS.FetchStatus"]
        base = fake.calls["FS.FetchStatus"]
        assert f.promise is None  # discarded, and the getattr returned anyway
        await cm.getattr(f)  # one more fetch installs a promise...
        assert fake.calls["FS.FetchStatus"] == base + 1 and f.promise is not None
        for _ in range(5):  # ...and then the fast path holds
            await cm.getattr(f)
        assert fake.calls["FS.FetchStatus"] == base + 1


async def test_expiry_counts_from_issue_time(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        fake.add(ROOT, b"f")
        root = await cm.mount_volume("test", "root.cell")
        f = await cm.lookup(root, b"f")
        f.promise = None
        gate = fake.gate("FS.FetchStatus")
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cm.getattr, f)
            await gate.entered.wait()
            await trio.sleep(4)  # a slow reply (under the 5 s RPC timeout)
            gate.release.set()
        del fake.gates["FS.FetchStatus"]
        assert abs(f.promise.expires_at - (t0 + fake.cb_expires)) < 0.5
        await trio.sleep(t0 + fake.cb_expires + 1 - trio.current_time())
        before = fake.calls["FS.FetchStatus"]
        await cm.getattr(f)  # reply time + 60 is still ahead: must refetch anyway
        assert fake.calls["FS.FetchStatus"] == before + 1


async def test_expired_and_unpromised_vnodes_both_revalidate(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        fake.add(ROOT, b"a")
        fake.add(ROOT, b"b")
        root = await cm.mount_volume("test", "root.cell")
        a = await cm.lookup(root, b"a")
        b = await cm.lookup(root, b"b")
        b.promise = None  # never promised (e.g. a DROPPED callback)
        before = fake.calls["FS.FetchStatus"]
        await cm.getattr(a)
        assert fake.calls["FS.FetchStatus"] == before  # promised: fast
        await cm.getattr(b)
        assert fake.calls["FS.FetchStatus"] == before + 1  # not promised: fetch
        await trio.sleep(fake.cb_expires + 1)
        await cm.getattr(a)  # promised but expired: fetch
        assert fake.calls["FS.FetchStatus"] == before + 2
        # A DROPPED promise from the server is never trusted either.
        fake.cb = lambda: CallBack(1, 60, CallBackType.DROPPED).to_wire()
        a.promise = None
        await cm.getattr(a)
        await cm.getattr(a)
        assert fake.calls["FS.FetchStatus"] == before + 4


async def test_stale_bulk_status_does_not_zap_fresh_writes(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        fake.add(ROOT, b"f", data=b"0123456789")
        root = await cm.mount_volume("test", "root.cell")
        entries = await cm.readdir(root)
        f = entries[0].vnode
        assert await cm.read(f, 0, 100) == b"0123456789"
        await trio.sleep(fake.cb_expires + 1)  # every promise expired
        gate = fake.gate("FS.InlineBulkStatus")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cm.readdir, root)
            await gate.entered.wait()  # bulk status computed with the old DV
            h = await cm.open(f)
            await cm.write(h, 0, b"ABC")
            await cm.fsync(h)  # stored: DV + 1, cache rekeyed
            dv = f.data_version
            assert cm.datacache.get(f.fid, dv, 0) is not None
            gate.release.set()  # the old status arrives now
        assert f.data_version == dv
        assert cm.stats.statuses_stale_ignored >= 1
        assert cm.datacache.get(f.fid, dv, 0) is not None  # not zapped
        fetches = fake.calls["FS.FetchData"]
        assert await cm.read(f, 0, 100) == b"ABC3456789"
        assert fake.calls["FS.FetchData"] == fetches  # served from the cache
        await cm.release(h)


async def test_aliased_cells_share_one_server_record(tmp_path, autojump_clock):
    cells = CellDB.from_dict(
        {"cells": {"test": {"vlservers": ["fs1:7000"]}, "alias": {"alias": "test"}}}
    )
    async with running(tmp_path, cells=cells) as (_net, fake, cm):
        n = fake.add(ROOT, b"f")
        r1 = await cm.mount_volume("test", "root.cell")
        r2 = await cm.mount_volume("alias", "root.cell")
        assert len(cm.servers) == 1
        assert r1.volume is not r2.volume and r1.volume.server is r2.volume.server
        f1 = await cm.lookup(r1, b"f")
        f2 = await cm.lookup(r2, b"f")
        assert f1 is not f2 and f1.fid == f2.fid
        await fake.break_fids([n.fid])  # one break reaches both instances
        assert f1.cb_break == 1 and f2.cb_break == 1
        assert f1.promise is None and f2.promise is None


async def test_reconnect_with_changed_epoch_bumps_cb_s_break(tmp_path, autojump_clock):
    async with running(tmp_path) as (net, fake, cm):
        fake.init_on_hello = False  # isolate the epoch check
        root = await cm.mount_volume("test", "root.cell")
        rec = root.volume.server
        s0 = rec.cb_s_break
        await net.drop_all()  # same server, same epoch: nothing lost
        await until(lambda: rec.connects >= 2 and rec.conn is not None)
        assert rec.cb_s_break == s0
        fake.epoch = 2  # the server restarted and lost its callback state
        await net.drop_all()
        await until(lambda: rec.connects >= 3 and rec.conn is not None)
        assert rec.cb_s_break == s0 + 1
        assert root.promise_state(trio.current_time()) == "server_break"
        await cm.getattr(root)  # and it works again
        assert cm.stats.reconnects == 2


async def test_own_directory_changes_edit_the_cached_listing(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        fake.add(ROOT, b"a")
        root = await cm.mount_volume("test", "root.cell")
        assert [e.name for e in await cm.readdir(root)] == [b"a"]
        assert fake.calls["FS.ReadDir"] == 1
        await cm.create(root, b"b", 0o644)
        d = await cm.mkdir(root, b"d", 0o755)
        await cm.rename(root, b"a", root, b"c")
        await cm.unlink(root, b"b")
        await cm.symlink(root, b"s", b"/target")
        assert root.listing.dv == root.data_version == fake.nodes[ROOT].dv
        assert [e.name for e in await cm.readdir(root)] == [b"c", b"d", b"s"]
        assert fake.calls["FS.ReadDir"] == 1  # never refetched
        assert cm.stats.dir_local_edits == 5
        assert await cm.readlink(await cm.lookup(root, b"s")) == b"/target"
        await cm.rename(root, b"c", d, b"moved")  # across directories
        assert [e.name for e in await cm.readdir(d)] == [b"moved"]
        assert [e.name for e in await cm.readdir(root)] == [b"d", b"s"]
        assert fake.calls["FS.ReadDir"] == 1
        # A change by someone else (DV + 1 but not ours) refetches.
        fake.add(ROOT, b"z")
        await fake.break_fids([ROOT])
        assert [e.name for e in await cm.readdir(root)] == [b"d", b"s", b"z"]
        assert fake.calls["FS.ReadDir"] == 2


async def test_write_on_close_stores_once_at_last_close(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        n = fake.add(ROOT, b"f", data=b"")
        root = await cm.mount_volume("test", "root.cell")
        f = await cm.lookup(root, b"f")
        h1 = await cm.open(f, flags=2)
        h2 = await cm.open(f, flags=2)
        assert await cm.write(h1, 0, b"hello ") == 6
        assert await cm.write(h2, 6, b"world" * 2000) == 10000
        assert (await cm.getattr(f)).size == 10006
        await cm.flush(h1)
        await cm.release(h1)
        assert fake.calls["FS.StoreData"] == 0  # not the last close
        await cm.flush(h2)
        await cm.release(h2)
        # 10006 bytes = 3 contiguous 4 KiB chunks: one StoreData.
        assert fake.calls["FS.StoreData"] == 1
        assert bytes(n.data) == b"hello " + b"world" * 2000
        assert f.local_size is None and f.data_version == n.dv
        # Our own store rekeyed the cache: reading needs no fetch.
        fetches = fake.calls["FS.FetchData"]
        assert await cm.read(f, 0, 11) == b"hello world"
        assert fake.calls["FS.FetchData"] == fetches


async def test_own_link_status_applies_after_a_local_write(tmp_path, autojump_clock):
    """Our own change's reply is never mistaken for a stale status."""
    async with running(tmp_path) as (_net, fake, cm):
        fake.add(ROOT, b"t")
        root = await cm.mount_volume("test", "root.cell")
        t = await cm.lookup(root, b"t")
        h = await cm.open(t, flags=2)
        await cm.write(h, 0, b"T")
        await cm.release(h)  # a completed local change
        await cm.link(t, root, b"hard")
        assert (await cm.getattr(t)).nlink == 2
        assert (await cm.getattr(await cm.lookup(root, b"hard"))).nlink == 2
        assert cm.stats.statuses_stale_ignored == 0


async def test_readdir_restarts_when_the_directory_moves_between_pages(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        for i in range(25):
            fake.add(ROOT, b"f%02d" % i)
        fake.page_size = 10
        root = await cm.mount_volume("test", "root.cell")
        pages = []

        async def meddle(conn, cred, dir_fid, cookie, *rest):
            pages.append(cookie)
            if len(pages) == 2:  # someone else adds a file after our first page
                fake.add(ROOT, b"late")

        fake.hooks["FS.ReadDir"] = meddle
        names = [e.name for e in await cm.readdir(root)]
        assert names == sorted([b"f%02d" % i for i in range(25)] + [b"late"])
        assert pages[0] is None and pages.count(None) == 2  # restarted from the top
        assert root.listing is not None and root.listing.dv == fake.nodes[ROOT].dv


async def test_break_of_an_uncached_fid_during_lookup_voids_the_new_promise(
    tmp_path, autojump_clock
):
    """The break finds nothing cached (and creates nothing), yet the promise
    the in-flight Lookup brings back for that fid must not be installed."""
    async with running(tmp_path) as (_net, fake, cm):
        n = fake.add(ROOT, b"f")
        root = await cm.mount_volume("test", "root.cell")
        gate = fake.gate("FS.Lookup")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cm.lookup, root, b"f")
            await gate.entered.wait()
            await fake.break_fids([n.fid])
            assert cm.find_vnode("test", n.fid) is None  # nothing created
            gate.release.set()
        f = cm.find_vnode("test", n.fid)
        assert f is not None and f.status is not None and f.promise is None
        assert root.promise is not None  # the directory's promise was not broken


async def test_writer_close_stores_while_a_reader_keeps_the_file_open(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        n = fake.add(ROOT, b"f")
        root = await cm.mount_volume("test", "root.cell")
        f = await cm.lookup(root, b"f")
        reader = await cm.open(f, flags=0)
        writer = await cm.open(f, flags=1)  # O_WRONLY
        await cm.write(writer, 0, b"published")
        await cm.flush(writer)  # close-to-open: stored now, not at the reader's close
        assert bytes(n.data) == b"published" and fake.calls["FS.StoreData"] == 1
        await cm.release(writer)
        assert await cm.read(reader, 0, 100) == b"published"
        await cm.flush(reader)
        await cm.release(reader)
        assert fake.calls["FS.StoreData"] == 1

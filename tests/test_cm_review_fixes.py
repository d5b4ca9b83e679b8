"""Regressions found in review of the cache manager: a recreated volume,
the kernel page-cache DV after our own store (C2), our own changes seen
through an aliased volume instance, and readdir never dropping children."""

from __future__ import annotations

import os

import trio
from test_cm_fakeserver import ROOT, running

from afsfuse.cells import CellDB


async def test_recreated_volume_lower_dv_is_news_not_stale(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        n = fake.add(ROOT, b"f")
        n.data[:] = b"old data"
        n.dv = 7
        root = await cm.mount_volume("test", "root.cell")
        f = await cm.lookup(root, b"f")
        assert f.status.data_version == 7
        # The volume is restored from an old backup: new creation stamp, DVs
        # start over lower, different contents.
        fake.vsync = lambda: [2, 0]
        n.dv = 2
        n.data[:] = b"restored"
        await fake.break_fids([n.fid])
        st = await cm.getattr(f)
        assert st.data_version == 2 and st.size == len(b"restored")
        assert await cm.read(f, 0, 100) == b"restored"
        base = fake.calls["FS.FetchStatus"]
        await cm.getattr(f)  # and the promise was installed: the fast path holds
        assert fake.calls["FS.FetchStatus"] == base


async def test_own_store_keeps_kernel_pages_only_if_they_were_current(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        n = fake.add(ROOT, b"f")
        n.data[:] = b"0123456789"
        root = await cm.mount_volume("test", "root.cell")
        f = await cm.lookup(root, b"f")
        h = await cm.open(f, None, os.O_RDWR)
        assert not h.keep_cache
        await cm.read(h, 0, 10)
        await cm.release(h)
        # Someone else rewrites it with the same size (mtime/size look unchanged).
        n.data[:] = b"abcdefghij"
        n.dv += 1
        await fake.break_fids([n.fid])
        h = await cm.open(f, None, os.O_RDWR)  # the kernel must drop its pages here...
        assert not h.keep_cache
        await cm.write(h, 0, b"X")
        await cm.release(h)  # ...and our store (DV + 1) keeps what it now holds
        h = await cm.open(f, None, os.O_RDONLY)
        assert h.keep_cache
        await cm.release(h)
        # Now the kernel never read the other writer's version before we stored.
        n.data[:] = b"ZZZZZZZZZZ"
        n.dv += 1
        await fake.break_fids([n.fid])
        await cm.getattr(f)  # revalidated (DV moved), no open in between
        h = await cm.write(f, 5, b"Y") and None
        await cm.fsync(f)
        h = await cm.open(f, None, os.O_RDONLY)
        assert not h.keep_cache, "kernel pages of an old DV were kept"
        await cm.release(h)


async def test_own_change_reaches_aliased_instance(tmp_path, autojump_clock):
    cells = CellDB.from_dict(
        {"cells": {"test": {"vlservers": ["fs1:7000"]}, "alias": {"alias": "test"}}}
    )
    async with running(tmp_path, cells=cells) as (_net, fake, cm):
        fake.add(ROOT, b"f")
        r1 = await cm.mount_volume("test", "root.cell")
        r2 = await cm.mount_volume("alias", "root.cell")
        f1 = await cm.lookup(r1, b"f")
        f2 = await cm.lookup(r2, b"f")
        assert (await cm.getattr(f2)).size == 0
        h = await cm.open(f1, None, os.O_WRONLY)
        await cm.write(h, 0, b"written via cell test")
        await cm.release(h)
        # The server does not break the changer; the alias must still see it.
        assert f2.promise is None
        assert (await cm.getattr(f2)).size == len(b"written via cell test")
        await cm.create(r1, b"new", 0o644)
        names = [e.name for e in await cm.readdir(r2)]
        assert b"new" in names


async def test_readdir_lists_children_nobody_primed(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        nodes = [fake.add(ROOT, b"c%d" % i) for i in range(3)]
        root = await cm.mount_volume("test", "root.cell")
        busy = root.volume.get(nodes[1].fid)  # cached, no status yet
        got = []
        async with trio.open_nursery() as nursery:

            async def hold_lock(task_status=trio.TASK_STATUS_IGNORED):
                async with busy.lock.write():  # e.g. another task validating it
                    task_status.started()
                    await trio.sleep(1)

            await nursery.start(hold_lock)
            got = [e.name for e in await cm.readdir(root)]
        assert got == [b"c0", b"c1", b"c2"]


def test_vnode_cache_is_bounded_but_keeps_what_is_needed():
    from afsfuse.volume import VolumeInstance
    from protocol.records import Fid

    vol = VolumeInstance("cell", 7, "v")
    vol.max_vnodes = vol._evict_at = 100
    held = vol.get(Fid(7, 2, 1))
    held.ino = 42  # the kernel holds it
    opened = vol.get(Fid(7, 3, 1))
    opened.open_count = 1
    dirty = vol.get(Fid(7, 4, 1))
    dirty.local_size = 10
    root = vol.get(vol.root_fid)
    for n in range(10, 1010):
        vol.get(Fid(7, n, 1))
    assert len(vol.vnodes) <= 110
    assert vol.evicted >= 890
    for v in (held, opened, dirty, root):
        assert vol.find(v.fid) is v
    assert vol.find(Fid(7, 1009, 1)) is not None  # the newest stay
    # Every vnode held: nothing can go, and a new vnode must not cost a scan
    # of the whole index each time.
    for v in vol.vnodes.values():
        v.ino = 1
    scans = 0
    real_evict = vol.evict

    def counting_evict():
        nonlocal scans
        scans += 1
        return real_evict()

    vol.evict = counting_evict
    for n in range(2000, 2300):
        vol.get(Fid(7, n, 1)).ino = 1
    assert len(vol.vnodes) >= 300 and scans <= 30


async def test_o_trunc_is_stored_at_close_not_at_open(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        n = fake.add(ROOT, b"f")
        n.data[:] = b"old contents " * 30_000  # several chunks
        root = await cm.mount_volume("test", "root.cell")
        f = await cm.lookup(root, b"f")
        stores = fake.calls["FS.StoreData"] + fake.calls["FS.StoreStatus"]
        h = await cm.open(f, None, os.O_RDWR | os.O_TRUNC)
        assert (await cm.getattr(f)).size == 0
        assert await cm.read(h, 0, 100) == b""
        # Nothing reached the server yet: other clients still see the old file.
        assert fake.calls["FS.StoreData"] + fake.calls["FS.StoreStatus"] == stores
        assert bytes(n.data[:3]) == b"old"
        await cm.write(h, 300_000, b"tail")  # leaves a hole over the old bytes
        assert await cm.read(h, 0, 16) == bytes(16)  # zeros, never old bytes
        await cm.release(h)
        assert bytes(n.data) == bytes(300_000) + b"tail"
        assert (await cm.getattr(f)).size == 300_004


async def test_o_trunc_alone_empties_the_file_at_close(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        n = fake.add(ROOT, b"f")
        n.data[:] = b"something"
        root = await cm.mount_volume("test", "root.cell")
        f = await cm.lookup(root, b"f")
        h = await cm.open(f, None, os.O_WRONLY | os.O_TRUNC)
        assert bytes(n.data) == b"something"
        await cm.release(h)
        assert bytes(n.data) == b"" and (await cm.getattr(f)).size == 0


async def test_readdir_keeps_a_name_replaced_while_its_break_is_in_flight(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        old = fake.add(ROOT, b"doc")
        fake.add(ROOT, b"other")
        root = await cm.mount_volume("test", "root.cell")
        assert [e.name for e in await cm.readdir(root)] == [b"doc", b"other"]
        # Another client renames a new file over "doc"; the directory's break
        # has not reached us yet (our promise on the directory still holds),
        # and the promise on the old file has lapsed.
        new = fake.add(ROOT, b"doc.tmp")
        d = fake.nodes[ROOT]
        d.entries[b"doc"] = d.entries.pop(b"doc.tmp")
        del fake.nodes[old.fid]
        cm.find_vnode("test", old.fid).promise = None
        entries = await cm.readdir(root)
        assert [(e.name, e.vnode.fid) for e in entries] == [
            (b"doc", new.fid),
            (b"other", entries[1].vnode.fid),
        ]

"""Directory read-ahead (afsfuse.dirahead): a tree walk's next listings are
fetched early, and a listing fetched early never answers wrongly.

Each test builds ``t`` with subdirectories ``s0``..``s4`` (each holding a
file and a subdirectory ``x``) on the fake server, then reads ``t`` the way
``ls -R`` or ``find`` would.
"""

from __future__ import annotations

import errno

import pytest
import trio
from test_cm_fakeserver import ROOT, running, until

from protocol.errors import RpcError
from protocol.records import FileType


def _tree(fake):
    t = fake.add(ROOT, b"t", ftype=FileType.DIRECTORY)
    subs = []
    for i in range(5):
        s = fake.add(t.fid, b"s%d" % i, ftype=FileType.DIRECTORY)
        fake.add(s.fid, b"f", data=b"x")
        fake.add(s.fid, b"x", ftype=FileType.DIRECTORY)
        subs.append(s)
    return t, subs


async def _open_tree(cm):
    root = await cm.mount_volume("test", "root.cell")
    return await cm.lookup(root, b"t")


async def _read_tree(fake, cm):
    """Build the tree, read ``t`` and wait for what that reads ahead:
    ``t``'s vnode and the fake's subdirectories."""
    _t, subs = _tree(fake)
    t = await _open_tree(cm)
    await cm.readdir(t)
    await until(lambda: _settled(cm))
    return t, subs


def _settled(cm) -> bool:
    return not cm.namespace.ahead._inflight


async def _child(cm, d, name):
    return await cm.lookup(d, name)


async def test_a_walk_finds_the_next_listings_already_fetched(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        t, _subs = await _read_tree(fake, cm)
        s = [await _child(cm, t, b"s%d" % i) for i in range(5)]
        # t's first two subdirectories, nothing else.
        assert [v.listing is not None for v in s] == [True, True, False, False, False]
        assert fake.calls["FS.ReadDir"] == 3
        ahead = s[0].listing
        names = [e.name for e in await cm.readdir(s[0])]
        assert names == [b"f", b"x"]
        assert s[0].listing is ahead  # answered from the listing read ahead
        await until(lambda: _settled(cm))
        # Entering s0: its own subdirectory, and the siblings after it (s1 is
        # there already, s2 now).
        assert (await _child(cm, s[0], b"x")).listing is not None
        assert [v.listing is not None for v in s] == [True, True, True, False, False]
        assert cm.stats.dir_ahead == 4


async def test_no_read_ahead_with_a_window_of_zero(tmp_path, autojump_clock):
    async with running(tmp_path, dir_ahead=0) as (_net, fake, cm):
        _tree(fake)
        t = await _open_tree(cm)
        await cm.readdir(t)
        await trio.sleep(5)
        assert fake.calls["FS.ReadDir"] == 1
        assert cm.stats.dir_ahead == 0


async def test_a_listing_read_ahead_is_dropped_by_its_break(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        t, subs = await _read_tree(fake, cm)
        s0 = await _child(cm, t, b"s0")
        assert s0.listing is not None
        # Another client creates a name in s0: its promise is broken before
        # that create returns.
        fake.add(subs[0].fid, b"new", data=b"hi")
        await fake.break_fids([subs[0].fid])
        assert [e.name for e in await cm.readdir(s0)] == [b"f", b"new", b"x"]


async def test_a_break_while_the_read_ahead_is_on_the_wire_is_not_lost(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        _t, subs = _tree(fake)
        s0_wire = subs[0].fid.to_wire()
        entered, release = trio.Event(), trio.Event()

        async def hold_s0(conn, cred, dir_fid, *rest):
            # The reply (the listing before the change) is already computed.
            if list(dir_fid) == s0_wire:
                entered.set()
                await release.wait()

        fake.hooks["FS.ReadDir"] = hold_s0
        t = await _open_tree(cm)
        await cm.readdir(t)
        await entered.wait()
        fake.add(subs[0].fid, b"new", data=b"hi")
        await fake.break_fids([subs[0].fid])  # arrives before the old reply
        release.set()
        await until(lambda: _settled(cm))
        s0 = await _child(cm, t, b"s0")
        assert [e.name for e in await cm.readdir(s0)] == [b"f", b"new", b"x"]


async def test_a_failed_read_ahead_is_left_to_the_application(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        _t, subs = _tree(fake)
        s0_wire = subs[0].fid.to_wire()
        denied = []

        async def deny_s0(conn, cred, dir_fid, *rest):
            if list(dir_fid) == s0_wire:
                denied.append(1)
                raise RpcError("EACCES", "not yours")

        fake.hooks["FS.ReadDir"] = deny_s0
        t = await _open_tree(cm)
        await cm.readdir(t)
        await until(lambda: _settled(cm))
        assert len(denied) == 1 and cm.stats.dir_ahead == 2  # s0 was tried, and failed
        s0 = await _child(cm, t, b"s0")
        assert s0.listing is None
        # Reading t again does not try s0 again at the same DV.
        await cm.readdir(t)
        await until(lambda: _settled(cm))
        assert len(denied) == 1
        with pytest.raises(RpcError) as e:
            await cm.readdir(s0)
        assert e.value.errno == errno.EACCES and len(denied) == 2
        # The manager lives on: s1 was read ahead and is served.
        s1 = await _child(cm, t, b"s1")
        assert [e.name for e in await cm.readdir(s1)] == [b"f", b"x"]


async def test_directories_too_large_to_read_whole_are_not_read_ahead(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        _tree(fake)  # the fake's directories are 2,048 "bytes" (entries) long
        cm.namespace.ahead.max_entries = 2047
        t = await _open_tree(cm)
        await cm.readdir(t)
        await trio.sleep(1)
        assert fake.calls["FS.ReadDir"] == 1 and cm.stats.dir_ahead == 0


async def test_nothing_is_read_ahead_while_the_server_is_not_connected(tmp_path, autojump_clock):
    async with running(tmp_path) as (net, fake, cm):
        t, _subs = await _read_tree(fake, cm)
        fake.nodes[t.fid].dv += 1  # t changes; its listing must be read again
        await fake.break_fids([t.fid])
        s0 = await _child(cm, t, b"s0")
        base = cm.stats.dir_ahead
        net.down.add(fake.addr[0])
        await net.drop_all()
        await until(lambda: not cm.servers[next(iter(cm.servers))].connected)
        # A cached directory stays instantly usable: no read-ahead that would
        # hold its lock while waiting for a reconnect.
        names = [e.name for e in await cm.readdir(s0)]
        assert names == [b"f", b"x"] and cm.stats.dir_ahead == base
        with trio.fail_after(0.5):
            await cm.getattr(s0)


async def test_a_walk_by_lookups_reads_ahead_too(tmp_path, autojump_clock):
    """``git status`` stats every path in order: cold lookups, no readdir."""
    async with running(tmp_path) as (_net, fake, cm):
        t = fake.add(ROOT, b"t", ftype=FileType.DIRECTORY)
        for i in range(4):
            s = fake.add(t.fid, b"s%d" % i, ftype=FileType.DIRECTORY)
            for n in (b"a", b"b", b"c"):
                fake.add(s.fid, n, data=n)
        root = await cm.mount_volume("test", "root.cell")
        tv = await cm.lookup(root, b"t")
        looked = 0
        for i in range(4):
            base = fake.calls["FS.Lookup"]
            s = await cm.lookup(tv, b"s%d" % i)
            for n in (b"a", b"b", b"c"):
                assert (await cm.getattr(await cm.lookup(s, n))).size == 1
            looked += fake.calls["FS.Lookup"] - base
            await until(lambda: _settled(cm))
        # Without read-ahead: 2 FS.Lookup per directory (the first cold names
        # of t and of each s_i) and a ReadDir each.  With it, the s_i after
        # the first were listed before the walk got there.
        assert looked <= 3, looked
        assert fake.calls["FS.ReadDir"] == 1 + 4
        assert cm.stats.dir_ahead >= 3


async def test_read_ahead_is_bounded_in_flight(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        t = fake.add(ROOT, b"t", ftype=FileType.DIRECTORY)
        for i in range(20):
            fake.add(t.fid, b"s%02d" % i, ftype=FileType.DIRECTORY)
        t_wire = t.fid.to_wire()
        release = trio.Event()

        async def park_subdirs(conn, cred, dir_fid, *rest):
            if list(dir_fid) != t_wire:
                await release.wait()

        fake.hooks["FS.ReadDir"] = park_subdirs
        ahead = cm.namespace.ahead
        ahead.window = 10
        tv = await _open_tree(cm)
        await cm.readdir(tv)
        await trio.sleep(1)  # well within the RPC timeout (5 s here)
        assert len(ahead._inflight) == ahead.max_inflight == 4
        assert fake.calls["FS.ReadDir"] == 1 + 4
        release.set()
        await until(lambda: _settled(cm))
        assert cm.stats.dir_ahead == 4

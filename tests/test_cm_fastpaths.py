"""Fast paths of the cache manager that must never answer wrongly.

A cold walk over many children reads the directory once; a name absent
from a listing held under a valid promise is ENOENT without an RPC, until a
break says otherwise; a lookup of a child whose promise is void brings its
siblings' statuses along in parallel bulk calls.
"""

from __future__ import annotations

import dataclasses
import errno

import pytest
import trio
from test_cm_fakeserver import ROOT, running

from afsfuse.namespace import SPECULATE_SCAN
from protocol.errors import RpcError
from protocol.records import FileType


async def test_cold_lookups_read_the_directory_once(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        d = fake.add(ROOT, b"d", ftype=FileType.DIRECTORY)
        for i in range(60):
            fake.add(d.fid, f"f{i:02d}".encode(), data=b"x" * i)
        root = await cm.mount_volume("test", "root.cell")
        dv = await cm.lookup(root, b"d")
        base = dict(fake.calls)
        for i in range(60):
            f = await cm.lookup(dv, f"f{i:02d}".encode())
            assert (await cm.getattr(f)).size == i
        # One FS.Lookup (the first cold name), then the whole listing.
        assert fake.calls["FS.Lookup"] - base.get("FS.Lookup", 0) == 1
        assert fake.calls["FS.ReadDir"] - base.get("FS.ReadDir", 0) == 1
        assert fake.calls["FS.FetchStatus"] == base.get("FS.FetchStatus", 0)
        # A name the listing lacks: ENOENT from the cache, no RPC.
        before = sum(fake.calls.values())
        with pytest.raises(RpcError) as e:
            await cm.lookup(dv, b"nothere")
        assert e.value.errno == errno.ENOENT
        assert sum(fake.calls.values()) == before


async def test_name_created_elsewhere_is_found_once_the_break_arrives(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        fake.add(ROOT, b"a")
        root = await cm.mount_volume("test", "root.cell")
        await cm.readdir(root)  # the listing is cached under the root's promise
        with pytest.raises(RpcError):
            await cm.lookup(root, b"new")
        # Another client creates it: the server breaks our promise on the
        # directory before that create returns.
        n = fake.add(ROOT, b"new", data=b"hello")
        await fake.break_fids([ROOT])
        f = await cm.lookup(root, b"new")
        assert f.fid == n.fid and await cm.read(f, 0, 100) == b"hello"
        # And one removed elsewhere is gone once its break arrives.
        fid = fake.nodes[ROOT].entries.pop(b"a")
        del fake.nodes[fid]
        fake.nodes[ROOT].dv += 1
        await fake.break_fids([ROOT, fid])
        with pytest.raises(RpcError) as e:
            await cm.lookup(root, b"a")
        assert e.value.errno == errno.ENOENT


async def test_negative_answer_is_held_only_while_the_promise_is(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        root = await cm.mount_volume("test", "root.cell")
        await cm.readdir(root)
        token = cm.dir_token(root)
        with pytest.raises(RpcError):
            await cm.lookup(root, b"x")
        assert cm.negative_holds(root, token)
        fake.add(ROOT, b"x")
        await fake.break_fids([ROOT])  # arrives after the ENOENT was computed
        assert not cm.negative_holds(root, token)  # the kernel must not cache it
        token = cm.dir_token(root)
        await cm.lookup(root, b"x")
        await fake.init_state(fake.clients[cm.uuid])  # a mass break voids it too
        assert not cm.negative_holds(root, token)


async def test_lookup_of_a_child_with_an_expired_promise_fetches_siblings_in_bulk(
    tmp_path, autojump_clock
):
    async with running(tmp_path) as (_net, fake, cm):
        nodes = [fake.add(ROOT, f"f{i:03d}".encode(), data=b"x") for i in range(120)]
        root = await cm.mount_volume("test", "root.cell")
        await cm.readdir(root)
        # Every promise expires (a long idle); one file changed meanwhile.
        nodes[70].data[:] = b"changed"
        nodes[70].dv += 1
        await trio.sleep(fake.cb_expires + 1)
        base = dict(fake.calls)
        gate = fake.gate("FS.InlineBulkStatus")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cm.lookup, root, b"f000")
            await gate.entered.wait()
            await trio.sleep(0.5)
            # 120 stale siblings: three bulk calls (50, 50, 20), all in flight.
            assert fake.calls["FS.InlineBulkStatus"] - base.get("FS.InlineBulkStatus", 0) == 3
            gate.release.set()
        del fake.gates["FS.InlineBulkStatus"]
        sizes = {}
        for i in range(120):
            f = await cm.lookup(root, f"f{i:03d}".encode())
            sizes[i] = (await cm.getattr(f)).size
        assert sizes[70] == len(b"changed") and sizes[0] == 1
        assert fake.calls["FS.InlineBulkStatus"] - base.get("FS.InlineBulkStatus", 0) == 3
        # Only the directory itself was fetched one by one.
        assert fake.calls["FS.FetchStatus"] - base.get("FS.FetchStatus", 0) == 1
        assert fake.calls["FS.Lookup"] == base.get("FS.Lookup", 0)


async def test_after_a_mass_break_only_used_children_revalidate(tmp_path, autojump_clock):
    async with running(tmp_path) as (_net, fake, cm):
        for i in range(30):
            fake.add(ROOT, f"f{i:02d}".encode())
        root = await cm.mount_volume("test", "root.cell")
        await cm.readdir(root)
        await fake.init_state(fake.clients[cm.uuid])  # O(1): every promise void
        base = dict(fake.calls)
        await cm.lookup(root, b"f03")
        assert fake.calls["FS.InlineBulkStatus"] == base.get("FS.InlineBulkStatus", 0)
        # The directory and the one file used: nothing else.
        assert fake.calls["FS.FetchStatus"] - base.get("FS.FetchStatus", 0) == 2


async def test_a_lookup_in_a_big_directory_looks_at_a_bounded_window_of_siblings(
    tmp_path, autojump_clock
):
    """Speculation takes the stale siblings next to the name, within
    ``SPECULATE_SCAN`` entries: in a big directory whose other children are
    fresh, a lookup does not walk every entry to find none (issue 12/13: no
    per-operation cost that grows with the directory)."""
    n = SPECULATE_SCAN + 300
    async with running(tmp_path) as (_net, fake, cm):
        nodes = [fake.add(ROOT, f"f{i:05d}".encode()) for i in range(n)]
        root = await cm.mount_volume("test", "root.cell")
        await cm.readdir(root)  # every child primed under a fresh promise
        vol = root.volume

        def expire(i: int) -> None:
            v = vol.get(nodes[i].fid)
            v.promise = dataclasses.replace(v.promise, expires_at=0.0)

        near, far = 7, SPECULATE_SCAN + 100
        for i in (0, near, far):
            expire(i)
        base = dict(fake.calls)
        f = await cm.lookup(root, b"f00000")
        assert f.fid == nodes[0].fid
        assert fake.calls["FS.InlineBulkStatus"] - base.get("FS.InlineBulkStatus", 0) == 1
        now = trio.current_time()
        assert vol.get(nodes[near].fid).promise_state(now) == "ok"  # brought along
        assert vol.get(nodes[far].fid).promise_state(now) == "expired"  # out of the window
        # Near the end of the name order the window wraps to the start.
        expire(n - 1)
        expire(1)
        await cm.lookup(root, f"f{n - 1:05d}".encode())
        assert vol.get(nodes[1].fid).promise_state(trio.current_time()) == "ok"

"""Callback promises and breaks across real protocol clients (no FUSE)."""

from __future__ import annotations

import trio

from afsfuse.lab.server import fs_client, running_server, server_and_two_clients, wait_until
from protocol.errors import RpcError
from protocol.records import Fid


async def _mkfile(c, root, name: bytes = b"f"):
    r = await c.call("FS.CreateFile", None, root, name, 0o644)
    return r["fid"]


async def test_store_breaks_other_holder_before_reply(tmp_path):
    async with server_and_two_clients(tmp_path / "fs") as (srv, x, y):
        root = await x.root_fid()
        fid = await _mkfile(x, root)
        r = await y.call("FS.FetchStatus", None, fid)
        assert r["callback"][1] > 0
        await x.call("FS.StoreData", None, fid, 0, b"hello", None, None)
        # The break reached Y before X's reply came back: no waiting here.
        assert Fid(*fid) in y.breaks
        assert x.breaks == []  # the changer's own promise is not broken
        # Y's promise is gone from the table; X never had one broken.
        assert srv.table.holders(Fid(*fid)).keys() == {srv.client(x.uuid).cid}


async def test_three_clients_parallel_and_directory_breaks(tmp_path):
    async with (
        running_server(tmp_path / "fs") as srv,
        fs_client(srv.host, srv.port) as x,
        fs_client(srv.host, srv.port) as y,
        fs_client(srv.host, srv.port) as z,
    ):
        root = await x.root_fid()
        for c in (y, z):
            await c.call("FS.ReadDir", None, root, None, 100, False)
        fid = await _mkfile(x, root)
        # Creating in root breaks root for Y and Z (not for X).
        assert Fid(*root) in y.breaks and Fid(*root) in z.breaks
        assert x.breaks == []
        await y.call("FS.Lookup", None, root, b"f")
        await z.call("FS.Lookup", None, root, b"f")
        n_y, n_z = len(y.breaks), len(z.breaks)
        await x.call("FS.Rename", None, root, b"f", root, b"g", 0)
        assert {Fid(*root), Fid(*fid)} <= set(y.breaks[n_y:])
        assert {Fid(*root), Fid(*fid)} <= set(z.breaks[n_z:])


async def test_rename_breaks_both_dirs_and_replaced_target(tmp_path):
    async with server_and_two_clients(tmp_path / "fs") as (_srv, x, y):
        root = await x.root_fid()
        d1 = (await x.call("FS.MakeDir", None, root, b"d1", 0o755))["fid"]
        d2 = (await x.call("FS.MakeDir", None, root, b"d2", 0o755))["fid"]
        a = (await x.call("FS.CreateFile", None, d1, b"a", 0o644))["fid"]
        b = (await x.call("FS.CreateFile", None, d2, b"b", 0o644))["fid"]
        for f in (d1, d2, a, b):
            await y.call("FS.FetchStatus", None, f)
        await x.call("FS.Rename", None, d1, b"a", d2, b"b", 0)
        assert {Fid(*d1), Fid(*d2), Fid(*a), Fid(*b)} <= set(y.breaks)


async def test_hung_client_does_not_hold_writer_and_gets_delayed_break(tmp_path):
    async with (
        running_server(tmp_path / "fs", break_timeout=0.5) as srv,
        fs_client(srv.host, srv.port) as x,
    ):
        root = await x.root_fid()
        fid = await _mkfile(x, root)
        y_uuid = None
        async with fs_client(srv.host, srv.port) as y:
            y_uuid = y.uuid
            await y.call("FS.FetchStatus", None, fid)
            y.hang = True
            t0 = trio.current_time()
            await x.call("FS.StoreData", None, fid, 0, b"v1", None, None)
            took = trio.current_time() - t0
            assert 0.4 < took < 1.5, took  # bounded by break_timeout, not longer
            st = srv.client(y.uuid)
            assert st.down and Fid(*fid) in st.delayed
            # Further changes while it is down are delayed without waiting.
            t0 = trio.current_time()
            await x.call("FS.CreateFile", None, root, b"other", 0o644)
            assert trio.current_time() - t0 < 0.4
        # Y comes back on a new connection with the same UUID: delayed
        # breaks arrive before its Hello reply.
        async with fs_client(srv.host, srv.port, uuid=y_uuid) as y2:
            assert Fid(*fid) in y2.breaks
            assert y2.inits == 0  # not a new client: delayed breaks, no reset
            assert srv.client(y_uuid).delayed == set()
            assert not srv.client(y_uuid).down
        assert srv.metrics.counts["breaks_delayed"] >= 1
        assert srv.metrics.counts["delayed_delivered"] >= 1


async def test_new_client_gets_init_callback_state_at_hello(tmp_path):
    async with running_server(tmp_path / "fs") as srv:
        async with fs_client(srv.host, srv.port) as c:
            assert c.inits == 1
            assert c.log[0][1] == srv.uuid
            uuid = c.uuid
        # Same UUID, same server run: state is known, no reset.
        async with fs_client(srv.host, srv.port, uuid=uuid) as c2:
            assert c2.inits == 0
    # Restarted server: new epoch, client unknown again.
    async with (
        running_server(tmp_path / "fs") as srv2,
        fs_client(srv2.host, srv2.port, uuid=uuid) as c3,
    ):
        assert c3.inits == 1
        assert c3.hello["epoch"] != 0


async def test_fs_before_hello_is_eproto(tmp_path):
    async with (
        running_server(tmp_path / "fs") as srv,
        fs_client(srv.host, srv.port, hello=False) as c,
    ):
        root = await c.root_fid()  # VL works without Hello
        try:
            await c.call("FS.FetchStatus", None, root)
        except RpcError as exc:
            assert exc.code == "EPROTO"
        else:
            raise AssertionError("FS call before Hello succeeded")


async def test_volume_break_reaches_every_holder(tmp_path):
    async with server_and_two_clients(tmp_path / "fs") as (srv, x, y):
        root = await x.root_fid()
        await x.call("FS.FetchStatus", None, root)
        await y.call("FS.FetchStatus", None, root)
        await srv.breaker.break_volume_all(root[0])
        vol = Fid(root[0], 0, 0)
        assert vol in x.breaks and vol in y.breaks
        assert srv.table.count == 0


async def test_give_up_all_callbacks(tmp_path):
    async with server_and_two_clients(tmp_path / "fs") as (srv, x, y):
        root = await x.root_fid()
        fid = await _mkfile(x, root)
        await y.call("FS.FetchStatus", None, fid)
        await y.call("FS.FetchStatus", None, root)
        assert srv.table.client_count(srv.client(y.uuid).cid) == 2
        assert await y.call("FS.GiveUpAllCallBacks") is None
        assert srv.table.client_count(srv.client(y.uuid).cid) == 0
        assert srv.metrics.rpcs["FS.GiveUpAllCallBacks"] == 1
        assert srv.metrics.counts["promises_given_up"] == 2
        await x.call("FS.StoreData", None, fid, 0, b"x", None, None)
        assert Fid(*fid) not in y.breaks  # nothing to break any more


async def test_disconnected_client_gets_delayed_break_on_return(tmp_path):
    async with running_server(tmp_path / "fs") as srv, fs_client(srv.host, srv.port) as x:
        root = await x.root_fid()
        fid = await _mkfile(x, root)
        async with fs_client(srv.host, srv.port) as y:
            uuid = y.uuid
            await y.call("FS.FetchStatus", None, fid)
        await wait_until(lambda: srv.client(uuid).down, 5)
        t0 = trio.current_time()
        await x.call("FS.StoreData", None, fid, 0, b"zz", None, None)
        assert trio.current_time() - t0 < 0.5  # down client: no waiting at all
        async with fs_client(srv.host, srv.port, uuid=uuid) as y2:
            assert y2.breaks == [Fid(*fid)]


async def test_too_many_delayed_becomes_init_callback_state(tmp_path):
    async with (
        running_server(tmp_path / "fs", max_delayed=3) as srv,
        fs_client(srv.host, srv.port) as x,
    ):
        root = await x.root_fid()
        fids = [await _mkfile(x, root, b"f%d" % i) for i in range(5)]
        async with fs_client(srv.host, srv.port) as y:
            uuid = y.uuid
            for f in fids:
                await y.call("FS.FetchStatus", None, f)
        await wait_until(lambda: srv.client(uuid).down, 5)
        for f in fids:
            await x.call("FS.StoreData", None, f, 0, b"zz", None, None)
        async with fs_client(srv.host, srv.port, uuid=uuid) as y2:
            assert y2.inits == 1 and y2.breaks == []


async def test_second_connection_replaces_first(tmp_path):
    async with (
        running_server(tmp_path / "fs") as srv,
        fs_client(srv.host, srv.port) as a,
        fs_client(srv.host, srv.port, uuid=a.uuid) as b,
    ):
        with trio.fail_after(5):
            await a.conn.wait_closed()
        root = await b.root_fid()
        await b.call("FS.FetchStatus", None, root)
        assert not srv.client(a.uuid).down


async def test_table_full_revokes_least_recent_client(tmp_path):
    async with (
        running_server(tmp_path / "fs", max_callbacks=4) as srv,
        fs_client(srv.host, srv.port) as old,
        fs_client(srv.host, srv.port) as new,
    ):
        root = await old.root_fid()
        fids = [await _mkfile(old, root, b"f%d" % i) for i in range(3)]
        await new.call("FS.FetchStatus", None, fids[0])
        await new.call("FS.FetchStatus", None, fids[1])
        await new.call("FS.FetchStatus", None, fids[2])  # table over its bound
        await old.wait_for(lambda: old.inits == 2)  # one at Hello, one revocation
        assert srv.table.client_count(srv.client(old.uuid).cid) == 0
        assert srv.metrics.counts["revocations"] == 1


async def test_promise_expiry_is_swept(tmp_path):
    async with (
        running_server(tmp_path / "fs", callback_duration=1, sweep_interval=0.2) as srv,
        fs_client(srv.host, srv.port) as x,
    ):
        root = await x.root_fid()
        r = await x.call("FS.FetchStatus", None, root)
        assert r["callback"][1] == 1
        # The sweep removes, yields between chunks, then counts: wait for the
        # count, then the table must be empty.
        await wait_until(lambda: srv.metrics.counts["expired"] == 1, 10)
        assert srv.table.count == 0


async def test_delayed_breaks_are_batched_50_per_call(tmp_path):
    async with running_server(tmp_path / "fs") as srv, fs_client(srv.host, srv.port) as x:
        root = await x.root_fid()
        fids = [await _mkfile(x, root, b"f%03d" % i) for i in range(120)]
        async with fs_client(srv.host, srv.port) as y:
            uuid = y.uuid
            r = await y.call("FS.InlineBulkStatus", None, fids[:50])
            assert all(res[0] is None for res in r["results"])
            await y.call("FS.InlineBulkStatus", None, fids[50:100])
            await y.call("FS.InlineBulkStatus", None, fids[100:])
        await wait_until(lambda: srv.client(uuid).down)
        for f in fids:
            await x.call("FS.StoreStatus", None, f, {"size": 1})
        async with fs_client(srv.host, srv.port, uuid=uuid) as y2:
            calls = [fids_ for kind, fids_, _ in y2.log if kind == "break"]
            assert [len(c) for c in calls] == [50, 50, 20]
            assert sorted(y2.breaks) == sorted(Fid(*f) for f in fids)


async def test_offline_volume_refuses_changes_and_breaks(tmp_path):
    async with running_server(tmp_path / "fs") as srv, fs_client(srv.host, srv.port) as c:
        root = await c.root_fid()
        h = srv.store.get(root[0])
        await h.run(h.vol.set_online, False)
        try:
            await c.call("FS.CreateFile", None, root, b"x", 0o644)
        except RpcError as exc:
            assert exc.code == "EBUSY"
        else:
            raise AssertionError("change on an offline volume succeeded")
        await c.call("FS.FetchStatus", None, root)  # reads still work


async def test_connected_but_down_client_is_retried_in_background(tmp_path):
    async with (
        running_server(tmp_path / "fs", break_timeout=0.4) as srv,
        fs_client(srv.host, srv.port) as x,
        fs_client(srv.host, srv.port) as y,
    ):
        root = await x.root_fid()
        fid = await _mkfile(x, root)
        await y.call("FS.FetchStatus", None, fid)
        y.hang = True
        await x.call("FS.StoreData", None, fid, 0, b"v1", None, None)
        assert srv.client(y.uuid).down
        y.hang = False  # it recovers, but makes no request
        await y.wait_for(lambda: Fid(*fid) in y.breaks, timeout=10)
        await wait_until(lambda: not srv.client(y.uuid).down)


async def test_breaks_to_clients_go_out_in_parallel(tmp_path):
    async with (
        running_server(tmp_path / "fs", break_timeout=1.0) as srv,
        fs_client(srv.host, srv.port) as x,
        fs_client(srv.host, srv.port) as y,
        fs_client(srv.host, srv.port) as z,
        fs_client(srv.host, srv.port) as w,
    ):
        root = await x.root_fid()
        fid = await _mkfile(x, root)
        for c in (y, z, w):
            await c.call("FS.FetchStatus", None, fid)
        y.hang = z.hang = True
        t0 = trio.current_time()
        await x.call("FS.StoreData", None, fid, 0, b"p", None, None)
        took = trio.current_time() - t0
        # Two stuck clients cost one bound, not two; the healthy one got its break.
        assert 0.9 < took < 1.7, took  # sequential delivery would take >= 2 s
        assert Fid(*fid) in w.breaks
        assert srv.client(y.uuid).down and srv.client(z.uuid).down
        assert not srv.client(w.uuid).down


async def test_a_change_waits_for_an_earlier_break_still_on_its_way(tmp_path):
    # X's create in root breaks Y's promise on root; that break is slow (the
    # delay-breaks nemesis).  Z's create in root meanwhile finds no promise
    # of Y's left in the table, yet Y still trusts its listing until the
    # break lands: Z's reply must wait for it, or Y would list root without
    # Z's completed create (what the coherence checker found).
    async with (
        running_server(tmp_path / "fs", break_timeout=2) as srv,
        fs_client(srv.host, srv.port) as x,
        fs_client(srv.host, srv.port) as y,
        fs_client(srv.host, srv.port) as z,
    ):
        root = await x.root_fid()
        await y.call("FS.ReadDir", None, root, None, 100, False)
        srv.breaker.nemesis.delays[y.uuid] = 0.5
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_mkfile, x, root, b"a")
            await wait_until(lambda: Fid(*root) in srv.breaker._inflight)
            await _mkfile(z, root, b"b")
            assert Fid(*root) in y.breaks  # landed before Z's reply
        assert srv.metrics.counts["breaks_awaited"] >= 1


async def test_a_change_waits_for_a_revoked_client_to_be_told(tmp_path):
    # The table overflows and OLD is revoked: its promises leave the table at
    # once, but OLD trusts them until its InitCallBackState3 lands (here it
    # never answers: it is marked down at the break timeout).  A change to a
    # file OLD held must not reply before then.
    async with (
        running_server(tmp_path / "fs", max_callbacks=4, break_timeout=0.5) as srv,
        fs_client(srv.host, srv.port) as old,
        fs_client(srv.host, srv.port) as new,
        fs_client(srv.host, srv.port) as z,
    ):
        root = await old.root_fid()
        fids = [await _mkfile(old, root, b"f%d" % i) for i in range(3)]
        old.hang = True
        for f in fids:
            await new.call("FS.FetchStatus", None, f)  # over the bound: OLD revoked
        assert srv.metrics.counts["revocations"] == 1
        await z.call("FS.StoreData", None, fids[0], 0, b"v2", None, None)
        assert srv.client(old.uuid).down  # told or marked down before Z's reply

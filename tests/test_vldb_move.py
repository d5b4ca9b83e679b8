"""``Admin.VolMove`` at the protocol level, with in-process fileservers: the
copy keeps fids, DVs and bytes; the VLDB (etcd, or the embedded VL) points
at the target; the source answers EREMCHG for the volume, also after a
restart; a volume name or id already on the target is refused."""

from __future__ import annotations

import pytest
import trio

from afsfuse.lab.etcd import EtcdCluster
from afsfuse.lab.server import fs_client, running_server, wait_until
from protocol.errors import MOVED, RpcError


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    with EtcdCluster(tmp_path_factory.mktemp("etcd"), size=1) as cluster:
        yield cluster


async def _fill(srv, name: str) -> tuple[list[int], list[int], bytes]:
    """A volume with a directory and a 5 MiB file (two FetchData calls' worth)."""
    h = await srv.store.create(name, random_ids=True)
    data = bytes(range(256)) * (5 * 4096)
    async with fs_client(srv.host, srv.port) as c:
        root = [h.id, 1, 1]
        d = await c.call("FS.MakeDir", None, root, b"dir", 0o755)
        f = await c.call("FS.CreateFile", None, d["fid"], b"file", 0o644)
        for off in range(0, len(data), 4 << 20):
            await c.call("FS.StoreData", None, f["fid"], off, data[off : off + (4 << 20)],
                         None, None)  # fmt: skip
        await c.call("FS.Symlink", None, root, b"link", b"dir/file", 0o777)
    return root, f["fid"], data


async def _admin(srv, method, *params):
    error: RpcError | None = None
    async with fs_client(srv.host, srv.port, auth=False, hello=False) as c:
        await c.call("Admin.Auth", srv.admin_secret)
        try:
            return await c.call(method, *params, timeout=60)
        except RpcError as exc:
            error = exc  # raised outside the connection's nursery: not in a group
    raise error


async def _read_all(c, fid, size):
    out = b""
    while len(out) < size:
        r = await c.call("FS.FetchData", None, fid, len(out), 4 << 20)
        out += r["data"]
    return out


async def test_move_with_etcd_vldb(tmp_path, etcd):
    cell = "movecell"
    key = tmp_path / "a" / "cell.key"
    async with (
        running_server(tmp_path / "a", vldb=etcd.url, cell=cell) as a,
        running_server(tmp_path / "b", vldb=etcd.url, cell=cell, key_file=key,
                       create_root=False) as b,
    ):  # fmt: skip
        root, fid, data = await _fill(a, "proj")
        async with fs_client(a.host, a.port) as ca:
            before = await ca.call("FS.FetchStatus", None, fid)
            res = await _admin(a, "Admin.VolMove", "proj", b.host, b.port)
            assert res["to"] == b.uuid and res["bytes_sent"] >= len(data)
            # The source answers "moved" for every call naming the volume.
            for method, params in [("FS.FetchStatus", (None, fid)),
                                       ("FS.Lookup", (None, root, b"dir")),
                                       ("FS.InlineBulkStatus", (None, [fid, root])),
                                       ("FS.GetVolumeStatus", (None, root[0]))]:  # fmt: skip
                with pytest.raises(RpcError) as exc:
                    await ca.call(method, *params)
                assert exc.value.code == MOVED
            # ... and it told the clients holding promises (whole-volume break).
            await ca.wait_for(lambda: any(f.vnode == 0 for f in ca.breaks))
        # Both VL services now say: on b.
        for srv in (a, b):
            async with fs_client(srv.host, srv.port, auth=False, hello=False) as c:
                e = await c.call("VL.GetEntryByName", "proj")
                assert e["volume_id"] == root[0]
                assert [s["uuid"] for s in e["servers"]] == [b.uuid]
        # The copy on b: same fids, DVs and bytes.
        async with fs_client(b.host, b.port) as cb:
            after = await cb.call("FS.FetchStatus", None, fid)
            assert after["status"] == before["status"]
            assert after["volsync"][0] == before["volsync"][0]  # same creation stamp
            assert await _read_all(cb, fid, len(data)) == data
            lk = await cb.call("FS.Lookup", None, root, b"link")
            assert (await cb.call("FS.FetchData", None, lk["fid"], 0, 100))["data"] == (b"dir/file")
            # A second move to where it already is is refused.
            with pytest.raises(RpcError, match="ENOENT"):
                await _admin(a, "Admin.VolMove", "proj", b.host, b.port)
    # The source still says "moved" after a restart (moved.json).
    async with (
        running_server(tmp_path / "a", vldb=etcd.url, cell=cell) as a2,
        fs_client(a2.host, a2.port) as c,
    ):
        with pytest.raises(RpcError) as exc:
            await c.call("FS.FetchStatus", None, fid)
        assert exc.value.code == MOVED


async def test_move_refused_when_the_target_has_the_volume(tmp_path, etcd):
    cell = "refusecell"
    key = tmp_path / "a" / "cell.key"
    async with (
        running_server(tmp_path / "a", vldb=etcd.url, cell=cell) as a,
        running_server(tmp_path / "b", vldb=etcd.url, cell=cell, key_file=key,
                       create_root=False) as b,
    ):  # fmt: skip
        h = await a.store.create("dup", random_ids=True)
        # b holds a volume of that id already (e.g. an earlier copy).
        await b.store.create("other", volume_id=h.id)
        with pytest.raises(RpcError, match="EEXIST"):
            await _admin(a, "Admin.VolMove", "dup", b.host, b.port)
        assert "dup" in a.store.by_name  # still served here
        async with fs_client(a.host, a.port) as c:
            await c.call("FS.FetchStatus", None, [h.id, 1, 1])
        with pytest.raises(RpcError, match="EINVAL"):
            await _admin(a, "Admin.VolMove", "dup", a.host, a.port)  # to itself


async def test_move_with_the_embedded_vl(tmp_path):
    async with running_server(tmp_path / "a") as a:  # noqa: SIM117 - b needs a's address
        async with running_server(tmp_path / "b", vl=(a.host, a.port),
                                  vl_register_interval=60) as b:  # fmt: skip
            _root, fid, data = await _fill(a, "proj")
            await _admin(a, "Admin.VolMove", "proj", b.host, b.port)
            async with fs_client(a.host, a.port, auth=False, hello=False) as c:
                e = await c.call("VL.GetEntryByName", "proj")
                assert e["servers"][0]["uuid"] == b.uuid
                assert e["servers"][0]["addrs"] == [[b.host, b.port]]
            async with fs_client(b.host, b.port) as cb:
                assert await _read_all(cb, fid, len(data)) == data
            with trio.fail_after(10):
                await b.registrar.registered.wait()


async def test_calls_waiting_on_the_final_round_get_moved(tmp_path, etcd):
    cell = "waitcell"
    key = tmp_path / "a" / "cell.key"
    async with (
        running_server(tmp_path / "a", vldb=etcd.url, cell=cell) as a,
        running_server(tmp_path / "b", vldb=etcd.url, cell=cell, key_file=key,
                       create_root=False) as b,
    ):  # fmt: skip
        _root, fid, _data = await _fill(a, "proj")
        switching, go_on = trio.Event(), trio.Event()
        real = a.vldb.set_location

        async def held_switch(*args):
            switching.set()  # the final round holds the volume here
            await go_on.wait()
            await real(*args)

        a.vldb.set_location = held_switch
        results: list = []
        async with fs_client(a.host, a.port) as c, trio.open_nursery() as n:

            async def fetch():
                try:
                    results.append(await c.call("FS.FetchStatus", None, fid))
                except RpcError as exc:
                    results.append(exc.code)

            n.start_soon(_admin, a, "Admin.VolMove", "proj", b.host, b.port)
            await switching.wait()
            h = a.store.by_id[fid[0]]
            n.start_soon(fetch)
            await wait_until(lambda: h.lock.statistics().tasks_waiting == 1)
            assert results == []  # it waits for the volume; it did not fail
            go_on.set()
        assert results == [MOVED]


async def test_failed_switch_keeps_the_volume_on_the_source(tmp_path, etcd):
    cell = "abortcell"
    key = tmp_path / "a" / "cell.key"
    async with (
        running_server(tmp_path / "a", vldb=etcd.url, cell=cell) as a,
        running_server(tmp_path / "b", vldb=etcd.url, cell=cell, key_file=key,
                       create_root=False) as b,
    ):  # fmt: skip
        _root, fid, data = await _fill(a, "proj")

        async def unavailable(*args):
            raise RpcError("EAGAIN", "VLDB unavailable")

        a.vldb.set_location = unavailable
        with pytest.raises(RpcError, match="EAGAIN"):
            await _admin(a, "Admin.VolMove", "proj", b.host, b.port)
        # The target dropped its copy; the source serves the volume as before.
        assert "proj" not in b.store.by_name and "proj" in a.store.by_name
        async with fs_client(a.host, a.port) as c:
            assert await _read_all(c, fid, len(data)) == data
        e = next(e for e in await a.vldb.entries() if e["name"] == "proj")
        assert e["servers"][0]["uuid"] == a.uuid
        # And a later move goes through.
        del a.vldb.set_location
        await _admin(a, "Admin.VolMove", "proj", b.host, b.port)
        assert "proj" in b.store.by_name and "proj" not in a.store.by_name


async def test_move_there_and_back(tmp_path, etcd):
    cell = "backcell"
    key = tmp_path / "a" / "cell.key"
    async with (
        running_server(tmp_path / "a", vldb=etcd.url, cell=cell) as a,
        running_server(tmp_path / "b", vldb=etcd.url, cell=cell, key_file=key,
                       create_root=False) as b,
    ):  # fmt: skip
        root, fid, data = await _fill(a, "proj")
        await _admin(a, "Admin.VolMove", "proj", b.host, b.port)
        res = await _admin(b, "Admin.VolMove", "proj", a.host, a.port)
        assert res["to"] == a.uuid
        async with fs_client(a.host, a.port) as c:
            assert await _read_all(c, fid, len(data)) == data
        async with fs_client(b.host, b.port) as c:
            with pytest.raises(RpcError) as exc:
                await c.call("FS.FetchStatus", None, fid)
            assert exc.value.code == MOVED
        # Back home, it is a's to register again (and b's no longer).
        assert root[0] not in a.vldb.moved_out and root[0] in b.vldb.moved_out
        e = next(e for e in await a.vldb.entries() if e["name"] == "proj")
        assert e["servers"][0]["uuid"] == a.uuid and e["volume_id"] == root[0]

"""The VLDB on etcd: the small etcd client, two fileservers sharing one cell's
VLDB, a server whose lease lapsed shown down, and a three-member cluster that
keeps answering after losing a member.  Every etcd here is real (Debian's
etcd-server, started by ``afsfuse.lab.etcd`` on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest
import trio

from afsfuse.lab.etcd import EtcdCluster
from afsfuse.lab.server import REPO, ServerProcess, fs_client, running_server, wait_until
from fileserver.etcd import EtcdClient, EtcdError, EtcdUnavailable, parse_endpoints, prefix_end
from fileserver.vldb import EtcdVLDB
from protocol.errors import RpcError


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    with EtcdCluster(tmp_path_factory.mktemp("etcd"), size=1) as cluster:
        yield cluster


@pytest.fixture
def cell(request):
    """A cell name of its own per test: tests share one etcd."""
    return "c" + str(abs(hash(request.node.name)) % 10**8)


def admin(data_dir, *argv):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-m", "fileserver.cli", *argv, "--data-dir",
                          str(data_dir), "--json"], capture_output=True, text=True, cwd=REPO,
                         env=env, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def eventually(fn, bound):
    """Poll ``fn`` until true or ``bound`` seconds passed; its last value."""
    deadline = time.monotonic() + bound
    while not (value := fn()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


async def until(fetch, pred, bound=10.0):
    """Fetch (``await fetch()``) until ``pred`` holds of the value, within ``bound`` s."""
    with trio.fail_after(bound):
        while True:
            if pred(await fetch()):
                return
            await trio.sleep(0.05)


def examine_up(srv, volume):
    return admin(srv.data_dir, "vol", "examine", volume)["servers"][0]["up"]


def test_parse_endpoints():
    assert parse_endpoints("etcd://127.0.0.1:2379,[::1]:2380") == [
        ("127.0.0.1", 2379),
        ("::1", 2380),
    ]
    for bad in ("http://h:1", "etcd://h", "etcd://h:x", "etcd://:1"):
        with pytest.raises(ValueError):
            parse_endpoints(bad)
    assert prefix_end(b"/a/") == b"/a0"
    assert prefix_end(b"a\xff") == b"b"


async def test_etcd_client_keys_txn_and_leases(etcd):
    async with EtcdClient(parse_endpoints(etcd.url)) as c:
        await c.put(b"/t/k1", b"one")
        await c.put(b"/t/k2", b"two")
        await c.put(b"/u/k3", b"three")
        assert await c.get(b"/t/k1") == b"one"
        assert await c.get(b"/t/none") is None
        got = await c.range(b"/t/", prefix=True)
        assert [(k, v) for k, v, _ in got] == [(b"/t/k1", b"one"), (b"/t/k2", b"two")]
        rev = got[0][2]
        # Compare-and-put: only against the revision it was read at.
        assert await c.put_if(b"/t/k1", b"uno", rev)
        assert not await c.put_if(b"/t/k1", b"ein", rev)
        assert not await c.put_if(b"/t/k1", b"ein", 0)  # 0: only if absent
        assert await c.put_if(b"/t/new", b"x", 0)
        assert await c.get(b"/t/k1") == b"uno"
        assert await c.delete(b"/t/k2") == 1
        # A key bound to a lease goes when the lease is revoked or lapses.
        lease = await c.grant(2)
        await c.put(b"/t/leased", b"alive", lease=lease)
        assert await c.keepalive_once(lease) == 2
        await c.revoke(lease)
        assert await c.get(b"/t/leased") is None
        assert await c.keepalive_once(lease) == 0
        await c.revoke(lease)  # already gone: not an error
        lease = await c.grant(2)
        await c.put(b"/t/lapse", b"x", lease=lease)
        await until(lambda: c.get(b"/t/lapse"), lambda v: v is None, 15)
        with pytest.raises(EtcdError):
            await c.put(b"/t/k", b"v", lease=lease)  # lease not found


async def test_etcd_client_moves_past_a_dead_endpoint(etcd):
    with trio.socket.socket() as s:  # a port nothing listens on
        await s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    async with EtcdClient([("127.0.0.1", dead), *parse_endpoints(etcd.url)], timeout=2) as c:
        await c.put(b"/failover", b"ok")
        assert await c.get(b"/failover") == b"ok"
    async with EtcdClient([("127.0.0.1", dead)], timeout=1) as c:
        with pytest.raises(EtcdUnavailable):
            await c.get(b"/failover")


async def test_etcd_client_waits_out_a_leader_election(autojump_clock):
    # Members that answer "leader changed" (no quorum behind them yet) are
    # asked again for a few seconds; members that do not answer are not.
    answers = [{"error": "etcdserver: leader changed", "code": 14}] * 4 + [{"kvs": []}]
    asked = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(str(request.url))
        return httpx.Response(200, json=answers.pop(0))

    async with EtcdClient([("127.0.0.1", 1), ("127.0.0.1", 2)]) as client:
        client._http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        assert await client.range(b"k") == []
        assert len(asked) == 5  # two rounds of both members, then one answer
        answers[:] = [{"error": "etcdserver: no leader", "code": 14}] * 20
        with pytest.raises(EtcdUnavailable):
            await client.range(b"k")  # bounded: gives up after about 3 s


async def test_two_servers_share_the_cells_vldb(tmp_path, etcd, cell):
    url = etcd.url
    async with (
        running_server(tmp_path / "a", vldb=url, cell=cell, vldb_ttl=3) as a,
        running_server(tmp_path / "b", vldb=url, cell=cell, vldb_ttl=3,
                       key_file=tmp_path / "a" / "cell.key") as b,
    ):  # fmt: skip
        assert isinstance(a.vldb, EtcdVLDB)
        # Only the first server of the cell created root.cell.
        assert "root.cell" in a.store.by_name
        assert "root.cell" not in b.store.by_name
        h = await b.store.create("bvol", random_ids=True)
        await until(a.vldb.entries, lambda es: any(e["name"] == "bvol" for e in es))
        # Either server answers VL.* for the whole cell, before authentication.
        for srv in (a, b):
            async with fs_client(srv.host, srv.port, auth=False, hello=False) as c:
                e = await c.call("VL.GetEntryByName", "bvol")
                assert e["volume_id"] == h.id and e["cell"] == cell
                assert e["servers"] == [{"uuid": b.uuid, "addrs": [[b.host, b.port]], "up": True}]
                r = await c.call("VL.GetEntryById", 536870912)
                assert r["name"] == "root.cell" and r["servers"][0]["uuid"] == a.uuid
                names = {x["name"] for x in await c.call("VL.ListEntries")}
                assert names == {"root.cell", "bvol"}
        # A name the cell has is refused on another server.
        async with fs_client(a.host, a.port, auth=False, hello=False) as c:
            await c.call("Admin.Auth", a.admin_secret)
            with pytest.raises(Exception, match="EEXIST"):
                await c.call("Admin.VolCreate", "bvol", 0, None)
            ex = await c.call("Admin.VolExamine", "bvol")  # held by b: its location
            assert ex["servers"][0]["uuid"] == b.uuid and ex["servers"][0]["up"]
        # A removed volume leaves the VLDB.
        await b.store.remove(h)
        await until(a.vldb.entries, lambda es: all(e["name"] != "bvol" for e in es))
        # A cleanly stopped server is shown down at once (its lease revoked).
        b.stop()
    e = None
    async with running_server(tmp_path / "c", vldb=url, cell=cell) as c:
        for e in await c.vldb.entries():
            assert e["servers"][0]["uuid"] == a.uuid and not e["servers"][0]["up"]
    assert e is not None


def test_lapsed_lease_is_reported_down(tmp_path, etcd, cell):
    args = ["--vldb", etcd.url, "--cell", cell, "--vldb-ttl", "2"]
    with ServerProcess(tmp_path / "a", extra_args=args) as a:
        b = ServerProcess(tmp_path / "b", extra_args=[*args, "--key-file", str(a.key_file)])
        with b:
            admin(b.data_dir, "vol", "create", "bvol")
            ex = admin(a.data_dir, "vol", "examine", "bvol")
            b_uuid = ex["servers"][0]["uuid"]
            assert ex["servers"][0]["up"] is True
            b.kill()  # SIGKILL: nobody revokes its lease; it lapses
            assert eventually(lambda: not examine_up(a, "bvol"), 30)
            ex = admin(a.data_dir, "vol", "examine", "bvol")
            assert ex["servers"] == [{"uuid": b_uuid, "addrs": [[b.host, b.port]], "up": False}]
            # It comes back up when the server does.
            b.start()
            assert eventually(lambda: examine_up(a, "bvol"), 30)


async def test_three_member_cluster_survives_losing_one(tmp_path):
    with EtcdCluster(tmp_path / "etcd3", size=3) as cluster:
        async with running_server(tmp_path / "a", vldb=cluster.url, vldb_ttl=3) as a:
            await a.store.create("before", random_ids=True)
            await until(a.vldb.entries, lambda es: {e["name"] for e in es} >= {"before"})
            # The member the server talks to first dies.
            cluster.members[0].kill()
            async with fs_client(a.host, a.port, auth=False, hello=False) as c:
                e = await c.call("VL.GetEntryByName", "before")
                assert e["servers"][0]["uuid"] == a.uuid and e["servers"][0]["up"]
                # Writes still reach a quorum: a new volume is registered.
                await a.store.create("after", random_ids=True)
                await until(a.vldb.entries, lambda es: any(e["name"] == "after" for e in es))
                assert (await c.call("VL.GetEntryByName", "after"))["servers"][0]["up"]
            # Its lease is still kept alive by the two members left.
            assert a.vldb.last_error == ""


async def test_server_registers_again_after_losing_etcd(tmp_path):
    with EtcdCluster(tmp_path / "etcd1") as cluster:
        async with running_server(tmp_path / "a", vldb=cluster.url, vldb_ttl=2) as a:
            await a.vldb.registered.wait()
            lease = a.vldb.lease
            member = cluster.members[0]
            member.kill()  # etcd gone for longer than the lease lasts
            await wait_until(lambda: a.vldb.last_error != "", 20)
            async with fs_client(a.host, a.port, auth=False, hello=False) as c:
                with pytest.raises(RpcError, match="EAGAIN"):  # VL cannot answer now
                    await c.call("VL.GetEntryByName", "root.cell")
            member.start(f"{member.name}={member.peer_url}", "unused")  # its data dir is kept
            await wait_until(member.healthy, 30, interval=0.1)
            # Back: the registration goes on (the same lease if etcd kept it alive,
            # a new one if it lapsed), and VL answers again.
            await until(
                a.vldb.entries,
                lambda es: any(e["name"] == "root.cell" and e["servers"][0]["up"] for e in es),
                30,
            )
            await wait_until(lambda: a.vldb.last_error == "", 20)
            assert a.vldb.lease in (lease, a.vldb.lease)

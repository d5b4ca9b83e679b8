"""Admin commands, VL service and registration, metrics and event log lines."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import urllib.request

import pytest
import trio

from afsfuse.lab.server import REPO, ServerProcess, fs_client, running_server, tls_for
from fileserver.admin import ADMIN_AUTH
from protocol.connection import open_connection
from protocol.errors import RpcError
from protocol.records import Fid


def admin_cli(data_dir, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fileserver.cli", *args, "--data-dir", str(data_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def admin_json(data_dir, *args: str):
    r = admin_cli(data_dir, *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_admin_cli_against_subprocess_server(tmp_path):
    d = tmp_path / "fs"
    with ServerProcess(d):
        vols = admin_json(d, "vol", "list")
        assert [v["name"] for v in vols] == ["root.cell"]
        v = admin_json(d, "vol", "create", "proj", "--quota", "1000")
        assert v["name"] == "proj" and v["quota_bytes"] == 1000
        ex = admin_json(d, "vol", "examine", "proj")
        assert ex["volume_id"] == v["volume_id"] and ex["promises"] == 0
        assert admin_cli(d, "vol", "create", "proj").returncode == 1
        human = admin_cli(d, "vol", "list")
        assert "proj" in human.stdout and "root.cell" in human.stdout
        assert admin_json(d, "clients") == []
        stats = admin_json(d, "stats")
        assert stats["counters"]["giveups"] == 0 and "rpcs" in stats
        assert admin_cli(d, "stats").returncode == 0
        assert admin_cli(d, "vol", "remove", "proj").returncode == 0
        assert [v["name"] for v in admin_json(d, "vol", "list")] == ["root.cell"]
        assert admin_cli(d, "break", "536870912.1.1").returncode == 0
        assert admin_cli(d, "break-volume", "root.cell").returncode == 0
        assert admin_cli(d, "reset", "nobody").returncode == 1
        assert admin_json(d, "vol", "offline", "root.cell")["online"] is False
        assert admin_json(d, "vol", "list")[0]["online"] is False
        assert admin_json(d, "vol", "online", "root.cell")["online"] is True


async def test_admin_rpcs_clients_callbacks_reset(tmp_path):
    async with running_server(tmp_path / "fs") as srv, fs_client(srv.host, srv.port) as c:
        root = await c.root_fid()
        await c.call("FS.FetchStatus", None, root)
        async with open_connection(srv.host, srv.port, tls=tls_for(srv.host, srv.port)) as adm:
            with pytest.raises(RpcError) as ei:
                await adm.call("Admin.Clients")
            assert ei.value.code == "EACCES"
            with pytest.raises(RpcError) as ei:
                await adm.call(ADMIN_AUTH, "wrong")
            assert ei.value.code == "EACCES"
            await adm.call(ADMIN_AUTH, srv.admin_secret)
            clients = await adm.call("Admin.Clients")
            assert [x["uuid"] for x in clients] == [c.uuid] and clients[0]["promises"] == 1
            cbs = await adm.call("Admin.Callbacks", c.uuid, None)
            assert cbs["callbacks"][0]["fid"] == str(Fid(*root))
            cbs = await adm.call("Admin.Callbacks", None, str(Fid(*root)))
            assert cbs["callbacks"][0]["client"] == c.uuid
            r = await adm.call("Admin.Break", str(Fid(*root)))
            assert r["clients"] == 1 and c.breaks == [Fid(*root)]
            await c.call("FS.FetchStatus", None, root)
            r = await adm.call("Admin.Reset", c.uuid)
            assert r["delivered"] and c.inits == 2 and srv.table.count == 0
            await adm.call("Admin.BreakVolume", "root.cell")
            assert Fid(root[0], 0, 0) in c.breaks
            with pytest.raises(RpcError) as ei:
                await adm.call("FS.Hello", {"uuid": c.uuid})
            assert ei.value.code == "EPERM"
        # Admin on a client connection is refused.
        with pytest.raises(RpcError) as ei:
            await c.call(ADMIN_AUTH, srv.admin_secret)
        assert ei.value.code == "EPERM"
        await c.call("FS.GiveUpAllCallBacks")
        assert srv.stats()["rpcs"]["FS.GiveUpAllCallBacks"] == 1


async def test_vl_entries_and_registration_of_second_server(tmp_path):
    async with (
        running_server(tmp_path / "vl") as vl,
        running_server(tmp_path / "fs2", vl=(vl.host, vl.port)) as fs2,
    ):
        assert "root.cell" not in fs2.store.by_name  # the cell root lives with the VL
        await fs2.store.create("vol2")
        with trio.fail_after(10):
            await fs2.registrar.registered.wait()
        async with fs_client(vl.host, vl.port, hello=False) as c:
            with trio.fail_after(10):
                while True:
                    try:
                        e = await c.call("VL.GetEntryByName", "vol2")
                        break
                    except RpcError:
                        await trio.sleep(0.05)
            assert e["servers"][0]["uuid"] == fs2.uuid
            assert e["servers"][0]["addrs"] == [[fs2.host, fs2.port]]
            assert e["cell"] == "localcell" and e["type"] == "rw"
            assert (await c.call("VL.GetEntryById", e["volume_id"]))["name"] == "vol2"
            names = sorted(x["name"] for x in await c.call("VL.ListEntries"))
            assert names == ["root.cell", "vol2"]
            with pytest.raises(RpcError) as ei:
                await c.call("VL.GetEntryByName", "nope")
            assert ei.value.code == "ENOENT"
            with pytest.raises(RpcError) as ei:
                await c.call("VL.RegisterServer", "x", [["h", 0]], [])
            assert ei.value.code == "EINVAL"
        # A client follows the VL entry to the second server.
        host, port = e["servers"][0]["addrs"][0]
        async with fs_client(host, port) as c2:
            fid = [e["volume_id"], 1, 1]
            r = await c2.call("FS.CreateFile", None, fid, b"x", 0o644)
            assert r["fid"][0] == e["volume_id"]


async def test_metrics_and_event_lines(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fileserver.events")
    async with (
        running_server(tmp_path / "fs", metrics=("127.0.0.1", 0)) as srv,
        fs_client(srv.host, srv.port) as x,
        fs_client(srv.host, srv.port) as y,
    ):
        root = await x.root_fid()
        await y.call("FS.FetchStatus", None, root)
        await x.call("FS.CreateFile", None, root, b"f", 0o644)
        await y.call("FS.GiveUpAllCallBacks")

        def scrape() -> str:
            url = f"http://127.0.0.1:{srv.metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=10) as resp:
                return resp.read().decode()

        text = await trio.to_thread.run_sync(scrape)
        assert 'afs_fileserver_rpcs_total{method="FS.GiveUpAllCallBacks",result="ok"} 1.0' in text
        assert "afs_fileserver_promises " in text
        assert "afs_fileserver_breaks_sent_total 1.0" in text
        assert "afs_fileserver_rpc_seconds_bucket" in text
        assert "afs_fileserver_inline_commits_total" in text
        assert "afs_fileserver_settle_timeouts_total " in text
    lines = [r.getMessage() for r in caplog.records if r.name == "fileserver.events"]
    for ev in ("grant", "break", "init_callback_state", "giveup", "hello"):
        assert any(m.startswith(f"event={ev} ") for m in lines), ev
    brk = next(m for m in lines if m.startswith("event=break "))
    assert f"fid={Fid(*root)}" in brk and f"client={y.uuid}" in brk and "result=sent" in brk

"""Several fileservers in one cell (VLDB on etcd), used by real mounts: volumes
on two servers reached through mount points in one mount, each server with
its own server record on the client, and changes flowing both ways."""

from __future__ import annotations

import os

import pytest

from afsfuse.lab.etcd import EtcdCluster
from afsfuse.lab.mount import ClientMount
from afsfuse.lab.server import ServerProcess
from protocol.logfmt import parse
from tests.cli_support import admin, run

pytestmark = pytest.mark.mount


@pytest.fixture
def cell2(tmp_path):
    """etcd, server A (root.cell) and server B (volume bvol) in one cell."""
    with EtcdCluster(tmp_path / "etcd") as etcd:
        args = ["--vldb", etcd.url, "--vldb-ttl", "3"]
        with ServerProcess(tmp_path / "a", extra_args=args) as a:
            b = ServerProcess(tmp_path / "b", extra_args=[*args, "--key-file", str(a.key_file)])
            with b:
                admin(b, "vol", "create", "bvol")
                yield etcd, a, b


def test_two_servers_two_mounts_through_mount_points(tmp_path, cell2, require_fuse):
    _etcd, a, b = cell2
    a_uuid = admin(a, "stats")["server_uuid"]
    b_uuid = admin(b, "stats")["server_uuid"]
    # One mount from each server's VL: either answers for the whole cell.
    with ClientMount(a, tmp_path / "ma") as ma, ClientMount(b, tmp_path / "mb") as mb:
        run("afsfuse.cli", "fs", "mkmount", ma.mnt / "b", "bvol")
        (ma.mnt / "b" / "f.txt").write_text("on server B")
        (ma.mnt / "top.txt").write_text("on server A")
        assert os.getxattr(ma.mnt / "b" / "f.txt", "afs.volume") == b"bvol"
        assert (mb.mnt / "b" / "f.txt").read_text() == "on server B"
        assert (mb.mnt / "top.txt").read_text() == "on server A"
        # Changes flow back through both servers' breaks.
        (mb.mnt / "b" / "f.txt").write_text("changed by mb")
        (mb.mnt / "top.txt").write_text("changed by mb too")
        assert (ma.mnt / "b" / "f.txt").read_text() == "changed by mb"
        assert (ma.mnt / "top.txt").read_text() == "changed by mb too"
        # The data lives where the VLDB says: bvol's file on B, not on A.
        ex_b = admin(b, "vol", "examine", "bvol")
        assert ex_b["files"] >= 1 and ex_b["servers"][0]["uuid"] == b_uuid
        assert admin(a, "vol", "examine", "bvol")["servers"][0]["uuid"] == b_uuid
        # Each client holds one server record per server UUID, and gets
        # promises from each server for its volumes only.
        for m in (ma, mb):
            assert sorted(m.stats()["servers"]) == sorted([a_uuid, b_uuid])
        holders_b = {c["fid"].split(".")[0] for c in admin(b, "callbacks")["callbacks"]}
        holders_a = {c["fid"].split(".")[0] for c in admin(a, "callbacks")["callbacks"]}
        assert holders_b == {str(ex_b["volume_id"])}
        assert holders_a == {"536870912"}

        # A whole-volume break from B reaches only bvol's instance (P3).
        def volume_breaks(vid):
            want = {"event": "volume_break", "cell": "localcell", "volume": str(vid)}
            lines = ma.log_text().splitlines()
            fields = (parse(ln[ln.index("event=") :]) for ln in lines if "event=" in ln)
            return sum(1 for f in fields if want.items() <= f.items())

        before_b, before_a = volume_breaks(ex_b["volume_id"]), volume_breaks(536870912)
        admin(b, "break-volume", "bvol")
        assert volume_breaks(ex_b["volume_id"]) == before_b + 1
        assert volume_breaks(536870912) == before_a
        assert (ma.mnt / "b" / "f.txt").read_text() == "changed by mb"

"""``vol move``: a mounted volume moves between two fileservers of a cell
(VLDB on etcd) while two real mounts use it.  The old server answers
"moved" (EREMCHG), the clients ask VL again and carry on from the new server;
no acknowledged byte is lost, a file open for writing across the move stores
after it, and stopping the old server afterwards changes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from afsfuse.lab.etcd import EtcdCluster
from afsfuse.lab.mount import REPO, ClientMount
from afsfuse.lab.server import ServerProcess

pytestmark = pytest.mark.mount


def run(*argv, check=True):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-m", *map(str, argv)], capture_output=True,
                         text=True, cwd=REPO, env=env, timeout=120)  # fmt: skip
    if check:
        assert res.returncode == 0, res.stderr
    return res


def admin(srv, *argv):
    out = run("fileserver.cli", *argv, "--data-dir", srv.data_dir, "--json").stdout
    return json.loads(out)


def test_move_a_mounted_volume(tmp_path, require_fuse):
    with EtcdCluster(tmp_path / "etcd") as etcd:
        args = ["--vldb", etcd.url, "--vldb-ttl", "3"]
        a = ServerProcess(tmp_path / "a", extra_args=args).start()
        b = ServerProcess(tmp_path / "b", extra_args=[*args, "--key-file", str(a.key_file)])
        try:
            b.start()
            admin(a, "vol", "create", "proj")
            a_uuid = admin(a, "stats")["server_uuid"]
            b_uuid = admin(b, "stats")["server_uuid"]
            # Both mounts ask B's VL: A can go away later.
            with (ClientMount(b, tmp_path / "ma", volume="proj") as ma,
                  ClientMount(b, tmp_path / "mb", volume="proj") as mb):  # fmt: skip
                (ma.mnt / "f.txt").write_text("written on A")
                (ma.mnt / "d").mkdir()
                (ma.mnt / "d" / "big.bin").write_bytes(os.urandom(3 << 20))
                big = (ma.mnt / "d" / "big.bin").read_bytes()
                assert (mb.mnt / "f.txt").read_text() == "written on A"
                # mb has a file open for writing across the move (bytes in
                # its cache, not yet stored).
                w = open(mb.mnt / "w.txt", "w")  # noqa: SIM115 - kept open across the move
                w.write("before the move;")
                w.flush()
                # ma keeps writing while the volume moves; every close that
                # returned is an acknowledged file.
                done: list[int] = []
                stop = threading.Event()

                def writer() -> None:
                    for i in range(200):
                        if stop.is_set():
                            return
                        (ma.mnt / f"during-{i}.txt").write_text(f"file {i}")
                        done.append(i)

                t = threading.Thread(target=writer)
                t.start()
                while len(done) < 3 and t.is_alive():
                    time.sleep(0.01)
                moved = admin(a, "vol", "move", "proj", "--to", f"{b.host}:{b.port}")
                stop.set()
                t.join(60)
                assert not t.is_alive()
                assert moved["to"] == b_uuid and moved["name"] == "proj"
                # The VLDB and the servers agree on where it is.
                ex = admin(b, "vol", "examine", "proj")
                assert ex["servers"][0]["uuid"] == b_uuid and ex["servers"][0]["up"]
                listed = {v["name"]: v for v in admin(a, "vol", "list")}
                assert listed["proj"]["server"] == b_uuid and "files" not in listed["proj"]
                assert listed["root.cell"]["server"] == a_uuid
                assert admin(a, "vol", "examine", "proj")["servers"][0]["uuid"] == b_uuid
                # No acknowledged file is lost, on either client.
                for m in (ma, mb):
                    for i in done:
                        assert (m.mnt / f"during-{i}.txt").read_text() == f"file {i}"
                assert (mb.mnt / "d" / "big.bin").read_bytes() == big
                # A change after the move reaches the other client via B.
                (ma.mnt / "f.txt").write_text("written after the move")
                assert (mb.mnt / "f.txt").read_text() == "written after the move"
                # The file open across the move stores (to B) at close.
                w.write("after the move")
                w.close()
                assert (ma.mnt / "w.txt").read_text() == "before the move;after the move"
                # The clients followed: their record for B serves the volume.
                for m in (ma, mb):
                    vols = m.stats()["volumes"]
                    assert any(k.endswith(str(ex["volume_id"])) for k in vols)
                    assert m.examine(m.mnt / "f.txt")["server"] == b_uuid
                # Stopping the old server changes nothing for clients.
                a.stop()
                (mb.mnt / "after-stop.txt").write_text("A is gone")
                assert (ma.mnt / "after-stop.txt").read_text() == "A is gone"
                assert sorted(os.listdir(ma.mnt))[:2] == ["after-stop.txt", "d"]
                assert (ma.mnt / "w.txt").read_text() == "before the move;after the move"
                assert a_uuid != b_uuid
        finally:
            b.stop()
            a.stop()

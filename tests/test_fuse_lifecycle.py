"""Mount, unmount, crash and restart, through the real commands."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from afsfuse.lab.admin import rpc_count
from afsfuse.lab.mount import REPO, ClientMount, unmount
from afsfuse.lab.server import ServerProcess

pytestmark = pytest.mark.mount


def afsfuse(*args, timeout=60):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "afsfuse.cli", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env,
    )  # fmt: skip


def daemon_pids(mnt):
    out = subprocess.run(["pgrep", "-f", f"afsfuse.cli mount .* {mnt}"], capture_output=True)
    return [int(p) for p in out.stdout.split()]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_daemonized_mount_and_umount_gives_up_once(tmp_path, require_fuse):
    with ServerProcess(tmp_path / "fs") as srv:
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        try:
            res = afsfuse("mount", f"{srv.host}:{srv.port}", mnt, "--cache-dir", tmp_path / "c")
            assert res.returncode == 0, res.stderr
            assert os.path.ismount(mnt)
            (mnt / "f").write_text("data")
            pids = daemon_pids(mnt)
            assert len(pids) == 1
            res = afsfuse("umount", mnt)
            assert res.returncode == 0, res.stderr
            assert not os.path.ismount(mnt)
            assert daemon_pids(mnt) == []
            assert rpc_count(srv.data_dir, "FS.GiveUpAllCallBacks") == 1
        finally:
            unmount(mnt)
            for pid in daemon_pids(mnt):
                os.kill(pid, signal.SIGKILL)


def test_mount_failures_are_clear_and_nonzero(tmp_path, require_fuse):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = afsfuse("mount", f"127.0.0.1:{free_port()}", mnt, "--cache-dir", tmp_path / "c")
    assert res.returncode != 0 and "mount failed" in res.stderr
    assert not os.path.ismount(mnt)
    with ServerProcess(tmp_path / "fs") as srv:
        res = afsfuse("mount", f"{srv.host}:{srv.port}/no.such.volume", mnt,
                      "--cache-dir", tmp_path / "c")  # fmt: skip
        assert res.returncode != 0 and "no.such.volume" in res.stderr
        assert not os.path.ismount(mnt)
        (mnt / "occupied").write_text("x")
        res = afsfuse("mount", f"{srv.host}:{srv.port}", mnt, "--cache-dir", tmp_path / "c")
        assert res.returncode != 0 and "not empty" in res.stderr
        res = afsfuse("mount", f"{srv.host}:{srv.port}", tmp_path / "absent")
        assert res.returncode != 0 and "does not exist" in res.stderr
    assert daemon_pids(mnt) == []


def test_sigterm_unmounts_and_stores(tmp_path, require_fuse):
    with ServerProcess(tmp_path / "fs") as srv:
        m = ClientMount(srv, tmp_path / "a").start()
        try:
            (m.mnt / "kept").write_bytes(b"stored before exit")
            m.proc.send_signal(signal.SIGTERM)
            assert m.proc.wait(30) == 0
            assert not os.path.ismount(m.mnt)
            assert rpc_count(srv.data_dir, "FS.GiveUpAllCallBacks") == 1
        finally:
            m.stop()
        with ClientMount(srv, tmp_path / "b") as m2:
            assert (m2.mnt / "kept").read_bytes() == b"stored before exit"


def test_crashed_daemon_mount_is_removable(tmp_path, require_fuse):
    with ServerProcess(tmp_path / "fs") as srv:
        m = ClientMount(srv, tmp_path / "a").start()
        try:
            (m.mnt / "f").write_text("x")
            m.kill()
            with pytest.raises(OSError):
                os.listdir(m.mnt)  # a dead mount: ENOTCONN
            res = subprocess.run(["fusermount3", "-u", str(m.mnt)], capture_output=True)
            assert res.returncode == 0, res.stderr
            assert not os.path.ismount(m.mnt)
        finally:
            m.stop()


def test_remount_reuses_cached_chunks(tmp_path, require_fuse):
    data = os.urandom(3 << 20)
    with ServerProcess(tmp_path / "fs") as srv:
        cache = tmp_path / "cache"
        with ClientMount(srv, tmp_path / "w") as w:
            (w.mnt / "file").write_bytes(data)
        with ClientMount(srv, tmp_path / "r", cache_dir=cache) as r:
            assert (r.mnt / "file").read_bytes() == data
            assert r.rpc_count("FS.FetchData") > 0
        with ClientMount(srv, tmp_path / "r", cache_dir=cache) as r:
            assert (r.mnt / "file").read_bytes() == data
            assert r.rpc_count("FS.FetchData") == 0, "cached chunks were not reused"
            assert r.rpc_count("FS.FetchStatus") + r.rpc_count("FS.InlineBulkStatus") > 0


def test_server_restart_under_live_mount(tmp_path, require_fuse):
    port = free_port()
    args = ["--listen", f"127.0.0.1:{port}"]
    srv = ServerProcess(tmp_path / "fs", extra_args=args).start()
    try:
        with ClientMount(srv, tmp_path / "a") as m:
            (m.mnt / "before").write_bytes(b"acknowledged")
            before = m.stats()
            srv.kill()  # no clean shutdown at all
            srv = ServerProcess(tmp_path / "fs", extra_args=args).start()
            # The mount recovers by itself: no remount, no user action.
            deadline = time.monotonic() + 30
            while True:
                try:
                    (m.mnt / "after").write_bytes(b"new")
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            assert (m.mnt / "before").read_bytes() == b"acknowledged"
            assert sorted(os.listdir(m.mnt)) == ["after", "before"]
            after = m.stats()
            # One server-wide break (the epoch changed), not a sweep of vnodes.
            assert after["mass_breaks"] > before["mass_breaks"]
            assert after["reconnects"] > before["reconnects"]
    finally:
        srv.stop()


def test_event_lines_only_when_asked_for(tmp_path, require_fuse):
    # Event lines are a trace (one per promise granted or installed), so a
    # default server and mount write none; --events turns them on.
    with (
        ServerProcess(tmp_path / "fs", events=False) as srv,
        ClientMount(srv, tmp_path / "quiet", events=False) as quiet,
        ClientMount(srv, tmp_path / "loud") as loud,
    ):
        (quiet.mnt / "f").write_text("x")
        assert (loud.mnt / "f").read_text() == "x"
        os.listdir(quiet.mnt)
    assert "listening on" in srv.log_path.read_text()
    assert "event=" not in srv.log_path.read_text()
    assert "event=" not in quiet.log_text()
    assert "event=promise_installed" in loud.log_text()
    with ServerProcess(tmp_path / "fs2") as srv2, ClientMount(srv2, tmp_path / "c"):
        pass
    assert "event=grant" in srv2.log_path.read_text()

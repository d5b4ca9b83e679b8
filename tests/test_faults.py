"""Faults with real mounts: a fileserver SIGKILLed under a stream of stores,
a client daemon SIGKILLed, a client daemon stopped (SIGSTOP) past the break
and idle bounds.  Each test bounds its loops in count and time; every
process is signalled by its pid and every mount is unmounted in ``finally``
(the harness context managers)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from afsfuse.lab.mount import ClientMount
from afsfuse.lab.server import REPO, ServerProcess


def clients(data_dir: Path) -> dict[str, dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-m", "fileserver.cli", "clients", "--data-dir", str(data_dir), "--json"],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=True,
    )  # fmt: skip
    return {c["uuid"]: c for c in json.loads(out.stdout)}


def client_uuid(m: ClientMount) -> str:
    return (m.cache_dir / "client-uuid").read_text().strip()


def wait_for(pred: Any, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


def test_server_sigkill_during_stores_from_two_clients(tmp_path, require_fuse):
    args = ("--rpc-timeout", "20")
    with (
        ServerProcess(tmp_path / "fs") as srv,
        ClientMount(srv, tmp_path / "a", extra_args=args) as a,
        ClientMount(srv, tmp_path / "b", extra_args=args) as b,
    ):
        acked: dict[str, bytes] = {}
        failed: list[tuple[str, str]] = []
        lock = threading.Lock()
        stop = threading.Event()
        restarted = threading.Event()
        after_restart = [0]

        def writer(m: ClientMount, tag: str) -> None:
            for i in range(2000):
                if stop.is_set():
                    return
                name = f"{tag}-{i:04d}"
                data = f"{tag} {i} ".encode() * (20 + 37 * i % 3000)
                try:
                    with open(m.mnt / name, "wb") as f:
                        f.write(data)
                except OSError as exc:  # not acknowledged: may or may not be there
                    with lock:
                        failed.append((name, os.strerror(exc.errno or 0)))
                    time.sleep(0.05)
                    continue
                with lock:  # close() returned: acknowledged
                    acked[name] = data
                    if restarted.is_set():
                        after_restart[0] += 1

        threads = [threading.Thread(target=writer, args=(m, t), daemon=True)
                   for m, t in ((a, "a"), (b, "b"))]  # fmt: skip
        for t in threads:
            t.start()
        try:
            time.sleep(1.5)
            srv.kill()  # SIGKILL, mid-stream
            before = len(acked)
            time.sleep(0.5)
            srv.start(srv.port)  # same port: the clients reconnect by themselves
            restarted.set()
            assert wait_for(lambda: after_restart[0] >= 20, 30), (after_restart, failed[-5:])
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert before > 10 and not any(t.is_alive() for t in threads)
        # Every acknowledged byte is there, seen from a client that was not involved.
        with ClientMount(srv, tmp_path / "c") as c:
            bad = [n for n, d in acked.items() if (c.mnt / n).read_bytes() != d]
            assert bad == [], bad[:5]
            names = set(os.listdir(c.mnt))
        assert set(acked) <= names
        print(f"faults: {len(acked)} acknowledged, {len(failed)} failed during the outage")


def test_client_sigkill_drops_its_session(tmp_path, require_fuse):
    with (
        ServerProcess(tmp_path / "fs", extra_args=["--idle-timeout", "1.5"]) as srv,
        ClientMount(srv, tmp_path / "a") as a,
        ClientMount(srv, tmp_path / "b") as b,
    ):
        (a.mnt / "f").write_bytes(b"one")
        assert (b.mnt / "f").read_bytes() == b"one"
        ua, ub = client_uuid(a), client_uuid(b)
        assert clients(srv.data_dir)[ua]["connected"]
        a.kill()  # SIGKILL the daemon
        assert wait_for(lambda: not clients(srv.data_dir)[ua]["connected"], 5)
        # B, idle meanwhile, kept its session by its keepalives, past the idle bound.
        time.sleep(2.5)
        cb = clients(srv.data_dir)[ub]
        assert cb["connected"] and cb["up"], cb
        (b.mnt / "f").write_bytes(b"two")
        assert (b.mnt / "f").read_bytes() == b"two"
        assert "Traceback" not in srv.log_text()


def test_client_stopped_past_break_and_idle_bounds_ends_coherent(tmp_path, require_fuse):
    extra = ["--break-timeout", "0.5", "--idle-timeout", "2"]
    with (
        ServerProcess(tmp_path / "fs", extra_args=extra) as srv,
        ClientMount(srv, tmp_path / "a") as a,
        ClientMount(srv, tmp_path / "b") as b,
    ):
        (a.mnt / "f").write_bytes(b"old")
        (a.mnt / "d").mkdir()
        assert (b.mnt / "f").read_bytes() == b"old"  # B holds promises on f and the root
        assert os.listdir(b.mnt / "d") == []
        ub = client_uuid(b)
        os.kill(b.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            (a.mnt / "f").write_bytes(b"new contents")  # B cannot answer the break
            (a.mnt / "d" / "g").write_bytes(b"g")
            held = time.monotonic() - t0
            # The breaker waited at most about its bound for B, not forever.
            assert held < 5, held
            # B stays stopped past the idle bound: the server drops it.
            assert wait_for(lambda: not clients(srv.data_dir)[ub]["connected"], 6)
        finally:
            os.kill(b.pid, signal.SIGCONT)
        # Resumed: B reconnects, gets its delayed breaks, and sees A's changes.
        assert wait_for(lambda: (b.mnt / "f").read_bytes() == b"new contents", 15)
        assert wait_for(lambda: os.listdir(b.mnt / "d") == ["g"], 15)
        # And it is coherent afterwards: a new change reaches it at close-to-open.
        (a.mnt / "f").write_bytes(b"third")
        assert (b.mnt / "f").read_bytes() == b"third"
        assert wait_for(lambda: clients(srv.data_dir)[ub]["connected"], 5)

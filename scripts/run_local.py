#!/usr/bin/env python3
"""``make run`` / ``make stop``: a fileserver and one mount on this machine.

start: starts ``afs-fileserver serve`` on 127.0.0.1:PORT with its data in
RUN_DIR/data (created with volume ``root.cell`` on first start), issues a
client bundle (``RUN_DIR/client.pem``) from the cell CA the server created,
mounts ``root.cell`` at MOUNT with ``afsfuse mount`` over TLS, and says what
it started.
stop: unmounts (``afsfuse umount``, then ``fusermount3 -u``/``-z`` if the
daemon is gone) and stops the fileserver it started, by the pid it recorded.
Both are idempotent.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from afsfuse.cli import pid_alive

BIN = Path(sys.executable).parent


def read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def start(run_dir: Path, mount: Path, port: int) -> int:
    run_dir.mkdir(parents=True, exist_ok=True)
    pidfile = run_dir / "fileserver.pid"
    pid = read_pid(pidfile)
    if pid is None:
        if port_open(port):
            print(f"run: port {port} on 127.0.0.1 is taken by another program", file=sys.stderr)
            print("run: choose another with `make run PORT=7010`", file=sys.stderr)
            return 1
        log = open(run_dir / "fileserver.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            [
                str(BIN / "afs-fileserver"),
                "serve",
                "--data-dir",
                str(run_dir / "data"),
                "--listen",
                f"127.0.0.1:{port}",
                # Event lines, so scripts/scenario.py --server can narrate.
                "--events",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        pidfile.write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + 30
        while not port_open(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                print(f"run: fileserver did not start; see {run_dir / 'fileserver.log'}")
                return 1
            time.sleep(0.1)
        pid = proc.pid
        print(f"run: fileserver pid {pid} on 127.0.0.1:{port}, data in {run_dir / 'data'}")
    else:
        print(f"run: fileserver already running (pid {pid})")
    mount.mkdir(parents=True, exist_ok=True)
    if os.path.ismount(mount):
        print(f"run: {mount} is already mounted")
    else:
        # A client certificate from the cell CA the fileserver created (TLS).
        bundle = run_dir / "client.pem"
        res = subprocess.run(
            [str(BIN / "afs-fileserver"), "issue-client-cert", "--data-dir",
             str(run_dir / "data"), "--out", str(bundle), "--name", "make run"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        if res.returncode != 0:
            return res.returncode
        res = subprocess.run(
            [
                str(BIN / "afsfuse"),
                "mount",
                f"127.0.0.1:{port}/root.cell",
                str(mount),
                "--cache-dir",
                str(run_dir / "cache"),
                # The cell key the fileserver created in its data dir.
                "--key-file",
                str(run_dir / "data" / "cell.key"),
                "--cert",
                str(bundle),
                "--events",
            ]
        )
        if res.returncode != 0:
            return res.returncode
    print(f"run: volume root.cell is mounted at {mount}")
    print(f"run: logs in {run_dir}; stop everything with `make stop`")
    return 0


def stop(run_dir: Path, mount: Path) -> int:
    if os.path.ismount(mount):
        res = subprocess.run([str(BIN / "afsfuse"), "umount", str(mount)])
        if res.returncode != 0 and os.path.ismount(mount):
            subprocess.run(["fusermount3", "-u", str(mount)])
        if os.path.ismount(mount):
            subprocess.run(["fusermount3", "-u", "-z", str(mount)])
        print(f"stop: unmounted {mount}")
    pidfile = run_dir / "fileserver.pid"
    pid = read_pid(pidfile)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        print(f"stop: fileserver pid {pid} stopped")
    pidfile.unlink(missing_ok=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("action", choices=["start", "stop"])
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--mount", type=Path, required=True)
    ap.add_argument("--port", type=int, default=7000)
    args = ap.parse_args()
    if args.action == "start":
        return start(args.run_dir.resolve(), args.mount.resolve(), args.port)
    return stop(args.run_dir.resolve(), args.mount.resolve())


if __name__ == "__main__":
    sys.exit(main())

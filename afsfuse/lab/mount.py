"""Run real afsfuse client mounts (for scenarios, benchmarks and tests).

Each ``ClientMount`` is its own daemon process (``afsfuse mount -f``), since
a process may serve one FUSE session and must never touch its own mount.
The test process only touches the mount from outside.  ``stop()`` always
unmounts (``fusermount3 -u``, then ``-z`` as a last resort) and ends the
daemon by its pid, even when the test failed.

    with ServerProcess(tmp_path / "fs") as srv, ClientMount(srv, tmp_path / "a") as a:
        (a.mnt / "file").write_text("hello")
        a.stats()["rpc"]      # the cache manager's counters (afs.stats xattr)

The mount gets the server's cell key (``--key-file DATA_DIR/cell.key``, or the
server's ``key_file``) unless ``extra_args`` names one or ``key_file=False``,
and the client bundle the lab issued for that server (``--cert``; ``--insecure``
for a server running plaintext) unless ``extra_args`` says ``--cert`` or
``--insecure``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# The checkout this package runs from (editable install): subprocesses start
# there, and tests find scripts/ under it.
REPO = Path(__file__).resolve().parents[2]


def is_mounted(mnt: Path) -> bool:
    """Also true for a dead mount (its daemon was killed): ``os.path.ismount``
    cannot stat it (ENOTCONN) and says False, so the mount table decides."""
    if os.path.ismount(mnt):
        return True
    target = os.path.abspath(mnt)
    try:
        with open("/proc/self/mountinfo") as f:
            # Field 5 is the mount point (spaces escaped as \040).
            return any(
                line.split()[4].replace("\\040", " ") == target for line in f if line.strip()
            )
    except OSError:
        return False


def unmount(mnt: Path) -> None:
    if not is_mounted(mnt):
        return
    subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=30)
    deadline = time.monotonic() + 5
    while is_mounted(mnt) and time.monotonic() < deadline:
        time.sleep(0.05)
    if is_mounted(mnt):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, timeout=30)


class ClientMount:
    def __init__(
        self,
        server: Any,
        workdir: Path,
        *,
        volume: str = "root.cell",
        extra_args: tuple[str, ...] = (),
        cache_dir: Path | None = None,
        key_file: Path | bool | None = None,
        events: bool = True,
    ) -> None:
        self.server = server
        self.workdir = Path(workdir)
        self.mnt = self.workdir / "mnt"
        self.cache_dir = cache_dir or self.workdir / "cache"
        self.log_path = self.workdir / "client.log"
        self.volume = volume
        # Tests and scenarios read the event lines; benchmarks turn them off.
        self.extra_args = list(extra_args) + (["--events"] if events else [])
        self.proc: subprocess.Popen[bytes] | None = None
        self.key_file = key_file

    def _key_args(self) -> list[str]:
        if self.key_file is False or "--key-file" in self.extra_args:
            return []
        path = self.key_file if isinstance(self.key_file, Path | str) else None
        if path is None:
            path = getattr(self.server, "key_file", None)
        if path is None and getattr(self.server, "data_dir", None) is not None:
            path = Path(self.server.data_dir) / "cell.key"
        return ["--key-file", str(path)] if path is not None else []

    def _cert_args(self) -> list[str]:
        if "--cert" in self.extra_args or "--insecure" in self.extra_args:
            return []
        from afsfuse.lab.server import CERT_FILES

        addr = (self.server.host, self.server.port)
        path = getattr(self.server, "cert_file", None)
        if getattr(self.server, "insecure", False) or (addr in CERT_FILES and not CERT_FILES[addr]):
            return ["--insecure"]
        path = CERT_FILES.get(addr) or path
        return ["--cert", str(path)] if path is not None else []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> ClientMount:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mnt.mkdir(exist_ok=True)
        cmd = [
            sys.executable, "-m", "afsfuse.cli", "mount", "-f",
            f"{self.server.host}:{self.server.port}/{self.volume}", str(self.mnt),
            "--cache-dir", str(self.cache_dir), *self._key_args(), *self._cert_args(),
            *self.extra_args,
        ]  # fmt: skip
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=logf,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"client exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mount not live in {timeout} s:\n{self.log_text()[-3000:]}")
            time.sleep(0.02)
        return self

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stats(self) -> dict[str, Any]:
        return json.loads(os.getxattr(self.mnt, "afs.stats"))

    def fuse_requests(self) -> dict[str, int]:
        """FUSE requests the daemon has handled, by handler name."""
        return dict(self.stats()["kernel_requests"])

    def rpc_count(self, method: str) -> int:
        return int(self.stats()["rpc"].get(method, 0))

    def examine(self, path: Path) -> dict[str, Any]:
        return json.loads(os.getxattr(path, "afs.examine"))

    def stop(self, timeout: float = 30.0) -> int | None:
        """Unmount and end the daemon; returns its exit code."""
        try:
            unmount(self.mnt)
        finally:
            if self.proc is not None:
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.send_signal(signal.SIGTERM)
                    try:
                        self.proc.wait(10)
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
                        self.proc.wait(10)
                unmount(self.mnt)  # a daemon killed mid-way leaves a dead mount
        return None if self.proc is None else self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the daemon (a crash); the dead mount stays until stop()."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> ClientMount:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

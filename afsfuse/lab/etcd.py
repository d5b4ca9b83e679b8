"""Run real etcd servers for tests and scenarios: one node or a small cluster.

    with EtcdCluster(tmp_path / "etcd", size=1) as etcd:
        url = etcd.url                      # "etcd://127.0.0.1:P1[,...]"
        ServerProcess(dir, extra_args=["--vldb", url]) ...
        etcd.members[0].kill()              # a member dies (SIGKILL, by pid)

Every member listens on 127.0.0.1 only, on ports picked free at start, and
keeps its data under the given directory.  Only the processes started here
are ever signalled, by pid.  The ``etcd`` binary comes from Debian's
``etcd-server`` (``make setup`` installs it).

May import: the standard library only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

ETCD = os.environ.get("AFSFUSE_ETCD", "etcd")


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free right now (all held open while picking, so
    the kernel cannot hand one out twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


class PortTaken(RuntimeError):
    """A member could not bind its port."""


class EtcdMember:
    """One etcd process of a cluster."""

    def __init__(self, name: str, data_dir: Path, client_port: int, peer_port: int) -> None:
        self.name = name
        self.data_dir = data_dir
        self.client_port = client_port
        self.peer_port = peer_port
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{name}.log"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def start(self, initial_cluster: str, token: str, state: str = "new") -> None:
        binary = shutil.which(ETCD)
        if binary is None:
            raise RuntimeError("no etcd binary: `make setup` installs Debian's etcd-server")
        client = f"http://{self.endpoint}"
        cmd = [binary, "--name", self.name, "--data-dir", str(self.data_dir),
               "--listen-client-urls", client, "--advertise-client-urls", client,
               "--listen-peer-urls", self.peer_url,
               "--initial-advertise-peer-urls", self.peer_url,
               "--initial-cluster", initial_cluster, "--initial-cluster-state", state,
               "--initial-cluster-token", token,
               # Small timings: a test cluster elects a leader in well under a second.
               "--heartbeat-interval", "50", "--election-timeout", "500"]  # fmt: skip
        logf = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        try:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
        finally:
            logf.close()

    def healthy(self) -> bool:
        """Whether this member answers and its cluster has a leader."""
        try:
            with urllib.request.urlopen(f"http://{self.endpoint}/health", timeout=1) as r:
                return json.loads(r.read()).get("health") == "true"
        except (OSError, ValueError):
            return False

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class EtcdCluster:
    """``size`` etcd members on 127.0.0.1 forming one cluster."""

    def __init__(self, base_dir: Path | str, size: int = 1, startup_timeout: float = 30.0) -> None:
        self.base_dir = Path(base_dir)
        self.size = size
        self.startup_timeout = startup_timeout
        self.members: list[EtcdMember] = []

    @property
    def url(self) -> str:
        """The ``--vldb`` value naming every member."""
        return "etcd://" + ",".join(m.endpoint for m in self.members)

    def start(self, attempts: int = 3) -> EtcdCluster:
        """Start every member; a port taken by someone else between picking it
        and etcd binding it means a new try on other ports."""
        for attempt in range(attempts):
            try:
                return self._start_once()
            except PortTaken:
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _start_once(self) -> EtcdCluster:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        for m in self.members:
            shutil.rmtree(m.data_dir, ignore_errors=True)
        ports = _free_ports(2 * self.size)
        self.members = [
            EtcdMember(f"m{i}", self.base_dir / f"m{i}", ports[2 * i], ports[2 * i + 1])
            for i in range(self.size)
        ]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        token = f"afsfuse-{os.getpid()}-{self.members[0].peer_port}"  # one per cluster
        for m in self.members:
            m.start(initial, token)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            dead = [m for m in self.members if not m.running()]
            if dead:
                self.stop()
                text = dead[0].log_text()[-3000:]
                if "address already in use" in text:
                    raise PortTaken(text)
                raise RuntimeError(f"etcd {dead[0].name} exited:\n{text}")
            if all(m.healthy() for m in self.members):
                return self
            time.sleep(0.05)
        self.stop()
        logs = "\n".join(m.log_text()[-1500:] for m in self.members)
        raise RuntimeError(f"etcd cluster not healthy in {self.startup_timeout} s:\n{logs}")

    def stop(self) -> None:
        for m in self.members:
            m.stop()

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

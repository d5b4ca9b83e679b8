"""A throwaway GlusterFS volume on 127.0.0.1, for the benchmarks to compare against.

Holds ``ensure_gluster`` (apt-installs Debian's ``glusterfs-server`` and
``glusterfs-client`` if missing) and ``Gluster``: a glusterd bound to loopback
only, run from a copy of ``glusterd.vol`` whose working directory is under
our temp dir, one brick (``127.1``: glusterd refuses the literal 127.0.0.1),
md-cache with upcall invalidation, and ``GlusterMount`` FUSE clients of it.
Every process it starts (glusterd, the glusterfsd brick, the glusterfs
clients) is stopped by its pid, and every mount unmounted, in ``stop()``,
also after a failure.

May import only the standard library.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

VOL = "afsbench"
BRICK_HOST = "127.1"  # glusterd refuses the literal 127.0.0.1 as a brick host
GLUSTERD_VOL = Path("/etc/glusterfs/glusterd.vol")
BRICK_LOG_DIR = Path("/var/log/glusterfs/bricks")
OPTIONS = (
    ("features.cache-invalidation", "on"),
    ("performance.cache-invalidation", "on"),
    ("performance.md-cache-timeout", "600"),
)


def ensure_gluster() -> str | None:
    """Install glusterfs-server/-client with apt if missing; None or why not."""
    if shutil.which("glusterd") and shutil.which("glusterfs"):
        return None
    if os.geteuid() != 0:
        return "glusterfs-server/-client missing and not root to install them"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "glusterfs-server", "glusterfs-client"],
    ):
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{' '.join(cmd[:2])} failed: {exc}"
        if r.returncode != 0:
            return f"{' '.join(cmd[:2])} failed: {(r.stderr or r.stdout).strip()[-300:]}"
    if not (shutil.which("glusterd") and shutil.which("glusterfs")):
        return "apt-get install did not provide glusterd and glusterfs"
    return None


def gluster_version() -> str:
    r = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", "glusterfs-server"], capture_output=True, text=True
    )
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else "absent"


def loopback_volfile(vol: str, working_dir: Path) -> str:
    """Debian's ``glusterd.vol`` with glusterd (and through it the bricks it
    spawns) bound to 127.0.0.1 and its state in ``working_dir``."""
    vol, n = re.subn(
        r"option working-directory \S+", f"option working-directory {working_dir}", vol
    )
    if n != 1:
        raise RuntimeError("glusterd.vol has no working-directory option to replace")
    vol = re.sub(r"^\s*option transport\.socket\.bind-address .*\n", "", vol, flags=re.M)
    return vol.replace(
        "end-volume", "    option transport.socket.bind-address 127.0.0.1\nend-volume", 1
    )


def _pid_alive(pid: int, needle: str) -> bool:
    """True if ``pid`` runs and its command line names ``needle`` (so a pid
    reused by someone else's process is never signalled)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z" and needle in cmdline


def _kill_pid(pid: int, needle: str, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL, the process ``pid`` if it is still the one we started."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _pid_alive(pid, needle):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while _pid_alive(pid, needle) and time.monotonic() < deadline:
            time.sleep(0.05)


def _is_mounted(mnt: Path) -> bool:
    target = os.path.abspath(mnt)
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        return any(line.split()[4].replace("\\040", " ") == target for line in f if line.strip())
    return False


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class GlusterMount:
    """One FUSE client (``glusterfs -N``: in front, so the pid we hold is the
    client's) of the volume at ``mnt``."""

    def __init__(self, mnt: Path, log_dir: Path, volume: str = VOL) -> None:
        self.mnt, self.log_dir, self.volume = mnt, log_dir, volume
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> GlusterMount:
        self.mnt.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"client-{self.mnt.name}.log"
        with open(log.with_suffix(".out"), "ab") as out:
            self.proc = subprocess.Popen(
                ["glusterfs", "-N", f"--volfile-server={BRICK_HOST}",
                 f"--volfile-id={self.volume}", "-l", str(log), str(self.mnt)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None:
                raise RuntimeError(f"glusterfs client exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"gluster mount {self.mnt} not live in {timeout} s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if _is_mounted(self.mnt):
            subprocess.run(["umount", str(self.mnt)], capture_output=True, timeout=60)
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
            self.proc = None
        if _is_mounted(self.mnt):  # a client killed mid-way leaves a dead mount
            subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True, timeout=60)


class Gluster:
    """glusterd + one brick on 127.0.0.1, everything under ``workdir``
    except what glusterd insists on: its management port 24007 (the brick
    processes it spawns find it there, so it cannot be ephemeral; it is bound
    to 127.0.0.1 only), its CLI socket, brick pid files under /run/gluster,
    and the brick's log under /var/log/glusterfs/bricks (moved into
    ``workdir`` by ``stop``)."""

    def __init__(self, workdir: Path, volume: str = VOL) -> None:
        self.dir, self.volume = workdir, volume
        self.brick = workdir / "brick"
        self.glusterd: subprocess.Popen[bytes] | None = None
        self.brick_pids: list[int] = []
        self.mounts: list[GlusterMount] = []
        self.vol_started = False

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["gluster", "--mode=script", *args], capture_output=True, text=True,
                           timeout=timeout)  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"gluster {' '.join(args)}: {(r.stderr or r.stdout).strip()}")
        return r

    def start(self) -> Gluster:
        if not _port_free(24007):
            raise RuntimeError("127.0.0.1:24007 is in use: another glusterd runs here")
        wd = self.dir / "glusterd"
        for d in (wd, self.brick, self.dir / "log"):
            d.mkdir(parents=True, exist_ok=True)
        cfg = self.dir / "glusterd.vol"
        cfg.write_text(loopback_volfile(GLUSTERD_VOL.read_text(), wd))
        with open(self.dir / "log" / "glusterd.out", "ab") as out:
            self.glusterd = subprocess.Popen(
                ["glusterd", "-N", "-f", str(cfg), "-p", str(self.dir / "glusterd.pid"),
                 "-l", str(self.dir / "log" / "glusterd.log")],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:  # the CLI answers once glusterd is up
            if self.glusterd.poll() is not None:
                raise RuntimeError(f"glusterd exited with {self.glusterd.returncode}")
            r = subprocess.run(["gluster", "--mode=script", "volume", "list"],
                               capture_output=True, text=True, timeout=30)  # fmt: skip
            if r.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"glusterd not answering: {r.stderr.strip()}")
            time.sleep(0.2)
        # force: the brick is on the root partition.
        self.cli("volume", "create", self.volume, f"{BRICK_HOST}:{self.brick}", "force")
        for key, value in OPTIONS:
            self.cli("volume", "set", self.volume, key, value)
        self.cli("volume", "start", self.volume)
        self.vol_started = True
        self.brick_pids = self._brick_pids()
        return self

    def _brick_pids(self) -> list[int]:
        pids = []
        for p in Path("/run/gluster/vols", self.volume).glob("*.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(p.read_text().strip())
                if _pid_alive(pid, str(self.brick)):
                    pids.append(pid)
        return pids

    def mount(self, mnt: Path) -> GlusterMount:
        m = GlusterMount(mnt, self.dir / "log", self.volume)
        self.mounts.append(m)
        return m.start()

    def stop(self) -> None:
        """Unmount every client, stop the volume and glusterd; by pid, always."""
        for m in self.mounts:
            with contextlib.suppress(Exception):
                m.stop()
        self.mounts.clear()
        if self.glusterd is not None and self.glusterd.poll() is None and self.vol_started:
            with contextlib.suppress(Exception):
                self.cli("volume", "stop", self.volume, timeout=60)
        self.vol_started = False
        for pid in self.brick_pids + self._brick_pids():
            _kill_pid(pid, str(self.brick))
        self.brick_pids = []
        if self.glusterd is not None:
            if self.glusterd.poll() is None:
                self.glusterd.terminate()
            try:
                self.glusterd.wait(15)
            except subprocess.TimeoutExpired:
                self.glusterd.kill()
                self.glusterd.wait(10)
            self.glusterd = None
        # glusterd puts the brick's log and pid dir outside our workdir: move
        # the log in (it goes with the temp dir), drop the emptied pid dir.
        brick_log = BRICK_LOG_DIR / (str(self.brick).strip("/").replace("/", "-") + ".log")
        with contextlib.suppress(OSError):
            shutil.move(brick_log, self.dir / "log" / "brick.log")
        with contextlib.suppress(OSError):
            Path("/run/gluster/vols", self.volume).rmdir()

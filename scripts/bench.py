#!/usr/bin/env python3
"""afsfuse benchmarks against the floor, sshfs and GlusterFS, in one run.

The driver: sets up on 127.0.0.1, in a temporary directory:

- ``local``: a plain local directory (the floor of the floor);
- ``pt0`` / ``ptlong``: ``scripts/passthrough.py``, a minimal pyfuse3 + trio
  passthrough of that directory, with kernel timeouts 0 and long (the
  FUSE-plus-Python floor);
- ``afsfuse``: a fileserver subprocess and client mounts (``afsfuse.lab.server``,
  ``afsfuse.lab.mount``); one column per ``AfsVariant`` (extra server and
  mount arguments), e.g. a TLS-vs-``--insecure`` pair via ``main(variants=...)``;
- ``sshfs``: Debian's sshfs of a local directory through an sshd started
  here on a free 127.0.0.1 port with throwaway keys;
- ``glusterfs``: a one-brick GlusterFS volume on 127.0.0.1 through its FUSE
  client (``scripts/bench_gluster.py``);

(sshfs and GlusterFS are installed with apt if missing; if that fails, the
table says so) and runs on each the micro workloads: warm ``stat`` of a tree,
``ls -lR`` cold and warm, sequential read cold and warm, sequential write +
fsync + close, small-file creation; two-client staleness; callback handling
time against the number of cached vnodes (in-process, at the cache manager
level); then the real tools of ``scripts/bench_tools.py`` (git clone, a
second mount's git status, a commit seen by the second mount, make -j2, tar
x, rm -rf, each checked; also on one ``ptlong`` mount, the floor of a
pyfuse3 + trio daemon); and what TLS costs against ``--insecure`` on a cold
read, write + fsync and small files (``scripts/bench_tls.py``, issue 17).
Prints a markdown table with goals met/missed, and writes ``BENCHMARKS.md``
and ``BENCHMARKS.json``.

    .venv/bin/python scripts/bench.py [--quick] [--reps 3] [--tools-reps 3] ...

Every process started here is stopped by its pid and every mount made here
is unmounted in a ``finally``, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))  # bench_* modules, also when imported

import bench_floor  # noqa: E402
import trio  # noqa: E402
from bench_gluster import Gluster, GlusterMount, ensure_gluster  # noqa: E402
from bench_tools import (  # noqa: E402
    QUICK,
    STEPS,
    TWO_MOUNT_STEPS,
    Sizes,
    Step,
    make_fixtures,
    run_tools,
)

from afsfuse.cache_manager import CacheConfig, CacheManager  # noqa: E402
from afsfuse.cells import CellDB  # noqa: E402
from afsfuse.lab.mount import ClientMount, unmount  # noqa: E402
from afsfuse.lab.server import ServerProcess  # noqa: E402
from afsfuse.server_record import ServerRecord, tcp_connector  # noqa: E402
from afsfuse.vnode import Promise  # noqa: E402
from afsfuse.volume import VolumeInstance  # noqa: E402
from protocol import methods as M  # noqa: E402
from protocol.records import CallBackType, Fid, FileStatus, FileType  # noqa: E402

log = logging.getLogger(__name__)

MIB = 1 << 20
PASSTHROUGH = REPO / "scripts" / "passthrough.py"
LONG_TIMEOUT = 3600.0
MOUNT_TIMEOUT = 30.0


# -- helpers -------------------------------------------------------------------


def drop_caches() -> bool:
    """Drop the page, dentry and inode caches (root only); False if refused."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def wait_mount(path: Path, proc: subprocess.Popen[bytes], timeout: float = MOUNT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.ismount(path):
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} not mounted after {timeout} s")
        time.sleep(0.02)


def stop_proc(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """Wait for ``proc`` (ours) to exit; SIGTERM, then SIGKILL, by its pid."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.wait(timeout)
        return
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# -- targets ---------------------------------------------------------------------


class Target:
    """One filesystem under test.  ``root`` is where workloads run; ``backing``
    (if any) is a local directory holding the same files, for fast setup."""

    name = ""
    label = ""

    def __init__(self) -> None:
        self.root = Path()
        self.backing: Path | None = None

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def cold(self) -> None:
        """Empty every cache between the workload and the data."""
        self.stop()
        drop_caches()
        self.start()

    def rpcs(self) -> dict[str, int] | None:
        return None


class LocalTarget(Target):
    name, label = "local", "local dir"

    def __init__(self, data: Path) -> None:
        super().__init__()
        self.root = self.backing = data

    def cold(self) -> None:
        drop_caches()


class DaemonTarget(Target):
    """A FUSE daemon this benchmark starts in the foreground (its pid is the
    daemon's) and always unmounts and stops, even after a failure."""

    root: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def spawn(self, cmd: list[str]) -> None:
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT)  # fmt: skip
        wait_mount(self.root, self.proc)

    def stop(self) -> None:
        try:
            unmount(self.root)
        finally:
            stop_proc(self.proc)
            unmount(self.root)  # a daemon killed mid-way leaves a dead mount
            self.proc = None


class PassthroughTarget(DaemonTarget):
    def __init__(self, data: Path, mnt: Path, timeout: float, logdir: Path) -> None:
        super().__init__()
        self.name = "pt0" if timeout == 0 else "ptlong"
        self.label = f"passthrough t={timeout:g}s"
        self.backing, self.root, self.timeout = data, mnt, timeout
        self.log_path = logdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        t = str(self.timeout)
        self.spawn([sys.executable, str(PASSTHROUGH), str(self.backing), str(self.root),
                    "--attr-timeout", t, "--entry-timeout", t])  # fmt: skip


@dataclass(frozen=True)
class AfsVariant:
    """One afsfuse configuration under test: its column name, and the extra
    arguments of its fileserver and its mounts (e.g. a TLS-vs-``--insecure``
    pair is two variants).  Goals are judged on the variant named "afsfuse"."""

    name: str = "afsfuse"
    server_args: tuple[str, ...] = ()
    mount_args: tuple[str, ...] = ()

    def server(self, data_dir: Path) -> ServerProcess:
        # events=False: what a default deployment does (no trace lines).
        return ServerProcess(data_dir, extra_args=self.server_args, events=False)


DEFAULT_VARIANTS = (AfsVariant(),)


class AfsTarget(Target):
    name, label = "afsfuse", "afsfuse"

    def __init__(
        self, server: ServerProcess, workdir: Path, extra: tuple[str, ...] = (), name: str = ""
    ) -> None:
        super().__init__()
        self.server, self.workdir, self.extra = server, workdir, extra
        if name:
            self.name = self.label = name
        self.mount: ClientMount | None = None
        self.root = workdir / "mnt"

    def start(self) -> None:
        # events=False: what a default deployment does (no trace lines).
        m = ClientMount(self.server, self.workdir, extra_args=self.extra, events=False)
        self.mount = m.start()

    def stop(self) -> None:
        if self.mount is not None:
            self.mount.stop()
            self.mount = None

    def cold(self) -> None:
        # An empty client cache dir: no chunks, no listings, a new client.
        self.stop()
        shutil.rmtree(self.workdir / "cache", ignore_errors=True)
        drop_caches()
        self.start()

    def rpcs(self) -> dict[str, int] | None:
        assert self.mount is not None
        return {k: int(v) for k, v in self.mount.stats()["rpc"].items()}

    def daemon_reads(self) -> int:
        """FUSE reads the daemon answered (cache hits + misses) so far."""
        assert self.mount is not None
        st = self.mount.stats()
        return int(st.get("cache_hits", 0)) + int(st.get("cache_misses", 0))


class Sshd:
    """An sshd on a free 127.0.0.1 port with throwaway host and user keys."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.user_key = workdir / "user_key"
        self.made_run_dir = False

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        host_key = self.dir / "host_key"
        for key in (host_key, self.user_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                           check=True, capture_output=True, timeout=30)  # fmt: skip
        auth = self.dir / "authorized_keys"
        shutil.copy(self.user_key.with_suffix(".pub"), auth)
        os.chmod(auth, 0o600)
        sftp = next((p for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/sftp-server")
                     if os.path.exists(p)), "internal-sftp")  # fmt: skip
        self.port = free_port()
        cfg = self.dir / "sshd_config"
        cfg.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
            f"AuthorizedKeysFile {auth}\nPidFile {self.dir / 'sshd.pid'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            f"Subsystem sftp {sftp}\nLogLevel ERROR\n"
        )
        run_dir = Path("/run/sshd")  # privilege separation dir sshd insists on
        if not run_dir.exists():
            run_dir.mkdir(mode=0o755, parents=True)
            self.made_run_dir = True
        with open(self.dir / "sshd.log", "ab") as logf:
            self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)],
                                         stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {(self.dir / 'sshd.log').read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            time.sleep(0.05)
        raise RuntimeError("sshd did not listen within 10 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
        stop_proc(self.proc, 5)
        self.proc = None
        if self.made_run_dir:
            with contextlib.suppress(OSError):
                Path("/run/sshd").rmdir()


class SshfsTarget(DaemonTarget):
    name, label = "sshfs", "sshfs"

    def __init__(self, sshd: Sshd, data: Path, mnt: Path, logdir: Path) -> None:
        super().__init__()
        self.sshd, self.backing, self.root = sshd, data, mnt
        self.log_path = logdir / f"sshfs-{mnt.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        opts = ",".join([
            f"port={self.sshd.port}", f"IdentityFile={self.sshd.user_key}",
            "StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null", "BatchMode=yes",
            "LogLevel=ERROR",
        ])  # fmt: skip
        # -f: foreground, so the pid we hold is the daemon's.
        self.spawn(["sshfs", "-f", f"root@127.0.0.1:{self.backing}", str(self.root), "-o", opts])


class GlusterTarget(Target):
    """A FUSE client of the benchmark's GlusterFS volume (``bench_gluster``)."""

    name, label = "glusterfs", "GlusterFS"

    def __init__(self, gluster: Gluster, mnt: Path) -> None:
        super().__init__()
        self.gluster, self.root = gluster, mnt
        self.mount: GlusterMount | None = None

    def start(self) -> None:
        self.mount = self.gluster.mount(self.root)

    def stop(self) -> None:
        if self.mount is not None:
            self.mount.stop()
            self.mount = None


def ensure_sshfs() -> str | None:
    """Install sshfs and openssh-server with apt if missing; None or why not."""
    if shutil.which("sshfs") and os.path.exists("/usr/sbin/sshd"):
        return None
    if os.geteuid() != 0:
        return "sshfs/openssh-server missing and not root to install them"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "sshfs", "openssh-server"]):  # fmt: skip
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{' '.join(cmd[:2])} failed: {exc}"
        if r.returncode != 0:
            return f"{' '.join(cmd[:2])} failed: {(r.stderr or r.stdout).strip()[-300:]}"
    if not (shutil.which("sshfs") and os.path.exists("/usr/sbin/sshd")):
        return "apt-get install did not provide sshfs and sshd"
    return None


# -- workloads -----------------------------------------------------------------


@dataclass
class Result:
    """Samples of one workload on one target (``unit`` per second, higher is
    better, unless ``lower_better``)."""

    samples: list[float] = field(default_factory=list)
    unit: str = ""
    lower_better: bool = False
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None


def tree_paths(root: Path, files: int, dirs: int) -> list[Path]:
    per = max(1, (files + dirs - 1) // dirs)
    return [root / "tree" / f"d{i // per:03d}" / f"f{i:05d}" for i in range(files)]


def make_tree(root: Path, files: int, dirs: int) -> float:
    t0 = time.perf_counter()
    made: set[Path] = set()
    for p in tree_paths(root, files, dirs):
        if p.parent not in made:
            p.parent.mkdir(parents=True, exist_ok=True)
            made.add(p.parent)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"x" * 100)
        os.close(fd)
    return time.perf_counter() - t0


def stat_all(paths: list[Path]) -> None:
    for p in paths:
        os.lstat(p)


def ls_lr(root: Path) -> None:
    subprocess.run(["ls", "-lR", str(root / "tree")], check=True, stdout=subprocess.DEVNULL,
                   timeout=600)  # fmt: skip


def write_big(path: Path, size: int, block: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = size
        while left > 0:
            n = os.write(fd, block[: min(len(block), left)])
            left -= n
        os.fsync(fd)
    finally:
        os.close(fd)


def warm_page_cache(where: Path, size: int, block: bytes) -> None:
    """Take ``size`` bytes of page cache and give them back, untimed, before
    a timed write.

    On the VMs this runs on, a page the guest has not touched for a while
    costs a fault in the host at its first use: in about a third of the runs
    a local 128 MiB write took 0.3-0.4 s instead of 0.1 s (perf: the kernel's
    copy into new page-cache folios), through a mount in any mode.  Writing
    and deleting a scratch file first (its dirty pages are dropped, never
    written) hands the timed write pages the host already backs."""
    path = where / ".warm-page-cache"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for off in range(0, size, len(block)):
            os.pwrite(fd, block, off)
    finally:
        os.close(fd)
        os.unlink(path)


def read_big(path: Path, size: int) -> None:
    buf = bytearray(MIB)
    got = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            got += n
    if got != size:
        raise RuntimeError(f"read {got} bytes of {path}, expected {size}")


def small_files(d: Path, n: int) -> None:
    d.mkdir()
    data = b"s" * 4096
    for i in range(n):
        fd = os.open(d / f"s{i:05d}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, data)
        os.close(fd)


def rpc_delta(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, int]:
    if before is None or after is None:
        return {}
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def run_target(
    t: Target, args: argparse.Namespace, block: bytes, scratch: Path
) -> dict[str, Result]:
    """All single-client workloads on ``t`` (already started); ``scratch`` is a
    local directory for ``warm_page_cache``."""
    out: dict[str, Result] = {}
    reps, files = args.reps, args.files
    big = args.big_mib * MIB
    paths = tree_paths(t.root, files, args.dirs)
    if t.backing is None or t.name == "local":
        # afsfuse and GlusterFS have no backing dir; local builds the tree
        # the others share.
        secs = make_tree(t.root, files, args.dirs)
        out["tree_setup"] = Result([files / secs], unit="files/s")
        log.info("%s: made a %d-file tree in %.1f s", t.name, files, secs)
    all_entries = paths + sorted({p.parent for p in paths}) + [t.root / "tree"]

    # 1. warm metadata: one pass to warm, then timed passes.  The pause lets
    # writeback of the tree just made finish, so it does not steal the core.
    stat_all(all_entries)
    os.sync()
    time.sleep(1.0)
    r = out["stat_warm"] = Result(unit="stats/s")
    rpc_total: dict[str, int] = {}
    stat_reps = max(reps, 5)  # cheap, and the noisiest row
    for _ in range(stat_reps):
        before = t.rpcs()
        secs = timed(lambda: stat_all(all_entries))
        for k, v in rpc_delta(before, t.rpcs()).items():
            rpc_total[k] = rpc_total.get(k, 0) + v
        r.samples.append(len(all_entries) / secs)
    r.extra["entries"] = len(all_entries)
    if t.rpcs() is not None:
        r.extra["rpcs_per_pass"] = {k: v / stat_reps for k, v in rpc_total.items()}
        r.extra["rpcs_total_per_pass"] = sum(rpc_total.values()) / stat_reps
    log.info("%s: warm stat %.0f/s", t.name, r.median or 0)

    # 2. ls -lR, cold (remount, empty client cache, dropped kernel caches) and warm.
    cold = out["ls_cold"] = Result(unit="s", lower_better=True)
    warm = out["ls_warm"] = Result(unit="s", lower_better=True)
    for _ in range(reps):
        t.cold()
        before = t.rpcs()
        cold.samples.append(timed(lambda: ls_lr(t.root)))
        cold.extra.setdefault("rpcs", []).append(rpc_delta(before, t.rpcs()))
        warm.samples.append(timed(lambda: ls_lr(t.root)))
    log.info("%s: ls -lR cold %.2f s warm %.2f s", t.name, cold.median, warm.median)

    # 4. sequential write + fsync + close (before the read: it makes the file).
    bigpath = t.root / f"big-{t.name}"
    w = out["write"] = Result(unit="MB/s")
    for _ in range(reps):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(bigpath)
        warm_page_cache(scratch, 4 * big, block)
        before = t.rpcs()
        w.samples.append(big / 1e6 / timed(lambda: write_big(bigpath, big, block)))
        w.extra.setdefault("rpcs", []).append(rpc_delta(before, t.rpcs()))
    log.info("%s: write %.0f MB/s", t.name, w.median)

    # 3. sequential read, cold then warm.
    rc = out["read_cold"] = Result(unit="MB/s")
    rw = out["read_warm"] = Result(unit="MB/s")
    for _ in range(reps):
        t.cold()
        warm_page_cache(scratch, 4 * big, block)
        before = t.rpcs()
        rc.samples.append(big / 1e6 / timed(lambda: read_big(bigpath, big)))
        rc.extra.setdefault("rpcs", []).append(rpc_delta(before, t.rpcs()))
        reads0 = t.daemon_reads() if isinstance(t, AfsTarget) else 0
        rw.samples.append(big / 1e6 / timed(lambda: read_big(bigpath, big)))
        if isinstance(t, AfsTarget):  # 0: the reread never left the page cache
            rw.extra.setdefault("daemon_reads", []).append(t.daemon_reads() - reads0)
    log.info("%s: read cold %.0f MB/s warm %.0f MB/s", t.name, rc.median, rw.median)
    os.unlink(bigpath)

    # 5. small files: create, write 4 KiB, close.
    s = out["small"] = Result(unit="files/s")
    for i in range(reps):
        d = t.root / f"small-{t.name}-{i}"
        before = t.rpcs()
        s.samples.append(args.small / timed(lambda d=d: small_files(d, args.small)))
        s.extra.setdefault("rpcs", []).append(rpc_delta(before, t.rpcs()))
    log.info("%s: small files %.0f/s", t.name, s.median)
    if t.backing is not None:  # a shared backing dir: leave it as the next target expects
        for i in range(reps):
            shutil.rmtree((t.backing or t.root) / f"small-{t.name}-{i}", ignore_errors=True)
    return out


def staleness(a_root: Path, b_root: Path, rounds: int, bound: float, budget: float) -> Result:
    """Time from A's close() to B's stat() showing the new size."""
    r = Result(unit="ms", lower_better=True)
    pa, pb = a_root / "stale.dat", b_root / "stale.dat"
    pa.write_bytes(b"")
    deadline = time.monotonic() + bound
    while not pb.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    timeouts = done = 0
    end = time.monotonic() + budget
    for i in range(rounds):
        if time.monotonic() > end:
            break
        fd = os.open(pa, os.O_WRONLY | os.O_APPEND)
        os.write(fd, b"z")
        os.close(fd)
        t0 = time.perf_counter()
        want = i + 1
        while True:
            try:
                size = os.stat(pb).st_size
            except FileNotFoundError:
                size = -1
            el = time.perf_counter() - t0
            if size == want:
                r.samples.append(el * 1000)
                break
            if el > bound:
                timeouts += 1
                break
            time.sleep(0.0002)  # leave the daemons a core
        done += 1
    r.extra.update(rounds=done, timeouts=timeouts, bound_s=bound)
    if r.samples:
        s = sorted(r.samples)
        r.extra["p99"] = s[min(len(s) - 1, int(0.99 * len(s)))] if not timeouts else None
    return r


def p99(r: Result) -> str:
    ex = r.extra
    if not ex.get("rounds"):
        return "n/a"
    if ex.get("timeouts"):
        return f"> {ex['bound_s']:g} s ({ex['timeouts']}/{ex['rounds']} timed out)"
    return f"{ex['p99']:.1f} ms"


# -- callback scaling (in-process, cache manager level) ----------------------------


async def _cb_scaling(sizes: list[int], runs: int, cache_dir: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for n in sizes:
        d = cache_dir / f"cb{n}"
        cfg = CacheConfig(cells=CellDB.single(("127.0.0.1", 1)), cache_dir=d)
        cm = CacheManager(cfg)
        await cm.start()
        try:
            # A record with no connection: its handlers are what a server calls.
            rec = ServerRecord(
                "bench-server", [("127.0.0.1", 1)], client_uuid=cm.uuid,
                connector=tcp_connector, handlers=cm.cb.handlers, stats=cm.stats,
                rpc_timeout=30.0, connect_timeout=1.0, on_mass_break=cm._on_mass_break,
            )  # fmt: skip
            cm.servers[rec.uuid] = rec
            vid = 536870912
            vol = VolumeInstance("local", vid, "root.cell")
            cm.volumes[vol.key] = vol
            vol.attach(rec)
            st = FileStatus(FileType.FILE, 0o644, 1, 0, 1, 0, 0, 0, 0, 1, 1)
            now = trio.current_time()
            for i in range(n):
                v = vol.get(Fid(vid, i + 2, 1))
                v.status = st
                v.promise = Promise(1, CallBackType.SHARED, now + 3600, rec, rec.cb_s_break,
                                    vol.cb_v_break)  # fmt: skip
            handlers = rec._handlers(rec)
            init, callback = handlers[M.CB_INIT_CALLBACK_STATE3], handlers[M.CB_CALLBACK]
            rng = random.Random(n)
            t_init: list[float] = []
            t_cb: list[float] = []
            for _ in range(runs):
                while cm.invalidations.get_nowait() is not None:  # nothing drains it here
                    pass
                t0 = time.perf_counter_ns()
                await init(None, rec.uuid)
                t_init.append((time.perf_counter_ns() - t0) / 1000)
                while cm.invalidations.get_nowait() is not None:
                    pass
                fid = [vid, rng.randrange(n) + 2, 1]
                t0 = time.perf_counter_ns()
                await callback(None, [fid])
                t_cb.append((time.perf_counter_ns() - t0) / 1000)
            assert cm.cb.vnodes_touched == runs, "a CB.CallBack missed a cached vnode"
            out[str(n)] = {
                "init_us": statistics.median(t_init),
                "init_min": min(t_init),
                "init_max": max(t_init),
                "callback_us": statistics.median(t_cb),
                "callback_min": min(t_cb),
                "callback_max": max(t_cb),
                "vnodes": len(vol.vnodes),
            }
            log.info("callbacks, %d vnodes: %s", n, out[str(n)])
        finally:
            await cm.close()
    return out


def cb_scaling(sizes: list[int], runs: int, cache_dir: Path) -> dict[str, dict[str, Any]]:
    return trio.run(_cb_scaling, sizes, runs, cache_dir)


# -- report ------------------------------------------------------------------------


def load_note(base: Path) -> str:
    """Load average and FUSE mounts that are not ours: other work on the machine."""
    load = "?"
    with contextlib.suppress(OSError, IndexError):
        load = Path("/proc/loadavg").read_text().split()[0]
    others = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and parts[2].startswith("fuse") and str(base) not in parts[1]:
                others += 1
    return f"load {load}, {others} other FUSE mounts"


def machine() -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        mem = f"{kb / (1 << 20):.1f} GiB"
    pkgs = {}
    for p in ("pyfuse3", "trio", "msgpack"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            pkgs[p] = metadata.version(p)
    for deb in ("sshfs", "openssh-server", "fuse3", "glusterfs-server", "git", "gcc"):
        r = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", deb], capture_output=True, text=True
        )
        pkgs[deb] = r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else "absent"
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "ram": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": ", ".join(f"{k} {v}" for k, v in pkgs.items()),
    }


ROWS = [
    ("stat_warm", "warm `stat`, 2nd pass (stats/s)"),
    ("ls_cold", "`ls -lR` cold (s)"),
    ("ls_warm", "`ls -lR` warm (s)"),
    ("read_cold", "seq read cold (MB/s)"),
    ("read_warm", "seq read warm (MB/s)"),
    ("write", "seq write + fsync + close (MB/s)"),
    ("small", "small files: create+4 KiB+close (files/s)"),
]
COLS = ["local", "pt0", "ptlong", "afsfuse", "sshfs", "glusterfs"]
OTHERS = ("sshfs", "glusterfs")  # what afsfuse is compared with
# ptlong: the floor of any pyfuse3 + trio daemon (no network, no durability).
TOOL_COLS = ["local", "ptlong", "sshfs", "glusterfs"]  # + the afsfuse variants
GOAL_RATIO = 1.5  # issue 13: every goal below is ">= 1.5x"


def fmt(v: float | None) -> str:
    if v is None:
        return "—"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.3f}" if v < 1 else f"{v:.2f}"


def cell(res: dict[str, dict[str, Result]], col: str, key: str, why: dict[str, str]) -> str:
    r = res.get(col, {}).get(key)
    if r is None or not r.samples:
        return f"n/a ({why[col]})" if col in why else "n/a"
    return f"{fmt(r.median)} [{fmt(min(r.samples))}-{fmt(max(r.samples))}]"


def ratio(
    res: dict[str, dict[str, Result]], key: str, other: str, afs: str = "afsfuse"
) -> float | None:
    """How many times better ``afs`` is than ``other`` (>1: ``afs`` better)."""
    a, b = res.get(afs, {}).get(key), res.get(other, {}).get(key)
    if a is None or b is None or not a.median or not b.median:
        return None
    return b.median / a.median if a.lower_better else a.median / b.median


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "MISSED")


def goals(
    res: dict[str, dict[str, Result]],
    stale: dict[str, Result],
    cbs: dict[str, dict[str, Any]],
    afs_name: str = "afsfuse",
    floor: dict[str, float] | None = None,
    small_n: int = 0,
) -> list[tuple[str, str, str]]:
    """(goal, measured, verdict) rows of the micro benchmarks; with the
    measured ``floor`` and ``small_n`` files per repetition, a small-files
    goal above the floor's rate says so."""
    out: list[tuple[str, str, str]] = []
    afs = res.get(afs_name, {})
    st = afs.get("stat_warm")
    if st is not None:
        n = st.extra.get("rpcs_total_per_pass")
        out.append(
            (
                "warm metadata sends 0 RPCs",
                f"{n:g} RPCs per pass {st.extra.get('rpcs_per_pass') or ''}".rstrip(),
                verdict(n == 0),
            )
        )
    for other in ("sshfs", "ptlong"):
        q = ratio(res, "stat_warm", other, afs_name)
        out.append(
            (
                f"warm stat within 1.3x of {other}",
                "—" if q is None else f"afsfuse at {q:.2f}x of {other}'s rate",
                verdict(None if q is None else q >= 1 / 1.3),
            )
        )
    for key, what in (
        ("small", "small files"),
        ("write", "write+fsync+close"),
        ("read_cold", "cold seq read"),
        ("ls_cold", "cold `ls -lR`"),
    ):
        q = ratio(res, key, "sshfs", afs_name)
        qg = ratio(res, key, "glusterfs", afs_name)
        measured = (
            "—" if q is None else f"{q:.2f}x" + ("" if qg is None else f" (vs GlusterFS {qg:.2f}x)")
        )
        if key == "small" and q is not None and q < GOAL_RATIO:
            fr = small_files_floor(res, afs_name, floor, small_n)
            want = res["sshfs"]["small"].median * GOAL_RATIO  # type: ignore[operator]
            if fr is not None and want > fr:
                measured += f" (the goal, {want:,.0f} files/s, is above the floor, {fr:,.0f})"
        out.append(
            (
                f"{what} beats sshfs by >= {GOAL_RATIO:g}x",
                measured,
                verdict(None if q is None else q >= GOAL_RATIO),
            )
        )
    q = ratio(res, "read_warm", "ptlong", afs_name)
    ql = ratio(res, "read_warm", "local", afs_name)
    rw = afs.get("read_warm")
    nreads = max(rw.extra.get("daemon_reads", [0])) if rw is not None else None
    out.append(
        (
            "warm reread at page-cache speed (no read reaches the daemon; >= 0.8x ptlong warm)",
            "—"
            if q is None
            else f"{nreads} daemon reads; {q:.2f}x of ptlong, {ql or 0:.2f}x of local (no FUSE)",
            verdict(None if q is None else (nreads == 0 and q >= 0.8)),
        )
    )
    sizes = sorted(cbs, key=int)
    if len(sizes) >= 2:
        lo, hi = cbs[sizes[0]], cbs[sizes[-1]]
        gi, gc = hi["init_us"] / lo["init_us"], hi["callback_us"] / lo["callback_us"]
        out.append(
            (
                f"callback handling grows < 2x from {sizes[0]} to {sizes[-1]} vnodes",
                f"InitCallBackState3 {gi:.2f}x, CallBack {gc:.2f}x",
                verdict(max(gi, gc) < 2),
            )
        )
    s = stale.get(afs_name)
    if s is not None:
        ok = (
            None
            if not s.extra.get("rounds")
            else (not s.extra.get("timeouts") and s.extra["p99"] < 100)
        )
        out.append(("two-client staleness p99 < 100 ms", p99(s), verdict(ok)))
    return out


# -- real tools report ----------------------------------------------------------------


def tool_cell(tools: dict[str, dict[str, Step]], col: str, key: str, why: dict[str, str]) -> str:
    if col not in tools:
        return f"n/a ({why[col]})" if col in why else "n/a"
    s = tools[col].get(key)
    if s is None:
        return "n/a (no second mount)" if key in TWO_MOUNT_STEPS else "n/a"
    bad = len(s.ok) - sum(s.ok)
    good = s.passed
    text = f"{fmt(s.median)} [{fmt(min(good))}-{fmt(max(good))}]" if good else ""
    if len(s.ok) < s.extra.get("reps_wanted", 0):
        text += f" (n={len(s.ok)})"
    if bad:
        text = (text + " " if text else "") + f"**FAILED {bad}/{len(s.ok)}**"
    return text


def tool_ratio(
    tools: dict[str, dict[str, Step]], key: str, other: str, afs: str
) -> tuple[str, str] | None:
    """(measured, verdict) of the goal "afs >= 1.5x other" on one workload:
    the other's seconds over afsfuse's; None if either did not run it."""
    a, b = tools.get(afs, {}).get(key), tools.get(other, {}).get(key)
    if a is None or b is None:
        return None
    if not a.all_ok:
        return f"{afs} failed", "MISSED"
    if b.median is None:
        return f"{other} failed", "n/a"
    assert a.median is not None
    q = b.median / a.median
    bad = len(b.ok) - sum(b.ok)
    failed = f" ({other} failed {bad}/{len(b.ok)})" if bad else ""
    return f"{q:.2f}x{failed}", verdict(q >= GOAL_RATIO)


def tool_goals(
    tools: dict[str, dict[str, Step]],
    afs: str,
    sizes: Sizes,
    floors: dict[str, dict[str, float]] | None = None,
) -> list[tuple[str, str, str]]:
    """(goal, measured, verdict) per real tool and peer; a missed goal that
    asks for less time than the workload's floor (``tool_floors``) says so."""
    out = []
    for key, label in STEPS:
        for other in ("glusterfs", "sshfs"):
            r = tool_ratio(tools, key, other, afs)
            if r is not None:
                name = "GlusterFS" if other == "glusterfs" else other
                measured, v = r
                want = goal_seconds(tools, key, other)
                fl = (floors or {}).get(key)
                if v == "MISSED" and want is not None and fl is not None and fl["floor"] > want:
                    measured += (
                        f" (the goal, {fmt(want)} s, is below the floor, {fmt(fl['floor'])} s)"
                    )
                out.append(
                    (f"{label.format(**vars(sizes))} >= {GOAL_RATIO:g}x {name}", measured, v)
                )
    return out


def small_files_floor(
    res: dict[str, dict[str, Result]], afs: str, floor: dict[str, float] | None, n: int
) -> float | None:
    """The most small files per second a synchronous durable design on
    pyfuse3 + trio makes here (see ``tool_floors``): per file, ptlong's time
    minus local's plus a round trip and a COMMIT per durable change ``afs``
    made for it."""
    a, p, loc = (res.get(t, {}).get("small") for t in (afs, "ptlong", "local"))
    if not floor or not n or a is None or p is None or not p.samples or not a.extra.get("rpcs"):
        return None
    # Generous to the floor: ptlong's fastest repetition, local's slowest.
    per_local = 1 / min(loc.samples) if loc is not None and loc.samples else 0.0
    durable = min(bench_floor.durable_count(r) for r in a.extra["rpcs"]) / n
    secs = bench_floor.floor_seconds(1 / max(p.samples), per_local, 0, 0, 0)
    secs += durable * (floor["echo_us"] + bench_floor.durable_write_us(floor)) / 1e6
    return 1 / secs if secs > 0 else None


def goal_seconds(tools: dict[str, dict[str, Step]], key: str, other: str) -> float | None:
    """The most seconds a workload may take to be GOAL_RATIO times ``other``."""
    s = tools.get(other, {}).get(key)
    return None if s is None or s.median is None else s.median / GOAL_RATIO


#: Real tools whose changes come one at a time (no two to share a commit or
#: overlap their round trips): the ones a floor is computed for.  ``make
#: -j2`` runs two compilers at once.
FLOOR_STEPS = ("clone", "tar", "rm")


def tool_floors(
    tools: dict[str, dict[str, Step]], afs: str, floor: dict[str, float] | None
) -> dict[str, dict[str, float]]:
    """Per sequential workload that ptlong and ``afs`` passed: ptlong's
    fastest and local's slowest repetition, ``afs``'s fewest durable changes
    of a repetition, and the floor (``bench_floor.floor_seconds``) under the
    measured round trip and durable write: every choice on the floor's side."""
    out: dict[str, dict[str, float]] = {}
    if not floor:
        return out
    for key in FLOOR_STEPS:
        a = tools.get(afs, {}).get(key)
        p, q = tools.get("ptlong", {}).get(key), tools.get("local", {}).get(key)
        pt, loc = (p.passed if p else []), (q.passed if q else [])
        if a is None or not a.all_ok or not pt or not a.extra.get("rpcs"):
            continue
        n = min(bench_floor.durable_count(r) for r in a.extra["rpcs"])
        local_s = max(loc) if loc else 0.0
        out[key] = {
            "ptlong": min(pt),
            "local": local_s,
            "durable": n,
            "floor": bench_floor.floor_seconds(
                min(pt), local_s, n, floor["echo_us"], bench_floor.durable_write_us(floor)
            ),
        }
    return out


def render_floors(
    tools: dict[str, dict[str, Step]],
    floors: dict[str, dict[str, float]],
    floor: dict[str, float],
    afs: str,
    sizes: Sizes,
) -> list[str]:
    L = ["### The floor under the goals\n"]
    L.append(
        f"What any daemon on this project's base (pyfuse3 + trio) with synchronous, durable "
        f"changes spends at least on a tool that makes its changes one at a time: ptlong's "
        f"time minus local's (FUSE and Python; the local disk's share taken out, generously, "
        f"as the whole local run; ptlong's fastest repetition, local's slowest), plus, per "
        f"change whose reply the tool waits for and that the fileserver gives only once "
        f"durable ({afs}'s own count around the tool in this run, its fewest of a repetition; "
        f"a StoreData counted at most once per created file), one raw trio round trip between "
        f"two processes ({floor['echo_us']:.0f} us) and one durable write (the cheaper of a "
        f"SQLite COMMIT, {floor['commit_us']:.0f} us, and a 4 KiB write into preallocated "
        f"space with its fdatasync, {floor.get('sync_us', math.nan):.0f} us; each the fastest "
        f"of the runs), measured in this run (`scripts/bench_floor.py`).  A goal below its "
        f"floor cannot be met by any such design on this machine.\n"
    )
    L.append("| real tool | ptlong - local (s) | durable changes | floor (s) | "
             "goal 1.5x GlusterFS (s) | goal 1.5x sshfs (s) |")  # fmt: skip
    L.append("|---|---:|---:|---:|---:|---:|")
    for key, label in STEPS:
        f = floors.get(key)
        if f is None:
            continue
        cells: list[str] = []
        for other in ("glusterfs", "sshfs"):
            want = goal_seconds(tools, key, other)
            below = want is not None and want < f["floor"]
            cells.append("n/a" if want is None else fmt(want) + (" **below**" if below else ""))
        head = f"| {label.format(**vars(sizes))} | {fmt(f['ptlong'] - f['local'])} | "
        L.append(head + f"{int(f['durable']):,} | {fmt(f['floor'])} | " + " | ".join(cells) + " |")
    L.append("")
    return L


def render_tools(
    args: argparse.Namespace,
    tools: dict[str, dict[str, Step]],
    why: dict[str, str],
    cols: list[str],
    afs: str,
    sizes: Sizes,
    loads: dict[str, str],
    floor: dict[str, float] | None = None,
) -> list[str]:
    L = ["## Real tools\n"]
    L.append(
        f"Seconds, median [min-max] of the repetitions whose check passed, {args.tools_reps} "
        f"repetition(s) (fewer, marked n=, where one would have ended past the "
        f"{args.tools_budget:g} s budget per target); lower is better.  A repository "
        f"generated with `git fast-import` "
        f"({sizes.files:,} files in a nested tree, {sizes.commits} commits) on the local disk; "
        f"each repetition clones it into mount A, then on mount B (a second client of the same "
        f"volume: a second sshfs, GlusterFS FUSE client or afsfuse mount) runs `git status` + "
        f"`git log -1` in the clone; commits an edit on A and polls B's `git log -1` and `git "
        f"status` (every 20 ms, at most {args.commit_bound:g} s) until they show it (time from "
        f"the edit); builds a {sizes.cfiles}-file C project with `make -j2` in A; untars the "
        f"tree (`git archive` of HEAD) into A; and `rm -rf`s the clone.  Checks: the clone's "
        f"HEAD, a clean `git status`, `git fsck` and its file count; B's HEAD and a clean "
        f"status; B reads the bytes A committed; the binary prints the right sum and `make -q` "
        f"says it is up to date; `tar -d` finds no difference; the clone is gone.  `ptlong` "
        f"(one mount of `scripts/passthrough.py`, kernel timeouts {LONG_TIMEOUT:g} s) is the "
        f"floor of a pyfuse3 + trio daemon: FUSE and Python, no network, nothing durable.  Kernel "
        f"caches are dropped before each repetition.  Ratios: the other's seconds over "
        f"{afs}'s (> 1: {afs} faster); goal >= {GOAL_RATIO:g}x.\n"
    )
    L.append("| real tool (s) | " + " | ".join(cols) + f" | {afs} vs GlusterFS | {afs} vs sshfs |")
    L.append("|---|" + "---:|" * (len(cols) + 2))
    for key, label in STEPS:
        cells = [tool_cell(tools, c, key, why) for c in cols]
        rs = [tool_ratio(tools, key, o, afs) for o in ("glusterfs", "sshfs")]
        rt = [
            "n/a" if r is None else (f"n/a ({r[0]})" if r[1] == "n/a" else " ".join(r)) for r in rs
        ]
        L.append(f"| {label.format(**vars(sizes))} | " + " | ".join(cells + rt) + " |")
    L.append("")
    fails = [
        f"- {col}, {key}, repetition {i + 1}: {note}"
        + ("" if secs is None else f" (the tool itself ran in {secs:.2f} s)")
        for col in cols
        for key, s in tools.get(col, {}).items()
        for i, (secs, ok, note) in enumerate(zip(s.samples, s.ok, s.notes, strict=True))
        if not ok
    ]
    if fails:
        L.append("Failed steps:\n")
        L.extend(fails)
        L.append("")
    else:
        L.append("Every step of every target passed its check.\n")
    if loads:
        L.append(
            "Load average when each target's real-tools run started: "
            + ", ".join(f"{k} {v}" for k, v in loads.items())
            + ".\n"
        )
    floors = tool_floors(tools, afs, floor)
    if floor and floors:
        L.extend(render_floors(tools, floors, floor, afs, sizes))
    return L


def render(
    args: argparse.Namespace,
    info: dict[str, str],
    res: dict[str, dict[str, Result]],
    why: dict[str, str],
    stale: dict[str, Result],
    cbs: dict[str, dict[str, Any]],
    goal_rows: list[tuple[str, str, str]],
    runtime: float,
    *,
    cols: list[str] | None = None,
    afs: str = "afsfuse",
    tools_md: list[str] | None = None,
    tls_md: str | None = None,
) -> str:
    cols = cols or COLS
    extra_afs = [c for c in cols if c not in COLS]
    L: list[str] = []
    L.append("# afsfuse benchmarks\n")
    L.append(
        f"Generated by `make bench` (`scripts/bench.py{' --quick' if args.quick else ''}`) on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; the run took "
        f"{runtime / 60:.1f} min.\n"
    )
    if args.quick:
        L.append("**Quick mode**: reduced sizes and 1 repetition; not comparable to a full run.\n")
    L.append("Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()) + ".\n")
    L.append("## Micro benchmarks\n")
    L.append(
        f"Sizes: {args.files:,}-file tree in {args.dirs} directories, "
        f"{args.big_mib} MiB sequential file (1 MiB reads/writes), {args.small:,} small "
        f"files; {args.reps} repetitions; cells show median [min-max].  Columns: "
        "`local` = a local directory; `pt0`/`ptlong` = `scripts/passthrough.py` "
        "(pyfuse3 + trio) of it with kernel timeouts 0 / 3600 s; `afsfuse` = fileserver + "
        "client mount (default options: kernel timeouts 3600 s); `sshfs` = sshfs of the "
        "local dir through sshd on 127.0.0.1; `glusterfs` = a one-brick GlusterFS volume on "
        "127.0.0.1 (md-cache with upcall invalidation, `md-cache-timeout` 600) through its "
        "FUSE client.  Cold = after remount (afsfuse: with an "
        "empty cache dir) and `drop_caches`.  Ratios > 1 mean afsfuse is better.\n"
    )
    rcols = [f"{afs}/{o}" for o in ("ptlong", *OTHERS)] + [f"{e}/{afs}" for e in extra_afs]
    L.append("| workload | " + " | ".join(cols) + " | " + " | ".join(rcols) + " |")
    L.append("|---|" + "---:|" * (len(cols) + len(rcols)))
    for key, label in ROWS:
        cells = [cell(res, c, key, why) for c in cols]
        rs = [ratio(res, key, o, afs) for o in ("ptlong", *OTHERS)]
        rs += [ratio(res, key, afs, e) for e in extra_afs]
        L.append(
            f"| {label} | "
            + " | ".join(cells)
            + " | "
            + " | ".join("—" if q is None else f"{q:.2f}x" for q in rs)
            + " |"
        )
    L.append("")
    st = res.get(afs, {}).get("stat_warm")
    if st is not None:
        L.append(
            f"afsfuse RPCs per warm `stat` pass ({st.extra.get('entries')} entries): "
            f"{st.extra.get('rpcs_per_pass') or 'none'}.\n"
        )
    setup = res.get(afs, {}).get("tree_setup")
    if setup is not None and setup.median:
        L.append(
            f"Making the tree through the afsfuse mount (create + write 100 B + close, "
            f"one run): {setup.median:,.0f} files/s.\n"
        )
    for key, what, per in (("small", "small file", args.small), ("write", "write", 1)):
        r = res.get(afs, {}).get(key)
        if r is not None and r.extra.get("rpcs"):
            last = r.extra["rpcs"][-1]
            shown = ", ".join(f"{k} {v / per:g}" for k, v in sorted(last.items()))
            L.append(f"afsfuse RPCs per {what} (last repetition): {shown or 'none'}.\n")
    if tools_md:
        L.extend(tools_md)
    L.append("## Two clients: A's `close()` to B's `stat()` showing the new size\n")
    L.append(
        f"{args.stale_rounds} rounds per system at most, each wait bounded at "
        f"{args.stale_bound:g} s, at most {args.stale_budget:g} s per system.\n"
    )
    L.append("| system | rounds | timeouts | median | min | max | p99 |")
    L.append("|---|---:|---:|---:|---:|---:|---:|")
    for name in [c for c in cols if c not in ("local", "pt0", "ptlong")]:
        s = stale.get(name)
        if s is None:
            L.append(f"| {name} | n/a ({why.get(name, 'not run')}) | | | | | |")
            continue
        med = f"{s.median:.1f} ms" if s.samples else "—"
        mn = f"{min(s.samples):.1f} ms" if s.samples else "—"
        mx = f"{max(s.samples):.1f} ms" if s.samples else "—"
        L.append(
            f"| {name} | {s.extra['rounds']} | {s.extra['timeouts']} | {med} | {mn} | "
            f"{mx} | {p99(s)} |"
        )
    L.append("")
    L.append("## Callback handling vs. cached vnodes (in-process, cache manager)\n")
    L.append(
        f"Median of {args.cb_runs} calls of the CB handlers bound to a server record "
        "(`CallbackService.handlers`), one volume instance holding N promised vnodes; "
        "µs per call [min-max].\n"
    )
    L.append("| cached vnodes | CB.InitCallBackState3 (µs) | CB.CallBack, 1 fid (µs) |")
    L.append("|---:|---:|---:|")
    for n in sorted(cbs, key=int):
        c = cbs[n]
        L.append(
            f"| {int(n):,} | {c['init_us']:.1f} [{c['init_min']:.1f}-{c['init_max']:.1f}] "
            f"| {c['callback_us']:.1f} [{c['callback_min']:.1f}-{c['callback_max']:.1f}] |"
        )
    L.append("")
    if tls_md:
        L.append("## TLS against `--insecure` (issue 17)\n")
        L.append(
            "The same mount workloads with TLS (the default) and with `--insecure` on both "
            "ends, one fileserver and one mount each, in this run "
            "(`scripts/bench_tls.py`); CPU is the daemon's and the server's.\n"
        )
        L.append(tls_md)
    L.append("## Goals\n")
    L.append("| goal | measured | verdict |")
    L.append("|---|---|---|")
    for g, m, v in goal_rows:
        L.append(f"| {g} | {m} | {v} |")
    L.append("")
    return "\n".join(L)


# -- main ----------------------------------------------------------------------------


def remove_workdir(base: Path) -> None:
    """Delete the temp dir, unless a mount under it survived its unmount
    (deleting through a live mount would delete the mounted files)."""
    with open("/proc/self/mountinfo") as f:
        left = [ln.split()[4] for ln in f if ln.split()[4].startswith(str(base) + "/")]
    if left:
        log.error("not removing %s: still mounted there: %s", base, ", ".join(left))
        return
    shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def started(t: Target) -> Iterator[Target]:
    t.start()
    try:
        yield t
    finally:
        t.stop()


QUICK_ARGS = {  # --quick: every section, small, once
    "files": 2000,
    "dirs": 40,
    "big_mib": 64,
    "small": 500,
    "reps": 1,
    "stale_rounds": 50,
    "stale_budget": 15.0,
    "cb_sizes": "10,1000,10000",
    "cb_runs": 300,
    "tools_reps": 1,
    "tls_big_mib": 32,
    "tls_small": 100,
    "tls_reps": 1,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="small sizes, 1 repetition (a smoke run of every section)")  # fmt: skip
    ap.add_argument("--files", type=int, default=10_000, help="files in the stat/ls tree")
    ap.add_argument("--dirs", type=int, default=100, help="directories they are spread over")
    ap.add_argument("--big-mib", type=int, default=512, help="sequential file size (MiB)")
    ap.add_argument("--small", type=int, default=5_000, help="small files per repetition")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per workload")
    ap.add_argument("--stale-rounds", type=int, default=200)
    ap.add_argument("--stale-bound", type=float, default=5.0, help="max wait per round (s)")
    ap.add_argument("--stale-budget", type=float, default=60.0, help="max seconds per system")
    ap.add_argument("--cb-sizes", default="10,1000,100000")
    ap.add_argument("--cb-runs", type=int, default=2000)
    ap.add_argument("--tools-reps", type=int, default=3, help="repetitions of the real tools")
    ap.add_argument("--tools-budget", type=float, default=330.0,
                    help="seconds per target for the real tools: fewer repetitions "
                    "where one would end past it")  # fmt: skip
    ap.add_argument("--commit-bound", type=float, default=60.0,
                    help="max seconds for B to show A's commit")  # fmt: skip
    ap.add_argument("--no-tools", action="store_true", help="skip the real-tools section")
    ap.add_argument("--no-micro", action="store_true", help="skip the micro benchmarks")
    ap.add_argument("--no-tls-cost", action="store_true",
                    help="skip the TLS against --insecure section")  # fmt: skip
    ap.add_argument("--tls-big-mib", type=int, default=128, help="TLS section: file size (MiB)")
    ap.add_argument("--tls-small", type=int, default=300, help="TLS section: small files")
    ap.add_argument("--tls-reps", type=int, default=9, help="TLS section: repetitions")
    ap.add_argument("--targets", default=",".join(COLS), help="comma-separated subset")
    ap.add_argument("--no-install", "--no-sshfs-install", action="store_true",
                    help="never run apt-get (sshfs, GlusterFS)")  # fmt: skip
    ap.add_argument("--workdir", type=Path, default=None, help="default: a new temp dir")
    ap.add_argument("--out-md", type=Path, default=REPO / "BENCHMARKS.md")
    ap.add_argument("--out-json", type=Path, default=REPO / "BENCHMARKS.json")
    args = ap.parse_args(argv)
    if args.quick:
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv or sys.argv[1:])}
        for k, v in QUICK_ARGS.items():
            if k not in given:  # an explicit option still wins
                setattr(args, k, v)
    return args


def install_problems(wanted: list[str], no_install: bool) -> dict[str, str]:
    why: dict[str, str] = {}
    checks = (("sshfs", ensure_sshfs, "sshfs"), ("glusterfs", ensure_gluster, "glusterfs"))
    for name, ensure, binary in checks:
        if name not in wanted:
            continue
        if no_install:
            problem = None if shutil.which(binary) else f"{binary} not installed (--no-install)"
        else:
            problem = ensure()
        if problem:
            why[name] = problem
            log.warning("%s column empty: %s", name, problem)
    return why


class Services:
    """The servers the targets share (sshd, GlusterFS, afsfuse fileservers),
    started on first use and all stopped by ``close``, also after a failure."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.sshd: Sshd | None = None
        self.gluster: Gluster | None = None
        self.servers: list[ServerProcess] = []

    def get_sshd(self) -> Sshd:
        if self.sshd is None:
            self.sshd = Sshd(self.base / "sshd")
            self.sshd.start()
        return self.sshd

    def get_gluster(self) -> Gluster:
        if self.gluster is None:
            self.gluster = Gluster(self.base / "gluster")
            try:
                self.gluster.start()
            except BaseException:
                self.gluster.stop()
                raise
        return self.gluster

    def afs_server(self, v: AfsVariant, tag: str) -> ServerProcess:
        srv = v.server(self.base / f"fs-{v.name}-{tag}".replace(" ", "_"))
        self.servers.append(srv)
        return srv.start()

    def close(self) -> None:
        if self.gluster is not None:
            self.gluster.stop()
        if self.sshd is not None:
            self.sshd.stop()
        for srv in self.servers:
            srv.stop()


SETUP_ERRORS = (RuntimeError, OSError, subprocess.SubprocessError)


def run_micro(
    args: argparse.Namespace,
    svc: Services,
    variants: tuple[AfsVariant, ...],
    wanted: list[str],
    why: dict[str, str],
) -> tuple[dict[str, dict[str, Result]], dict[str, Result]]:
    base = svc.base
    data = base / "data"
    data.mkdir()
    block = os.urandom(MIB)
    res: dict[str, dict[str, Result]] = {}
    stale: dict[str, Result] = {}
    # The local tree (shared by local, pt0, ptlong, sshfs) is made by the
    # local target, so it always runs first.
    res["local"] = run_target(LocalTarget(data), args, block, base)
    for timeout in (0.0, LONG_TIMEOUT):
        pt = PassthroughTarget(data, base / f"mnt-pt{timeout:g}", timeout, base)
        if pt.name in wanted:
            with started(pt):
                res[pt.name] = run_target(pt, args, block, base)
    for v in variants:
        if v.name not in wanted and not (v.name.startswith("afsfuse") and "afsfuse" in wanted):
            continue
        server = svc.afs_server(v, "micro")
        d = v.name.replace(" ", "_")
        with started(AfsTarget(server, base / f"{d}-a", v.mount_args, v.name)) as afs:
            res[v.name] = run_target(afs, args, block, base)
            with started(AfsTarget(server, base / f"{d}-b", v.mount_args, v.name)) as afs_b:
                stale[v.name] = staleness(
                    afs.root, afs_b.root, args.stale_rounds, args.stale_bound, args.stale_budget
                )
        log.info("%s staleness: %s", v.name, stale[v.name].extra)
    if "sshfs" in wanted and "sshfs" not in why:
        try:
            sshd = svc.get_sshd()
            a = SshfsTarget(sshd, data, base / "mnt-sshfs-a", base)
            with started(a):
                res["sshfs"] = run_target(a, args, block, base)
                with started(SshfsTarget(sshd, data, base / "mnt-sshfs-b", base)) as b:
                    stale["sshfs"] = staleness(
                        a.root, b.root, args.stale_rounds, args.stale_bound, args.stale_budget
                    )
            log.info("sshfs staleness: %s", stale["sshfs"].extra)
        except SETUP_ERRORS as exc:
            why["sshfs"] = f"sshfs run failed: {exc}"[:300]
            log.error("%s", why["sshfs"])
    if "glusterfs" in wanted and "glusterfs" not in why:
        try:
            g = svc.get_gluster()
            ga = GlusterTarget(g, base / "mnt-gluster-a")
            with started(ga):
                res["glusterfs"] = run_target(ga, args, block, base)
                with started(GlusterTarget(g, base / "mnt-gluster-b")) as gb:
                    stale["glusterfs"] = staleness(
                        ga.root, gb.root, args.stale_rounds, args.stale_bound, args.stale_budget
                    )
            log.info("glusterfs staleness: %s", stale["glusterfs"].extra)
        except SETUP_ERRORS as exc:
            why["glusterfs"] = f"GlusterFS run failed: {exc}"[:300]
            log.error("%s", why["glusterfs"])
    return res, stale


def _sum_counts(x: dict[str, int], y: dict[str, int]) -> dict[str, int]:
    return {k: x.get(k, 0) + y.get(k, 0) for k in x.keys() | y.keys()}


def run_all_tools(
    args: argparse.Namespace,
    svc: Services,
    variants: tuple[AfsVariant, ...],
    wanted: list[str],
    why: dict[str, str],
    sizes: Sizes,
) -> tuple[dict[str, dict[str, Step]], dict[str, str]]:
    """The real-tools workloads on every target, one after the other."""
    base = svc.base / "tools"
    fx = make_fixtures(base / "fixtures", sizes)
    home = base / "fixtures" / "home"
    tools: dict[str, dict[str, Step]] = {}
    loads: dict[str, str] = {}

    def go(name: str, a: Path, b: Path | None, rpcs: Any = None) -> None:
        loads[name] = Path("/proc/loadavg").read_text().split()[0]
        a_dir = a / "tools"
        a_dir.mkdir()
        b_dir = None if b is None else b / "tools"
        tools[name] = run_tools(name, a_dir, b_dir, fx, args.tools_reps, home=home,
                                cold=drop_caches, commit_bound=args.commit_bound,
                                budget=args.tools_budget, rpcs=rpcs)  # fmt: skip

    if "local" in wanted:
        (base / "local").mkdir()
        go("local", base / "local", None)
    if "ptlong" in wanted:
        # One mount (no second client: the passthrough has no coherence to test).
        (base / "ptlong").mkdir()
        pt = PassthroughTarget(base / "ptlong", base / "mnt-pt-tools", LONG_TIMEOUT, base)
        try:
            with started(pt):
                go("ptlong", pt.root, None)
        except SETUP_ERRORS as exc:
            why["ptlong"] = f"passthrough run failed: {exc}"[:300]
            log.error("%s", why["ptlong"])
    if "sshfs" in wanted and "sshfs" not in why:
        try:
            sshd = svc.get_sshd()
            (base / "sshfs").mkdir()
            a = SshfsTarget(sshd, base / "sshfs", base / "mnt-sshfs-a", base)
            b = SshfsTarget(sshd, base / "sshfs", base / "mnt-sshfs-b", base)
            with started(a), started(b):
                go("sshfs", a.root, b.root)
        except SETUP_ERRORS as exc:
            why["sshfs"] = f"sshfs run failed: {exc}"[:300]
            log.error("%s", why["sshfs"])
    if "glusterfs" in wanted and "glusterfs" not in why:
        try:
            g = svc.get_gluster()
            ga, gb = GlusterTarget(g, base / "mnt-gl-a"), GlusterTarget(g, base / "mnt-gl-b")
            with started(ga), started(gb):
                go("glusterfs", ga.root, gb.root)
        except SETUP_ERRORS as exc:
            why["glusterfs"] = f"GlusterFS run failed: {exc}"[:300]
            log.error("%s", why["glusterfs"])
    for v in variants:
        if v.name not in wanted and not (v.name.startswith("afsfuse") and "afsfuse" in wanted):
            continue
        try:
            server = svc.afs_server(v, "tools")
            d = v.name.replace(" ", "_")
            a = AfsTarget(server, base / f"{d}-a", v.mount_args, v.name)
            b = AfsTarget(server, base / f"{d}-b", v.mount_args, v.name)
            with started(a), started(b):
                # Both mounts' RPCs: the floor counts the changes either made.
                go(v.name, a.root, b.root,
                   lambda a=a, b=b: _sum_counts(a.rpcs() or {}, b.rpcs() or {}))  # fmt: skip
        except SETUP_ERRORS as exc:
            why[v.name] = f"{v.name} run failed: {exc}"[:300]
            log.error("%s", why[v.name])
    return tools, loads


def main(argv: list[str] | None = None, variants: tuple[AfsVariant, ...] | None = None) -> int:
    """Run the benchmarks; ``variants`` (default: plain afsfuse) are the
    afsfuse configurations measured side by side, the first one judged."""
    args = parse_args(argv)
    variants = tuple(variants or DEFAULT_VARIANTS)
    afs = variants[0].name
    cols = ["local", "pt0", "ptlong", *(v.name for v in variants), *OTHERS]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    # The in-process callback benchmark measures the handlers, not log formatting.
    for name in ("afsfuse", "protocol"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # SIGTERM ends the run like Ctrl-C, so the finally blocks unmount and stop.
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    t_start = time.monotonic()
    load_start = load_note(Path("/nonexistent"))
    wanted = [c for c in args.targets.split(",") if c]
    if "afsfuse" in wanted:
        wanted += [v.name for v in variants]
    base = Path(tempfile.mkdtemp(prefix="afsbench-", dir=args.workdir))
    res: dict[str, dict[str, Result]] = {}
    stale: dict[str, Result] = {}
    tools: dict[str, dict[str, Step]] = {}
    loads: dict[str, str] = {}
    tls: dict[str, Any] = {}
    floor: dict[str, float] = {}
    if not drop_caches():
        log.warning("cannot drop kernel caches: cold runs only remount")
    why = install_problems(wanted, args.no_install)
    sizes = QUICK if args.quick else Sizes()
    svc = Services(base)
    try:
        if not args.no_micro:
            res, stale = run_micro(args, svc, variants, wanted, why)
        if not args.no_tools:
            tools, loads = run_all_tools(args, svc, variants, wanted, why, sizes)
        if "ptlong" in tools or "ptlong" in res:
            try:
                got = bench_floor.round_trip_and_commit(base)
                floor = {k: min(v) for k, v in got.items()}  # the floor's side: fastest
                log.info("floor: round trip %.0f us, COMMIT %.0f us, append + fdatasync %.0f us",
                         floor["echo_us"], floor["commit_us"], floor["sync_us"])  # fmt: skip
            except (OSError, RuntimeError) as exc:
                log.error("floor not measured: %s", exc)
        sizes_cb = [int(x) for x in args.cb_sizes.split(",") if x]
        cbs = cb_scaling(sizes_cb, args.cb_runs, base / "cb") if not args.no_micro else {}
        if not args.no_tls_cost:
            import bench_tls

            tls = bench_tls.measure(base / "tls", args.tls_big_mib, args.tls_small, args.tls_reps)
            log.info("TLS cost: %s", {w: f"{c:+.1%}" for w, c in tls["tls_cost"].items()})
    finally:
        svc.close()
        remove_workdir(base)

    runtime = time.monotonic() - t_start
    info = machine()
    # Other processes share the cores: say how busy the machine was.
    info["busy"] = f"at start {load_start}; at end {load_note(Path('/nonexistent'))}"
    floors = tool_floors(tools, afs, floor)
    goal_rows = goals(res, stale, cbs, afs, floor, args.small) + tool_goals(
        tools, afs, sizes, floors
    )
    tls_md = None
    if tls:
        import bench_tls

        goal_rows += bench_tls.goal_rows(tls)
        tls_md = bench_tls.render(tls)
    tcols = TOOL_COLS + [v.name for v in variants]
    tools_md = render_tools(args, tools, why, tcols, afs, sizes, loads, floor) if tools else None
    md = render(args, info, res, why, stale, cbs, goal_rows, runtime, cols=cols, afs=afs,
                tools_md=tools_md, tls_md=tls_md)  # fmt: skip
    print(md)
    args.out_md.write_text(md)
    doc = {
        "machine": info,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "variants": [vars(v) for v in variants],
        "runtime_s": runtime,
        "results": {t: {k: vars(r) for k, r in rs.items()} for t, rs in res.items()},
        "staleness": {t: vars(r) for t, r in stale.items()},
        "callbacks": cbs,
        "tools": {t: {k: vars(s) for k, s in st.items()} for t, st in tools.items()},
        "tools_sizes": vars(sizes),
        "tools_load": loads,
        "floor": floor,
        "tool_floors": floors,
        "tls_cost": tls,
        "goals": [{"goal": g, "measured": m, "verdict": v} for g, m, v in goal_rows],
        "unavailable": why,
    }
    args.out_json.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    for g, m, v in goal_rows:
        print(f"{v:>6}  {g}: {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""What TLS costs (issue 17): the same workloads through a real mount, with
TLS and with ``--insecure`` on both ends, in one run.

Workloads (each repeated ``--reps`` times, medians reported, the two modes
interleaved so a change in machine load hits both alike):

- ``cold_read``: sequential read of a ``--big-mib`` file after a remount with
  an empty client cache and dropped kernel caches (every byte crosses the
  connection);
- ``write_fsync``: sequential write of a ``--big-mib`` file, fsync, close;
- ``small_files``: create ``--small`` files of 4 KiB (one store each).

    .venv/bin/python scripts/bench_tls.py [--big-mib 64] [--small 300] [--reps 3] [--json]

``measure(base, ...)`` returns the figures for scripts/bench.py.  Every
process started here is stopped by its pid and every mount unmounted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from afsfuse.lab.mount import ClientMount
from afsfuse.lab.server import ServerProcess

MIB = 1 << 20
MODES = ("tls", "insecure")
WORKLOADS = ("cold_read", "write_fsync", "small_files")
#: The issue's goal: TLS costs at most this much more time on each workload.
GOAL = 0.15


def drop_caches() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass  # not root: the remount with an empty cache still makes it cold


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (its threads included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def write_big(path: Path, size: int) -> None:
    block = os.urandom(MIB)  # incompressible, not that TLS compresses
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = size
        while left > 0:
            left -= os.write(fd, block[: min(MIB, left)])
        os.fsync(fd)
    finally:
        os.close(fd)


def read_big(path: Path, size: int) -> None:
    buf = bytearray(MIB)
    got = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
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


class Side:
    """One fileserver and one mount of it, in one mode."""

    def __init__(self, base: Path, mode: str) -> None:
        extra = ["--insecure"] if mode == "insecure" else []
        self.server = ServerProcess(base / mode / "fs", extra_args=extra, events=False)
        self.work = base / mode / "client"
        self.mount: ClientMount | None = None

    def start(self) -> None:
        self.server.start()
        self.remount()

    def remount(self) -> None:
        if self.mount is not None:
            self.mount.stop()
        shutil.rmtree(self.work / "cache", ignore_errors=True)
        drop_caches()
        self.mount = ClientMount(self.server, self.work, events=False).start()

    def cpu(self) -> float:
        """CPU seconds used so far by the client daemon and the fileserver."""
        assert self.mount is not None
        return cpu_seconds(self.mount.pid) + cpu_seconds(self.server.pid)

    def run(self, fn: Callable[[], Any]) -> tuple[float, float]:
        """(wall seconds, CPU seconds of daemon + server) of ``fn``."""
        c0 = self.cpu()
        wall = timed(fn)
        return wall, self.cpu() - c0

    @property
    def mnt(self) -> Path:
        assert self.mount is not None
        return self.mount.mnt

    def stop(self) -> None:
        try:
            if self.mount is not None:
                self.mount.stop()
        finally:
            self.server.stop()


def measure(base: Path, big_mib: int = 64, small: int = 300, reps: int = 3) -> dict[str, Any]:
    """Medians (seconds) per mode and workload, and TLS's cost per workload."""
    size = big_mib * MIB
    sides = {m: Side(base, m) for m in MODES}
    samples: dict[str, dict[str, list[float]]] = {m: {w: [] for w in WORKLOADS} for m in MODES}
    cpu: dict[str, dict[str, list[float]]] = {m: {w: [] for w in WORKLOADS} for m in MODES}

    def note(mode: str, w: str, r: tuple[float, float]) -> None:
        samples[mode][w].append(r[0])
        cpu[mode][w].append(r[1])

    try:
        for s in sides.values():
            s.start()
        for rep in range(reps):
            for mode in MODES if rep % 2 == 0 else MODES[::-1]:
                s = sides[mode]
                big = s.mnt / f"big{rep}"
                note(mode, "write_fsync", s.run(lambda: write_big(big, size)))  # noqa: B023
                s.remount()  # empty client cache, dropped kernel caches
                big = s.mnt / f"big{rep}"
                note(mode, "cold_read", s.run(lambda: read_big(big, size)))  # noqa: B023
                d = s.mnt / f"small{rep}"
                note(mode, "small_files", s.run(lambda: small_files(d, small)))  # noqa: B023
                os.unlink(big)  # keep the data dir small
    finally:
        for s in sides.values():
            s.stop()
    med = {m: {w: statistics.median(v) for w, v in ws.items()} for m, ws in samples.items()}
    cmed = {m: {w: statistics.median(v) for w, v in ws.items()} for m, ws in cpu.items()}
    cost = {w: med["tls"][w] / med["insecure"][w] - 1 for w in WORKLOADS}
    ccost = {w: cmed["tls"][w] / cmed["insecure"][w] - 1 for w in WORKLOADS}
    return {"big_mib": big_mib, "small": small, "reps": reps, "median_s": med,
            "samples_s": samples, "tls_cost": cost, "cpu_median_s": cmed,
            "cpu_samples_s": cpu, "tls_cpu_cost": ccost,
            "load": os.getloadavg()}  # fmt: skip


def render(r: dict[str, Any]) -> str:
    mib = r["big_mib"]
    rows = [
        "| workload | TLS | --insecure | TLS cost | goal <= 15% | CPU s TLS / insecure "
        "(daemon + server) | CPU cost |",
        "|---|---|---|---|---|---|---|",
    ]
    for w in WORKLOADS:
        t, p = r["median_s"]["tls"][w], r["median_s"]["insecure"][w]
        if w == "small_files":
            fig = lambda s: f"{r['small'] / s:,.0f} files/s"  # noqa: E731
        else:
            fig = lambda s: f"{mib / s:,.1f} MiB/s"  # noqa: E731
        c, ct, cp = r["tls_cost"][w], r["cpu_median_s"]["tls"][w], r["cpu_median_s"]["insecure"][w]
        rows.append(f"| {w} | {fig(t)} ({t:.2f} s) | {fig(p)} ({p:.2f} s) | {c:+.1%} | "
                    f"{'met' if c <= GOAL else 'MISSED'} | {ct:.2f} / {cp:.2f} | "
                    f"{r['tls_cpu_cost'][w]:+.1%} |")  # fmt: skip
    return "\n".join(rows) + (
        f"\n\nmedians of {r['reps']}; {mib} MiB file, {r['small']} small files of 4 KiB; "
        f"load average at the end {r['load'][0]:.1f}\n"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--big-mib", type=int, default=64)
    ap.add_argument("--small", type=int, default=300)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp:
        r = measure(Path(tmp), args.big_mib, args.small, args.reps)
    print(json.dumps(r, indent=2) if args.json else render(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())

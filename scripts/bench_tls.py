#!/usr/bin/env python3
"""What TLS costs (issue 17): the same workloads through a real mount, with
TLS and with ``--insecure`` on both ends, in one run.  ``make bench``
(``scripts/bench.py``) runs this as its "TLS against --insecure" section;
this file also runs it alone.

Workloads (each repeated ``--reps`` times, medians reported, the two modes
interleaved so a change in machine load hits both alike):

- ``cold_read``: sequential read of a ``--big-mib`` file after a remount with
  an empty client cache and dropped kernel caches (every byte crosses the
  connection);
- ``write_fsync``: sequential write of a ``--big-mib`` file, fsync, close;
- ``small_files``: create ``--small`` files of 4 KiB (one store each).

Before each timed workload the kernel's dirty pages are written back
(``os.sync``, untimed, in both modes): otherwise the writeback of the cache
chunks a 128 MiB cold read just made runs during the small files and
competes with the fileserver's fsyncs, which doubled their TLS "cost".
Before the write and the cold read, page cache is taken and given back
(``bench.warm_page_cache``, untimed): without it a third of the writes, in
either mode, met pages the VM's host had to fault in and took 0.6 s instead
of 0.4, which put the write's TLS "cost" anywhere from -30 % to +50 %.

``crypto_floor`` measures what TLS cannot go below here: encrypting and
decrypting records through Python's ``ssl`` in one process, memory BIOs, no
socket, with the contexts the servers and mounts use.  Its share of the
plaintext cold read's CPU per MiB is a lower bound on TLS's CPU cost there.

    .venv/bin/python scripts/bench_tls.py [--big-mib 128] [--small 300] [--reps 9] [--json]

The mounts and servers are bench.py's (``AfsVariant``, ``AfsTarget``), as
are the workloads.  ``measure(base, ...)`` returns the figures, ``render``
the markdown table, ``goal_rows`` the goal verdicts.  Every process started
here is stopped by its pid and every mount unmounted.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import (
    MIB,
    AfsTarget,
    AfsVariant,
    read_big,
    remove_workdir,
    small_files,
    timed,
    verdict,
    warm_page_cache,
    write_big,
)

from afsfuse.lab.cpu import cpu_seconds
from protocol import tls

#: The two configurations compared: TLS (the default) and plaintext on both ends.
VARIANTS = {
    "tls": AfsVariant("tls"),
    "insecure": AfsVariant("insecure", ("--insecure",), ("--insecure",)),
}
MODES = tuple(VARIANTS)
WORKLOADS = ("cold_read", "write_fsync", "small_files")
LABELS = {"cold_read": "cold sequential read", "write_fsync": "write + fsync + close",
          "small_files": "small files (4 KiB)"}  # fmt: skip
#: The issue's goal: TLS costs at most this much more time on each workload.
GOAL = 0.15


class Side:
    """One fileserver and one mount of it, in one mode."""

    def __init__(self, base: Path, mode: str) -> None:
        v = VARIANTS[mode]
        self.server = v.server(base / mode / "fs")
        self.target = AfsTarget(self.server, base / mode / "client", v.mount_args, v.name)

    def start(self) -> None:
        self.server.start()
        self.target.cold()

    def cpu(self) -> float:
        """CPU seconds used so far by the client daemon and the fileserver."""
        assert self.target.mount is not None
        return cpu_seconds(self.target.mount.pid) + cpu_seconds(self.server.pid)

    def run(self, fn: Callable[[], Any]) -> tuple[float, float]:
        """(wall seconds, CPU seconds of daemon + server) of ``fn``."""
        c0 = self.cpu()
        wall = timed(fn)
        return wall, self.cpu() - c0

    def stop(self) -> None:
        try:
            self.target.stop()
        finally:
            self.server.stop()


def _pump(src: ssl.MemoryBIO, dst: ssl.MemoryBIO) -> None:
    if src.pending:
        dst.write(src.read())


def crypto_floor(base: Path, mib: int = 256) -> dict[str, float]:
    """CPU ms per MiB to encrypt and to decrypt TLS records through Python's
    ``ssl`` (the contexts a server and a mount use, 256 KiB writes, 16 KiB
    reads as the streams do), in one process: no socket, no RPC, no FUSE."""
    base.mkdir(parents=True, exist_ok=True)
    ca = tls.CellCA.create(base / "ca.pem", "floor.test")
    srv = tls.ensure_server_cert(ca, base / "server.pem", "floor", ["127.0.0.1"])
    tls.write_client_bundle(ca, base / "client.pem")
    sbio = (ssl.MemoryBIO(), ssl.MemoryBIO())  # (incoming, outgoing)
    cbio = (ssl.MemoryBIO(), ssl.MemoryBIO())
    server = tls.server_context(srv, ca).wrap_bio(*sbio, server_side=True)
    client = tls.client_context(base / "client.pem").wrap_bio(*cbio, server_side=False)
    for _ in range(10):  # a TLS 1.3 handshake takes two flights each way
        for o in (client, server):
            try:
                o.do_handshake()
            except ssl.SSLWantReadError:
                pass
        _pump(cbio[1], sbio[0])
        _pump(sbio[1], cbio[0])
    chunk = 256 * 1024
    msg, buf = os.urandom(chunk), bytearray(chunk)
    enc = dec = 0.0
    for _ in range(mib * MIB // chunk):
        t0 = time.process_time()
        server.write(msg)
        wire = sbio[1].read()
        t1 = time.process_time()
        cbio[0].write(wire)
        n = 0
        with memoryview(buf) as view:
            while n < chunk:
                n += client.read(tls.RECORD, view[n:])
        enc, dec = enc + t1 - t0, dec + time.process_time() - t1
    return {"encrypt_ms_per_mib": enc * 1e3 / mib, "decrypt_ms_per_mib": dec * 1e3 / mib,
            "cipher": str(client.cipher()[0])}  # fmt: skip


def measure(base: Path, big_mib: int = 128, small: int = 300, reps: int = 9) -> dict[str, Any]:
    """Medians (seconds) per mode and workload, and TLS's cost per workload."""
    size = big_mib * MIB
    block = os.urandom(MIB)  # incompressible, not that TLS compresses
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
                big = s.target.root / f"big{rep}"
                os.sync()  # untimed: no earlier writeback during the timed run
                # Pages for the daemon's cache, FUSE's and the server's file.
                warm_page_cache(base, 4 * size, block)
                note(mode, "write_fsync", s.run(lambda: write_big(big, size, block)))  # noqa: B023
                s.target.cold()  # empty client cache, dropped kernel caches
                warm_page_cache(base, 4 * size, block)
                note(mode, "cold_read", s.run(lambda: read_big(big, size)))  # noqa: B023
                d = s.target.root / f"small{rep}"
                os.sync()  # the cold read's cache chunks, written back untimed
                note(mode, "small_files", s.run(lambda: small_files(d, small)))  # noqa: B023
                os.unlink(big)  # keep the data dir small
    finally:
        for s in sides.values():
            s.stop()
    med = {m: {w: statistics.median(v) for w, v in ws.items()} for m, ws in samples.items()}
    cmed = {m: {w: statistics.median(v) for w, v in ws.items()} for m, ws in cpu.items()}
    floor = crypto_floor(base / "floor")
    cost = {w: med["tls"][w] / med["insecure"][w] - 1 for w in WORKLOADS}
    ccost = {w: cmed["tls"][w] / cmed["insecure"][w] - 1 for w in WORKLOADS}
    return {"big_mib": big_mib, "small": small, "reps": reps, "median_s": med,
            "samples_s": samples, "tls_cost": cost, "cpu_median_s": cmed,
            "cpu_samples_s": cpu, "tls_cpu_cost": ccost, "crypto_floor": floor,
            "load": os.getloadavg()}  # fmt: skip


def _rate(r: dict[str, Any], w: str, s: float) -> str:
    if w == "small_files":
        return f"{r['small'] / s:,.0f} files/s"
    return f"{r['big_mib'] / s:,.1f} MiB/s"


def render(r: dict[str, Any]) -> str:
    """The markdown table of a ``measure`` result."""
    rows = [
        "| workload | TLS | --insecure | TLS cost | goal <= 15% | CPU s TLS / insecure "
        "(daemon + server) | CPU cost |",
        "|---|---|---|---|---|---|---|",
    ]
    for w in WORKLOADS:
        t, p = r["median_s"]["tls"][w], r["median_s"]["insecure"][w]
        c, ct, cp = r["tls_cost"][w], r["cpu_median_s"]["tls"][w], r["cpu_median_s"]["insecure"][w]
        rows.append(f"| {LABELS[w]} | {_rate(r, w, t)} ({t:.2f} s) | {_rate(r, w, p)} "
                    f"({p:.2f} s) | {c:+.1%} | {'met' if c <= GOAL else 'MISSED'} | "
                    f"{ct:.2f} / {cp:.2f} | {r['tls_cpu_cost'][w]:+.1%} |")  # fmt: skip
    f = r["crypto_floor"]
    both = f["encrypt_ms_per_mib"] + f["decrypt_ms_per_mib"]
    plain = r["cpu_median_s"]["insecure"]["cold_read"] * 1e3 / r["big_mib"]
    return "\n".join(rows) + (
        f"\n\nMedians of {r['reps']} (modes interleaved); {r['big_mib']} MiB file, "
        f"{r['small']} small files of 4 KiB; load average at the end {r['load'][0]:.1f}.\n"
        f"\nThe floor: Python's `ssl` ({f['cipher']}) encrypts at "
        f"{f['encrypt_ms_per_mib']:.2f} and decrypts at {f['decrypt_ms_per_mib']:.2f} CPU ms "
        f"per MiB in one process with no socket; the plaintext cold read spends "
        f"{plain:.2f} CPU ms per MiB (daemon + server), so TLS costs it at least about "
        f"{both / plain:+.0%} CPU (the floor's BIO copies aside).\n"
    )


def goal_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(goal, measured, verdict) per workload, for bench.py's goals table."""
    out = []
    for w in WORKLOADS:
        cost = r["tls_cost"][w]
        out.append((f"TLS costs <= 15% on {LABELS[w]}",
                    f"{cost:+.1%} (medians of {r['reps']})", verdict(cost <= GOAL)))  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--big-mib", type=int, default=128)
    ap.add_argument("--small", type=int, default=300)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-tls-"))
    try:
        r = measure(base, args.big_mib, args.small, args.reps)
    finally:
        remove_workdir(base)
    print(json.dumps(r, indent=2) if args.json else render(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The floor under the speed goals: what Python, trio and a durable commit
cost on this machine before any fileserver or cache manager runs.

The measurements, each in processes of their own on 127.0.0.1, medians of
``--runs``:

``echo``
    A raw trio TCP round trip between two processes: 48 bytes each way, no
    framing, no msgpack, no TLS.  Every synchronous RPC any trio daemon here
    makes costs at least this.
``commit``
    One SQLite COMMIT of a one-row change in WAL mode with
    ``synchronous=FULL`` (the fileserver's durable default), on the disk of
    ``--dir``; and, for a store other than SQLite, a 4 KiB write into a
    file's preallocated space and its ``fdatasync``.  The cheaper of the two
    is what a reply that survives power loss costs at least.
``ideal``
    The smallest durable server of the fileserver benchmark's cycle
    (``bench_server.py --only cycles``): trio, plaintext msgpack frames,
    SQLite as above, and handlers that do only the cycle's essential SQL
    (create: two inserts; store: an insert of the bytes and an update;
    unlink: a select and three deletes), each answered after the COMMIT
    that covers it.  Requests that arrive while a COMMIT runs share the next
    one (group commit); one session's requests commit on the trio thread,
    with no thread hand-off at all.  No authentication, no callbacks, no
    TLS, no metrics, no volume: an upper bound for any Python trio
    fileserver with the durable default, not a design to copy.  Its
    clients are as thin (one process, one connection per session).
``ideal, log``
    The same server with no database at all: the state in dicts, each
    change a msgpack record appended to one log file, a group's records
    written with one ``pwrite`` into the log's preallocated space and one
    ``fdatasync`` (what a hand-made store could at best do instead of
    SQLite).

    .venv/bin/python scripts/bench_floor.py [--runs 3] [--seconds 4]
        [--sessions 1,16] [--dir DIR] [--json FILE]

The figures feed the closing argument of the speed goals (README,
"Measured"): a goal that asks more than the floor allows cannot be met by
any implementation on this stack.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import msgpack
import trio

REPO = Path(__file__).resolve().parent.parent
ECHO_BYTES = b"x" * 48
PAYLOAD = b"x" * 4096

#: Changes whose reply the application's system call waits for and that the
#: fileserver gives only once the change is durable (issue 12: a reply means
#: the change survives power loss; close-to-open: close() returns once the
#: server acknowledged every byte).
DURABLE_RPCS = frozenset(
    "FS." + m
    for m in [
        "CreateFile",
        "MakeDir",
        "Symlink",
        "Link",
        "MakeNode",
        "RemoveFile",
        "RemoveDir",
        "Rename",
        "StoreStatus",
        "SetXattr",
        "RemoveXattr",
    ]
)


def durable_count(rpcs: Mapping[str, int]) -> int:
    """The durable round trips a workload's RPC counts imply at least:
    every namespace or status change, and one StoreData per created file at
    most (a big file's stores may overlap the writes; a new file's bytes
    need one acknowledged store before its close returns)."""
    n = sum(v for k, v in rpcs.items() if k in DURABLE_RPCS)
    return n + min(rpcs.get("FS.StoreData", 0), rpcs.get("FS.CreateFile", 0))


def floor_seconds(ptlong_s: float, local_s: float, durable: int, echo_us: float,
                  sync_us: float) -> float:  # fmt: skip
    """The least any daemon on pyfuse3 + trio with synchronous durable changes
    spends on a sequential workload: what the passthrough spent beyond the
    local disk (FUSE and Python; the local file operations it also did are
    taken out, generously, as the whole local run), plus a round trip and a
    durable write (``sync_us``) per durable change."""
    return max(ptlong_s - local_s, 0.0) + durable * (echo_us + sync_us) / 1e6


def durable_write_us(floor: Mapping[str, float]) -> float:
    """The cheaper durable write of the measured ones (SQLite COMMIT, or a
    4 KiB write into preallocated space and its fdatasync)."""
    return min(floor["commit_us"], floor.get("sync_us", math.inf))


# -- echo ---------------------------------------------------------------------


async def _echo_handler(stream: trio.SocketStream) -> None:
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return
        await stream.send_all(data)


async def _echo_rtt(port: int, n: int) -> float:
    """Seconds per round trip (after a warm-up)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        for _ in range(300):
            await stream.send_all(ECHO_BYTES)
            await stream.receive_some(65536)
        t0 = time.perf_counter()
        for _ in range(n):
            await stream.send_all(ECHO_BYTES)
            got = 0
            while got < len(ECHO_BYTES):
                got += len(await stream.receive_some(65536))
        return (time.perf_counter() - t0) / n


# -- commit -------------------------------------------------------------------


def _open_db(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(
        "CREATE TABLE IF NOT EXISTS vnodes (vnode INTEGER PRIMARY KEY, size INTEGER,"
        " dv INTEGER);"
        "CREATE TABLE IF NOT EXISTS dirents (dir INTEGER, name BLOB, vnode INTEGER,"
        " PRIMARY KEY (dir, name)) WITHOUT ROWID;"
        "CREATE TABLE IF NOT EXISTS data (vnode INTEGER PRIMARY KEY, bytes BLOB);"
    )
    return db


def commit_cost(directory: Path, n: int) -> float:
    """Median seconds of one durable COMMIT of a one-row change."""
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        db = _open_db(Path(tmp) / "floor.db")
        db.execute("INSERT INTO vnodes VALUES (1, 0, 0)")
        times = []
        for i in range(n):
            db.execute("BEGIN IMMEDIATE")
            db.execute("UPDATE vnodes SET dv = ? WHERE vnode = 1", (i,))
            t0 = time.perf_counter()
            db.execute("COMMIT")
            times.append(time.perf_counter() - t0)
        db.close()
    return statistics.median(times)


def append_sync_cost(directory: Path, n: int) -> float:
    """Median seconds of a 4 KiB write into a file's preallocated (already
    written and synced) space and its ``fdatasync``: the cheapest durable
    write here, as no block or size has to change (a log that grows its
    file costs more: about the COMMIT's)."""
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        fd = os.open(Path(tmp) / "log", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.write(fd, bytes(len(PAYLOAD) * n))
            os.fsync(fd)
            times = []
            for i in range(n):
                t0 = time.perf_counter()
                os.pwrite(fd, PAYLOAD, i * len(PAYLOAD))
                os.fdatasync(fd)
                times.append(time.perf_counter() - t0)
        finally:
            os.close(fd)
    return statistics.median(times)


# -- the ideal server -----------------------------------------------------------


class _GroupSync:
    """Group commit: a request waits in ``_durable`` for the one ``_sync``
    that covers its change; requests arriving meanwhile share it."""

    def __init__(self) -> None:
        self.waiting: list[trio.Event] = []
        self.committing = False

    def _sync(self) -> None:
        raise NotImplementedError

    async def _durable(self) -> None:
        done = trio.Event()
        self.waiting.append(done)
        if not self.committing:
            self.committing = True
            try:
                # Let every request already received make its change first:
                # they share this sync.
                await trio.lowlevel.cancel_shielded_checkpoint()
                while self.waiting:
                    batch, self.waiting = self.waiting, []
                    self._sync()
                    for ev in batch:
                        ev.set()
            finally:
                self.committing = False
        await done.wait()


class IdealServer(_GroupSync):
    """The cycle's SQL and a group commit; see the module docstring."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.db = _open_db(path)
        self.next_vnode = 2
        self.in_txn = False

    def _begin(self) -> None:
        if not self.in_txn:
            self.db.execute("BEGIN IMMEDIATE")
            self.in_txn = True

    def _sync(self) -> None:
        self.db.execute("COMMIT")
        self.in_txn = False

    async def create(self, d: int, name: bytes) -> int:
        self._begin()
        v = self.next_vnode
        self.next_vnode += 1
        self.db.execute("INSERT INTO vnodes VALUES (?, 0, 0)", (v,))
        self.db.execute("INSERT INTO dirents VALUES (?, ?, ?)", (d, name, v))
        await self._durable()
        return v

    async def store(self, v: int, data: bytes) -> int:
        self._begin()
        self.db.execute("INSERT OR REPLACE INTO data VALUES (?, ?)", (v, data))
        self.db.execute("UPDATE vnodes SET size = ?, dv = dv + 1 WHERE vnode = ?", (len(data), v))
        await self._durable()
        return len(data)

    async def unlink(self, d: int, name: bytes) -> int:
        row = self.db.execute(
            "SELECT vnode FROM dirents WHERE dir = ? AND name = ?", (d, name)
        ).fetchone()
        if row is None:
            return -1
        self._begin()
        self.db.execute("DELETE FROM dirents WHERE dir = ? AND name = ?", (d, name))
        self.db.execute("DELETE FROM vnodes WHERE vnode = ?", (row[0],))
        self.db.execute("DELETE FROM data WHERE vnode = ?", (row[0],))
        await self._durable()
        return row[0]


class IdealLogServer(_GroupSync):
    """The cycle on dicts and an append-only log; see the module docstring."""

    #: Bytes of log written (and synced) before the first request, so a
    #: group's sync changes no block or size; past it the log grows.
    PREALLOCATE = 256 << 20

    def __init__(self, path: Path, preallocate: int = PREALLOCATE) -> None:
        super().__init__()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        chunk = bytes(1 << 20)
        for _ in range(preallocate // len(chunk)):
            os.write(self.fd, chunk)
        os.fsync(self.fd)
        self.pos = 0
        self.packer = msgpack.Packer(use_bin_type=True)
        self.dirents: dict[tuple[int, bytes], int] = {}
        self.vnodes: dict[int, list[int]] = {}
        self.data: dict[int, bytes] = {}
        self.next_vnode = 2
        self.log = bytearray()

    def _sync(self) -> None:
        out, self.log = bytes(self.log), bytearray()
        os.pwrite(self.fd, out, self.pos)
        self.pos += len(out)
        os.fdatasync(self.fd)

    async def _logged(self, record: tuple[Any, ...]) -> None:
        """Log ``record``; return once a write + fdatasync covered it."""
        self.log += self.packer.pack(record)
        await self._durable()

    async def create(self, d: int, name: bytes) -> int:
        v = self.next_vnode
        self.next_vnode += 1
        self.vnodes[v] = [0, 0]
        self.dirents[(d, name)] = v
        await self._logged(("c", d, name, v))
        return v

    async def store(self, v: int, data: bytes) -> int:
        self.data[v] = data
        st = self.vnodes[v]
        st[0], st[1] = len(data), st[1] + 1
        await self._logged(("s", v, data))
        return len(data)

    async def unlink(self, d: int, name: bytes) -> int:
        v = self.dirents.pop((d, name), None)
        if v is None:
            return -1
        self.vnodes.pop(v, None)
        self.data.pop(v, None)
        await self._logged(("u", d, name))
        return v


async def _serve_ideal(server: IdealServer | IdealLogServer, stream: trio.SocketStream) -> None:
    methods = {"create": server.create, "store": server.store, "unlink": server.unlink}
    packer = msgpack.Packer(use_bin_type=True)
    unpacker = msgpack.Unpacker(raw=False)

    async def run(msgid: int, method: str, args: list[Any]) -> None:
        result = await methods[method](*args)
        await stream.send_all(packer.pack([msgid, result]))

    async with trio.open_nursery() as nursery:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            unpacker.feed(data)
            for msgid, method, args in unpacker:
                nursery.start_soon(run, msgid, method, args)


async def _ideal_main(directory: str, store: str) -> None:
    server: IdealServer | IdealLogServer
    if store == "log":
        server = IdealLogServer(Path(directory) / "ideal.log")
    else:
        server = IdealServer(Path(directory) / "ideal.db")
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, partial(_serve_ideal, server), 0, host="127.0.0.1")
        )
        print(listeners[0].socket.getsockname()[1], flush=True)


class _Client:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.packer = msgpack.Packer(use_bin_type=True)
        self.unpacker = msgpack.Unpacker(raw=False)
        self.msgid = 0

    async def call(self, method: str, *args: Any) -> Any:
        self.msgid += 1
        await self.stream.send_all(self.packer.pack([self.msgid, method, list(args)]))
        while True:
            for _msgid, result in self.unpacker:
                return result
            self.unpacker.feed(await self.stream.receive_some(65536))


async def _cycles(port: int, sessions: int, seconds: float) -> float:
    """Create + 4 KiB store + unlink cycles per second over ``sessions``."""
    done = [0]
    start = trio.Event()
    warm = trio.Event()
    ready = [0]
    t_end = [0.0]

    async def session(i: int) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = _Client(stream)
        d = 1000 + i
        for k in range(50):  # warm-up
            v = await c.call("create", d, b"w%d" % k)
            await c.call("store", v, PAYLOAD)
            await c.call("unlink", d, b"w%d" % k)
        ready[0] += 1
        if ready[0] == sessions:
            warm.set()
        await start.wait()
        k = 0
        while time.perf_counter() < t_end[0]:
            name = b"f%d" % k
            v = await c.call("create", d, name)
            await c.call("store", v, PAYLOAD)
            await c.call("unlink", d, name)
            done[0] += 1
            k += 1
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        for i in range(sessions):
            nursery.start_soon(session, i)
        await warm.wait()  # every session warmed up before the clock starts
        t0 = time.perf_counter()
        t_end[0] = t0 + seconds
        start.set()
    return done[0] / (time.perf_counter() - t0)


# -- driver ---------------------------------------------------------------------


def _spawn(*args: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        raise RuntimeError(f"{args[0]} server did not start")
    return proc, int(line)


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def round_trip_and_commit(directory: Path, runs: int = 3, echo_n: int = 5000,
                          commit_n: int = 2000) -> dict[str, list[float]]:  # fmt: skip
    """``runs`` samples (us) of the raw round trip, the durable COMMIT and
    the 4 KiB write + fdatasync into preallocated space."""
    out: dict[str, list[float]] = {"echo_us": [], "commit_us": [], "sync_us": []}
    proc, port = _spawn("--serve-echo")
    try:
        for _ in range(runs):
            out["echo_us"].append(trio.run(_echo_rtt, port, echo_n) * 1e6)
    finally:
        _stop(proc)
    for _ in range(runs):
        out["commit_us"].append(commit_cost(directory, commit_n) * 1e6)
        out["sync_us"].append(append_sync_cost(directory, commit_n) * 1e6)
    return out


def measure(runs: int, seconds: float, sessions: list[int], directory: Path) -> dict[str, Any]:
    out: dict[str, Any] = dict(round_trip_and_commit(directory, runs))
    out["cycles"] = {n: [] for n in sessions}
    out["cycles_log"] = {n: [] for n in sessions}
    for _ in range(runs):
        for n in sessions:
            with tempfile.TemporaryDirectory(dir=directory) as tmp:
                for store, key in (("sqlite", "cycles"), ("log", "cycles_log")):
                    proc, port = _spawn("--serve-ideal", tmp, "--store", store)
                    try:
                        out[key][n].append(trio.run(_cycles, port, n, seconds))
                    finally:
                        _stop(proc)
    return out


def report(res: dict[str, Any]) -> str:
    med = statistics.median
    echo, commit = med(res["echo_us"]), med(res["commit_us"])
    lines = [
        "| floor | median | runs |",
        "|---|---:|---|",
        f"| trio TCP round trip, two processes (us) | {echo:.0f} | "
        + " / ".join(f"{x:.0f}" for x in res["echo_us"])
        + " |",
        f"| durable SQLite COMMIT, WAL + synchronous=FULL (us) | {commit:.0f} | "
        + " / ".join(f"{x:.0f}" for x in res["commit_us"])
        + " |",
        f"| 4 KiB write into preallocated space + fdatasync (us) | {med(res['sync_us']):.0f} | "
        + " / ".join(f"{x:.0f}" for x in res["sync_us"])
        + " |",
        f"| one durable RPC: round trip + the cheaper of the two (us) | "
        f"{echo + min(commit, med(res['sync_us'])):.0f} | |",
    ]
    for key, what in (("cycles", "SQLite"), ("cycles_log", "log + fdatasync")):
        for n, vals in res.get(key, {}).items():
            lines.append(
                f"| ideal server ({what}), create + 4 KiB store + unlink cycles/s, "
                f"{n} session(s) | {med(vals):,.0f} | "
                + " / ".join(f"{x:,.0f}" for x in vals)
                + " |"
            )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--sessions", default="1,16")
    ap.add_argument("--dir", type=Path, default=REPO.parent, help="where the databases live")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--serve-echo", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--serve-ideal", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--store", choices=("sqlite", "log"), default="sqlite",
                    help=argparse.SUPPRESS)  # fmt: skip
    args = ap.parse_args()
    if args.serve_echo:

        async def serve_echo() -> None:
            async with trio.open_nursery() as nursery:
                ls = await nursery.start(partial(trio.serve_tcp, _echo_handler, 0,
                                                 host="127.0.0.1"))  # fmt: skip
                print(ls[0].socket.getsockname()[1], flush=True)

        trio.run(serve_echo)
        return 0
    if args.serve_ideal:
        trio.run(_ideal_main, args.serve_ideal, args.store)
        return 0
    sessions = [int(x) for x in args.sessions.split(",")]
    res = measure(args.runs, args.seconds, sessions, args.dir)
    print(f"The floor on this machine ({os.cpu_count()} cores), {args.runs} runs:\n")
    print(report(res))
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Fileserver benchmarks: callback table speed and memory, break fan-out.

    .venv/bin/python scripts/bench_server.py [--promises 1000000] [--clients 100]

Measures, and prints as a table of medians:
- grants, renewals and fid breaks per second on a table holding N promises;
- memory per promise (tracemalloc, table structures only);
- wall time of one FS.StoreData that breaks the promises of C other clients
  (C protocol clients on loopback, in this process; the server runs as a
  subprocess so client-side work does not share its event loop), next to
  the same store with nobody to break.

Goals (issue 3): < 300 bytes per promise; 100-client fan-out < 50 ms.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fileserver.callback import CallbackTable  # noqa: E402
from protocol.connection import open_connection  # noqa: E402


def build_table(n: int, clients: int, per_fid: int = 10) -> tuple[CallbackTable, list[int], int]:
    """N promises over N/per_fid fids, spread across ``clients`` clients."""
    t = CallbackTable(max_promises=n * 2)
    cids = [t.new_client() for _ in range(clients)]
    nfids = n // per_fid
    for i in range(nfids):
        fid = (536870912, i + 2, i + 2)
        base = (i * 7) % clients
        for j in range(per_fid):
            t.grant(cids[(base + j) % clients], fid)
    return t, cids, nfids


def bench_table(n: int, rounds: int) -> dict[str, float]:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    t, cids, nfids = build_table(n, 1000)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    mem = (after - before) / t.count
    del t
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    t, cids, nfids = build_table(n, 1000, per_fid=1)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    mem1 = (after - before) / t.count
    del t
    gc.collect()

    t, cids, nfids = build_table(n, 1000)
    assert t.count >= n * 0.99
    batch = 100_000
    grants, renews, breaks = [], [], []
    extra = nfids + 10
    for r in range(rounds):
        # new grants: fresh fids, one holder each (the table grows past N)
        t0 = time.perf_counter()
        for i in range(batch):
            t.grant(cids[i % len(cids)], (536870912, extra + i, 1))
        grants.append(batch / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for i in range(batch):
            t.grant(cids[i % len(cids)], (536870912, extra + i, 1))
        renews.append(batch / (time.perf_counter() - t0))
        # breaks: each of these fids has 10 holders in the 1M table
        lo = (r * 10_000) % max(1, nfids - 10_000)
        t0 = time.perf_counter()
        for i in range(lo, lo + 10_000):
            t.break_fid((536870912, i + 2, i + 2), None)
        breaks.append(10_000 / (time.perf_counter() - t0))
        for i in range(batch):  # back to N for the next round
            t.break_fid((536870912, extra + i, 1), None)
        for i in range(lo, lo + 10_000):  # re-grant what we broke
            base = (i * 7) % len(cids)
            for j in range(10):
                t.grant(cids[(base + j) % len(cids)], (536870912, i + 2, i + 2))
    return {
        "promises held": t.count,
        "grants/s (new)": statistics.median(grants),
        "grants/s (renew)": statistics.median(renews),
        "fid breaks/s (10 holders each)": statistics.median(breaks),
        "promise removals/s": statistics.median(breaks) * 10,
        "bytes per promise": mem,
        "bytes per promise (1 holder/fid)": mem1,
    }


def start_server(data_dir: Path) -> tuple[subprocess.Popen[bytes], str, int]:
    cmd = [sys.executable, "-m", "fileserver.cli", "serve", "--data-dir", str(data_dir),
           "--listen", "127.0.0.1:0", "--break-timeout", "5"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO))
    log = open(data_dir.parent / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    addr = data_dir / "address"
    for _ in range(1000):
        if addr.exists():
            host, _, port = addr.read_text().strip().rpartition(":")
            return proc, host, int(port)
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    proc.kill()
    raise SystemExit("server did not start; see " + str(data_dir.parent / "server.log"))


async def bench_fanout(nclients: int, rounds: int, host: str, port: int) -> dict[str, float]:
    got = [0]

    async def on_break(conn: object, fids: list[object]) -> None:
        got[0] += 1

    async def on_init(conn: object, server_uuid: str) -> None:
        return None

    handlers = {"CB.CallBack": on_break, "CB.InitCallBackState3": on_init}
    conns = []
    async with trio.open_nursery() as nursery:

        async def client(ready: trio.Event, task_status=trio.TASK_STATUS_IGNORED) -> None:
            async with open_connection(host, port, handlers) as conn:
                await conn.call("FS.Hello", {"uuid": str(uuid.uuid4()), "version": 1})
                conns.append(conn)
                task_status.started()
                await ready.wait()

        done = trio.Event()
        for _ in range(nclients + 1):
            await nursery.start(client, done)
        x, others = conns[0], conns[1:]
        e = await x.call("VL.GetEntryByName", "root.cell")
        root = [e["volume_id"], 1, 1]
        fid = (await x.call("FS.CreateFile", None, root, b"bench-%d" % time.time_ns(), 0o644))[
            "fid"
        ]
        lone = (await x.call("FS.CreateFile", None, root, b"lone-%d" % time.time_ns(), 0o644))[
            "fid"
        ]
        with_breaks, without = [], []
        for r in range(rounds):
            async with trio.open_nursery() as n2:
                for c in others:
                    n2.start_soon(c.call, "FS.FetchStatus", None, fid)
            got[0] = 0
            t0 = time.perf_counter()
            await x.call("FS.StoreData", None, fid, 0, b"x%d" % r, None, None)
            with_breaks.append((time.perf_counter() - t0) * 1000)
            assert got[0] == nclients, (got[0], nclients)
            t0 = time.perf_counter()
            await x.call("FS.StoreData", None, lone, 0, b"y%d" % r, None, None)
            without.append((time.perf_counter() - t0) * 1000)
        done.set()
    w, wo = statistics.median(with_breaks), statistics.median(without)
    return {
        f"store breaking {nclients} clients (ms)": w,
        "store breaking nobody (ms)": wo,
        f"break fan-out to {nclients} clients (ms)": w - wo,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--promises", type=int, default=1_000_000)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    results: dict[str, float] = {}
    print(f"callback table with {args.promises:,} promises ...", flush=True)
    results.update(bench_table(args.promises, args.rounds))
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "fs"
        proc, host, port = start_server(data_dir)
        try:
            print(f"break fan-out to {args.clients} clients on {host}:{port} ...", flush=True)
            results.update(trio.run(bench_fanout, args.clients, max(args.rounds, 9), host, port))
        finally:
            proc.terminate()
            proc.wait(20)
    width = max(len(k) for k in results)
    print(f"\n{'metric'.ljust(width)}  median")
    print(f"{'-' * width}  {'-' * 14}")
    for k, v in results.items():
        print(f"{k.ljust(width)}  {v:14,.1f}")
    mem = max(results["bytes per promise"], results["bytes per promise (1 holder/fid)"])
    fan = results[f"break fan-out to {args.clients} clients (ms)"]
    print(f"\ngoals: bytes/promise < 300: {'OK' if mem < 300 else 'MISSED'}; "
          f"{args.clients}-client store < 50 ms: "
          f"{'OK' if results[f'store breaking {args.clients} clients (ms)'] < 50 else 'MISSED'}"
          f" (fan-out alone {fan:.1f} ms)")  # fmt: skip


if __name__ == "__main__":
    main()

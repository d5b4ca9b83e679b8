#!/usr/bin/env python3
"""Benchmark the msgpack-RPC layer over loopback TCP.

Starts a server subprocess on 127.0.0.1 (its own process, so client and
server each get a core), then measures, several runs each, median first:
small round trips per second sequentially and with 64 calls in flight, and
MB/s for 1 MiB payloads sent (store-like) and received (fetch-like).

    .venv/bin/python scripts/bench_rpc.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol.connection import open_connection, serve_tcp

MIB = 1 << 20
PAYLOAD = os.urandom(MIB)


async def h_echo(conn, x):
    return x


async def h_sink(conn, data):
    return len(data)


async def h_source(conn, n):
    return PAYLOAD[:n]


HANDLERS = {"echo": h_echo, "sink": h_sink, "source": h_source}


async def serve() -> None:
    async def on_connection(conn):
        await conn.run()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve_tcp, on_connection, "127.0.0.1", 0, HANDLERS)
        print(listeners[0].socket.getsockname()[1], flush=True)


async def in_flight(conn, method, arg, total, width):
    """``total`` calls with ``width`` callers; returns seconds."""
    per = total // width

    async def worker():
        for _ in range(per):
            await conn.call(method, arg)

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(width):
            nursery.start_soon(worker)
    return time.perf_counter() - t0, per * width


async def measure(port: int, runs: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in ("seq", "par64", "send", "recv")}
    async with open_connection("127.0.0.1", port) as conn:
        await in_flight(conn, "echo", 1, 2000, 64)  # warm up
        for _ in range(runs):
            secs, n = await in_flight(conn, "echo", 1, 5000, 1)
            out["seq"].append(n / secs)
            secs, n = await in_flight(conn, "echo", 1, 64 * 500, 64)
            out["par64"].append(n / secs)
            secs, n = await in_flight(conn, "sink", PAYLOAD, 256, 4)
            out["send"].append(n * MIB / secs / 1e6)
            secs, n = await in_flight(conn, "source", MIB, 256, 4)
            out["recv"].append(n * MIB / secs / 1e6)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        trio.run(serve)
        return 0
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True
    )
    try:
        port = int(server.stdout.readline())
        results = trio.run(measure, port, args.runs)
    finally:
        server.terminate()
        try:
            server.wait(5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    rows = [
        ("small calls/s, sequential", "seq", None),
        ("small calls/s, 64 in flight", "par64", 20_000),
        ("MB/s, 1 MiB payloads sent", "send", 400),
        ("MB/s, 1 MiB payloads received", "recv", 400),
    ]
    print(f"RPC over loopback TCP, {args.runs} runs, {os.cpu_count()} cores\n")
    print("| workload | median | min | max | goal | met |")
    print("|---|---:|---:|---:|---:|---|")
    ok = True
    for label, key, goal in rows:
        vals = results[key]
        med = statistics.median(vals)
        met = "" if goal is None else ("yes" if med >= goal else "NO")
        ok &= met != "NO"
        print(
            f"| {label} | {med:,.0f} | {min(vals):,.0f} | {max(vals):,.0f} | "
            f"{'' if goal is None else f'>= {goal:,}'} | {met} |"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

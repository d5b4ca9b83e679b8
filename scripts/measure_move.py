"""Measure ``vol move`` on 127.0.0.1: a volume of N files moves back and
forth between two in-process fileservers (VLDB on a real single-node etcd)
while a writer keeps storing to it; prints, per move, the seconds it took,
the rounds, the files sent in the final round and how long that round held
the volume (calls to it wait that long), then the medians.

    .venv/bin/python scripts/measure_move.py --files 200 --size 65536 --moves 5

Every loop is bounded (moves, files, the writer stops with the last move).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import trio

from afsfuse.lab.etcd import EtcdCluster
from afsfuse.lab.server import fs_client, running_server
from protocol.errors import RpcError


async def _admin(srv, method, *params):
    async with fs_client(srv.host, srv.port, auth=False, hello=False) as c:
        await c.call("Admin.Auth", srv.admin_secret)
        return await c.call(method, *params, timeout=600)


async def main(args: argparse.Namespace, base: Path) -> None:
    with EtcdCluster(base / "etcd") as etcd:
        key = base / "a" / "cell.key"
        async with (
            running_server(base / "a", vldb=etcd.url) as a,
            running_server(base / "b", vldb=etcd.url, key_file=key, create_root=False) as b,
        ):
            h = await a.store.create("bench", random_ids=True)
            root = [h.id, 1, 1]
            payload = b"x" * args.size
            fids = []
            async with fs_client(a.host, a.port) as c:
                for i in range(args.files):
                    f = await c.call("FS.CreateFile", None, root, f"f{i}".encode(), 0o644)
                    await c.call("FS.StoreData", None, f["fid"], 0, payload, None, None)
                    fids.append(f["fid"])
            where = [a, b]
            rows = []
            stores = 0
            stop = trio.Event()

            async def writer() -> None:
                # Stores one file after another to whichever server holds it.
                nonlocal stores
                i = 0
                while not stop.is_set() and i < 100_000:
                    srv = where[0]
                    try:
                        async with fs_client(srv.host, srv.port) as c:
                            while not stop.is_set():
                                fid = fids[i % len(fids)]
                                await c.call("FS.StoreData", None, fid, 0, payload, None, None)
                                stores += 1
                                i += 1
                    except* (RpcError, OSError):
                        await trio.sleep(0.01)  # moved: reconnect to the new holder

            async with trio.open_nursery() as n:
                n.start_soon(writer)
                for _ in range(args.moves):
                    src, dst = where
                    t0 = time.monotonic()
                    r = await _admin(src, "Admin.VolMove", "bench", dst.host, dst.port)
                    rows.append((time.monotonic() - t0, r["rounds"], r["changed_meanwhile"],
                                 r["held_ms"], r["bytes_sent"]))  # fmt: skip
                    where.reverse()
                stop.set()
    print(f"{args.files} files of {args.size} bytes, {args.moves} moves, "
          f"{stores} stores by the writer meanwhile")  # fmt: skip
    print("seconds  rounds  final_files  held_ms  bytes_sent")
    for s, rounds, ch, held, sent in rows:
        print(f"{s:7.3f}  {rounds:6d}  {ch:11d}  {held:7.1f}  {sent}")
    print(
        f"median: {statistics.median(r[0] for r in rows):.3f} s per move, "
        f"final round held the volume {statistics.median(r[3] for r in rows):.1f} ms"
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--files", type=int, default=200)
    p.add_argument("--size", type=int, default=65536)
    p.add_argument("--moves", type=int, default=5)
    ns = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="afs-move-") as d:
        trio.run(main, ns, Path(d))

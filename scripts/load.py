#!/usr/bin/env python3
"""Load test: protocol-level sessions and real mounts against one fileserver.

    .venv/bin/python scripts/load.py [--duration 60] [--sessions 20] [--mounts 2] [--json]

Starts a fileserver (subprocess, 127.0.0.1, random port) and ``--mounts``
real client mounts, then for ``--duration`` seconds runs ``--sessions``
authenticated protocol-level client sessions (each as its own uid, in its
own directory: create, store, fetch, status, lookup, readdir, rename,
remove) and one worker per mount (write/read/stat/list/create/unlink) at
the same time, while sampling the server's RSS.

Checks, at the end: no operation failed; no lost update: every file's last
acknowledged write (close() returned, or StoreData answered) is what every
reader sees (both mounts and a protocol session read every file); the
server's peak RSS stays under ``--max-rss-mb``.  Prints operations/s,
errors and peak RSS; exits 1 if a check failed.  Every process it starts is
stopped by pid and every mount unmounted in ``finally``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from afsfuse.lab.mount import ClientMount  # noqa: E402
from afsfuse.lab.server import ServerProcess, fs_client  # noqa: E402
from protocol.errors import RpcError  # noqa: E402

log = logging.getLogger(__name__)

FILES_PER_WRITER = 8
MAX_DATA = 48 * 1024


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Tally:
    def __init__(self) -> None:
        self.ops: Counter[str] = Counter()
        self.errors: list[str] = []
        #: path relative to the volume root -> last acknowledged content
        self.last: dict[str, bytes] = {}

    def error(self, text: str) -> None:
        if len(self.errors) < 1000:
            self.errors.append(text)
        log.warning("load error: %s", text)


def payload(rng: random.Random, tag: str) -> bytes:
    head = f"{tag} {time.time_ns()} ".encode()
    return head + rng.randbytes(rng.randrange(0, MAX_DATA))


# -- protocol-level sessions -------------------------------------------------------


async def session(srv: ServerProcess, i: int, end: float, tally: Tally) -> None:
    rng = random.Random(i)
    uid = 2000 + i
    cred = [uid, uid, []]
    async with fs_client(srv.host, srv.port) as c:
        root = await c.root_fid()
        name = f"s{i:02d}".encode()
        d = (await c.call("FS.MakeDir", cred, root, name, 0o755))["fid"]
        fids: dict[bytes, list[int]] = {}
        for k in range(FILES_PER_WRITER):
            fname = b"f%d" % k
            fids[fname] = (await c.call("FS.CreateFile", cred, d, fname, 0o644))["fid"]
            tally.last[f"{name.decode()}/{fname.decode()}"] = b""
        tmp_n = 0
        while trio.current_time() < end:
            op = rng.choice(["store", "store", "fetch", "fetch", "status", "lookup", "readdir",
                             "tmp", "rootdir"])  # fmt: skip
            fname = rng.choice(sorted(fids))
            path = f"{name.decode()}/{fname.decode()}"
            try:
                if op == "store":
                    data = payload(rng, path)
                    await c.call("FS.StoreData", cred, fids[fname], 0, data, len(data), None)
                    tally.last[path] = data
                elif op == "fetch":
                    r = await c.call("FS.FetchData", cred, fids[fname], 0, MAX_DATA + 100)
                    if r["data"] != tally.last[path]:
                        tally.error(f"session {i}: {path} lost its last store")
                elif op == "status":
                    await c.call("FS.FetchStatus", cred, fids[fname])
                elif op == "lookup":
                    r = await c.call("FS.Lookup", cred, d, fname)
                    if r["fid"] != fids[fname]:
                        tally.error(f"session {i}: lookup {path} gave another fid")
                elif op == "readdir":
                    r = await c.call("FS.ReadDir", cred, d, None, 100, True)
                    if len(r["entries"]) != FILES_PER_WRITER:
                        tally.error(f"session {i}: {len(r['entries'])} entries in its dir")
                elif op == "tmp":
                    tmp_n += 1
                    t = b"tmp%d" % tmp_n
                    await c.call("FS.CreateFile", cred, d, t, 0o600)
                    await c.call("FS.Rename", cred, d, t, d, t + b".r", 0)
                    await c.call("FS.RemoveFile", cred, d, t + b".r")
                    tally.ops["session"] += 2
                else:
                    await c.call("FS.ReadDir", cred, root, None, 50, False)
                tally.ops["session"] += 1
            except RpcError as exc:
                tally.error(f"session {i}: {op} {path}: {exc}")


# -- mount workers (threads: file syscalls block) ---------------------------------------


def mount_worker(m: ClientMount, idx: int, end: float, tally: Tally) -> None:
    rng = random.Random(1000 + idx)
    tag = f"m{idx}"
    mine = [f"{tag}-{k}" for k in range(FILES_PER_WRITER)]
    for name in mine:
        (m.mnt / name).write_bytes(b"")
        tally.last[name] = b""
    n = 0
    while time.monotonic() < end:
        op = rng.choice(["write", "write", "read", "read", "stat", "list", "tmp", "other"])
        name = rng.choice(mine)
        try:
            if op == "write":
                data = payload(rng, name)
                with open(m.mnt / name, "wb") as f:
                    f.write(data)
                tally.last[name] = data  # close() returned: acknowledged
            elif op == "read":
                if (m.mnt / name).read_bytes() != tally.last[name]:
                    tally.error(f"mount {idx}: {name} does not read back its last write")
            elif op == "stat":
                os.stat(m.mnt / name)
            elif op == "list":
                os.listdir(m.mnt)
            elif op == "tmp":
                n += 1
                t = m.mnt / f"{tag}-tmp{n}"
                t.write_bytes(b"t" * rng.randrange(1, 5000))
                t.rename(m.mnt / f"{tag}-tmp{n}.r")
                os.unlink(m.mnt / f"{tag}-tmp{n}.r")
                tally.ops["mount"] += 2
            else:
                other = [p for p in tally.last if not p.startswith(tag)]
                if other:
                    (m.mnt / rng.choice(other)).read_bytes()
            tally.ops["mount"] += 1
        except OSError as exc:
            tally.error(f"mount {idx}: {op} {name}: {exc!r}")


# -- the run -------------------------------------------------------------------------


async def final_check(srv: ServerProcess, mounts: list[ClientMount], tally: Tally) -> int:
    """Every reader sees every file's last acknowledged write; returns lost updates."""
    lost = 0
    for m in mounts:
        for path, data in tally.last.items():
            got = await trio.to_thread.run_sync((m.mnt / path).read_bytes)
            if got != data:
                lost += 1
                tally.error(f"lost update: {path} as seen by mount {m.workdir.name}")
    async with fs_client(srv.host, srv.port) as c:
        root = await c.root_fid()
        for path, data in tally.last.items():
            fid = root
            for part in path.split("/"):
                fid = (await c.call("FS.Lookup", None, fid, part.encode()))["fid"]
            got = (await c.call("FS.FetchData", None, fid, 0, MAX_DATA + 100))["data"]
            if got != data:
                lost += 1
                tally.error(f"lost update: {path} as seen by a protocol session")
    return lost


async def run(args: argparse.Namespace, srv: ServerProcess, mounts: list[ClientMount]) -> dict:
    tally = Tally()
    samples: list[int] = []
    t0 = time.monotonic()
    end_trio = trio.current_time() + args.duration
    end_mono = t0 + args.duration

    async def sampler() -> None:
        while True:
            samples.append(rss_kb(srv.pid))
            await trio.sleep(0.5)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sampler)
        async with trio.open_nursery() as work:
            for i in range(args.sessions):
                work.start_soon(session, srv, i, end_trio, tally)
            for idx, m in enumerate(mounts):
                work.start_soon(trio.to_thread.run_sync, mount_worker, m, idx, end_mono, tally)
        elapsed = time.monotonic() - t0
        lost = await final_check(srv, mounts, tally)
        samples.append(rss_kb(srv.pid))
        nursery.cancel_scope.cancel()
    ops = sum(tally.ops.values())
    return {
        "duration_s": round(elapsed, 2),
        "sessions": args.sessions,
        "mounts": len(mounts),
        "ops": ops,
        "ops_per_s": round(ops / elapsed, 1),
        "session_ops": tally.ops["session"],
        "mount_ops": tally.ops["mount"],
        "errors": len(tally.errors),
        "lost_updates": lost,
        "files_checked": len(tally.last),
        "rss_start_mb": round(samples[0] / 1024, 1) if samples else 0,
        "rss_peak_mb": round(max(samples) / 1024, 1) if samples else 0,
        "rss_end_mb": round(samples[-1] / 1024, 1) if samples else 0,
        "first_errors": tally.errors[:5],
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    ap.add_argument("--sessions", type=int, default=20, help="protocol-level sessions")
    ap.add_argument("--mounts", type=int, default=2, help="real client mounts")
    ap.add_argument("--max-rss-mb", type=float, default=512.0, help="server RSS bound")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temp dir, removed")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="afsfuse-load-"))
    work.mkdir(parents=True, exist_ok=True)
    srv = ServerProcess(work / "fs", events=False)  # a default deployment
    mounts: list[ClientMount] = []
    try:
        srv.start()
        for k in range(args.mounts):
            mounts.append(ClientMount(srv, work / f"m{k}", events=False).start())
        result = trio.run(run, args, srv, mounts)
    finally:
        for m in mounts:
            m.stop()
        srv.stop()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    ok = result["errors"] == 0 and result["lost_updates"] == 0
    ok = ok and result["rss_peak_mb"] <= args.max_rss_mb
    result["ok"] = ok
    if args.json:
        print(json.dumps(result))
    else:
        print(f"load: {result['duration_s']} s, {args.sessions} sessions + {len(mounts)} mounts")
        print(f"load: {result['ops']} operations, {result['ops_per_s']} ops/s "
              f"({result['session_ops']} protocol, {result['mount_ops']} mount)")  # fmt: skip
        print(f"load: errors {result['errors']}, lost updates {result['lost_updates']} "
              f"of {result['files_checked']} files")  # fmt: skip
        print(f"load: server RSS start {result['rss_start_mb']} MB, peak "
              f"{result['rss_peak_mb']} MB, end {result['rss_end_mb']} MB")  # fmt: skip
        for e in result["first_errors"]:
            print(f"load: error: {e}")
        print("load: OK" if ok else "load: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

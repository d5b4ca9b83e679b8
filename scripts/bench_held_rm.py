#!/usr/bin/env python3
"""What another client's promises cost a removal: ``rm -rf`` through mount A,
alone and after mount B listed every file (``ls -lR``, so B holds a promise
on each and every removal breaks one).

Starts a fileserver and two mounts on 127.0.0.1; each of ``--runs`` rounds
builds ``--dirs`` directories of ``--files`` 100-byte files on A twice and
removes them, once alone and once held by B (in that order), timing the
``rm -rf`` and the CPU seconds A's daemon, B's daemon and the server spent
in it; then prints the medians.  The difference between the two rows is
the break's: the server telling B, B answering and telling its kernel.

    .venv/bin/python scripts/bench_held_rm.py [--dirs 20 --files 100 --runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from afsfuse.lab.cpu import cpu_seconds
from afsfuse.lab.mount import ClientMount
from afsfuse.lab.server import ServerProcess


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dirs", type=int, default=20)
    ap.add_argument("--files", type=int, default=100, help="per directory")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="afsfuse-held-rm-"))
    rows: dict[str, list[tuple[float, dict[str, float]]]] = {"alone": [], "held by B": []}
    try:
        with ServerProcess(work / "fs", events=False) as srv, \
                ClientMount(srv, work / "a", events=False) as a, \
                ClientMount(srv, work / "b", events=False) as b:  # fmt: skip
            pids = {"A": a.pid, "B": b.pid, "server": srv.pid}
            for r in range(args.runs):
                for mode in rows:
                    top = a.mnt / f"run{r}-{mode.replace(' ', '-')}"
                    top.mkdir()
                    for d in range(args.dirs):
                        (top / f"d{d}").mkdir()
                        for i in range(args.files):
                            (top / f"d{d}" / f"f{i}").write_bytes(b"x" * 100)
                    if mode != "alone":
                        listing = ["ls", "-lR", str(b.mnt / top.name)]
                        subprocess.run(listing, stdout=subprocess.DEVNULL, check=True, timeout=300)
                    os.sync()
                    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
                    t0 = time.perf_counter()
                    subprocess.run(["rm", "-rf", str(top)], check=True, timeout=600)
                    wall = time.perf_counter() - t0
                    cpu = {k: cpu_seconds(p) - cpu0[k] for k, p in pids.items()}
                    rows[mode].append((wall, cpu))
                    spent = ", ".join(f"{k} {v:.2f} s" for k, v in cpu.items())
                    print(f"run {r + 1} {mode}: {wall:.2f} s, CPU {spent}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = args.dirs * (args.files + 1)
    print(f"\nrm -rf of {n:,} entries, medians of {args.runs}")
    print(f"{'':>10}  {'wall s':>7}  {'A CPU s':>7}  {'B CPU s':>7}  {'server CPU s':>12}")
    for mode, got in rows.items():
        med = {k: statistics.median(c[k] for _, c in got) for k in ("A", "B", "server")}
        wall = statistics.median(w for w, _ in got)
        print(f"{mode:>10}  {wall:7.2f}  {med['A']:7.2f}  {med['B']:7.2f}  {med['server']:12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Where a client's time goes on everyday work: a profile driver.

Starts a fileserver and two mounts (A, B) on 127.0.0.1, then times, each
``--runs`` times on fresh directories:

- ``small_create``: A creates ``--files`` small files (open, write, close);
- ``small_stat_b``: B stats them all (cold: B never saw them);
- ``clone``: A runs ``git clone`` of a local repository this script makes
  (``--repo-files`` files in a nested tree, a few commits);
- ``status_b``: B runs ``git status`` and ``git log -1`` in that clone;
- ``tar``: A untars the repository's tree (``git archive`` of HEAD);
- ``rm``: A removes the small files and the clone (``rm -rf``).

For each step it prints the median wall time and what the step cost in
RPCs (client-side counters of A and B, by method) and FUSE requests.
``--profile STEP`` runs ``py-spy record`` on A's daemon (or B's, for the
``_b`` steps) during that step of the first run and prints the hottest
functions, self and inclusive; with ``--profile-server`` the
fileserver's process instead (where a mutation's CPU goes).  Needs ``py-spy`` in the venv for that
(``.venv/bin/pip install py-spy``).  ``--perf`` samples the same process
with Linux ``perf`` instead and prints its CPU by kind of code (the Python
interpreter, the kernel, SQLite, OpenSSL, libfuse and pyfuse3, msgpack,
libc) and the hottest native symbols: what py-spy cannot show, such as how
much of a daemon's time is system calls and copies rather than Python
(needs ``perf``: ``apt-get install linux-perf``).

    .venv/bin/python scripts/profile_client.py --runs 3
    .venv/bin/python scripts/profile_client.py --runs 1 --profile clone
    .venv/bin/python scripts/profile_client.py --runs 1 --profile rm --profile-server --perf
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from afsfuse.lab.cpu import cpu_seconds
from afsfuse.lab.mount import ClientMount
from afsfuse.lab.server import ServerProcess

STEPS = ("small_create", "small_stat_b", "clone", "status_b", "tar", "rm")
GIT_ENV = {
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "bench@example.org",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@example.org",
    "GIT_CONFIG_NOSYSTEM": "1",
    "HOME": "/nonexistent",
}


def git(*args: str, cwd: Path) -> str:
    env = {**os.environ, **GIT_ENV}
    out = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} in {cwd}: exit {out.returncode}: "
                           f"{out.stderr.decode(errors='replace').strip()}")  # fmt: skip
    return out.stdout.decode()


def make_repo(root: Path, files: int, commits: int = 5) -> Path:
    """A local repository: ``files`` small files, 10 per directory, 3 deep."""
    repo = root / "repo"
    repo.mkdir()
    git("init", "-q", "-b", "main", cwd=repo)
    per_commit = max(1, files // commits)
    for c in range(commits):
        for i in range(c * per_commit, min(files, (c + 1) * per_commit)):
            d = repo / f"d{i // 100 % 10}" / f"e{i // 10 % 10}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"f{i}.c").write_text(f"int f{i}(void) {{ return {i}; }}\n" * (1 + i % 7))
        git("add", "-A", cwd=repo)
        git("commit", "-q", "-m", f"commit {c}", cwd=repo)
    return repo


def counters(m: ClientMount) -> dict[str, Any]:
    s = m.stats()
    return {"rpc": dict(s["rpc"]), "fuse": dict(s["kernel_requests"])}


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for kind in ("rpc", "fuse"):
        d = {k: after[kind].get(k, 0) - before[kind].get(k, 0) for k in after[kind]}
        out[kind] = {k: v for k, v in sorted(d.items(), key=lambda kv: -kv[1]) if v}
    return out


class Profiler:
    """py-spy record on one pid for the length of a ``with`` block."""

    def __init__(self, pid: int, out: Path) -> None:
        self.pid, self.out = pid, out
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Profiler:
        spy = Path(sys.executable).parent / "py-spy"
        self.proc = subprocess.Popen(
            [str(spy), "record", "--pid", str(self.pid), "--format", "raw", "--rate", "200",
             "--output", str(self.out), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(1.0)  # let it attach
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(2)  # SIGINT: py-spy writes its output and exits
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class PerfProfiler:
    """``perf record`` on one pid for the length of a ``with`` block."""

    def __init__(self, pid: int, out: Path) -> None:
        self.pid, self.out = pid, out
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PerfProfiler:
        self.proc = subprocess.Popen(
            ["perf", "record", "-F", "999", "-p", str(self.pid), "-o", str(self.out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(0.5)  # let it attach
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(2)  # SIGINT: perf writes its data file and exits
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def report(self, sort: str) -> str:
        out = subprocess.run(
            ["perf", "report", "-i", str(self.out), "--stdio", "--no-children", "-n",
             "--sort", sort],
            capture_output=True, timeout=300,
        )  # fmt: skip
        return out.stdout.decode(errors="replace")


#: How ``perf report --sort dso`` names map to kinds of code, first match wins.
CODE_KINDS = (
    ("python", re.compile(r"^libpython|^python3")),
    ("kernel", re.compile(r"^\[kernel")),
    ("sqlite", re.compile(r"sqlite3")),
    ("tls", re.compile(r"^libcrypto|^libssl|^_ssl\.")),
    ("fuse", re.compile(r"^libfuse|^__init__\.cpython")),  # pyfuse3's module
    ("msgpack", re.compile(r"^_cmsgpack")),
    ("libc", re.compile(r"^libc\.|^libm\.|^ld-linux")),
)
_REPORT_ROW = re.compile(r"^\s*([0-9.]+)%\s+([0-9]+)\s+(.+?)\s*$")


def perf_rows(report: str) -> list[tuple[int, str]]:
    """(samples, name) per row of a ``perf report --stdio -n`` table."""
    rows = []
    for line in report.splitlines():
        if line.startswith("#"):
            continue
        m = _REPORT_ROW.match(line)
        if m:
            rows.append((int(m.group(2)), " ".join(m.group(3).split())))
    return rows


def code_kinds(dso_rows: list[tuple[int, str]]) -> dict[str, int]:
    """Samples per kind of code (``CODE_KINDS``; the rest is ``other``)."""
    out: dict[str, int] = collections.Counter()
    for n, dso in dso_rows:
        kind = next((k for k, rx in CODE_KINDS if rx.search(dso)), "other")
        out[kind] += n
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def summarize_perf(prof: PerfProfiler, top: int = 15) -> str:
    kinds = code_kinds(perf_rows(prof.report("dso")))
    total = sum(kinds.values())
    lines = [f"{total} samples (999 Hz: about {total / 999:.2f} CPU s)", "-- by kind of code --"]
    lines += [f"{100 * n / max(total, 1):5.1f}%  {k}" for k, n in kinds.items()]
    lines.append("-- hottest symbols --")
    for n, sym in perf_rows(prof.report("dso,sym"))[:top]:
        lines.append(f"{100 * n / max(total, 1):5.1f}%  {sym}")
    return "\n".join(lines)


def summarize_profile(path: Path, top: int = 25) -> str:
    """Hottest functions in a py-spy raw (collapsed stacks) file."""
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        count = int(n)
        total += count
        frames = stack.split(";")
        self_t[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    lines = [f"{total} samples"]
    lines.append("-- self --")
    for f, n in self_t.most_common(top):
        lines.append(f"{100 * n / max(total, 1):5.1f}%  {f}")
    lines.append("-- inclusive --")
    for f, n in incl.most_common(top):
        lines.append(f"{100 * n / max(total, 1):5.1f}%  {f}")
    return "\n".join(lines)


def run_once(a: ClientMount, b: ClientMount, srv: ServerProcess, repo: Path, n: int, files: int,
             profile: str | None, work: Path, profile_server: bool = False,
             use_perf: bool = False) -> dict[str, tuple[float, Any]]:  # fmt: skip
    out: dict[str, tuple[float, Any]] = {}
    top_a = a.mnt / f"run{n}"
    top_b = b.mnt / f"run{n}"
    top_a.mkdir()

    def step(name: str, fn: Any) -> None:
        m = b if name.endswith("_b") else a
        before_a, before_b = counters(a), counters(b)
        cpu0 = {k: cpu_seconds(p) for k, p in (("A", a.pid), ("B", b.pid), ("srv", srv.pid))}
        prof: Profiler | PerfProfiler | None = None
        if profile == name and n == 0:
            pid = srv.pid if profile_server else m.pid
            if use_perf:
                prof = PerfProfiler(pid, work / f"perf-{name}.data")
            else:
                prof = Profiler(pid, work / f"profile-{name}.txt")
            prof.__enter__()
        t0 = time.perf_counter()
        try:
            fn()
        finally:
            dt = time.perf_counter() - t0
            if prof is not None:
                prof.__exit__(None, None, None)
        cpu = {k: round(cpu_seconds(p) - cpu0[k], 2)
               for k, p in (("A", a.pid), ("B", b.pid), ("srv", srv.pid))}  # fmt: skip
        out[name] = (dt, {"A": delta(before_a, counters(a)), "B": delta(before_b, counters(b)),
                          "cpu": cpu})  # fmt: skip
        if prof is not None:
            who = "fileserver" if profile_server else ("B" if m is b else "A")
            if isinstance(prof, PerfProfiler):
                print(f"== perf, {name} ({who}):")
                print(summarize_perf(prof))
            else:
                print(f"== py-spy, {name} ({who}):")
                print(summarize_profile(prof.out))

    def small_create() -> None:
        d = top_a / "small"
        d.mkdir()
        for i in range(files):
            with open(d / f"s{i:05d}", "wb") as f:
                f.write(b"x" * (i % 200 + 1))

    def small_stat_b() -> None:
        d = top_b / "small"
        names = os.listdir(d)
        assert len(names) == files, (len(names), files)
        for name in names:
            os.stat(d / name)

    def clone() -> None:
        git("clone", "-q", "--no-hardlinks", str(repo), str(top_a / "clone"), cwd=work)

    def status_b() -> None:
        st = git("status", "--porcelain", cwd=top_b / "clone")
        assert st == "", st
        git("log", "-1", "--format=%H", cwd=top_b / "clone")

    def untar() -> None:
        d = top_a / "tar"
        d.mkdir()
        subprocess.run(["tar", "xf", str(work / "tree.tar"), "-C", str(d)], check=True,
                       timeout=600)  # fmt: skip

    def rm() -> None:
        shutil.rmtree(top_a)

    for name, fn in (("small_create", small_create), ("small_stat_b", small_stat_b),
                     ("clone", clone), ("status_b", status_b), ("tar", untar),
                     ("rm", rm)):  # fmt: skip
        step(name, fn)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--repo-files", type=int, default=1000)
    ap.add_argument("--profile", choices=STEPS)
    ap.add_argument("--profile-server", action="store_true",
                    help="profile the fileserver, not the step's daemon")  # fmt: skip
    ap.add_argument("--perf", action="store_true",
                    help="profile with Linux perf (native code too) instead of py-spy")  # fmt: skip
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--mount-arg", action="append", default=[],
                    help="extra afsfuse mount argument (both mounts)")  # fmt: skip
    args = ap.parse_args()
    if args.perf and args.profile and shutil.which("perf") is None:
        print("--perf needs perf (apt-get install linux-perf)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="afs-profile-"))
    results: dict[str, list[tuple[float, Any]]] = {s: [] for s in STEPS}
    try:
        repo = make_repo(work, args.repo_files)
        git("archive", "-o", str(work / "tree.tar"), "HEAD", cwd=repo)
        with ServerProcess(work / "fs", events=False) as srv, \
                ClientMount(srv, work / "a", events=False,
                            extra_args=tuple(args.mount_arg)) as a, \
                ClientMount(srv, work / "b", events=False,
                            extra_args=tuple(args.mount_arg)) as b:  # fmt: skip
            for n in range(args.runs):
                steps = run_once(a, b, srv, repo, n, args.files, args.profile, work,
                                 args.profile_server, args.perf)  # fmt: skip
                for name, r in steps.items():
                    results[name].append(r)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary: dict[str, Any] = {}
    for name in STEPS:
        times = [t for t, _ in results[name]]
        med = statistics.median(times)
        cost = results[name][len(times) // 2][1]
        summary[name] = {"median_s": med, "times": times, "cost": cost}
        cpu = " ".join(f"{k} {v:.2f}" for k, v in cost["cpu"].items())
        print(f"{name:14s} median {med:7.3f} s  runs {' '.join(f'{t:.3f}' for t in times)}"
              f"  cpu s [{cpu}]")  # fmt: skip
        for who in ("A", "B"):
            rpc = cost[who]["rpc"]
            fuse = cost[who]["fuse"]
            if rpc or fuse:
                top_rpc = ", ".join(f"{k.split('.')[-1]} {v}" for k, v in list(rpc.items())[:6])
                top_fuse = ", ".join(f"{k} {v}" for k, v in list(fuse.items())[:6])
                print(f"    {who}: rpc[{top_rpc}]  fuse[{top_fuse}]")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

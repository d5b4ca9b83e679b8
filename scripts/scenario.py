"""Break scenarios: drive real fileserver and client mounts through one
callback story each, check the outcome, and print the timeline the
processes themselves logged.

    scripts/scenario.py --list
    scripts/scenario.py single-break mass-break      # or: all
    scripts/scenario.py all --json timeline.json     # timelines for plotting
    scripts/scenario.py dead-client --keep           # leave the processes up
    scripts/scenario.py single-break --server 127.0.0.1:7000 --data-dir .run/data \\
        --server-log .run/server.log --mount mnt-a=LOG_A --mount mnt-b=LOG_B

Each scenario starts its own fileserver (127.0.0.1, random port) and client
mounts in a temporary directory, unless ``--server``/``--mount`` name ones
already running (only for scenarios that need no special server options or
restarts).  The timeline merges the server's ``fileserver.events`` lines,
each client's ``afsfuse.events`` lines and the driver's own ``app:X`` lines
(what the application did and when it returned) by time.  The verdict is
PASS or FAIL per scenario; the exit status is non-zero on any FAIL.

Every wait is bounded; every process started here is stopped by its pid and
every mount unmounted in ``finally`` (after SIGCONT, if it was stopped),
except with ``--keep``, which prints how to stop them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from afsfuse.lab.mount import ClientMount, unmount  # noqa: E402
from afsfuse.lab.server import ServerProcess  # noqa: E402
from afsfuse.lab.timeline import CLIENT_SLACK, Event, Timeline, render, write_json  # noqa: E402

log = logging.getLogger(__name__)

ROOT_VOLUME = "root.cell"


class ScenarioFailed(Exception):
    """A required step failed: the scenario cannot go on."""


# -- processes ------------------------------------------------------------------


class ExternalServer:
    """A fileserver the user already runs (``--server``, ``--data-dir``)."""

    def __init__(self, addr: str, data_dir: Path, log_path: Path | None) -> None:
        host, _, port = addr.rpartition(":")
        self.host, self.port = host or "127.0.0.1", int(port)
        self.data_dir = data_dir
        self.log_path = log_path
        self.proc = None


class ExternalMount:
    """A client mount the user already runs (``--mount DIR[=LOGFILE]``)."""

    def __init__(self, spec: str) -> None:
        mnt, _, logfile = spec.partition("=")
        self.mnt = Path(mnt).resolve()
        if logfile:
            self.log_path = Path(logfile)
        else:
            from afsfuse.cli import default_cache_dir

            self.log_path = default_cache_dir(self.mnt) / "daemon.log"
        self.cache_dir = self.log_path.parent
        self.proc = None

    @property
    def pid(self) -> int:
        return int(os.getxattr(self.mnt, "afs.pid"))

    def stats(self) -> dict[str, Any]:
        return json.loads(os.getxattr(self.mnt, "afs.stats"))

    def examine(self, path: Path) -> dict[str, Any]:
        return json.loads(os.getxattr(path, "afs.examine"))


Mount = ClientMount | ExternalMount


class Lab:
    """The processes of one scenario run, and how to stop them."""

    def __init__(self, base: Path, tl: Timeline, external: argparse.Namespace | None) -> None:
        self.base = base
        self.tl = tl
        self.external = external
        self.server: ServerProcess | ExternalServer | None = None
        self.mounts: dict[str, Mount] = {}
        self.stopped: set[int] = set()  # pids we SIGSTOPped (SIGCONT before cleanup)
        self.kept: list[str] = []  # with --keep: how to stop what was left running

    def start_server(self, *extra: str) -> ServerProcess | ExternalServer:
        ext = self.external
        if ext is not None and ext.server:
            srv: ServerProcess | ExternalServer = ExternalServer(
                ext.server, Path(ext.data_dir), ext.server_log
            )
            if srv.log_path is not None:
                self.tl.add_server(srv.log_path)
        else:
            srv = ServerProcess(self.base / "fs", extra_args=list(extra)).start()
            self.tl.add_server(srv.log_path)
        self.server = srv
        with contextlib.suppress(OSError, ValueError, KeyError):
            ident = json.loads((Path(srv.data_dir) / "server.json").read_text())
            self.tl.server_uuids[ident["uuid"]] = "fs"
        return srv

    def mount(self, label: str, *extra: str, volume: str = ROOT_VOLUME) -> Mount:
        ext = self.external
        if ext is not None and ext.mount:
            idx = len(self.mounts)
            if idx >= len(ext.mount):
                raise ScenarioFailed(f"this scenario needs more than {len(ext.mount)} --mount")
            m: Mount = ExternalMount(ext.mount[idx])
        else:
            assert self.server is not None
            m = ClientMount(self.server, self.base / label, volume=volume,
                            extra_args=tuple(extra)).start()  # fmt: skip
        uuid = None
        for d in (Path(m.cache_dir), Path(m.cache_dir) / "cache"):  # daemon.log's dir, or below
            with contextlib.suppress(OSError):
                uuid = uuid or (d / "client-uuid").read_text().strip()
        self.tl.add_client(m.log_path, label, uuid)
        self.mounts[label] = m
        return m

    def admin(self, *argv: str) -> Any:
        """``afs-fileserver ARGV --data-dir D --json``; the parsed answer."""
        assert self.server is not None
        cmd = [sys.executable, "-m", "fileserver.cli", *argv, "--data-dir",
               str(self.server.data_dir), "--json"]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60,
                             env=_env())  # fmt: skip
        if res.returncode != 0:
            raise ScenarioFailed(f"{' '.join(argv)}: {res.stderr.strip()[-500:]}")
        return json.loads(res.stdout) if res.stdout.strip() else None

    def sigstop(self, pid: int) -> None:
        os.kill(pid, signal.SIGSTOP)
        self.stopped.add(pid)

    def sigcont(self, pid: int) -> None:
        os.kill(pid, signal.SIGCONT)
        self.stopped.discard(pid)

    def owned(self) -> bool:
        return self.external is None

    def close(self, keep: bool) -> list[str]:
        """Stop what we started (never a user's processes); with ``keep``,
        return how to stop them instead."""
        for pid in list(self.stopped):
            with contextlib.suppress(ProcessLookupError):
                self.sigcont(pid)
        if keep:
            out = []
            for m in self.mounts.values():
                if isinstance(m, ClientMount) and m.proc is not None:
                    out.append(f"fusermount3 -u {m.mnt}   # client daemon pid {m.proc.pid} "
                               f"exits after; log {m.log_path}")  # fmt: skip
            srv = self.server
            if isinstance(srv, ServerProcess) and srv.proc is not None:
                out.append(f"kill {srv.proc.pid}   # fileserver {srv.host}:{srv.port}, "
                           f"data {srv.data_dir}, log {srv.log_path}")  # fmt: skip
            out.append(f"rm -rf {self.base}   # afterwards: logs, data and cache")
            return out
        errors = []
        for m in self.mounts.values():
            if isinstance(m, ClientMount):
                try:
                    m.stop()
                except Exception as exc:  # keep going: every mount must come down
                    errors.append(f"stopping {m.mnt}: {exc!r}")
                    with contextlib.suppress(Exception):
                        unmount(m.mnt)
        if isinstance(self.server, ServerProcess):
            try:
                self.server.stop()
            except Exception as exc:
                errors.append(f"stopping the fileserver: {exc!r}")
        return errors


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# -- one run ---------------------------------------------------------------------


@dataclass
class Ctx:
    name: str
    lab: Lab
    tl: Timeline
    checks: list[tuple[bool, str]] = field(default_factory=list)
    focus_t: float | None = None

    def check(self, ok: bool, text: str) -> bool:
        self.checks.append((bool(ok), text))
        return bool(ok)

    def require(self, ok: bool, text: str) -> None:
        if not self.check(ok, text):
            raise ScenarioFailed(text)

    def focus(self, what: str) -> None:
        """From here on the timeline is printed (setup before it is not)."""
        ev = self.tl.note("driver", "phase", what=what)
        if self.focus_t is None:
            self.focus_t = ev.t

    def note(self, actor: str, name: str, **fields: Any) -> Event:
        return self.tl.note(actor, name, **fields)

    def events(self, name: str | None = None, actor: str | None = None,
               since: float | None = None, **match: str) -> list[Event]:  # fmt: skip
        out = []
        for ev in self.tl.events():
            if name is not None and ev.name != name:
                continue
            if actor is not None and ev.actor != actor:
                continue
            if since is not None and ev.t < since - CLIENT_SLACK:
                continue
            if any(ev.get(k) != v for k, v in match.items()):
                continue
            out.append(ev)
        return out

    def wait_for(
        self,
        timeout: float,
        name: str,
        actor: str | None = None,
        since: float | None = None,
        count: int = 1,
        **match: str,
    ) -> list[Event]:
        """Poll the logs (bounded) until ``count`` matching events appeared."""
        deadline = time.monotonic() + timeout
        while True:
            evs = self.events(name, actor, since, **match)
            if len(evs) >= count or time.monotonic() > deadline:
                return evs
            time.sleep(0.05)

    def fid(self, path: Path, label: str | None = None) -> str:
        """The fid of ``path`` (``VOL.VNODE.UNIQUE``, from the afs.fid xattr,
        which sends no RPC), remembered for the timeline."""
        vol, vnode, uniq = (int(x, 16) for x in os.getxattr(path, "afs.fid").decode().split(":"))
        fid = f"{vol}.{vnode}.{uniq}"
        self.tl.fids.setdefault(fid, label or path.name)
        return fid


def write_file(ctx: Ctx, actor: str, path: Path, data: bytes, *, trunc: bool = True) -> float:
    """open/write/close as an application does; returns when close() returned."""
    ctx.note(actor, "open", path=path.name, mode="w" if trunc else "r+")
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if trunc else 0)
    fd = os.open(path, flags, 0o644)
    try:
        os.write(fd, data)
    finally:
        ctx.note(actor, "close", path=path.name)
        os.close(fd)
    return ctx.note(actor, "close_returned", path=path.name).t


def read_file(ctx: Ctx, actor: str, path: Path, show: bool = True) -> bytes:
    ctx.note(actor, "open", path=path.name, mode="r")
    data = path.read_bytes()
    shown = data[:24].decode(errors="replace").replace(" ", "_") if show else f"{len(data)}B"
    ctx.note(actor, "read", path=path.name, got=shown)
    return data


def listdir(ctx: Ctx, actor: str, path: Path) -> list[str]:
    names = sorted(os.listdir(path))
    ctx.note(actor, "readdir", path=path.name, got=",".join(names) or "(empty)")
    return names


def eventually(fn: Callable[[], Any], bound: float) -> Any:
    deadline = time.monotonic() + bound
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


# -- scenarios -----------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    run: Callable[[Ctx, argparse.Namespace], None]
    external_ok: bool = False  # can run on a user's server and mounts


SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str, summary: str, *, external_ok: bool = False) -> Callable[..., Any]:
    def deco(fn: Callable[[Ctx, argparse.Namespace], None]) -> Callable[..., Any]:
        SCENARIOS[name] = Scenario(name, summary, fn, external_ok)
        return fn

    return deco


@scenario("single-break",
          "B caches a file; A writes and closes; B's promise is broken before A's close "
          "returns; B reads the new data", external_ok=True)  # fmt: skip
def single_break(ctx: Ctx, opts: argparse.Namespace) -> None:
    lab = ctx.lab
    lab.start_server()
    a, b = lab.mount("A"), lab.mount("B")
    fa, fb = a.mnt / "single-break.txt", b.mnt / "single-break.txt"
    write_file(ctx, "A", fa, b"version-1")
    fid = ctx.fid(fa)
    ctx.require(read_file(ctx, "B", fb) == b"version-1", "B reads version-1")
    ctx.check(b.examine(fb)["promise"] == "ok", "B holds a promise on the file")
    ctx.focus("A rewrites the file B caches")
    t_open = time.time()
    closed = write_file(ctx, "A", fa, b"version-2", trunc=False)
    changes = ctx.events("change", "server", since=t_open, client="A")
    change = next((e for e in changes if fid in e.get("fids").split(",")), None)
    ctx.require(change is not None, "server logged A's change to the file")
    assert change is not None
    sent = ctx.wait_for(2, "break", "server", since=t_open, fid=fid, client="B", result="sent")
    ctx.require(bool(sent), "server sent the break to B")
    got = ctx.wait_for(2, "break_received", "B", since=t_open, fid=fid)
    ctx.require(bool(got), "B logged break_received for the file")
    stored = ctx.events("stored", "A", since=t_open, fid=fid)
    ctx.check(bool(stored), "A logged its store of the file")
    ctx.check(
        change.t <= sent[0].t <= closed,
        f"break acknowledged by B ({sent[0].t - t_open:.4f}) after A's change "
        f"({change.t - t_open:.4f}) and before A's close returned ({closed - t_open:.4f})",
    )
    ctx.check(
        got[0].t <= sent[0].t + CLIENT_SLACK,
        "B processed the break before the server logged it acknowledged",
    )
    ctx.check(
        not stored or sent[0].t <= stored[0].t + CLIENT_SLACK,
        "A's store completed after the break was acknowledged",
    )
    ctx.check(read_file(ctx, "B", fb) == b"version-2", "B reads version-2 after A's close")
    slow = ctx.wait_for(1, "validate_slow", "B", since=closed, fid=fid)
    ctx.check(bool(slow), "B revalidated the file (validate_slow) on its next open")


@scenario("dir-break",
          "A creates, renames and removes entries in a directory B listed; B's listing "
          "follows each change", external_ok=True)  # fmt: skip
def dir_break(ctx: Ctx, opts: argparse.Namespace) -> None:
    lab = ctx.lab
    lab.start_server()
    a, b = lab.mount("A"), lab.mount("B")
    da, db = a.mnt / "dir-break", b.mnt / "dir-break"
    if da.exists():
        shutil.rmtree(da)
    da.mkdir()
    dfid = ctx.fid(da, "dir-break/")
    ctx.require(listdir(ctx, "B", db) == [], "B lists the empty directory")
    ctx.focus("A changes the directory B listed")
    steps: list[tuple[str, Callable[[], None], list[str]]] = [
        ("create x", lambda: (da / "x").write_bytes(b"x"), ["x"]),
        ("rename x -> y", lambda: os.rename(da / "x", da / "y"), ["y"]),
        ("create z", lambda: (da / "z").write_bytes(b"z"), ["y", "z"]),
        ("remove y", lambda: os.unlink(da / "y"), ["z"]),
        ("remove z", lambda: os.unlink(da / "z"), []),
    ]
    for what, act, want in steps:
        t = ctx.note("A", "op", what=what.replace(" ", "_")).t
        act()
        ctx.note("A", "op_returned", what=what.replace(" ", "_"))
        sent = ctx.wait_for(2, "break", "server", since=t, fid=dfid, client="B")
        ctx.check(
            bool(sent) and sent[0].get("result") == "sent",
            f"{what}: server broke B's promise on the directory",
        )
        got = listdir(ctx, "B", db)
        ctx.check(got == want, f"{what}: B lists {want} (got {got})")
        # Kernel dentries must follow too: a removed name must not resolve.
        for gone in {"x", "y", "z"} - set(want):
            ctx.check(not (db / gone).exists(), f"{what}: {gone} does not resolve on B")
    got = ctx.events("break_received", "B", since=ctx.focus_t, fid=dfid)
    ctx.check(len(got) >= len(steps), f"B logged {len(got)} directory breaks (>= {len(steps)})")
    # A name B itself gave a file by rename (the kernel moved its dentry there,
    # no lookup) must follow A's later changes too.
    ctx.note("B", "op", what="write_t_and_rename_t_->_mine")
    (db / "t").write_bytes(b"B's")
    os.rename(db / "t", db / "mine")
    ctx.note("B", "op_returned", what="rename_t_->_mine")
    ctx.check((db / "mine").read_bytes() == b"B's", "B reads the file it renamed to 'mine'")
    t = ctx.note("A", "op", what="rename_mine_->_yours").t
    os.rename(da / "mine", da / "yours")
    ctx.note("A", "op_returned", what="rename_mine_->_yours")
    ctx.wait_for(2, "break_received", "B", since=t, fid=dfid)
    # Resolve before listing: a fresh listing would drop the stale name anyway.
    ok = eventually(lambda: not (db / "mine").exists(), 1.0)
    ctx.note("B", "stat", path="mine", exists=not ok)
    ctx.check(ok, "rename mine -> yours: 'mine' no longer resolves on B (a name B renamed "
              "into must be dropped from the kernel at A's directory break)")  # fmt: skip
    got_names = listdir(ctx, "B", db)
    ctx.check(got_names == ["yours"], f"rename mine -> yours: B lists ['yours'] (got {got_names})")


def _touch_files(ctx: Ctx, actor: str, d: Path, n: int) -> list[Path]:
    paths = [d / f"f{i:03d}" for i in range(n)]
    for p in paths:
        p.read_bytes()
    ctx.note(actor, "cached", files=n, dir=d.name)
    return paths


@scenario("mass-break",
          "the fileserver restarts (same port) under two clients holding many promises; "
          "each handles it with one cb_s_break bump and revalidates lazily on use")  # fmt: skip
def mass_break(ctx: Ctx, opts: argparse.Namespace) -> None:
    lab = ctx.lab
    n = opts.files
    srv = lab.start_server()
    assert isinstance(srv, ServerProcess)
    a, b = lab.mount("A"), lab.mount("B")
    d = a.mnt / "many"
    d.mkdir()
    for i in range(n):
        (d / f"f{i:03d}").write_bytes(b"%d" % i)
    fa = _touch_files(ctx, "A", d, n)
    fb = _touch_files(ctx, "B", b.mnt / "many", n)
    for p in (fa[0], fa[1], fa[-1]):
        ctx.fid(p)
    held = {ctx.tl.names.get(c["uuid"], c["uuid"]): c["promises"] for c in lab.admin("clients")}
    ctx.check(
        all(v >= n for v in held.values()) and len(held) == 2,
        f"both clients hold >= {n} promises before the restart ({held})",
    )
    before = {k: m.stats() for k, m in lab.mounts.items()}
    ctx.focus("fileserver restart on the same port")
    port = srv.port
    ctx.note("driver", "server_stop", pid=srv.pid)
    srv.stop()
    srv.extra_args += ["--listen", f"127.0.0.1:{port}"]
    srv.start()
    ctx.note("driver", "server_started", pid=srv.pid, port=srv.port)
    ctx.require(srv.port == port, f"restarted on the same port {port}")
    t_restart = ctx.focus_t or 0.0
    for label in ("A", "B"):
        # Reconnect backoff doubles from 0.1 s; no use of the mount meanwhile.
        ev = ctx.wait_for(20, "server_connected", label, since=t_restart)
        ctx.require(bool(ev), f"{label} reconnected by itself")
    time.sleep(0.5)  # let a second bump, if any, be logged
    for label, m in lab.mounts.items():
        bumps = ctx.events("mass_break", label, since=t_restart)
        s0 = next(iter(before[label]["servers"].values()))["cb_s_break"]
        s1 = next(iter(m.stats()["servers"].values()))["cb_s_break"]
        ctx.check(
            len(bumps) == 1 and s1 == s0 + 1,
            f"{label}: the reset is one cb_s_break bump ({s0} -> {s1}; "
            f"mass_break events: {[e.get('why') for e in bumps]})",
        )
        # Reading the stats xattr stats the mount root: the root may revalidate.
        root = ctx.fid(m.mnt, "/")
        slow = {e.get("fid") for e in ctx.events("validate_slow", label, since=t_restart)}
        ctx.check(slow <= {root}, f"{label}: no file revalidated before use "
                  f"({len(slow - {root})} besides the root)")  # fmt: skip
        fs0 = before[label]["rpc"].get("FS.FetchStatus", 0)
        fs1 = m.stats()["rpc"].get("FS.FetchStatus", 0)
        ctx.check(fs1 - fs0 <= 1, f"{label}: at most the root's FS.FetchStatus before use "
                  f"({fs0} -> {fs1}), not one per cached vnode ({n})")  # fmt: skip
    ctx.note("driver", "use", what="A reads 2 files, B reads 1")
    t_use = time.time()
    used = {"A": [fa[0], fa[1]], "B": [fb[-1]]}
    for label, paths in used.items():
        for p in paths:
            ctx.check(p.read_bytes() == b"%d" % int(p.name[1:]), f"{label}: {p.name} reads back")
    for label, paths in used.items():
        m = lab.mounts[label]
        want = {ctx.fid(p) for p in paths}
        files = revalidated(ctx, label, t_use) - {ctx.fid(m.mnt, "/"), ctx.fid(m.mnt / "many")}
        ctx.check(files == want, f"{label}: exactly the used files revalidated "
                  f"({len(files)} of {n} cached)")  # fmt: skip
        why = {e.get("why") for e in ctx.events("validate_slow", label, since=t_use)}
        ctx.check(
            why <= {"server_break", "no_status"},
            f"{label}: revalidations say why=server_break ({sorted(why)})",
        )


def revalidated(ctx: Ctx, actor: str, since: float) -> set[str]:
    """Fids ``actor`` revalidated since ``since``: a FetchStatus (validate_slow)
    or a fresh promise from another reply (a Lookup after the kernel's
    dentries were dropped also revalidates)."""
    evs = ctx.events("validate_slow", actor, since) + ctx.events("promise_installed", actor, since)
    return {e.get("fid") for e in evs}


@scenario("volume-break",
          "an admin whole-volume break: every cached vnode of that volume revalidates on "
          "next use; another volume (behind a mount point) is untouched")  # fmt: skip
def volume_break(ctx: Ctx, opts: argparse.Namespace) -> None:
    lab = ctx.lab
    lab.start_server()
    vol2 = f"proj{int(time.time()) % 100000}"
    lab.admin("vol", "create", vol2)
    a = lab.mount("A")
    subprocess.run([sys.executable, "-m", "afsfuse.cli", "fs", "mkmount", str(a.mnt / vol2),
                    vol2], check=True, cwd=REPO, env=_env(), timeout=60)  # fmt: skip
    top = [a.mnt / f"vb-{i}" for i in range(3)]
    inner = [a.mnt / vol2 / f"p-{i}" for i in range(3)]
    for p in top + inner:
        p.write_bytes(p.name.encode())
    for p in top + inner:
        p.read_bytes()
        ctx.fid(p, p.relative_to(a.mnt).as_posix())
    ctx.check(
        all(a.examine(p)["promise"] == "ok" for p in top + inner),
        "A holds promises in both volumes",
    )
    vid1, vid2 = (ctx.fid(p).split(".")[0] for p in (top[0], inner[0]))
    ctx.focus(f"admin: break-volume {ROOT_VOLUME}")
    t = time.time()
    res = lab.admin("break-volume", ROOT_VOLUME)
    ctx.note("driver", "break_volume_returned", volume=res.get("volume_id") if res else "?")
    got = ctx.wait_for(2, "volume_break", "A", since=t)
    ctx.check(
        [e.get("volume") for e in got] == [vid1],
        f"A: one volume_break, for {ROOT_VOLUME} ({vid1}) only "
        f"(got {[e.get('volume') for e in got]})",
    )
    stats = a.stats()["volumes"]
    ctx.check(
        any(k.endswith(f":{vid1}") and v["cb_v_break"] == 1 for k, v in stats.items())
        and any(k.endswith(f":{vid2}") and v["cb_v_break"] == 0 for k, v in stats.items()),
        f"cb_v_break bumped once for {vid1}, still 0 for {vid2}",
    )
    ctx.note("driver", "use", what="A examines every file")
    t_use = time.time()
    for p in inner + top:
        info = a.examine(p)
        ctx.check(info["promise"] == "ok", f"{p.name}: promise ok after use")
    again = revalidated(ctx, "A", t_use)
    slow = ctx.events("validate_slow", "A", since=t_use)
    for p in top:
        ctx.check(ctx.fid(p) in again, f"{p.name} ({ROOT_VOLUME}) revalidated on use")
    why = {e.get("why") for e in slow if e.get("fid").startswith(vid1 + ".")}
    ctx.check(why <= {"volume_break"}, f"{ROOT_VOLUME}'s revalidations say why=volume_break "
              f"({sorted(why)})")  # fmt: skip
    broke2 = [e for e in slow if e.get("fid").startswith(vid2 + ".") and e.get("why")
              in ("volume_break", "server_break")]  # fmt: skip
    ctx.check(not broke2, f"no {vol2} vnode lost its promise to the break ({len(broke2)})")


@scenario("alias-cells",
          "one volume through two aliased cells in one mount: one server record, two "
          "volume instances, one break reaches both")  # fmt: skip
def alias_cells(ctx: Ctx, opts: argparse.Namespace) -> None:
    lab = ctx.lab
    srv = lab.start_server()
    cells = lab.base / "cells.toml"
    cells.write_text(
        'default = "localcell"\n'
        f'[cells."localcell"]\nvlservers = ["{srv.host}:{srv.port}"]\n'
        '[cells."othercell"]\nalias = "localcell"\n'
    )
    a = lab.mount("A", "--cells", str(cells))
    b = lab.mount("B")
    subprocess.run([sys.executable, "-m", "afsfuse.cli", "fs", "mkmount", str(a.mnt / "other"),
                    ROOT_VOLUME, "--cell", "othercell"], check=True, cwd=REPO, env=_env(),
                   timeout=60)  # fmt: skip
    write_file(ctx, "B", b.mnt / "shared.txt", b"one")
    p1, p2 = a.mnt / "shared.txt", a.mnt / "other" / "shared.txt"
    ctx.require(
        read_file(ctx, "A", p1) == b"one" and read_file(ctx, "A", p2) == b"one",
        "A reads the file through both cells",
    )
    fid = ctx.fid(p1, "shared.txt")
    ctx.check(
        os.getxattr(p1, "afs.cell") == b"localcell" and os.getxattr(p2, "afs.cell") == b"othercell",
        "the two paths are two cells",
    )
    ctx.check(p1.stat().st_ino != p2.stat().st_ino, "two volume instances: two inodes")
    st = a.stats()
    ctx.check(len(st["servers"]) == 1, f"A has one server record ({len(st['servers'])})")
    insts = sorted(k for k in st["volumes"] if k.endswith(":" + fid.split(".")[0]))
    ctx.check(len(insts) == 2, f"A has two instances of the volume: {insts}")
    ctx.focus("B rewrites the file A reaches through both cells")
    t = time.time()
    write_file(ctx, "B", b.mnt / "shared.txt", b"two!", trunc=False)
    sent = ctx.wait_for(2, "break", "server", since=t, fid=fid, client="A")
    ctx.check(len(sent) == 1, f"the server sent one break to A ({len(sent)})")
    got = ctx.wait_for(2, "break_received", "A", since=t, fid=fid, count=2)
    ctx.check(
        sorted(e.get("cell") for e in got) == ["localcell", "othercell"],
        f"that break reached both instances ({[e.get('cell') for e in got]})",
    )
    ctx.check(
        read_file(ctx, "A", p1) == b"two!" and read_file(ctx, "A", p2) == b"two!",
        "A reads the new data through both cells",
    )


@scenario("dead-client",
          "B is SIGSTOPped; A's write completes within the server's break bound; B resumes, "
          "receives the delayed break and reads the new data")  # fmt: skip
def dead_client(ctx: Ctx, opts: argparse.Namespace) -> None:
    lab = ctx.lab
    bound = opts.break_timeout
    lab.start_server("--break-timeout", str(bound))
    a, b = lab.mount("A"), lab.mount("B")
    fa, fb = a.mnt / "dead.txt", b.mnt / "dead.txt"
    write_file(ctx, "A", fa, b"before")
    fid = ctx.fid(fa)
    ctx.require(read_file(ctx, "B", fb) == b"before", "B reads 'before'")
    ctx.focus("B's daemon is SIGSTOPped")
    lab.sigstop(b.pid)
    ctx.note("driver", "SIGSTOP", who="B", pid=b.pid)
    t0 = time.time()
    closed = write_file(ctx, "A", fa, b"after!", trunc=False)
    took = closed - t0
    ctx.check(
        took < bound + 1.5,
        f"A's write+close took {took:.2f} s (break bound {bound} s, limit {bound + 1.5} s)",
    )
    failed = ctx.events("break", "server", since=t0, fid=fid, client="B")
    ctx.check(
        any(e.get("result") in ("failed", "delayed") for e in failed),
        "the server gave up on B within the bound and kept the break as delayed",
    )
    ctx.check(
        bool(ctx.events("client_down", "server", since=t0, client="B")), "the server marked B down"
    )
    time.sleep(0.3)
    lab.sigcont(b.pid)
    t_cont = ctx.note("driver", "SIGCONT", who="B", pid=b.pid).t
    got = ctx.wait_for(5, "break_received", "B", since=t_cont, fid=fid)
    ctx.check(bool(got), "B processed the break after it resumed")
    ctx.check(read_file(ctx, "B", fb) == b"after!", "B reads the new data")
    redo = ctx.wait_for(3 * bound + 3, "break", "server", since=t_cont, fid=fid, client="B",
                        result="sent")  # fmt: skip
    ctx.check(
        any(e.get("delayed") == "1" for e in redo),
        "the server delivered the delayed break (delayed=1) once B was back",
    )
    ctx.check(
        bool(ctx.events("client_up", "server", since=t_cont, client="B")),
        "the server marked B up again",
    )


@scenario("expiry",
          "short promise duration on the server: the promise lapses with no break and the "
          "next use revalidates")  # fmt: skip
def expiry(ctx: Ctx, opts: argparse.Namespace) -> None:
    lab = ctx.lab
    dur = opts.duration_cb
    lab.start_server("--callback-duration", str(dur))
    a = lab.mount("A")
    p = a.mnt / "expiry.txt"
    write_file(ctx, "A", p, b"lasting")
    fid = ctx.fid(p)
    read_file(ctx, "A", p)
    info = a.examine(p)
    ctx.check(
        info["promise"] == "ok" and info["promise_expires_in"] <= dur,
        f"A holds a promise for <= {dur} s ({info['promise_expires_in']:.2f} s left)",
    )
    ctx.focus(f"nobody touches the file for {dur + 1} s")
    t = time.time()
    time.sleep(dur + 1)
    ctx.note("driver", "use", what="A opens the file again")
    ctx.check(read_file(ctx, "A", p) == b"lasting", "A reads the file")
    ctx.check(
        not ctx.events("break", "server", since=t, fid=fid),
        "no break was sent: the promise lapsed by itself",
    )
    ctx.check(not ctx.events("break_received", "A", since=t, fid=fid), "A received no break")
    ctx.check(fid in revalidated(ctx, "A", t), "the next use revalidated the file")
    why = {e.get("why") for e in ctx.events("validate_slow", "A", since=t)}
    ctx.check(why == {"expired"}, f"every revalidation says why=expired ({sorted(why)})")
    grant = ctx.events("grant", "server", since=t, fid=fid, client="A")
    ctx.check(bool(grant), "the server granted a fresh promise")


def _diff(got: bytes, want: bytes) -> str:
    """Where two contents first differ, for a failed check's text."""
    if got == want:
        return ""
    at = next((i for i, (x, y) in enumerate(zip(got, want, strict=False)) if x != y),
              min(len(got), len(want)))  # fmt: skip
    return (f" (got {len(got)} bytes, want {len(want)}; first difference at offset {at}: "
            f"got {got[at:at + 12]!r}, want {want[at:at + 12]!r})")  # fmt: skip


def _read_loop(path: Path, stop: threading.Event, reads: list[int], bound: float = 20) -> None:
    """Read ``path`` whole, again and again, until ``stop`` (or ``bound`` s)."""
    deadline = time.monotonic() + bound
    while not stop.is_set() and time.monotonic() < deadline:
        with contextlib.suppress(OSError), open(path, "rb") as f:
            while f.read(1 << 20):
                pass
        reads[0] += 1


@scenario("inflight-race",
          "a break arrives while B's FetchData for the same file is in flight; B does not "
          "install the promise from that reply (promise_discarded)", external_ok=True)  # fmt: skip
def inflight_race(ctx: Ctx, opts: argparse.Namespace) -> None:
    lab = ctx.lab
    lab.start_server()
    a, b = lab.mount("A"), lab.mount("B")
    size = opts.race_mib << 20
    fa, fb = a.mnt / "race.bin", b.mnt / "race.bin"
    final = b""
    found: list[Event] = []
    for attempt in range(1, opts.race_attempts + 1):
        fill = b"%d" % attempt
        write_file(ctx, "A", fa, (fill * size)[:size])
        fid = ctx.fid(fa)
        read_file(ctx, "B", fb, show=False)
        if attempt == 1:
            ctx.focus("A stores a large file while B keeps reading it")
        # A's close sends many StoreData calls, each breaking B's promise; B's
        # reads keep a FetchData in flight (queued behind the store on the
        # server's volume), so a break lands between its issue and its reply.
        final = ((b"%d" % (attempt + 100)) * size)[:size]  # as long as the file: no tail left
        stop = threading.Event()
        reads = [0]
        t = ctx.note("driver", "attempt", n=attempt).t
        th = threading.Thread(target=_read_loop, args=(fb, stop, reads), daemon=True)
        th.start()
        time.sleep(0.05)
        write_file(ctx, "A", fa, final, trunc=False)
        stop.set()
        th.join(25)
        ctx.note("B", "reads_done", n=reads[0])
        found = ctx.wait_for(1, "promise_discarded", "B", since=t, fid=fid)
        if found:
            break
    ctx.check(bool(found), f"B discarded a promise from a reply raced by a break "
              f"(attempt {attempt} of {opts.race_attempts}; why="
              f"{found[0].get('why') if found else None})")  # fmt: skip
    got = read_file(ctx, "B", fb, show=False)
    ctx.check(got == final, "B then reads A's final data" + _diff(got, final))


@scenario("giveup",
          "forgetting vnodes (drop_caches) gives nothing back; unmount sends exactly one "
          "FS.GiveUpAllCallBacks")  # fmt: skip
def giveup(ctx: Ctx, opts: argparse.Namespace) -> None:
    lab = ctx.lab
    n = opts.files
    lab.start_server()
    a = lab.mount("A")
    d = a.mnt / "gu"
    d.mkdir()
    for i in range(n):
        (d / f"f{i:03d}").write_bytes(b"x")
    _touch_files(ctx, "A", d, n)
    uuid = (Path(a.cache_dir) / "client-uuid").read_text().strip()
    held0 = lab.admin("callbacks", "--client", uuid)["total"]
    vn0 = sum(v["vnodes"] for v in a.stats()["volumes"].values())
    ctx.focus("the kernel forgets inodes (drop_caches)")
    t = time.time()
    ctx.note("driver", "drop_caches")
    try:
        Path("/proc/sys/vm/drop_caches").write_text("2\n")
    except OSError as exc:
        raise ScenarioFailed(f"cannot drop caches (root needed): {exc}") from None
    vn1 = (
        eventually(
            lambda: (v := sum(x["vnodes"] for x in a.stats()["volumes"].values())) < vn0 and v, 3
        )
        or vn0
    )
    ctx.note("A", "vnodes_cached", before=vn0, after=vn1)
    ctx.check(vn1 < vn0, f"A forgot vnodes ({vn0} -> {vn1} cached)")
    held1 = lab.admin("callbacks", "--client", uuid)["total"]
    ctx.check(held1 == held0, f"the server still holds A's promises ({held0} -> {held1})")
    ctx.check(not ctx.events("giveup", "server", since=t), "no GiveUp reached the server")
    rpcs = lab.admin("stats")["rpcs"].get("FS.GiveUpAllCallBacks", 0)
    ctx.check(rpcs == 0, f"FS.GiveUpAllCallBacks calls so far: {rpcs}")
    ctx.note("driver", "unmount", who="A")
    assert isinstance(a, ClientMount)
    a.stop()
    ctx.note("driver", "unmounted", who="A")
    gave = ctx.wait_for(3, "giveup", "server", since=t)
    ctx.check(
        len(gave) == 1 and gave[0].get("client") == "A",
        f"one giveup event at the server, from A ({len(gave)})",
    )
    rpcs = lab.admin("stats")["rpcs"].get("FS.GiveUpAllCallBacks", 0)
    ctx.check(rpcs == 1, f"exactly one FS.GiveUpAllCallBacks ({rpcs})")
    ctx.check(
        len(ctx.events("gave_up_callbacks", "A", since=t)) == 1, "A logged gave_up_callbacks once"
    )


@scenario("overflow",
          "a server with a tiny callback table revokes the least recently active client "
          "with InitCallBackState instead of failing requests")  # fmt: skip
def overflow(ctx: Ctx, opts: argparse.Namespace) -> None:
    lab = ctx.lab
    n = 12
    lab.start_server("--max-callbacks", str(2 * n))
    a, b = lab.mount("A"), lab.mount("B")
    for i in range(n):
        (a.mnt / f"a{i:02d}").write_bytes(b"a%d" % i)
        (a.mnt / f"b{i:02d}").write_bytes(b"b%d" % i)
    afids = set()
    for i in range(n):
        (a.mnt / f"a{i:02d}").read_bytes()
        afids.add(ctx.fid(a.mnt / f"a{i:02d}"))
    errs0 = lab.admin("stats").get("rpc_errors", {})
    ctx.focus(f"B caches {n} more files; the table holds {2 * n} promises")
    t = time.time()
    errors = []
    for i in range(n):
        try:
            if (b.mnt / f"b{i:02d}").read_bytes() != b"b%d" % i:
                errors.append(f"b{i:02d}: wrong data")
        except OSError as exc:
            errors.append(f"b{i:02d}: {exc}")
    ctx.note("B", "cached", files=n, errors=len(errors))
    ctx.check(not errors, f"B read all {n} files while the table overflowed {errors}")
    rev = ctx.wait_for(3, "revoke", "server", since=t)
    ctx.check(
        bool(rev) and all(e.get("client") == "A" for e in rev),
        f"the server revoked A, the least recently active ({[e.get('client') for e in rev]})",
    )
    init = ctx.wait_for(3, "init_callback_state", "server", since=t, client="A")
    ctx.check(
        bool(init) and init[0].get("reason") == "table_full",
        "A got InitCallBackState3 (reason table_full)",
    )
    mass = ctx.wait_for(3, "mass_break", "A", since=t)
    ctx.check(len(mass) == 1, f"A handled it as one mass break ({len(mass)})")
    errs = {k: v - errs0.get(k, 0) for k, v in lab.admin("stats").get("rpc_errors", {}).items()}
    errs = {k: v for k, v in errs.items() if v}
    ctx.check(not errs, f"no request failed at the server meanwhile ({errs})")
    ctx.note("driver", "use", what="A reads its files again")
    t_use = time.time()
    ok = all((a.mnt / f"a{i:02d}").read_bytes() == b"a%d" % i for i in range(n))
    ctx.check(ok, "A reads its files again")
    missed = afids - revalidated(ctx, "A", t_use)
    ctx.check(not missed, f"A revalidated every one of them ({len(missed)} not)")
    why = {e.get("why") for e in ctx.events("validate_slow", "A", since=t_use)}
    ctx.check(why <= {"server_break", "no_status"}, f"why=server_break ({sorted(why)})")


# -- driver --------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    passed: bool
    seconds: float
    checks: list[tuple[bool, str]]
    events: list[Event]
    focus_t: float
    error: str = ""
    kept: list[str] = field(default_factory=list)
    fids: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def _lab(name: str, opts: argparse.Namespace, tl: Timeline) -> Iterator[Lab]:
    base = Path(tempfile.mkdtemp(prefix=f"afs-{name}-", dir=opts.tmp))
    ext = opts if (opts.server or opts.mount) else None
    lab = Lab(base, tl, ext)
    try:
        yield lab
    finally:
        lab_errors = lab.close(opts.keep)
        if opts.keep:
            lab.kept = lab_errors
        else:
            for e in lab_errors:
                log.warning("%s", e)
            shutil.rmtree(base, ignore_errors=True)


def run_one(sc: Scenario, opts: argparse.Namespace) -> Result:
    tl = Timeline()
    t0 = time.monotonic()
    error = ""
    ctx: Ctx | None = None
    kept: list[str] = []
    with _lab(sc.name, opts, tl) as lab:
        ctx = Ctx(sc.name, lab, tl)
        try:
            sc.run(ctx, opts)
        except ScenarioFailed as exc:
            error = str(exc)
        except Exception as exc:  # a crash is a FAIL with its reason, not a traceback storm
            log.debug("scenario %s crashed", sc.name, exc_info=True)
            error = f"{type(exc).__name__}: {exc}"
        events = tl.events()  # before the lab (and its logs) go away
    kept = lab.kept
    passed = not error and bool(ctx.checks) and all(ok for ok, _ in ctx.checks)
    focus = ctx.focus_t or (events[0].t if events else time.time())
    return Result(
        sc.name,
        passed,
        time.monotonic() - t0,
        ctx.checks,
        events,
        focus,
        error,
        kept,
        dict(tl.fids),
    )


def report(r: Result, opts: argparse.Namespace) -> None:
    print(f"=== {r.name}: {SCENARIOS[r.name].summary}")
    shown = r.events if opts.verbose else [e for e in r.events if e.t >= r.focus_t - 0.002]
    print(render(shown, r.focus_t, fids=r.fids, verbose=opts.verbose))
    for ok, text in r.checks:
        print(f"  [{'ok' if ok else 'FAIL'}] {text}")
    if r.error and (not r.checks or r.checks[-1][1] != r.error):
        print(f"  [FAIL] {r.error}")
    for line in r.kept:
        print(f"  kept: {line}")
    print(f"--- {r.name}: {'PASS' if r.passed else 'FAIL'} ({r.seconds:.1f} s)\n")
    sys.stdout.flush()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scenario.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("names", nargs="*", metavar="NAME", help="scenarios to run, or 'all'")
    p.add_argument("--list", action="store_true", help="name each scenario and what it shows")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the timelines here")
    p.add_argument("--keep", action="store_true", help="leave the processes running")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="whole timelines, including setup and validate_fast")  # fmt: skip
    p.add_argument("--tmp", default=None, help="where temporary directories go")
    p.add_argument("--server", metavar="HOST:PORT", help="use this running fileserver")
    p.add_argument("--data-dir", metavar="DIR", help="its data directory (admin commands)")
    p.add_argument("--server-log", type=Path, metavar="FILE",
                   help="its log or --event-log file (for the timeline)")  # fmt: skip
    p.add_argument("--mount", action="append", default=[], metavar="DIR[=LOG]",
                   help="use this running mount (repeat: A, B, ...); LOG defaults to "
                        "the daemon's log in its default cache dir")  # fmt: skip
    p.add_argument("--files", type=int, default=50, help="files cached in mass-break/giveup")
    p.add_argument("--break-timeout", type=float, default=1.0, help="dead-client's bound")
    p.add_argument("--duration-cb", type=float, default=2.0, help="expiry's promise duration")
    p.add_argument("--race-mib", type=int, default=24, help="inflight-race file size")
    p.add_argument("--race-attempts", type=int, default=4, help="inflight-race retries")
    return p


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if opts.list:
        width = max(len(n) for n in SCENARIOS)
        for sc in SCENARIOS.values():
            print(f"{sc.name:<{width}}  {sc.summary}")
        return 0
    names = list(SCENARIOS) if opts.names in (["all"], []) else opts.names
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)} (see --list)", file=sys.stderr)
        return 2
    external = bool(opts.server or opts.mount)
    if external and not (opts.server and opts.data_dir and opts.mount):
        print("--server needs --data-dir and --mount (and --server-log for server events)",
              file=sys.stderr)  # fmt: skip
        return 2
    results: list[Result] = []
    for name in names:
        sc = SCENARIOS[name]
        if external and not sc.external_ok:
            print(f"=== {name}: SKIPPED (starts its own processes; not with --server/--mount)\n")
            continue
        r = run_one(sc, opts)
        report(r, opts)
        results.append(r)
    if opts.json:
        write_json(opts.json, [
            {"name": r.name, "passed": r.passed, "seconds": round(r.seconds, 3),
             "t0": r.focus_t, "checks": [{"ok": ok, "text": t} for ok, t in r.checks],
             "error": r.error, "events": [e.to_json() for e in r.events]}
            for r in results
        ])  # fmt: skip
    failed = [r.name for r in results if not r.passed]
    total = sum(r.seconds for r in results)
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed ({total:.1f} s)"
          + (f": {' '.join(failed)}" if failed else ""))  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

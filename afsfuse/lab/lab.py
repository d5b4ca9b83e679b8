"""The lab: a scenario's processes, its app actions, its expectations.

A scenario is a function ``fn(lab)`` registered with ``@scenario``::

    from afsfuse.lab import Lab, scenario

    @scenario("my-break", "B caches a file; A rewrites it; B sees it", break_timeout=1)
    def my_break(lab: Lab) -> None:
        a, b = lab.mount("A"), lab.mount("B")
        a.write("f.txt", b"one")
        lab.check(b.read("f.txt") == b"one", "B reads one")
        lab.phase("A rewrites the file B caches")
        a.write("f.txt", b"two")
        lab.expect("server", "break", client="B", fid=a.fid("f.txt"), result="sent")
        lab.check(b.read("f.txt") == b"two", "B reads two")

``server_options`` of the decorator are the fileserver's command-line
options (``break_timeout=1`` is ``--break-timeout 1``).  The lab starts that
server before calling ``fn``; ``lab.mount(NAME)`` starts a client mount.
Every handle call is an ``app:NAME`` event with its start (``t``) and end
(``end``) time; the processes' own event lines (``protocol/logfmt.py``) and
the lab's own (actor ``lab``: phases, restarts, injected faults) make the
timeline.  ``lab.expect`` waits for an event in a process's log;
``lab.check`` records a verdict; a scenario passes when it ran to the end,
made at least one check, and every check held.

A cell of several fileservers: ``lab.add_server("fs2")`` (before the first
use of ``lab.server``) starts a single-node etcd for the VLDB, the first
server on it and a second one with the cell's key; ``lab.move(volume,
to="fs2")`` runs ``afs-fileserver vol move``.  Each extra server's events
are its own actor (``fs2``); the first server's stay ``server``.

May import ``afsfuse.lab.server``, ``.mount``, ``.timeline`` and ``protocol``
(never the test suite).  Every process started here is stopped by its pid and
every mount unmounted (after SIGCONT when paused), unless ``keep``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from afsfuse.lab.etcd import EtcdCluster
from afsfuse.lab.mount import ClientMount, unmount
from afsfuse.lab.server import REPO, ServerProcess
from afsfuse.lab.timeline import CLIENT_SLACK, Event, Timeline, render

log = logging.getLogger(__name__)

ROOT_VOLUME = "root.cell"
#: The actor of the lab's own events (phases, server actions, faults).
LAB = "lab"


class ScenarioFailed(Exception):
    """A required step failed; ``timeline`` is the text of the timeline so far."""

    def __init__(self, message: str, timeline: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.timeline = timeline

    def __str__(self) -> str:
        return self.message + (f"\ntimeline so far:\n{self.timeline}" if self.timeline else "")


# -- registry --------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """One registered scenario: ``fn(lab)`` run against a server started with
    ``server_options``; ``external_ok`` when it can run on a user's processes."""

    name: str
    summary: str
    fn: Callable[[Lab], None]
    server_options: dict[str, Any] = field(default_factory=dict)
    external_ok: bool = False


#: Scenarios registered so far, by name (built-ins and any file loaded).
SCENARIOS: dict[str, Scenario] = {}


def scenario(
    name: str, summary: str, *, external_ok: bool = False, **server_options: Any
) -> Callable[[Callable[[Lab], None]], Callable[[Lab], None]]:
    """Register ``fn(lab)`` as scenario ``name``; ``server_options`` are the
    fileserver's options (``break_timeout=1`` -> ``--break-timeout 1``; True
    gives the bare flag)."""

    def deco(fn: Callable[[Lab], None]) -> Callable[[Lab], None]:
        SCENARIOS[name] = Scenario(name, summary, fn, dict(server_options), external_ok)
        return fn

    return deco


def server_args(options: dict[str, Any]) -> list[str]:
    """``{"break_timeout": 1, "x": True}`` -> ``["--break-timeout", "1", "--x"]``."""
    out: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value not in (None, False):
            out += [flag, str(value)]
    return out


def _fid_of(path: Path) -> str:
    """``VOL.VNODE.UNIQUE`` of a path in a mount (the afs.fid xattr: no RPC)."""
    vol, vnode, uniq = (int(x, 16) for x in os.getxattr(path, "afs.fid").decode().split(":"))
    return f"{vol}.{vnode}.{uniq}"


def _shown(data: bytes) -> str:
    return data[:24].decode(errors="replace")


# -- mounts ----------------------------------------------------------------------


class Mount:
    """A client mount in the lab; every call is an ``app:NAME`` event.

    Paths are relative to the mount's root (``m.path``); an absolute path is
    used as it is.  ``write``, ``read``, ``listdir``, ``stat``, ``rename`` and
    ``unlink`` do what an application does, from this (the lab's) process;
    ``pause``/``resume`` SIGSTOP/SIGCONT the client daemon, ``kill`` SIGKILLs
    it (the mount is dead until ``remount``), ``remount`` unmounts and mounts
    again with the same cache (same client UUID).
    """

    def __init__(self, lab: Lab, name: str, proc: ClientMount | ExternalMount) -> None:
        self.lab = lab
        self.name = name
        self.proc = proc
        self.path = Path(proc.mnt)
        self.actor = f"app:{name}"
        self.last: Event | None = None

    @property
    def uuid(self) -> str:
        """The client's UUID (as the server's events name it)."""
        for d in (Path(self.proc.cache_dir), Path(self.proc.cache_dir) / "cache"):
            with contextlib.suppress(OSError):
                return (d / "client-uuid").read_text().strip()
        raise ScenarioFailed(f"{self.name}: no client-uuid in {self.proc.cache_dir}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def p(self, rel: str | Path) -> Path:
        return self.path / rel

    @contextlib.contextmanager
    def action(self, op: str, **fields: Any) -> Iterator[Event]:
        """Log an action of your own as an ``app:NAME`` event: ``with
        m.action("scan", dir="d") as ev: ...`` (``ev.end`` set when it ends;
        add result fields to ``ev.fields``)."""
        ev = self.lab.timeline.add(self.actor, op, **fields)
        self.lab.mark = ev.t
        self.last = ev
        try:
            yield ev
        except OSError as exc:
            ev.fields["error"] = os.strerror(exc.errno) if exc.errno else str(exc)
            raise
        finally:
            ev.end = time.time()

    def write(self, rel: str | Path, data: bytes, *, trunc: bool = True) -> Event:
        """open (O_CREAT, O_TRUNC unless ``trunc=False``), write, close; returns
        the event once ``close()`` returned (``ev.end`` is when)."""
        with self.action("write", path=str(rel), bytes=len(data), data=_shown(data)) as ev:
            flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if trunc else 0)
            fd = os.open(self.p(rel), flags, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        return ev

    def read(self, rel: str | Path) -> bytes:
        """open, read all, close."""
        with self.action("read", path=str(rel)) as ev:
            data = self.p(rel).read_bytes()
            ev.fields["got"] = _shown(data)
            ev.fields["bytes"] = str(len(data))
        return data

    def listdir(self, rel: str | Path = ".") -> list[str]:
        """Sorted names in a directory."""
        with self.action("listdir", path=str(rel)) as ev:
            names = sorted(os.listdir(self.p(rel)))
            ev.fields["got"] = ",".join(names)
        return names

    def stat(self, rel: str | Path) -> os.stat_result:
        with self.action("stat", path=str(rel)) as ev:
            st = os.stat(self.p(rel))
            ev.fields["size"] = str(st.st_size)
        return st

    def exists(self, rel: str | Path) -> bool:
        """Whether the name resolves (a stat; ENOENT is False)."""
        with self.action("exists", path=str(rel)) as ev:
            ok = self.p(rel).exists()
            ev.fields["got"] = str(ok)
        return ok

    def mkdir(self, rel: str | Path) -> None:
        with self.action("mkdir", path=str(rel)):
            os.mkdir(self.p(rel))

    def rename(self, a: str | Path, b: str | Path) -> None:
        with self.action("rename", path=str(a), to=str(b)):
            os.rename(self.p(a), self.p(b))

    def unlink(self, rel: str | Path) -> None:
        with self.action("unlink", path=str(rel)):
            os.unlink(self.p(rel))

    def fid(self, rel: str | Path = ".", label: str | None = None) -> str:
        """The fid of a path (``VOL.VNODE.UNIQUE``), remembered for the timeline."""
        fid = _fid_of(self.p(rel))
        self.lab.timeline.fids.setdefault(fid, label or str(rel))
        return fid

    def mkmount(self, rel: str | Path, volume: str, cell: str | None = None) -> None:
        """``afsfuse fs mkmount``: a mount point for ``volume`` at ``rel``."""
        with self.action("mkmount", path=str(rel), volume=volume, cell=cell or ""):
            cmd = [sys.executable, "-m", "afsfuse.cli", "fs", "mkmount", str(self.p(rel)), volume]
            subprocess.run(cmd + (["--cell", cell] if cell else []), check=True, cwd=REPO,
                           env=_env(), timeout=60, capture_output=True)  # fmt: skip

    def examine(self, rel: str | Path = ".") -> dict[str, Any]:
        """The daemon's view of a path (promise, DV, ...): the afs.examine xattr."""
        return json.loads(os.getxattr(self.p(rel), "afs.examine"))

    def stats(self) -> dict[str, Any]:
        """The cache manager's counters (the afs.stats xattr)."""
        return json.loads(os.getxattr(self.path, "afs.stats"))

    def _own(self) -> ClientMount:
        if not isinstance(self.proc, ClientMount):
            raise ScenarioFailed(f"{self.name} is a user's mount: the lab does not signal it")
        return self.proc

    def pause(self) -> None:
        """SIGSTOP the client daemon (it answers nothing until ``resume``)."""
        proc = self._own()
        with self.action("pause", pid=proc.pid):
            os.kill(proc.pid, signal.SIGSTOP)
            self.lab.paused.add(proc.pid)

    def resume(self) -> None:
        """SIGCONT the client daemon."""
        proc = self._own()
        with self.action("resume", pid=proc.pid):
            os.kill(proc.pid, signal.SIGCONT)
            self.lab.paused.discard(proc.pid)

    def kill(self) -> None:
        """SIGKILL the client daemon (a crash): the mount is dead until ``remount``."""
        proc = self._own()
        with self.action("kill", pid=proc.pid):
            self.lab.paused.discard(proc.pid)
            proc.kill()

    def unmount(self) -> None:
        """Unmount cleanly (the daemon gives its promises up and exits)."""
        proc = self._own()
        with self.action("unmount"):
            proc.stop()

    def remount(self) -> None:
        """Unmount (a dead mount too) and mount again, same cache and UUID."""
        proc = self._own()
        with self.action("remount") as ev:
            self.lab.paused.discard(proc.pid)
            if proc.proc is not None and proc.proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
            proc.stop()
            proc.start()
            ev.fields["pid"] = str(proc.pid)


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

    @property
    def pid(self) -> int:
        return int(os.getxattr(self.mnt, "afs.pid"))


# -- the server ------------------------------------------------------------------


class ExternalServer:
    """A fileserver the user already runs (``--server``, ``--data-dir``)."""

    def __init__(self, addr: str, data_dir: Path, log_path: Path | None) -> None:
        host, _, port = addr.rpartition(":")
        self.host, self.port = host or "127.0.0.1", int(port)
        self.data_dir = data_dir
        self.log_path = log_path
        self.proc = None


class Server:
    """The lab's fileserver: lifecycle, admin breaks and nemeses.

    ``restart()``/``stop()``/``start()`` keep the port, so mounts reconnect by
    themselves.  The nemeses are the fileserver's own (``afs-fileserver
    inject``, see ``fileserver/nemesis.py``): ``delay_breaks(mount, s)``,
    ``drop_breaks(mount)``, ``partition(mount, s)``, ``shorten_promises(s)``
    and ``heal(mount=None)`` (None heals every fault).  Each is a ``lab``
    event; the server logs the injection and each effect.
    """

    def __init__(
        self, lab: Lab, proc: ServerProcess | ExternalServer, name: str = "server"
    ) -> None:
        self.lab = lab
        self.proc = proc
        #: Its actor on the timeline ("server" for the first, else its name).
        self.name = name

    @property
    def uuid(self) -> str:
        """The server's UUID (``server.json`` in its data dir)."""
        try:
            return str(json.loads((self.data_dir / "server.json").read_text())["uuid"])
        except (OSError, ValueError, KeyError) as exc:
            raise ScenarioFailed(f"{self.name}: no server.json in {self.data_dir}") from exc

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def host(self) -> str:
        return self.proc.host

    @property
    def port(self) -> int:
        return self.proc.port

    @property
    def data_dir(self) -> Path:
        return Path(self.proc.data_dir)

    @property
    def pid(self) -> int:
        return self._own().pid

    def _own(self) -> ServerProcess:
        if not isinstance(self.proc, ServerProcess):
            raise ScenarioFailed("the lab does not restart a user's fileserver")
        return self.proc

    def _note(self, name: str, **fields: Any) -> Event:
        ev = self.lab.timeline.add(LAB, name, **fields)
        self.lab.mark = ev.t
        return ev

    def stop(self) -> None:
        """SIGTERM the fileserver and wait for it."""
        srv = self._own()
        ev = self._note("server_stop", pid=srv.pid)
        srv.stop()
        ev.end = time.time()

    def start(self) -> None:
        """Start it again on the same port and data directory."""
        srv = self._own()
        ev = self._note("server_start", port=srv.port)
        srv.start(srv.port)
        ev.fields["pid"] = str(srv.pid)
        ev.end = time.time()

    def restart(self) -> None:
        """``stop()`` then ``start()`` (a new epoch: clients get InitCallBackState)."""
        self.stop()
        self.start()

    def admin(self, *argv: str) -> Any:
        """``afs-fileserver ARGV --data-dir D --json``: the parsed answer."""
        cmd = [sys.executable, "-m", "fileserver.cli", *argv, "--data-dir",
               str(self.data_dir), "--json"]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60, env=_env())
        if res.returncode != 0:
            raise ScenarioFailed(f"{' '.join(argv)}: {res.stderr.strip()[-500:]}")
        return json.loads(res.stdout) if res.stdout.strip() else None

    def break_fid(self, rel_or_fid: str) -> dict[str, Any]:
        """Admin break of one fid (``VOL.VNODE.UNIQUE``, or a path relative to
        the first mount)."""
        fid = rel_or_fid
        if not _looks_like_fid(fid):
            first = next(iter(self.lab.mounts.values()), None)
            if first is None:
                raise ScenarioFailed(f"break_fid({rel_or_fid!r}): no mount to resolve it")
            fid = first.fid(rel_or_fid)
        ev = self._note("break_fid", fid=fid)
        out = self.admin("break", fid)
        ev.end = time.time()
        return out

    def break_volume(self, name: str = ROOT_VOLUME) -> dict[str, Any]:
        """Admin whole-volume break (every client caching it revalidates)."""
        ev = self._note("break_volume", volume=name)
        out = self.admin("break-volume", name)
        ev.end = time.time()
        return out

    def _inject(self, kind: str, mount: str | None, *rest: str) -> dict[str, Any]:
        args = [self.lab.mounts[mount].uuid] if mount is not None else []
        ev = self._note("inject", kind=kind, **({"mount": mount} if mount else {}),
                        **({"seconds": rest[0]} if rest else {}))  # fmt: skip
        out = self.admin("inject", kind, *args, *rest)
        ev.end = time.time()
        return out

    def delay_breaks(self, mount: str, seconds: float) -> dict[str, Any]:
        """Delay every break to that mount by ``seconds``."""
        return self._inject("delay-breaks", mount, str(seconds))

    def drop_breaks(self, mount: str) -> dict[str, Any]:
        """Drop breaks to that mount (lost): it is marked down and gets them
        as delayed breaks (or InitCallBackState) when it comes back."""
        return self._inject("drop-breaks", mount)

    def partition(self, mount: str, seconds: float) -> dict[str, Any]:
        """Close that mount's connection and refuse it for ``seconds``."""
        return self._inject("partition", mount, str(seconds))

    def shorten_promises(self, seconds: float) -> dict[str, Any]:
        """New promises last at most ``seconds``."""
        return self._inject("shorten-promises", None, str(seconds))

    def heal(self, mount: str | None = None) -> dict[str, Any]:
        """End that mount's faults; None ends every fault."""
        if mount is None:
            ev = self._note("heal", mount="all")
            out = self.admin("inject", "heal", "--all")
        else:
            ev = self._note("heal", mount=mount)
            out = self.admin("inject", "heal", self.lab.mounts[mount].uuid)
        ev.end = time.time()
        return out

    def move(self, volume: str, to: Server) -> dict[str, Any]:
        """``afs-fileserver vol move VOLUME --to TO`` from this server (a
        ``lab`` event ``vol_move`` spanning the move); the command's answer."""
        ev = self._note("vol_move", volume=volume, **{"from": self.name}, to=to.name)
        out = self.admin("vol", "move", volume, "--to", to.address)
        ev.end = time.time()
        return out

    def stats(self) -> dict[str, Any]:
        return self.admin("stats")

    def clients(self) -> list[dict[str, Any]]:
        return self.admin("clients")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _looks_like_fid(text: str) -> bool:
    parts = text.split(".")
    return len(parts) == 3 and all(p.isdigit() for p in parts)


# -- the lab ---------------------------------------------------------------------


class Lab:
    """One scenario run: its server, mounts, timeline and checks.

    ``lab.server`` (a ``Server``), ``lab.mount(name)`` (a ``Mount``),
    ``lab.expect``, ``lab.events``, ``lab.check``, ``lab.phase``; ``lab.base``
    is a scratch directory; ``lab.options`` the run's parameters (``files``,
    ``race_mib``, ...).  ``lab.add_server(name)`` and ``lab.move(volume,
    to=name)`` make a cell of several servers (VLDB on etcd);
    ``lab.servers`` holds every server by actor name.
    """

    def __init__(
        self,
        base: Path,
        *,
        server_options: dict[str, Any] | None = None,
        options: Any = None,
        external: Any = None,
    ) -> None:
        self.base = Path(base)
        self.timeline = Timeline()
        self.options = options if options is not None else SimpleNamespace()
        self.external = external
        self.server_options = dict(server_options or {})
        self.mounts: dict[str, Mount] = {}
        self.checks: list[tuple[bool, str]] = []
        self.paused: set[int] = set()
        self.focus_t: float | None = None
        self.mark = time.time()  # expect's default ``since``
        self._server: Server | None = None
        #: Every server by actor name ("server" first, then add_server's).
        self.servers: dict[str, Server] = {}
        #: The cell's VLDB, once add_server started one.
        self.etcd: EtcdCluster | None = None

    # -- processes --------------------------------------------------------------

    @property
    def server(self) -> Server:
        """The fileserver (started at first use with the scenario's options)."""
        if self._server is None:
            self._server = self._start_server()
        return self._server

    def _start_server(self) -> Server:
        ext = self.external
        if ext is not None and getattr(ext, "server", None):
            proc: ServerProcess | ExternalServer = ExternalServer(
                ext.server, Path(ext.data_dir), ext.server_log
            )
        else:
            args = server_args(self.server_options) + self._vldb_args()
            proc = ServerProcess(self.base / "fs", extra_args=args)
            proc.start()
        return self._register(Server(self, proc), "fs")

    def _vldb_args(self) -> list[str]:
        return ["--vldb", self.etcd.url] if self.etcd is not None else []

    def _register(self, srv: Server, label: str) -> Server:
        """Put a started server on the timeline (its log, its UUID's label)."""
        if srv.proc.log_path is not None:
            self.timeline.add_server(srv.proc.log_path, srv.name)
        with contextlib.suppress(OSError, ValueError, KeyError):
            ident = json.loads((Path(srv.proc.data_dir) / "server.json").read_text())
            self.timeline.server_uuids[ident["uuid"]] = label
        self.servers[srv.name] = srv
        return srv

    def add_server(self, name: str, **options: Any) -> Server:
        """Start another fileserver of the cell, actor ``name`` on the timeline
        (its UUID is also named ``name``); ``options`` as the scenario's.

        The servers of a cell share a VLDB: the first call starts a
        single-node etcd (127.0.0.1) and the first server (``lab.server``)
        on it, so call it before anything uses ``lab.server``.  The new server
        has the cell's key and no root volume of its own."""
        if self.external is not None:
            raise ScenarioFailed("add_server: not with a user's fileserver (--server)")
        if name in self.servers or name in self.mounts or name in (LAB, "server", "fs"):
            raise ScenarioFailed(f"server name {name!r} is taken")
        if self.etcd is None:
            if self._server is not None:
                raise ScenarioFailed("add_server must come before the first use of "
                                     "lab.server (it must use the cell's etcd VLDB)")  # fmt: skip
            ev = self.note("etcd_start")
            self.etcd = EtcdCluster(self.base / "etcd", size=1).start()
            ev.fields["url"] = self.etcd.url
            ev.end = time.time()
        first = self.server
        ev = self.note("server_add", server=name)
        args = server_args(options) + self._vldb_args()
        args += ["--key-file", str(first._own().key_file), "--no-root-volume"]
        proc = ServerProcess(self.base / name, extra_args=args)
        proc.start()
        ev.fields["addr"] = f"{proc.host}:{proc.port}"
        ev.end = time.time()
        return self._register(Server(self, proc, name), name)

    def move(self, volume: str, *, to: str, source: str | None = None) -> dict[str, Any]:
        """Move ``volume`` to server ``to`` (a name from ``add_server``, or
        "server"): ``afs-fileserver vol move`` run against the server that
        holds it (``source``, by default the one the VLDB names).  Returns
        the command's answer (``to``: the target's UUID, ``bytes_sent``...)."""
        if to not in self.servers:
            raise ScenarioFailed(f"move: no server {to!r} (servers: {', '.join(self.servers)})")
        if source is None:
            where = self.server.admin("vol", "examine", volume)["servers"][0]["uuid"]
            source = next((n for n, s in self.servers.items() if s.uuid == where), None)
            if source is None:
                raise ScenarioFailed(f"move: {volume} is on {where}, not a lab server")
        return self.servers[source].move(volume, self.servers[to])

    def mount(
        self,
        name: str,
        *,
        volume: str = ROOT_VOLUME,
        cells: Path | None = None,
        args: tuple[str, ...] = (),
        **options: Any,
    ) -> Mount:
        """Start client mount ``name`` (a daemon subprocess); ``options`` are
        ``afsfuse mount`` options (``rpc_timeout=5`` -> ``--rpc-timeout 5``)."""
        if name in self.mounts or name == LAB:
            raise ScenarioFailed(f"mount name {name!r} is taken")
        srv = self.server
        ext = self.external
        if ext is not None and getattr(ext, "mount", None):
            idx = len(self.mounts)
            if idx >= len(ext.mount):
                raise ScenarioFailed(f"this scenario needs more than {len(ext.mount)} --mount")
            proc: ClientMount | ExternalMount = ExternalMount(ext.mount[idx])
        else:
            extra = list(args) + server_args(options)
            if cells is not None:
                extra += ["--cells", str(cells)]
            proc = ClientMount(srv.proc, self.base / name, volume=volume,
                               extra_args=tuple(extra))  # fmt: skip
            proc.start()
        m = Mount(self, name, proc)
        self.mounts[name] = m
        self.timeline.add_client(proc.log_path, name, m.uuid)
        return m

    # -- the story ----------------------------------------------------------------

    def phase(self, what: str) -> Event:
        """Mark a phase; the printed timeline starts at the first one."""
        ev = self.timeline.add(LAB, "phase", what=what)
        self.mark = ev.t
        if self.focus_t is None:
            self.focus_t = ev.t
        return ev

    def note(self, name: str, **fields: Any) -> Event:
        """A ``lab`` event of your own (it moves expect's default ``since``)."""
        ev = self.timeline.add(LAB, name, **fields)
        self.mark = ev.t
        return ev

    def check(self, cond: Any, message: str) -> bool:
        """Record a verdict; the scenario fails at the end if any is false."""
        self.checks.append((bool(cond), message))
        return bool(cond)

    def require(self, cond: Any, message: str) -> None:
        """``check``, and stop the scenario here if it failed."""
        if not self.check(cond, message):
            raise ScenarioFailed(message, self.render_tail())

    def events(
        self,
        actor: str | None = None,
        event: str | None = None,
        *,
        since: float | None = None,
        **fields: Any,
    ) -> list[Event]:
        """Events seen so far (logs re-read), by time; filtered by actor,
        event name, ``since`` (a time.time(); within CLIENT_SLACK) and exact
        field values (``client="B"``: clients are named by mount name)."""
        want = {k: str(v) for k, v in fields.items()}
        out = []
        for ev in self.timeline.events():
            if actor is not None and ev.actor != actor:
                continue
            if event is not None and ev.name != event:
                continue
            if since is not None and ev.t < since - CLIENT_SLACK:
                continue
            if any(ev.fields.get(k) != v for k, v in want.items()):
                continue
            out.append(ev)
        return out

    def expect(
        self,
        actor: str,
        event: str,
        within: float = 5.0,
        *,
        since: float | None = None,
        count: int = 1,
        **fields: Any,
    ) -> Event:
        """Wait (at most ``within`` s) until ``actor`` logged ``event`` with
        these field values, and return the first such event.  Only events
        since ``since`` count, by default since the start of the last app
        action, server action or phase (``since=0``: any).  Raises
        ``ScenarioFailed`` with the timeline so far when none comes (or fewer
        than ``count``)."""
        return self.expect_all(actor, event, within, since=since, count=count, **fields)[0]

    def expect_all(
        self,
        actor: str,
        event: str,
        within: float = 5.0,
        *,
        since: float | None = None,
        count: int = 1,
        **fields: Any,
    ) -> list[Event]:
        """As ``expect``, returning every matching event once ``count`` came.
        Either way the outcome is one of the run's checks."""
        evs = self.wait_for(actor, event, within, since=since, count=count, **fields)
        what = " ".join(f"{k}={v}" for k, v in fields.items())
        if len(evs) >= count:
            self.checks.append((True, f"{actor} logged {event} {what}".rstrip()))
            return evs
        msg = (f"expected {count if count > 1 else 'an'} {actor} {event} {what}".rstrip()
               + f" within {within} s (saw {len(evs)})")  # fmt: skip
        self.checks.append((False, msg))
        raise ScenarioFailed(msg, self.render_tail())

    def wait_for(
        self,
        actor: str,
        event: str,
        within: float = 5.0,
        *,
        since: float | None = None,
        count: int = 1,
        **fields: Any,
    ) -> list[Event]:
        """As ``expect_all`` but never raises: whatever matched when ``count``
        came or ``within`` passed (possibly nothing)."""
        since = self.mark if since is None else since
        deadline = time.monotonic() + within
        while True:
            evs = self.events(actor, event, since=since, **fields)
            if len(evs) >= count or time.monotonic() > deadline:
                return evs
            time.sleep(0.03)

    def wait(self, seconds: float) -> None:
        """Sleep (a ``lab`` event, so the timeline shows the gap)."""
        ev = self.note("wait", seconds=seconds)
        time.sleep(seconds)
        ev.end = time.time()

    def render_tail(self, lines: int = 60) -> str:
        t0 = self.focus_t or self.timeline.t0 or time.time()
        evs = [e for e in self.timeline.events() if e.t >= t0 - 0.002]
        return "\n".join(render(evs, t0, fids=self.timeline.fids).splitlines()[-lines:])

    # -- cleanup --------------------------------------------------------------------

    def close(self, keep: bool = False) -> list[str]:
        """Stop what the lab started (never a user's processes).  With
        ``keep``, leave them running and return how to stop them."""
        for pid in list(self.paused):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            self.paused.discard(pid)
        srv = self._server.proc if self._server is not None else None
        extra = [s.proc for n, s in self.servers.items() if s is not self._server]
        if keep:
            out = []
            for m in self.mounts.values():
                if isinstance(m.proc, ClientMount) and m.proc.proc is not None:
                    out.append(f"fusermount3 -u {m.path}   # client daemon pid {m.proc.pid} "
                               f"exits after; log {m.proc.log_path}")  # fmt: skip
            if isinstance(srv, ServerProcess) and srv.proc is not None:
                out.append(f"kill {srv.proc.pid}   # fileserver {srv.host}:{srv.port}, "
                           f"data {srv.data_dir}, log {srv.log_path}")  # fmt: skip
            for p in extra:
                if isinstance(p, ServerProcess) and p.proc is not None:
                    out.append(f"kill {p.proc.pid}   # fileserver {p.host}:{p.port}, "
                               f"data {p.data_dir}, log {p.log_path}")  # fmt: skip
            for m in self.etcd.members if self.etcd is not None else []:
                if m.proc is not None:
                    out.append(f"kill {m.proc.pid}   # etcd {m.endpoint}, log {m.log_path}")
            out.append(f"rm -rf {self.base}   # afterwards: logs, data and cache")
            return out
        errors = []
        for m in self.mounts.values():
            if isinstance(m.proc, ClientMount):
                try:
                    m.proc.stop()
                except Exception as exc:  # keep going: every mount must come down
                    errors.append(f"stopping {m.path}: {exc!r}")
                    with contextlib.suppress(Exception):
                        unmount(m.path)
        for p in [srv, *extra]:
            if isinstance(p, ServerProcess):
                try:
                    p.stop()
                except Exception as exc:
                    errors.append(f"stopping the fileserver {p.data_dir.name}: {exc!r}")
        if self.etcd is not None:
            try:
                self.etcd.stop()
            except Exception as exc:
                errors.append(f"stopping etcd: {exc!r}")
        return errors


# -- running ---------------------------------------------------------------------


@dataclass
class Result:
    """What one scenario run gave: verdict, checks and its whole timeline."""

    name: str
    summary: str
    passed: bool
    seconds: float
    checks: list[tuple[bool, str]]
    events: list[Event]
    focus_t: float
    error: str = ""
    kept: list[str] = field(default_factory=list)
    fids: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "summary": self.summary, "passed": self.passed,
                "seconds": round(self.seconds, 3), "t0": self.focus_t,
                "checks": [{"ok": ok, "text": t} for ok, t in self.checks],
                "error": self.error, "fids": self.fids,
                "events": [e.to_json() for e in self.events]}  # fmt: skip


def run(
    sc: Scenario,
    *,
    tmp: str | None = None,
    keep: bool = False,
    options: Any = None,
    external: Any = None,
    server_overrides: dict[str, Any] | None = None,
) -> Result:
    """Run one scenario in a fresh scratch directory and stop everything
    after it (unless ``keep``); a crash is a FAIL with its reason."""
    base = Path(tempfile.mkdtemp(prefix=f"afs-{sc.name}-", dir=tmp))
    server_options = dict(sc.server_options)
    for k, v in (server_overrides or {}).items():
        if k in server_options:
            server_options[k] = v
    lab = Lab(base, server_options=server_options, options=options, external=external)
    t0 = time.monotonic()
    error = ""
    try:
        try:
            sc.fn(lab)
        except ScenarioFailed as exc:
            error = exc.message
        except Exception as exc:
            log.debug("scenario %s crashed", sc.name, exc_info=True)
            error = f"{type(exc).__name__}: {exc}"
        events = lab.timeline.events()  # before the lab (and its logs) go away
    finally:
        kept = lab.close(keep)
        if not keep:
            for e in kept:
                log.warning("%s", e)
            kept = []
            shutil.rmtree(base, ignore_errors=True)
    passed = not error and bool(lab.checks) and all(ok for ok, _ in lab.checks)
    focus = lab.focus_t or (events[0].t if events else time.time())
    return Result(sc.name, sc.summary, passed, time.monotonic() - t0, lab.checks, events,
                  focus, error, kept, dict(lab.timeline.fids))  # fmt: skip


def report(r: Result, verbose: bool = False) -> str:
    """The text report of one run: timeline (from the first phase unless
    ``verbose``), checks, verdict."""
    lines = [f"=== {r.name}: {r.summary}"]
    shown = r.events if verbose else [e for e in r.events if e.t >= r.focus_t - 0.002]
    lines.append(render(shown, r.focus_t, fids=r.fids, verbose=verbose))
    for ok, text in r.checks:
        lines.append(f"  [{'ok' if ok else 'FAIL'}] {text}")
    if r.error and (not r.checks or r.checks[-1][1] != r.error):
        lines.append(f"  [FAIL] {r.error}")
    lines += [f"  kept: {line}" for line in r.kept]
    lines.append(f"--- {r.name}: {'PASS' if r.passed else 'FAIL'} ({r.seconds:.1f} s)\n")
    return "\n".join(lines)

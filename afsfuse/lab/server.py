"""Run a fileserver for scenarios, benchmarks and tests: as a subprocess
(``ServerProcess``) or inside the caller's trio loop (``running_server``),
plus ``fs_client``, a protocol-level client that records the CB.* calls it
receives.

Subprocess::

    with ServerProcess(tmp_path / "fs", extra_args=["--callback-duration", "5"]) as srv:
        ... connect to (srv.host, srv.port) ...
        srv.kill()            # SIGKILL, e.g. for crash tests
        srv.start()           # same data dir, new epoch

In-process (trio test)::

    async with running_server(tmp_path / "fs", break_timeout=0.5) as server:
        async with fs_client(server.host, server.port) as c:
            root = await c.root_fid()
            r = await c.call("FS.FetchStatus", None, root)

Both know their server's cell key (``srv.key``, ``srv.key_file``) and record
it by address, so ``fs_client(host, port)`` authenticates by itself (pass
``auth=False`` to stay unauthenticated, ``key=`` to use another key), and a
server started with ``vl=``/``--vl`` gets that VL server's key.

``ServerProcess.start()`` also points ``$AFSFUSE_KEY_FILE`` at its key, so a
plain ``afsfuse mount`` run by a test (environment inherited) finds the key of
the server started last.

TLS: each server started here (unless ``--insecure`` / ``insecure=True``)
gets a client bundle issued from its cell CA (``srv.cert_file``, recorded by
address in ``CERT_FILES``; ``$AFSFUSE_CERT_FILE`` points at the last one), so
``fs_client`` and ``ClientMount`` connect over TLS by themselves;
``tls_for(host, port)`` is the client context for other callers.

Only processes started here are ever signalled, by pid.
"""

from __future__ import annotations

import math
import os
import signal
import ssl
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from fileserver.config import ADDRESS_FILE, PID_FILE, ServerConfig
from fileserver.server import FileServer
from protocol.auth import KEY_FILE, client_handshake, load_key
from protocol.connection import Connection, open_connection
from protocol.records import Fid
from protocol.tls import CERT_ENV, CellCA, ca_file_for, client_context, write_client_bundle

# The checkout this package runs from (editable install): subprocesses start
# there, and tests find scripts/ under it.
REPO = Path(__file__).resolve().parents[2]

#: Cell key files of the servers started here, by (host, port).
KEY_FILES: dict[tuple[str, int], Path] = {}


#: Client bundles for the servers started here, by (host, port); None: --insecure.
CERT_FILES: dict[tuple[str, int], Path | None] = {}


def issue_bundle(ca_file: Path, out: Path, **kw: Any) -> Path:
    """A client bundle from the cell CA at ``ca_file`` (the CA must exist)."""
    write_client_bundle(CellCA.load(ca_file), out, name=f"lab {out.name}", **kw)
    return out


def tls_for(host: str, port: int) -> ssl.SSLContext | None:
    """The client TLS context for the server started here at that address
    (None: it runs --insecure), else from $AFSFUSE_CERT_FILE."""
    if (host, port) in CERT_FILES:
        path = CERT_FILES[(host, port)]
    else:
        path = Path(os.environ[CERT_ENV]) if os.environ.get(CERT_ENV) else None
    return client_context(path) if path is not None else None


def key_for(host: str, port: int) -> bytes | None:
    """The key of the server started here at that address, else $AFSFUSE_KEY_FILE's."""
    path = KEY_FILES.get((host, port))
    if path is None and os.environ.get("AFSFUSE_KEY_FILE"):
        path = Path(os.environ["AFSFUSE_KEY_FILE"])
    return load_key(path) if path is not None else None


class ServerProcess:
    """A fileserver subprocess on 127.0.0.1 with a random port."""

    def __init__(
        self,
        data_dir: Path | str,
        *,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 20.0,
        python: str = sys.executable,
        events: bool = True,
    ) -> None:
        self.data_dir = Path(data_dir)
        # Tests and scenarios read the event lines; benchmarks turn them off
        # to measure what a default deployment does.
        self.extra_args = list(extra_args) + (["--events"] if events else [])
        self.startup_timeout = startup_timeout
        self.python = python
        self.proc: subprocess.Popen[bytes] | None = None
        self.host = ""
        self.port = 0
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.server.log"
        #: The client bundle issued at each start (TLS).
        self.cert_file = self.data_dir.parent / f"{self.data_dir.name}.client.pem"

    @property
    def key_file(self) -> Path:
        args = self.extra_args
        if "--key-file" in args:
            return Path(args[args.index("--key-file") + 1])
        return self.data_dir / KEY_FILE

    @property
    def key(self) -> bytes:
        return load_key(self.key_file)

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def start(self, port: int = 0) -> ServerProcess:
        """Start (again); ``port`` 0 picks a free one, ``srv.start(srv.port)``
        restarts on the same port so running clients reconnect by themselves."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("already running")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for name in (ADDRESS_FILE, PID_FILE):  # stale after a SIGKILL
            (self.data_dir / name).unlink(missing_ok=True)
        extra = list(self.extra_args)
        if "--vl" in extra and "--key-file" not in extra:
            # One cell, one key: use the key of the VL server we register with.
            vl = extra[extra.index("--vl") + 1].rpartition(":")
            vl_key = KEY_FILES.get((vl[0] or "127.0.0.1", int(vl[2])))
            if vl_key is not None:
                self.extra_args += ["--key-file", str(vl_key)]
                extra = list(self.extra_args)
        cmd = [self.python, "-m", "fileserver.cli", "serve", "--data-dir", str(self.data_dir),
               "--listen", f"127.0.0.1:{port}", *extra]  # fmt: skip
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        logf = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        try:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=logf,
                                         stderr=subprocess.STDOUT)  # fmt: skip
        finally:
            logf.close()
        deadline = time.monotonic() + self.startup_timeout
        addr_file = self.data_dir / ADDRESS_FILE
        pid_file = self.data_dir / PID_FILE
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fileserver exited with {self.proc.returncode}:\n"
                                   f"{self.log_text()[-3000:]}")  # fmt: skip
            try:
                if int(pid_file.read_text()) == self.proc.pid:
                    host, _, port = addr_file.read_text().strip().rpartition(":")
                    self.host, self.port = host, int(port)
                    KEY_FILES[(self.host, self.port)] = self.key_file
                    os.environ["AFSFUSE_KEY_FILE"] = str(self.key_file)
                    CERT_FILES[(self.host, self.port)] = self._issue_cert()
                    return self
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"fileserver did not start in {self.startup_timeout} s:\n"
                           f"{self.log_text()[-3000:]}")  # fmt: skip

    @property
    def insecure(self) -> bool:
        return "--insecure" in self.extra_args

    def _issue_cert(self) -> Path | None:
        if self.insecure:
            return None
        args = self.extra_args
        ca = Path(args[args.index("--ca-file") + 1]) if "--ca-file" in args else None
        issue_bundle(ca or ca_file_for(self.key_file), self.cert_file)
        os.environ[CERT_ENV] = str(self.cert_file)
        return self.cert_file

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL.  Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@asynccontextmanager
async def running_server(data_dir: Path | str, **config: Any) -> AsyncIterator[FileServer]:
    """Run a FileServer in the current trio loop on 127.0.0.1:<random>."""
    vl = config.get("vl")
    if vl is not None and config.get("key_file") is None and tuple(vl) in KEY_FILES:
        config["key_file"] = KEY_FILES[tuple(vl)]  # one cell, one key
    cfg = ServerConfig(data_dir=Path(data_dir), host="127.0.0.1", port=0, **config)
    server = FileServer(cfg)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        KEY_FILES[(server.host, server.port)] = Path(cfg.key_file)  # type: ignore[arg-type]
        CERT_FILES[(server.host, server.port)] = (
            None
            if cfg.insecure
            else issue_bundle(
                cfg.ca_file,  # type: ignore[arg-type]
                Path(data_dir).parent / f"{Path(data_dir).name}.client.pem",
            )
        )
        try:
            yield server
        finally:
            server.stop()


class FsTestClient:
    """A protocol-level client: FS.* calls out, CB.* calls recorded.

    ``log`` holds ``(kind, payload, trio time)`` in arrival order: ``("break",
    [Fid, ...])``, ``("init", server_uuid)``.  Set ``hang`` to make CB.CallBack
    never answer (a client that is alive on TCP but stuck).
    """

    def __init__(self, uuid: str | None = None, *, hang: bool = False) -> None:
        self.uuid = uuid or str(uuidlib.uuid4())
        self.hang = hang
        self.log: list[tuple[str, Any, float]] = []
        self.conn: Connection | None = None
        self.hello: dict[str, Any] = {}
        self.changed = trio.Event()

    def _note(self, kind: str, payload: Any) -> None:
        self.log.append((kind, payload, trio.current_time()))
        self.changed.set()
        self.changed = trio.Event()

    async def _cb_callback(self, conn: Connection, fids: list[Any]) -> None:
        if self.hang:
            await trio.sleep_forever()
        self._note("break", [Fid.from_wire(f) for f in fids])

    async def _cb_init(self, conn: Connection, server_uuid: str) -> None:
        if self.hang:
            await trio.sleep_forever()
        self._note("init", server_uuid)

    async def _cb_probe(self, conn: Connection) -> None:
        return None

    async def _cb_probe_uuid(self, conn: Connection, uuid: str) -> bool:
        return uuid == self.uuid

    def handlers(self) -> dict[str, Any]:
        return {"CB.CallBack": self._cb_callback, "CB.InitCallBackState3": self._cb_init,
                "CB.Probe": self._cb_probe, "CB.ProbeUuid": self._cb_probe_uuid}  # fmt: skip

    @property
    def breaks(self) -> list[Fid]:
        return [f for kind, fids, _ in self.log if kind == "break" for f in fids]

    @property
    def inits(self) -> int:
        return sum(1 for kind, _, _ in self.log if kind == "init")

    async def call(self, method: str, *params: Any, timeout: float | None = 30) -> Any:
        assert self.conn is not None
        return await self.conn.call(method, *params, timeout=timeout)

    async def say_hello(self) -> dict[str, Any]:
        self.hello = await self.call(
            "FS.Hello", {"uuid": self.uuid, "version": 1, "capabilities": []}
        )
        return self.hello

    async def root_fid(self, volume: str = "root.cell") -> list[int]:
        e = await self.call("VL.GetEntryByName", volume)
        return [e["volume_id"], 1, 1]

    async def wait_for(self, pred: Any, timeout: float = 5.0) -> None:
        with trio.fail_after(timeout):
            while not pred():
                await self.changed.wait()


@asynccontextmanager
async def fs_client(
    host: str,
    port: int,
    *,
    uuid: str | None = None,
    hang: bool = False,
    hello: bool = True,
    client: FsTestClient | None = None,
    auth: bool = True,
    key: bytes | None = None,
    tls: ssl.SSLContext | bool | None = None,
) -> AsyncIterator[FsTestClient]:
    """Connect a FsTestClient (reusing ``client`` keeps its UUID and log).

    It authenticates with ``key`` (default: the key of the server started
    here at that address) unless ``auth`` is false, over TLS with ``tls``
    (default: ``tls_for(host, port)``; ``False``: plaintext)."""
    c = client or FsTestClient(uuid, hang=hang)
    ctx = tls_for(host, port) if tls is None else (tls or None)
    async with open_connection(
        host, port, c.handlers(), name=f"client-{c.uuid[:8]}", tls=ctx
    ) as conn:
        c.conn = conn
        if auth:
            k = key if key is not None else key_for(host, port)
            if k is None:
                raise RuntimeError(f"no cell key known for {host}:{port}; pass key=")
            await client_handshake(conn, k, timeout=30)
        if hello:
            await c.say_hello()
        yield c


@asynccontextmanager
async def server_and_two_clients(
    data_dir: Path | str, **config: Any
) -> AsyncIterator[tuple[FileServer, FsTestClient, FsTestClient]]:
    """A ``running_server`` and two ``fs_client`` sessions of it: the usual
    cast of a break test (one changes, the other holds promises)."""
    async with (
        running_server(data_dir, **config) as srv,
        fs_client(srv.host, srv.port) as x,
        fs_client(srv.host, srv.port) as y,
    ):
        yield srv, x, y


INF = math.inf


async def wait_until(pred: Any, timeout: float = 5.0, interval: float = 0.01) -> None:
    """Poll ``pred()`` (server-side state has no event to wait on) up to ``timeout``."""
    with trio.fail_after(timeout):
        while True:
            if pred():
                return
            await trio.sleep(interval)

"""The fileserver: listener, per-connection client sessions, handler wiring.

``FileServer(config)`` runs inside a trio nursery (``await nursery.start(
server.serve)`` returns the bound ``(host, port)``), so tests can run one
in-process; the CLI runs the same object until SIGTERM.

Authentication (SPEC section 4): every connection passes the gate of
``protocol.Connection``: before the cell key handshake (``Auth.Challenge``,
``Auth.Prove``, see ``protocol.auth``) only those two, the read-only ``VL.*``
lookups and ``Admin.*`` (which has its own secret) may run; anything else gets
one EACCES and the connection is closed.  Connection limits (per peer
address, in total), idle, partial-frame and handshake timeouts are enforced
here and in the Connection.

Session rules (SPEC section 4): ``FS.*`` before ``FS.Hello`` is EPROTO; at
Hello a client the server has no state for gets ``CB.InitCallBackState3``
and a returning client gets its delayed breaks, both before the reply; a
second connection with the same UUID replaces the first; a dropped
connection marks the client down until it says Hello again.

Imports: every other fileserver module except cli and salvage (it wires
them); ``protocol``.
"""

from __future__ import annotations

import inspect
import logging
import re
import ssl
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import trio

from fileserver.admin import AdminService
from fileserver.breaker import Breaker, ClientState
from fileserver.callback import CallbackTable
from fileserver.config import ROOT_VOLUME_NAME, ServerConfig
from fileserver.events import event
from fileserver.fsops import CAPABILITIES, FsOps
from fileserver.locks import LockService
from fileserver.metrics import Metrics
from fileserver.prober import run_prober
from fileserver.store import DataDir, VolumeStore
from fileserver.vl import VLRegistrar, VLService
from fileserver.vldb import VLDB, LocalVLDB, make_vldb
from fileserver.volmove import MovedVolumes, Receiver, move_volume
from protocol.auth import AUTH_CHALLENGE, AUTH_PROVE, ServerAuth, create_key
from protocol.connection import Connection, serve_tcp
from protocol.errors import RpcError
from protocol.gc_schedule import gc_stats
from protocol.limits import PROTOCOL_VERSION
from protocol.methods import FS_HELLO, VL_GET_ENTRY_BY_ID, VL_GET_ENTRY_BY_NAME, VL_LIST_ENTRIES
from protocol.records import Fid
from protocol.tls import ServerTLS, note_mode, server_tls

log = logging.getLogger(__name__)

#: What may run before the handshake: the handshake itself, the VL lookups
#: (readable by anyone, as in AFS) and Admin.* (guarded by the admin secret).
_PRE_AUTH = frozenset({AUTH_CHALLENGE, AUTH_PROVE, VL_GET_ENTRY_BY_NAME, VL_GET_ENTRY_BY_ID,
                       VL_LIST_ENTRIES})  # fmt: skip


def allowed_before_auth(method: str) -> bool:
    return method in _PRE_AUTH or method.startswith("Admin.")


_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _arity(fn: Callable[..., Any], skip: int) -> tuple[int, int]:
    """(min, max) positional params of ``fn`` after the first ``skip``."""
    params = list(inspect.signature(fn).parameters.values())[skip:]
    lo = sum(1 for p in params if p.default is inspect.Parameter.empty)
    return lo, len(params)


class FileServer:
    """One fileserver.  ``serve()`` runs it; ``stop()`` ends ``serve()`` cleanly."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.datadir = DataDir(config.data_dir)
        self.store = VolumeStore(self.datadir, sync=config.sync, inline_max=config.inline_max)
        self.metrics = Metrics()
        self.metrics.durability(self.store.sync_stats)
        self.table = CallbackTable(
            max_duration=config.callback_duration,
            max_promises=config.max_callbacks,
            on_revoke=self._on_revoke,
        )
        self.breaker = Breaker(self.table, self.metrics, "", break_timeout=config.break_timeout,
                               max_delayed=config.max_delayed)  # fmt: skip
        self.uuid = ""
        self.cell = config.cell
        self.epoch = 0
        self.admin_secret = ""
        self.auth = ServerAuth(b"")
        #: TLS (protocol.tls): ours as a server, and our certificate as a client.
        self.tls: ServerTLS | None = None
        self.client_tls: ssl.SSLContext | None = None
        self._per_peer: dict[str, int] = {}
        self.host = ""
        self.port = 0
        self.metrics_port = 0
        self.started_at = 0.0
        self.connections: set[Connection] = set()
        self.registrar: VLRegistrar | None = None
        self.first_start = False
        self._nursery: trio.Nursery | None = None
        self._stop = trio.Event()
        self.fsops = FsOps(self.store, self.table, self.breaker, self.metrics, config)
        self.locks = LockService(self.store, self.fsops.caller, config.lock_lifetime,
                                 config.data_dir)  # fmt: skip
        self.vl = VLService(self.store, config.cell, "", self.advertised_addrs)
        self.vldb: VLDB = make_vldb(self) if config.vldb else LocalVLDB(self.vl)
        self.vl.vldb = self.vldb
        self.moved = MovedVolumes(config.data_dir)  # volumes moved away: EREMCHG
        self.admin = AdminService(
            self.store, self.table, self.breaker, config,
            identity=lambda: {"server_uuid": self.uuid, "cell": self.cell, "epoch": self.epoch},
            secret=lambda: self.admin_secret,
            stats=self.stats,
            vldb=self.vldb,
            move=partial(move_volume, self),
        )  # fmt: skip
        self.handlers = self._build_handlers()
        self.metrics.gauge("promises", "Callback promises held", lambda: self.table.count)
        self.metrics.gauge("clients", "Clients known", lambda: len(self.breaker.clients))
        self.metrics.gauge(
            "clients_up",
            "Clients up",
            lambda: sum(not s.down for s in self.breaker.clients.values()),
        )
        self.metrics.gauge(
            "delayed_breaks",
            "Delayed fid breaks held",
            lambda: sum(len(s.delayed) for s in self.breaker.clients.values()),
        )

    # -- lifecycle ---------------------------------------------------------------

    def _open(self) -> bool:
        cfg = self.config
        first = self.datadir.initialize(cfg.cell)
        self.datadir.lock()
        try:
            self.uuid, self.cell = self.datadir.uuid, self.datadir.cell
            self.admin_secret = self.datadir.read_secret()
            self.auth.key = create_key(cfg.key_file)  # type: ignore[arg-type]
            if not cfg.insecure:
                self.tls, self.client_tls = server_tls(cfg, self.cell, self.uuid)
            note_mode(cfg.data_dir, cfg.insecure)
            self.store.open_all()
            self.first_start = first  # an etcd VLDB creates root.cell only if the cell has none
            if (first and cfg.create_root and cfg.vldb is None
                    and ROOT_VOLUME_NAME not in self.store.by_name):  # fmt: skip
                self.store.create_sync(ROOT_VOLUME_NAME)
        except BaseException:
            self.store.close_all()
            self.datadir.unlock()
            raise
        return first

    def advertised_addrs(self) -> list[list[Any]]:
        if self.config.advertise is not None:
            return [list(self.config.advertise)]
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return [[host, self.port]]

    async def serve(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until ``stop()`` or cancellation; reports the bound (host, port)."""
        cfg = self.config
        await trio.to_thread.run_sync(self._open)
        # A new epoch each start: clients learn the server lost its callback state.
        self.epoch = time.time_ns() // 1000
        self.breaker.server_uuid = self.uuid
        self.vl.server_uuid = self.uuid
        self.vl.cell = self.cell
        self.started_at = time.time()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if cfg.insecure:
                    log.warning("*** --insecure: connections are NOT encrypted or "
                                "integrity-protected (plaintext, for benchmarks) ***")  # fmt: skip
                if cfg.host not in ("127.0.0.1", "::1", "localhost"):
                    log.warning("listening on %s: reachable from other machines; only the "
                                "cell key and client certificates keep strangers out%s",
                                cfg.host, ", traffic is NOT encrypted" if cfg.insecure
                                else "")  # fmt: skip
                listeners = await nursery.start(
                    partial(
                        serve_tcp,
                        self._on_connection,
                        cfg.host,
                        cfg.port,
                        self.handlers,
                        tls=self.tls,
                        allow_unauthenticated=allowed_before_auth,
                        handshake_timeout=cfg.handshake_timeout,
                        idle_timeout=cfg.idle_timeout,
                        frame_timeout=cfg.frame_timeout,
                        max_frame=cfg.max_frame,
                        max_pending=cfg.max_calls_in_flight,
                        max_concurrent=min(128, cfg.max_calls_in_flight),
                        on_receive=self.store.activity.heard,
                    )
                )
                sockname = listeners[0].socket.getsockname()
                self.host, self.port = sockname[0], sockname[1]
                await trio.to_thread.run_sync(self.datadir.write_address, self.host, self.port)
                if cfg.metrics is not None:
                    self.metrics_port = self.metrics.serve(*cfg.metrics)
                nursery.start_soon(self._sweeper)
                nursery.start_soon(self._redo_syncer)
                if cfg.sync == "batch":
                    nursery.start_soon(self._flusher)
                if self.tls is not None:
                    nursery.start_soon(self.tls.watch_revocations)
                nursery.start_soon(self._retry_down_clients)
                nursery.start_soon(run_prober, self.breaker, cfg.probe_after)
                if cfg.vl is not None:
                    self.registrar = VLRegistrar(
                        cfg.vl,
                        self.store,
                        self.uuid,
                        self.advertised_addrs,
                        cfg.vl_register_interval,
                        key=self.auth.key,
                        tls=self.client_tls,
                    )
                    nursery.start_soon(self.registrar.run)
                await nursery.start(self.vldb.run)
                log.info("fileserver %s (cell %s, epoch %d) listening on %s:%d, data dir %s",
                         self.uuid, self.cell, self.epoch, self.host, self.port,
                         cfg.data_dir)  # fmt: skip
                task_status.started((self.host, self.port))
                await self._stop.wait()
                log.info("fileserver stopping")
                nursery.cancel_scope.cancel()
        finally:
            # Handlers were cancelled; worker threads doing a store were not
            # abandoned, so every started transaction finished before this.
            self._nursery = None
            self.metrics.stop()
            self.datadir.clear_address()
            self.store.close_all()
            self.datadir.unlock()
            log.info("fileserver stopped")

    def stop(self) -> None:
        self._stop.set()

    async def _sweeper(self) -> None:
        while True:
            await trio.sleep(self.config.sweep_interval)
            n = 0
            for n in self.table.sweep(chunk=10_000):  # noqa: B007
                await trio.lowlevel.checkpoint()  # let requests run between chunks
            if n:
                self.metrics.inc("expired", n)
                event("sweep", expired=n)
            # Clients gone for longer than any promise lasts are forgotten, so
            # the client registry does not grow with every UUID ever seen.
            idle = self.table.max_duration + 600
            now = time.time()
            for st in list(self.breaker.clients.values()):
                if st.down and st.conn is None and now - st.last_seen > idle:
                    self.breaker.forget(st)

    async def _redo_syncer(self) -> None:
        """Small stores and truncations reach their data files unsynced, their
        redo records committed: sync those files off the reply path, in bulk,
        so the records can go."""
        while True:
            await trio.sleep(0.2)
            for h in self.store.list():
                if h.vol.redo_unsynced and not h.removed:
                    await trio.to_thread.run_sync(h.vol.sync_redo)

    async def _flusher(self) -> None:
        """``--sync batch``: make what was written durable about once a second."""
        while True:
            await trio.sleep(1.0)
            for h in self.store.list():
                if h.vol.dirty:
                    await h.commit(h.vol.flush, op="flush")

    async def _retry_down_clients(self) -> None:
        """Clients still connected but marked down (a break timed out) get what
        they are owed retried in the background, so an idle client does not
        sit on stale promises until its next request."""
        interval = max(1.0, self.config.break_timeout * 2.5)
        while True:
            await trio.sleep(interval)
            nursery = self._nursery
            if nursery is None:
                return
            for st in list(self.breaker.clients.values()):
                conn = st.conn
                if st.down and conn is not None and not conn.closed and not st.lock.locked():
                    nursery.start_soon(self._retry_one, st, conn)

    async def _retry_one(self, st: ClientState, conn: Connection) -> None:
        async with st.lock:
            if not st.down or st.conn is not conn:
                return
            try:
                await self.breaker.catch_up(st, conn)
            except (RpcError, trio.TooSlowError):
                return
            st.down = False
        event("client_up", client=st.uuid, conn=conn.name, retried=1)

    def _on_revoke(self, cid: int, held: list[Fid]) -> None:
        st = self.breaker.by_cid.get(cid)
        if st is None:
            return
        st.needs_init = True
        st.delayed.clear()
        self.metrics.inc("revocations")
        event("revoke", client=st.uuid)
        if self._nursery is not None:
            # Until the client is told (or marked down) it still trusts these:
            # changes to them wait for the reset as for a break on its way.
            done = self.breaker.track(cid, held)
            try:
                self._nursery.start_soon(self.breaker.reset_client, st, "table_full", done)
            except RuntimeError:  # stopping: nothing will wait on it
                self.breaker.untrack(done)

    # -- connections ---------------------------------------------------------------

    async def _on_connection(self, conn: Connection) -> None:
        self.metrics.inc("connections")
        peer = conn.name.rpartition(":")[0] or conn.name
        cfg = self.config
        if len(self.connections) >= cfg.max_connections:
            conn.refuse = RpcError("EAGAIN", f"server has {cfg.max_connections} connections")
        elif self._per_peer.get(peer, 0) >= cfg.max_connections_per_peer:
            conn.refuse = RpcError(
                "EAGAIN", f"{cfg.max_connections_per_peer} connections from {peer} already"
            )
        if conn.refuse is not None:
            # Served only to say why: the first request gets the error.
            log.warning("%s: connection refused: %s", conn.name, conn.refuse.message)
            self.metrics.inc("connections_refused")
            conn.handshake_timeout = min(conn.handshake_timeout or 2.0, 2.0)
            await conn.run()
            return
        self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        self.connections.add(conn)
        try:
            await conn.run()
        finally:
            n = self._per_peer.get(peer, 1) - 1
            if n > 0:
                self._per_peer[peer] = n
            else:
                self._per_peer.pop(peer, None)
            self.connections.discard(conn)
            st: ClientState | None = conn.context.get("session")
            if st is not None and st.conn is conn:
                st.conn = None
                self.breaker.mark_down(st, "disconnected")

    async def hello(self, conn: Connection, hello: Any) -> dict[str, Any]:
        if conn.context.get("admin"):
            raise RpcError("EPERM", "FS.Hello on an admin connection")
        if not isinstance(hello, dict) or type(hello.get("uuid")) is not str:
            raise RpcError("EINVAL", "hello must be a map with a str uuid")
        uuid = hello["uuid"].lower()
        if not _UUID.match(uuid):
            raise RpcError("EINVAL", f"uuid {hello['uuid']!r:.60} is not a canonical UUID")
        version = hello.get("version", PROTOCOL_VERSION)
        if type(version) is not int:
            raise RpcError("EINVAL", "version must be an int")
        if self.breaker.nemesis.refuses(uuid):
            raise RpcError("ECONNREFUSED", "partitioned by the nemesis")
        cur: ClientState | None = conn.context.get("session")
        if cur is not None and cur.uuid != uuid:
            raise RpcError("EINVAL", "a connection cannot change its client UUID")
        st, new = self.breaker.client(uuid)
        async with st.lock:
            old = st.conn
            if old is not None and old is not conn:
                # The new connection replaces the old one (SPEC section 4).
                st.conn = None
                if not old.closed and self._nursery is not None:
                    self._nursery.start_soon(partial(old.aclose, "replaced by a new connection"))
            st.down = True
            st.conn = conn
            conn.context.pop("session", None)
            ndelayed, needs_init = len(st.delayed), st.needs_init
            try:
                await self.breaker.catch_up(st, conn)
            except (RpcError, trio.TooSlowError) as exc:
                if st.conn is conn:
                    st.conn = None
                log.info("client %s: Hello failed, callbacks not answered: %s", uuid, exc)
                raise RpcError(
                    "ETIMEDOUT", "client did not answer callbacks during Hello"
                ) from None
            st.down = False
            st.addr = conn.name
            st.last_seen = time.time()
            st.hello_count += 1
            conn.context["session"] = st
        self.table.touch(st.cid)
        event("hello", client=uuid, new=int(new), delayed=ndelayed, dropped=int(needs_init),
              conn=conn.name)  # fmt: skip
        return {"uuid": self.uuid, "epoch": self.epoch, "cell": self.cell,
                "version": PROTOCOL_VERSION, "capabilities": list(CAPABILITIES),
                "idle_timeout": self.config.idle_timeout}  # fmt: skip

    async def _session(self, conn: Connection) -> ClientState:
        st: ClientState | None = conn.context.get("session")
        if st is None:
            raise RpcError("EPROTO", "FS.Hello must be the first call on a connection")
        if st.conn is not conn:
            raise RpcError("EPROTO", "this connection was replaced by a newer one")
        if st.down:
            # It missed breaks (did not answer in time): it gets them before
            # anything else, or loses the connection.
            async with st.lock:
                if st.down:
                    try:
                        await self.breaker.catch_up(st, conn)
                    except (RpcError, trio.TooSlowError):
                        await conn.aclose("client does not answer callbacks")
                        raise RpcError("ETIMEDOUT", "client does not answer callbacks") from None
                    st.down = False
                    event("client_up", client=st.uuid, conn=conn.name)
        st.last_seen = time.time()
        self.table.touch(st.cid)
        return st

    # -- handler wiring --------------------------------------------------------------

    def _wrap(self, method: str, fn: Callable[..., Any], kind: str) -> Callable[..., Any]:
        lo, hi = _arity(fn, 1)
        metrics = self.metrics
        activity = self.store.activity

        async def handler(conn: Connection, *params: Any) -> Any:
            t0 = time.perf_counter()
            err: str | None = None
            activity.started(conn)
            try:
                if not lo <= len(params) <= hi:
                    raise RpcError("EINVAL", f"{method}: {len(params)} params, want {lo}..{hi}")
                if kind == "fs":
                    self.moved.check(params, self.store.by_id.__contains__)
                    st = await self._session(conn)
                    return await fn(st, *params)
                return await fn(conn, *params)
            except RpcError as exc:
                if kind == "fs" and exc.code in ("ESTALE", "ENOENT"):
                    self.moved.check(params, self.store.by_id.__contains__)  # moved meanwhile
                err = exc.code
                raise
            except (TypeError, ValueError, KeyError, IndexError):
                err = "EINVAL"
                raise
            except BaseException:
                err = "EIO"
                raise
            finally:
                activity.ended(conn)
                metrics.rpc(method, time.perf_counter() - t0, err)

        return handler

    def _build_handlers(self) -> dict[str, Callable[..., Any]]:
        h: dict[str, Callable[..., Any]] = {
            FS_HELLO: self._wrap(FS_HELLO, self.hello, "conn"),
            AUTH_CHALLENGE: self._wrap(AUTH_CHALLENGE, self.auth.challenge, "conn"),
            AUTH_PROVE: self._wrap(AUTH_PROVE, self.auth.prove, "conn"),
        }
        for name, fn in [*self.fsops.handlers().items(), *self.locks.handlers().items()]:
            h[name] = self._wrap(name, fn, "fs")
        for name, fn in self.locks.admin_handlers().items():
            h[name] = self._wrap(name, fn, "conn")
        for name, fn in self.vl.handlers().items():
            h[name] = self._wrap(name, fn, "conn")
        for name, fn in self.admin.handlers().items():
            h[name] = self._wrap(name, fn, "conn")
        for name, fn in Receiver(self).handlers().items():  # vol move, cell-key authenticated
            h[name] = self._wrap(name, fn, "conn")
        return h

    # -- introspection -------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        snap = self.metrics.snapshot()
        snap["table"] = dict(self.table.stats, promises=self.table.count)
        snap["durability"] = dict(self.store.sync_stats.snapshot(), sync=self.config.sync)
        snap["gc"] = gc_stats()
        snap.update({"server_uuid": self.uuid, "cell": self.cell, "epoch": self.epoch,
                     "uptime": round(time.time() - self.started_at, 3)})  # fmt: skip
        return snap

    def client(self, uuid: str) -> ClientState | None:
        return self.breaker.clients.get(uuid)

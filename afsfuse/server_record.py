"""Server records: one per fileserver, keyed by the server's persistent UUID.

Two cells that alias each other, or a server listed in two cells, share one
record.  A record owns the connection to its server (reconnecting with
backoff when it drops), and the connection carries the server's CB.* calls
back to us, so the record's handlers are bound to it.  It holds
``cb_s_break`` (the seed's ``cb_seq``): a mass break (``CB.InitCallBackState3``
or a changed epoch on reconnect) is one increment (P4).  It also holds the
interest registry {volume id -> set of volume instances} the CB service
consults (P3).

P2: ``FS.GiveUpAllCallBacks`` is sent only by ``destroy()``, exactly once,
when the record has had no interests for the idle lifetime, or at unmount.

Each connection first runs the cell key handshake (``protocol.auth``): the
server must prove the key before any of its CB.* calls may run (the
connection's gate refuses them until then), then we prove it.  An idle
connection sends ``FS.GetCapabilities`` as a keepalive at a third of the
idle timeout the server announces, so the server's idle bound only drops
clients that are gone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import trio
import trio.lowlevel

from afsfuse.stats import Stats, log_event
from protocol import methods as M
from protocol.auth import client_handshake
from protocol.connection import Connection, ConnectionLost, Handler, RpcTimeout
from protocol.errors import RpcError
from protocol.limits import PROTOCOL_VERSION

if TYPE_CHECKING:
    from afsfuse.volume import VolumeInstance

log = logging.getLogger(__name__)

Address = tuple[str, int]
#: Opens a byte stream to (host, port); tests pass one over memory streams.
Connector = Callable[[str, int], Awaitable[trio.abc.Stream]]


async def tcp_connector(host: str, port: int) -> trio.abc.Stream:
    return await trio.open_tcp_stream(host, port)


class NoConnection(ConnectionLost):
    """No connection to the server could be had in time (nothing was sent)."""


class ServerRecord:
    def __init__(
        self,
        uuid: str,
        addrs: list[Address],
        *,
        client_uuid: str,
        connector: Connector,
        handlers: Callable[[ServerRecord], Mapping[str, Handler]],
        stats: Stats,
        rpc_timeout: float,
        connect_timeout: float,
        backoff_max: float = 10.0,
        on_mass_break: Callable[[ServerRecord, str], None] | None = None,
        key: bytes | None = None,
        keepalive_interval: float | None = None,
    ) -> None:
        self.uuid = uuid
        self.addrs = list(addrs)
        self.client_uuid = client_uuid
        self._connector = connector
        self._handlers = handlers
        self._stats = stats
        self.rpc_timeout = rpc_timeout
        self.connect_timeout = connect_timeout
        self.backoff_max = backoff_max
        self._on_mass_break = on_mass_break
        self.cb_s_break = 0
        self.epoch: int | None = None
        self.cell: str | None = None
        #: What the server said it does at the last Hello (FS.Hello's reply).
        self.capabilities: frozenset[str] = frozenset()
        self.interests: dict[int, set[VolumeInstance]] = {}
        self.idle_since: float | None = trio.current_time()
        self.conn: Connection | None = None
        self._connected = trio.Event()
        self._cancel = trio.CancelScope()
        self.destroyed = False
        self.gave_up = 0  # GiveUpAllCallBacks sent (0 or 1)
        self.connects = 0
        self.last_error: str = ""
        self.key = key
        self.keepalive_interval = keepalive_interval
        #: Set while the last attempt failed the key handshake: callers fail at
        #: once instead of waiting for a reconnect that will fail the same way.
        self.auth_error: str = ""

    def __repr__(self) -> str:
        return f"<ServerRecord {self.uuid} cb_s_break={self.cb_s_break}>"

    # The seed's name for the server break counter; both words find it.
    @property
    def cb_seq(self) -> int:
        return self.cb_s_break

    @property
    def connected(self) -> bool:
        """A call made now goes out at once (no reconnect to wait for)."""
        conn = self.conn
        return not self.destroyed and conn is not None and not conn.closed

    # -- interests (P3) ---------------------------------------------------

    def add_interest(self, vol: VolumeInstance) -> None:
        self.interests.setdefault(vol.volume_id, set()).add(vol)
        self.idle_since = None

    def remove_interest(self, vol: VolumeInstance) -> None:
        s = self.interests.get(vol.volume_id)
        if s is not None:
            s.discard(vol)
            if not s:
                del self.interests[vol.volume_id]
        if not self.interests:
            self.idle_since = trio.current_time()

    def instances(self, volume_id: int) -> set[VolumeInstance]:
        return self.interests.get(volume_id, set())

    def all_instances(self) -> tuple[VolumeInstance, ...]:
        return tuple(v for s in self.interests.values() for v in s)

    # -- breaks ---------------------------------------------------------------

    def mass_break(self, why: str) -> None:
        """Void every promise from this server: one increment (P4)."""
        self.cb_s_break += 1
        self._stats.mass_breaks += 1
        log_event("mass_break", server=self.uuid, why=why, cb_s_break=self.cb_s_break)
        if self._on_mass_break is not None:
            self._on_mass_break(self, why)

    # -- connection -----------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a connection up until destroyed, reconnecting with backoff."""
        task_status.started()
        backoff = 0.1
        with self._cancel:
            while not self.destroyed:
                started = trio.current_time()
                try:
                    await self._session()
                except (RpcError, OSError, trio.BrokenResourceError) as exc:
                    self.last_error = repr(exc)
                    log.info("server %s: connection failed: %r", self.uuid, exc)
                    if isinstance(exc, RpcError) and exc.code == "EACCES":
                        self.auth_error = self.last_error
                        # Wake callers waiting for a connection: they fail now.
                        waiting, self._connected = self._connected, trio.Event()
                        waiting.set()
                except Exception as exc:  # a bug must not end the client
                    self.last_error = repr(exc)
                    log.warning("server %s: session failed: %r", self.uuid, exc)
                if trio.current_time() - started > 5 * self.backoff_max:
                    backoff = 0.1  # it worked for a while: retry promptly
                if self.destroyed:
                    break
                await trio.sleep(backoff)
                backoff = min(backoff * 2, self.backoff_max)

    async def _open_stream(self) -> trio.abc.Stream:
        last: Exception | None = None
        for host, port in self.addrs:
            try:
                with trio.fail_after(self.connect_timeout):
                    return await self._connector(host, port)
            except (OSError, trio.TooSlowError) as exc:
                last = exc
        raise ConnectionLost(f"cannot connect to server {self.uuid}: {last!r}")

    async def _session(self) -> None:
        stream = await self._open_stream()
        conn = Connection(
            stream,
            self._handlers(self),
            name=f"fs-{self.uuid[:8]}",
            default_timeout=self.rpc_timeout,
            # With a key, nothing the server sends runs before it proved the key.
            allow_unauthenticated=(lambda method: False) if self.key is not None else None,
        )
        failure: Exception | None = None
        # Nothing is raised inside the nursery (it would come out wrapped in
        # an ExceptionGroup): a failure is carried out of it.
        async with trio.open_nursery() as nursery:
            await nursery.start(conn.run)
            try:
                if self.key is not None:
                    await client_handshake(conn, self.key, timeout=self.rpc_timeout)
                idle = await self._hello(conn)
                self.auth_error = ""
                self.conn = conn
                self._connected.set()
                interval = self.keepalive_interval or (idle / 3 if idle else None)
                if interval:
                    nursery.start_soon(self._keepalive, conn, interval)
                await conn.wait_closed()
                log.info("server %s: connection closed (%s)", self.uuid, conn.close_reason)
            except (RpcError, KeyError, TypeError, ValueError) as exc:
                failure = exc
            finally:
                if self.conn is conn:
                    self.conn = None
                    self._connected = trio.Event()
                with trio.CancelScope(shield=True):
                    await conn.aclose()
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _keepalive(self, conn: Connection, interval: float) -> None:
        """Something on the wire at least every ``interval`` seconds."""
        while not conn.closed:
            await trio.sleep(interval)
            try:
                await conn.call(M.FS_GET_CAPABILITIES, timeout=max(interval, 5.0))
            except RpcError as exc:
                log.info("server %s: keepalive failed: %r", self.uuid, exc)
                return

    async def _hello(self, conn: Connection) -> float | None:
        """Say Hello; returns the server's idle timeout (None if it has none)."""
        hello = {"uuid": self.client_uuid, "version": PROTOCOL_VERSION, "capabilities": []}
        self._stats.rpc[M.FS_HELLO] += 1
        before = self.cb_s_break
        reply = await conn.call(M.FS_HELLO, hello, timeout=self.rpc_timeout)
        uuid, epoch = reply["uuid"], reply["epoch"]
        if uuid != self.uuid:
            raise ConnectionLost(f"server at {self.addrs} is {uuid}, not {self.uuid}")
        self.cell = reply.get("cell")
        caps = reply.get("capabilities")
        self.capabilities = frozenset(c for c in caps if isinstance(c, str)) if isinstance(
            caps, list) else frozenset()  # fmt: skip
        if self.epoch is not None and epoch != self.epoch and self.cb_s_break == before:
            # The server lost its callback state: every promise is void.  If it
            # already said so during this Hello (CB.InitCallBackState3, as a
            # restarted server does), that one bump voided them all (P4).
            self.mass_break("epoch_changed")
        self.epoch = epoch
        self.connects += 1
        if self.connects > 1:
            self._stats.reconnects += 1
        log_event("server_connected", server=self.uuid, epoch=epoch)
        idle = reply.get("idle_timeout")
        return float(idle) if isinstance(idle, int | float) and idle > 0 else None

    async def connection(self) -> Connection:
        """The live connection, waiting (bounded) for a reconnect."""
        if self.destroyed:
            raise NoConnection(f"server record {self.uuid} was destroyed")
        conn = self.conn
        if conn is not None and not conn.closed:
            return conn
        with trio.move_on_after(self.connect_timeout):
            while True:
                if self.auth_error:
                    raise NoConnection(f"server {self.uuid} refused: {self.auth_error}")
                await self._connected.wait()
                conn = self.conn
                if conn is not None and not conn.closed:
                    return conn
                await trio.sleep(0.01)  # closing: the session resets the event soon
        raise NoConnection(f"no connection to server {self.uuid}: {self.last_error}")

    async def call(
        self,
        method: str,
        *params: Any,
        timeout: float | None = None,
        on_issue: Callable[[], None] | None = None,
    ) -> Any:
        """Call on the live connection; ``on_issue`` runs just before sending."""
        conn = await self.connection()
        self._stats.rpc[method] += 1
        if on_issue is not None:
            on_issue()
        t0 = time.perf_counter()
        try:
            return await conn.call(method, *params, timeout=timeout)
        finally:
            self._stats.rpc_seconds[method] += time.perf_counter() - t0

    # -- destruction (P2) -------------------------------------------------------

    async def destroy(self, timeout: float = 5.0) -> None:
        """Give up all promises, once, and close the connection."""
        if self.destroyed:
            return
        self.destroyed = True
        conn = self.conn
        with trio.CancelScope(shield=True):
            if conn is not None and not conn.closed and not self.gave_up:
                self.gave_up += 1
                self._stats.rpc[M.FS_GIVE_UP_ALL_CALLBACKS] += 1
                try:
                    await conn.call(M.FS_GIVE_UP_ALL_CALLBACKS, timeout=timeout)
                except (RpcError, RpcTimeout) as exc:
                    log.info("server %s: GiveUpAllCallBacks failed: %r", self.uuid, exc)
                log_event("gave_up_callbacks", server=self.uuid)
            if conn is not None:
                await conn.aclose()
        self._cancel.cancel()
        self._stats.records_destroyed += 1
        log_event("server_record_destroyed", server=self.uuid)

    def idle_for(self, now: float) -> float:
        return 0.0 if self.idle_since is None else now - self.idle_since


__all__ = ["Connector", "NoConnection", "ServerRecord", "tcp_connector"]

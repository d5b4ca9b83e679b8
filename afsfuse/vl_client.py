"""The volume-location client (kAFS vl_*.c): VL queries over kept connections.

``VLClient`` keeps ONE connection per VL server address and reuses it for
every query; a connection the server closed (its idle bound, a restart) is
noticed at the next query, which is sent again once over a fresh
connection (VL queries change nothing).  Servers of a cell are tried in
the order the cells file lists them.  VL lookups are made without
authentication: AFS VL data is public, and a lying VL server can only point
at servers that then fail the key handshake.

May import: ``afsfuse.cells``, ``afsfuse.server_record`` (the connector
type), ``afsfuse.stats``, ``protocol.connection``, ``protocol.errors``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import trio

from afsfuse.cells import Address, Cell
from afsfuse.server_record import Connector
from afsfuse.stats import Stats
from protocol.connection import Connection, ConnectionLost, RpcTimeout
from protocol.errors import RpcError

log = logging.getLogger(__name__)


class VLClient:
    def __init__(
        self,
        connector: Connector,
        stats: Stats,
        *,
        connect_timeout: float,
        rpc_timeout: float,
        cell_connector: Callable[[str], Connector] | None = None,
    ) -> None:
        self._connector = connector
        #: The connector of a cell (TLS with its client bundle), if not ``connector``.
        self._cell_connector = cell_connector
        self._stats = stats
        self.connect_timeout = connect_timeout
        self.rpc_timeout = rpc_timeout
        self._conns: dict[Address, Connection] = {}
        self._opening: dict[Address, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None
        self.connects = 0  # connections opened, all servers (reuse shows here)

    def start(self, nursery: trio.Nursery) -> None:
        """Connections run in ``nursery`` (the manager's) from now on."""
        self._nursery = nursery

    async def aclose(self) -> None:
        conns, self._conns = list(self._conns.values()), {}
        with trio.CancelScope(shield=True):
            for conn in conns:
                await conn.aclose()

    async def _run(self, conn: Connection, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await conn.run(task_status=task_status)
        except Exception as exc:  # a broken VL connection must not end the manager
            log.info("%s: ended: %r", conn.name, exc)

    async def _connection(
        self, addr: Address, connector: Connector | None = None
    ) -> tuple[Connection, bool]:
        """The kept connection to ``addr`` (True if it was opened just now)."""
        conn = self._conns.get(addr)
        if conn is not None and not conn.closed:
            return conn, False
        if self._nursery is None:
            raise RuntimeError("VLClient.start() was not called")
        async with self._opening.setdefault(addr, trio.Lock()):
            conn = self._conns.get(addr)
            if conn is not None and not conn.closed:
                return conn, False
            host, port = addr
            with trio.fail_after(self.connect_timeout):
                stream = await (connector or self._connector)(host, port)
            conn = Connection(
                stream, {}, name=f"vl-{host}:{port}", default_timeout=self.rpc_timeout
            )
            await self._nursery.start(self._run, conn)
            self._conns[addr] = conn
            self.connects += 1
            return conn, True

    async def _drop(self, addr: Address, conn: Connection) -> None:
        if self._conns.get(addr) is conn:
            del self._conns[addr]
        with trio.CancelScope(shield=True):
            await conn.aclose()

    async def call(self, cell: Cell, method: str, *params: Any) -> Any:
        """``method`` on the first VL server of ``cell`` that answers."""
        last: BaseException | None = None
        connector = self._cell_connector(cell.name) if self._cell_connector else None
        for addr in cell.vlservers:
            for _attempt in range(2):
                try:
                    conn, fresh = await self._connection(addr, connector)
                except (OSError, trio.TooSlowError) as exc:
                    last = exc
                    break
                self._stats.rpc[method] += 1
                t0 = time.perf_counter()
                try:
                    return await conn.call(method, *params)
                except (ConnectionLost, RpcTimeout) as exc:
                    last = exc
                    await self._drop(addr, conn)
                    if fresh or isinstance(exc, RpcTimeout):
                        break  # this server is not answering: the next one
                    # A kept connection the server closed meanwhile: once more.
                except RpcError:
                    raise
                finally:
                    self._stats.rpc_seconds[method] += time.perf_counter() - t0
        raise ConnectionLost(f"no VL server of cell {cell.name} answered: {last!r}")


__all__ = ["VLClient"]

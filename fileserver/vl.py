"""Volume location (SPEC section 7).

``VLService`` answers ``VL.*`` for the cell: this server's own volumes plus
whatever other fileservers registered with ``VL.RegisterServer``.
Registrations live in memory; registering servers repeat them periodically,
so a restarted VL server learns them again within one interval.

``VLRegistrar`` is the other side: a server started with ``--vl HOST:PORT``
registers its volumes there at start, whenever its volumes change, and
periodically.

Imports: ``fileserver.store``, ``protocol``, trio.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from fileserver.store import VolumeStore
from protocol.auth import client_handshake
from protocol.connection import Connection, open_connection
from protocol.errors import RpcError
from protocol.limits import MAX_UINT32
from protocol.methods import (
    VL_GET_ENTRY_BY_ID,
    VL_GET_ENTRY_BY_NAME,
    VL_LIST_ENTRIES,
    VL_REGISTER_SERVER,
)

if TYPE_CHECKING:
    from fileserver.vldb import VLDB

log = logging.getLogger(__name__)


def _addrs(v: Any) -> list[list[Any]]:
    if not isinstance(v, list):
        raise RpcError("EINVAL", "addrs must be a list of [host, port]")
    out = []
    for a in v:
        if (not isinstance(a, list) or len(a) != 2 or type(a[0]) is not str
                or type(a[1]) is not int or not 0 < a[1] < 65536):  # fmt: skip
            raise RpcError("EINVAL", f"bad address {a!r:.100}")
        out.append([a[0], a[1]])
    return out


class VLService:
    def __init__(
        self,
        store: VolumeStore,
        cell: str,
        server_uuid: str,
        local_addrs: Callable[[], list[list[Any]]],
    ) -> None:
        self.store = store
        self.cell = cell
        self.server_uuid = server_uuid
        self.local_addrs = local_addrs
        # server uuid -> (addrs, {volume_id: name})
        self.registered: dict[str, tuple[list[list[Any]], dict[int, str]]] = {}
        #: The VLDB answering lookups (fileserver.vldb); None: entries() here.
        self.vldb: VLDB | None = None

    async def lookup_entries(self) -> list[dict[str, Any]]:
        return await self.vldb.entries() if self.vldb is not None else self.entries()

    def _entry(self, vid: int, name: str, uuid: str, addrs: list[list[Any]]) -> dict[str, Any]:
        return {"volume_id": vid, "name": name, "type": "rw", "cell": self.cell,
                "servers": [{"uuid": uuid, "addrs": addrs}]}  # fmt: skip

    def entries(self) -> list[dict[str, Any]]:
        out = [self._entry(h.id, h.name, self.server_uuid, self.local_addrs())
               for h in self.store.list()]  # fmt: skip
        seen_ids = {h.id for h in self.store.list()}
        seen_names = set(self.store.by_name)
        for uuid, (addrs, vols) in sorted(self.registered.items()):
            for vid, name in sorted(vols.items()):
                if vid in seen_ids or name in seen_names:
                    continue
                seen_ids.add(vid)
                seen_names.add(name)
                out.append(self._entry(vid, name, uuid, addrs))
        return out

    async def get_entry_by_name(self, conn: Connection, name: Any) -> dict[str, Any]:
        if type(name) is not str:
            raise RpcError("EINVAL", "volume name must be a str")
        for e in await self.lookup_entries():
            if e["name"] == name:
                return e
        raise RpcError("ENOENT", f"no volume named {name!r:.100}")

    async def get_entry_by_id(self, conn: Connection, volume_id: Any) -> dict[str, Any]:
        if type(volume_id) is not int or not 0 <= volume_id <= MAX_UINT32:
            raise RpcError("EINVAL", "volume_id must be a uint32")
        for e in await self.lookup_entries():
            if e["volume_id"] == volume_id:
                return e
        raise RpcError("ENOENT", f"no volume {volume_id}")

    async def list_entries(self, conn: Connection) -> list[dict[str, Any]]:
        return await self.lookup_entries()

    async def register_server(
        self, conn: Connection, server_uuid: Any, addrs: Any, volumes: Any
    ) -> None:
        if type(server_uuid) is not str or not server_uuid:
            raise RpcError("EINVAL", "server_uuid must be a str")
        addrs = _addrs(addrs)
        if not isinstance(volumes, list):
            raise RpcError("EINVAL", "volumes must be a list of [volume_id, name]")
        vols: dict[int, str] = {}
        for v in volumes:
            if (not isinstance(v, list) or len(v) != 2 or type(v[0]) is not int
                    or not 0 < v[0] <= MAX_UINT32 or type(v[1]) is not str):  # fmt: skip
                raise RpcError("EINVAL", f"bad volume {v!r:.100}")
            vols[v[0]] = v[1]
        if server_uuid == self.server_uuid:
            raise RpcError("EINVAL", "a server cannot register with itself")
        # Conflicts (an id or name another server already has) are kept but
        # shadowed by the earlier owner in entries(); log them once.
        for uuid, (_a, other) in self.registered.items():
            if uuid == server_uuid:
                continue
            clash = set(other) & set(vols) | set(other.values()) & set(vols.values())
            if clash:
                log.warning("VL: server %s registers volumes already held by %s: %s",
                            server_uuid, uuid, sorted(map(str, clash)))  # fmt: skip
        old = self.registered.get(server_uuid)
        self.registered[server_uuid] = (addrs, vols)
        if old is None or old != (addrs, vols):
            log.info("VL: server %s registered %d volumes at %s", server_uuid, len(vols), addrs)

    def handlers(self) -> dict[str, Callable[..., Any]]:
        return {
            VL_GET_ENTRY_BY_NAME: self.get_entry_by_name,
            VL_GET_ENTRY_BY_ID: self.get_entry_by_id,
            VL_LIST_ENTRIES: self.list_entries,
            VL_REGISTER_SERVER: self.register_server,
        }


class VLRegistrar:
    """Keeps this server's volumes registered with a remote VL service."""

    def __init__(
        self,
        vl: tuple[str, int],
        store: VolumeStore,
        server_uuid: str,
        local_addrs: Callable[[], list[list[Any]]],
        interval: float,
        *,
        key: bytes = b"",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.vl = vl
        self.tls = tls  # our own certificate, as a client of the VL server
        self.key = key  # the cell key: VL.RegisterServer needs an authenticated connection
        self.store = store
        self.server_uuid = server_uuid
        self.local_addrs = local_addrs
        self.interval = interval
        self.registered = trio.Event()  # set after the first success (tests wait on it)
        self.last_error = ""

    async def register_once(self) -> None:
        volumes = [[h.id, h.name] for h in self.store.list()]
        async with open_connection(
            *self.vl, connect_timeout=5, default_timeout=10, tls=self.tls
        ) as conn:
            await client_handshake(conn, self.key)
            await conn.call(VL_REGISTER_SERVER, self.server_uuid, self.local_addrs(), volumes)

    async def run(self) -> None:
        backoff = 0.5
        while True:
            changed = self.store.changed
            try:
                await self.register_once()
                if not self.registered.is_set():
                    log.info("registered volumes with VL %s:%d", *self.vl)
                self.registered.set()
                self.last_error = ""
                backoff = 0.5
                wait = self.interval
            except (OSError, RpcError, trio.TooSlowError) as exc:
                if str(exc) != self.last_error:
                    log.warning("VL registration with %s:%d failed: %s", *self.vl, exc)
                self.last_error = str(exc)
                wait = backoff
                backoff = min(backoff * 2, 30.0)
            with trio.move_on_after(wait):
                await changed.wait()

"""The volume location database behind ``VL.*``: one interface, two backends.

``LocalVLDB`` is the embedded default (one fileserver, no other service):
the VL data is this server's own volume store plus what other servers
registered with ``VL.RegisterServer`` (``fileserver.vl.VLService``).

``EtcdVLDB`` keeps the cell's VLDB in etcd (``serve --vldb etcd://...``):
every fileserver of the cell registers itself under a lease it keeps alive,
and its volumes; any server answers ``VL.*`` from etcd.  A server whose
lease lapsed (it died, or lost etcd for longer than the TTL) is listed with
``"up": false``.  Keys, under ``/afsfuse/cells/<cell>/``::

    servers/<uuid>   {"uuid", "addrs", "epoch"}   bound to the server's lease
    known/<uuid>     {"uuid", "addrs"}            last addresses, kept
    volumes/<id>     {"volume_id", "name", "server"}   where the volume lives

A volume entry names one server; it is written by that server when it
creates or opens the volume (never over another server's entry), and
switched by ``vol move`` (``set_location``).

May import: fileserver.etcd, fileserver.store, protocol, trio.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import trio

from fileserver.config import ROOT_VOLUME_ID, ROOT_VOLUME_NAME
from fileserver.etcd import EtcdClient, EtcdError, dumps, loads, parse_endpoints
from fileserver.store import VolumeStore
from protocol.errors import RpcError

if TYPE_CHECKING:
    from fileserver.server import FileServer
    from fileserver.vl import VLService

log = logging.getLogger(__name__)

Entry = dict[str, Any]


class VLDB(Protocol):
    """What the VL service and the admin commands need of a VLDB."""

    async def entries(self) -> list[Entry]: ...

    async def check_new(self, name: str, volume_id: int | None) -> None:
        """EEXIST when the cell already has a volume of that name or id."""

    async def set_location(self, volume_id: int, name: str, uuid: str, addrs: list[Any]) -> None:
        """Point the volume's entry at another server (``vol move``)."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep this server registered until cancelled."""

    def volume_arrived(self, volume_id: int) -> None:
        """A volume was moved (back) to this server."""


def entry(cell: str, vid: int, name: str, servers: list[dict[str, Any]]) -> Entry:
    return {"volume_id": vid, "name": name, "type": "rw", "cell": cell, "servers": servers}


async def vol_location(vldb: VLDB, name_or_id: Any) -> Entry | None:
    """The VLDB entry of a volume (by name or id) with its servers' up flags."""
    key = int(name_or_id) if str(name_or_id).isdigit() else name_or_id
    for e in await vldb.entries():
        if key in (e["volume_id"], e["name"]):
            return e
    return None


class LocalVLDB:
    """Today's VL data: this server's volumes and the registered servers'."""

    def __init__(self, vl: VLService) -> None:
        self.vl = vl

    async def entries(self) -> list[Entry]:
        return self.vl.entries()

    async def check_new(self, name: str, volume_id: int | None) -> None:
        return None  # the local store checks its own names and ids

    async def set_location(self, volume_id: int, name: str, uuid: str, addrs: list[Any]) -> None:
        old_addrs, vols = self.vl.registered.get(uuid, (addrs, {}))
        self.vl.registered[uuid] = (addrs or old_addrs, {**vols, volume_id: name})

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    def volume_arrived(self, volume_id: int) -> None:
        return None


class EtcdVLDB:
    """The cell's VLDB in etcd; this server's registration kept alive."""

    def __init__(
        self,
        url: str,
        store: VolumeStore,
        *,
        cell: Callable[[], str],
        server_uuid: Callable[[], str],
        local_addrs: Callable[[], list[list[Any]]],
        epoch: Callable[[], int],
        ttl: float = 10.0,
        create_root: Callable[[], bool] = lambda: False,
    ) -> None:
        self.endpoints = parse_endpoints(url)
        self.store = store
        self._cell = cell
        self._uuid = server_uuid
        self.local_addrs = local_addrs
        self._epoch = epoch
        self.ttl = max(2, round(ttl))
        self._create_root = create_root
        self.client = EtcdClient(self.endpoints, timeout=max(1.0, self.ttl / 3))
        self.lease = 0
        self.registered = trio.Event()  # set after the first full registration
        self.last_error = ""
        #: Volumes this server moved away: never registered by it again.
        self.moved_out: set[int] = set()

    @property
    def prefix(self) -> bytes:
        return f"/afsfuse/cells/{self._cell()}/".encode()

    def _key(self, kind: str, name: str | int) -> bytes:
        return self.prefix + f"{kind}/{name}".encode()

    # -- reading ---------------------------------------------------------------

    async def _scan(self, kind: str) -> dict[str, tuple[Any, int]]:
        out = {}
        start = self._key(kind, "")
        for k, v, rev in await self.client.range(start, prefix=True):
            try:
                out[k[len(start) :].decode()] = (loads(v), rev)
            except ValueError:
                log.warning("VLDB: unreadable value at %r", k)
        return out

    async def entries(self) -> list[Entry]:
        try:
            vols = await self._scan("volumes")
            up = await self._scan("servers")
            known = await self._scan("known")
        except EtcdError as exc:
            raise RpcError("EAGAIN", f"VLDB unavailable: {exc}") from None
        cell = self._cell()
        out = []
        for _k, (rec, _rev) in sorted(vols.items(), key=lambda kv: kv[1][0].get("volume_id", 0)):
            uuid = str(rec.get("server", ""))
            live = up.get(uuid)
            info = live[0] if live else known.get(uuid, ({}, 0))[0]
            servers = [{"uuid": uuid, "addrs": info.get("addrs", []), "up": live is not None}]
            out.append(entry(cell, int(rec["volume_id"]), str(rec["name"]), servers))
        return out

    async def check_new(self, name: str, volume_id: int | None) -> None:
        for e in await self.entries():
            if e["name"] == name or e["volume_id"] == volume_id:
                raise RpcError("EEXIST", f"the cell has volume {e['name']} ({e['volume_id']})")

    # -- writing ---------------------------------------------------------------

    async def set_location(self, volume_id: int, name: str, uuid: str, addrs: list[Any]) -> None:
        rec = {"volume_id": volume_id, "name": name, "server": uuid}
        try:
            await self.client.put(self._key("volumes", volume_id), dumps(rec))
        except EtcdError as exc:
            raise RpcError("EAGAIN", f"VLDB unavailable: {exc}") from None
        self.moved_out.add(volume_id)
        log.info("VLDB: volume %s (%d) now on server %s", name, volume_id, uuid)

    def volume_arrived(self, volume_id: int) -> None:
        self.moved_out.discard(volume_id)  # ours to register again

    async def _register_server(self) -> None:
        uuid = self._uuid()
        if self.lease:
            await self.client.revoke(self.lease)
        self.lease = await self.client.grant(self.ttl)
        addrs = self.local_addrs()
        await self.client.put(self._key("known", uuid), dumps({"uuid": uuid, "addrs": addrs}))
        me = {"uuid": uuid, "addrs": addrs, "epoch": self._epoch(), "since": int(time.time())}
        await self.client.put(self._key("servers", uuid), dumps(me), lease=self.lease)

    async def _register_volumes(self) -> None:
        uuid = self._uuid()
        local = {h.id: h.name for h in self.store.list()}
        existing = await self._scan("volumes")
        for vid, name in local.items():
            if vid in self.moved_out:
                continue
            want = {"volume_id": vid, "name": name, "server": uuid}
            cur = existing.get(str(vid))
            if cur is not None and cur[0] == want:
                continue
            if cur is not None and cur[0].get("server") != uuid:
                log.warning("VLDB: volume %s (%d) is registered to server %s; ours is "
                            "not served to clients", name, vid, cur[0].get("server"))  # fmt: skip
                continue
            if not await self.client.put_if(self._key("volumes", vid), dumps(want),
                                            cur[1] if cur else 0):  # fmt: skip
                log.info("VLDB: volume %d changed under us; retried next round", vid)
        for k, (rec, _rev) in existing.items():
            if rec.get("server") == uuid and rec.get("volume_id") not in local:
                await self.client.delete(self._key("volumes", k))  # removed here

    async def _maybe_create_root(self) -> None:
        """First start of a server that may create root.cell: only when the
        cell has none (the first server of the cell creates it)."""
        if not any(e["name"] == ROOT_VOLUME_NAME for e in await self.entries()) and (
            ROOT_VOLUME_NAME not in self.store.by_name
        ):
            await self.store.create(ROOT_VOLUME_NAME, volume_id=ROOT_VOLUME_ID)
        self._create_root = lambda: False  # done (retried while this failed)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        backoff = 0.2
        pending = True  # our volumes need (re)registering
        try:
            while True:
                changed = self.store.changed
                try:
                    if not self.lease or await self.client.keepalive_once(self.lease) <= 0:
                        if self.lease:
                            log.warning("VLDB: lease lapsed; registering again")
                        await self._register_server()
                        pending = True
                    if self._create_root():
                        await self._maybe_create_root()
                    if pending:
                        await self._register_volumes()
                        pending = False
                    if not self.registered.is_set():
                        log.info("registered with the VLDB at %s", self.endpoints)
                        self.registered.set()
                    self.last_error = ""
                    backoff = 0.2
                    wait = self.ttl / 3
                except (EtcdError, RpcError, KeyError, ValueError, TypeError) as exc:
                    if str(exc) != self.last_error:
                        log.warning("VLDB registration failed: %s", exc)
                    self.last_error = str(exc)
                    wait = min(backoff, self.ttl / 3)
                    backoff *= 2
                if not started:
                    started = True
                    task_status.started()
                with trio.move_on_after(wait):
                    await changed.wait()
                pending = pending or changed.is_set()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                if self.lease:
                    try:
                        await self.client.revoke(self.lease)  # shown down at once
                    except EtcdError:
                        pass
                await self.client.aclose()


def make_vldb(server: FileServer) -> EtcdVLDB:
    """The etcd VLDB of ``server`` (``config.vldb`` is its etcd:// URL)."""
    cfg = server.config
    assert cfg.vldb is not None
    return EtcdVLDB(
        cfg.vldb,
        server.store,
        cell=lambda: server.cell,
        server_uuid=lambda: server.uuid,
        local_addrs=server.advertised_addrs,
        epoch=lambda: server.epoch,
        ttl=cfg.vldb_ttl,
        create_root=lambda: bool(server.first_start and cfg.create_root),
    )

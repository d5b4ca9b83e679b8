"""Volume mounting and relocation (kAFS volume.c).

``VolumeMounts`` holds the volume instances of a cache manager, keyed by
(cell, volume id), and the (cell, volume name) mounts already resolved.  It
asks VL for a volume's entry, makes or reuses the instance, attaches it to
the server records the entry names (each attach registers an interest, P3),
and validates the root.  When a server says a vnode is gone, ``relocate``
asks VL again (at most once per ``RELOCATE_INTERVAL`` per volume; at once
when a server answered "moved"); a moved volume is re-attached to its new
servers and gets a whole-volume break.  A volume reached only through mount
points is released once the kernel forgot its root and nothing crossed
into it again for the idle lifetime.

May import: ``afsfuse.cells``, ``afsfuse.context``, ``afsfuse.rpc``,
``afsfuse.server_registry``, ``afsfuse.stats``, ``afsfuse.validation``,
``afsfuse.vl_client``, ``afsfuse.vnode``, ``afsfuse.volume``, ``protocol``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import trio

from afsfuse.cells import CellDB
from afsfuse.context import CacheContext
from afsfuse.rpc import Cred, err, wire_cred
from afsfuse.server_registry import ServerRegistry
from afsfuse.stats import log_event
from afsfuse.validation import validate, volume_break
from afsfuse.vl_client import VLClient
from afsfuse.vnode import Vnode
from afsfuse.volume import VolumeInstance
from protocol import methods as M
from protocol.errors import RpcError
from protocol.records import Fid

log = logging.getLogger(__name__)

RELOCATE_INTERVAL = 10.0  # seconds between VL checks of one volume


class VolumeMounts:
    def __init__(
        self,
        ctx: CacheContext,
        cells: CellDB,
        vl: VLClient,
        registry: ServerRegistry,
        on_new_vnode: Callable[[Vnode], None],
    ) -> None:
        self.ctx = ctx
        self.cells = cells
        self.vl = vl
        self.registry = registry
        self.on_new_vnode = on_new_vnode
        self.volumes: dict[tuple[str, int], VolumeInstance] = {}
        self._by_name: dict[tuple[str, str], VolumeInstance] = {}  # (cell, name) mounted

    def _volume_from_entry(self, cell: str, entry: dict[str, Any]) -> VolumeInstance:
        volume_id = int(entry["volume_id"])
        vol = self.volumes.get((cell, volume_id))
        if vol is None:
            vol = VolumeInstance(cell, volume_id, str(entry.get("name", volume_id)))
            vol.on_new_vnode = self.on_new_vnode
            vol.relocate = functools.partial(self.relocate, vol, force=True)
            vol.located_at = trio.current_time()
            self.volumes[vol.key] = vol
        servers = entry.get("servers") or []
        if not servers and not vol.servers:
            raise err("ENXIO", f"volume {vol.name} has no servers")
        for s in servers:
            addrs = [(str(h), int(p)) for h, p in s["addrs"]]
            vol.attach(self.registry.record(str(s["uuid"]), addrs, cell))  # interest (P3)
        return vol

    async def mount(
        self, cell: str | None, volume: str, cred: Cred = None, *, crossing: bool = False
    ) -> Vnode:
        """Find ``volume`` through the cell's VL servers; return its root vnode.

        A volume already mounted through this cell is not looked up again
        (mount points are crossed often).  Each call counts one mount, except
        a mount-point ``crossing``: that volume is in use while the kernel
        holds its root, and released when the kernel forgets it
        (``forgot``), so its server record can go idle (P2)."""
        try:
            c = self.cells.get(cell)
        except KeyError:
            raise err("ENOENT", f"unknown cell {cell!r}") from None
        vol = self._by_name.get((c.name, volume))
        if vol is None or self.volumes.get(vol.key) is not vol:
            if volume.isdigit():
                entry = await self.vl.call(c, M.VL_GET_ENTRY_BY_ID, int(volume))
            else:
                entry = await self.vl.call(c, M.VL_GET_ENTRY_BY_NAME, volume)
            vol = self._volume_from_entry(c.name, entry)
            self._by_name[(c.name, volume)] = vol
        if not crossing:
            vol.mounts += 1
        vol.unused_since = None  # crossed (again): in use
        root = vol.get(vol.root_fid)
        try:
            await validate(self.ctx, root, wire_cred(cred))
        except BaseException:
            if crossing:
                self._release_crossed(vol)
            else:
                self.unmount(vol)
            raise
        log_event("volume_mounted", cell=c.name, volume=vol.name, id=vol.volume_id)
        return root

    async def relocate(self, vol: VolumeInstance, *, force: bool = False) -> bool:
        """Ask VL where ``vol`` lives now; True if it moved (its instance now
        uses the new servers and every promise on it is void).  At most one
        VL query per volume per ``RELOCATE_INTERVAL`` seconds, unless
        ``force`` (a server answered that the volume moved)."""
        now = trio.current_time()
        if now - vol.located_at < RELOCATE_INTERVAL and not force:
            return False
        vol.located_at = now
        log_event("vl_query", cell=vol.cell, volume=vol.volume_id, forced=int(force))
        try:
            entry = await self.vl.call(
                self.cells.get(vol.cell), M.VL_GET_ENTRY_BY_ID, vol.volume_id
            )
            uuids = [str(s["uuid"]) for s in entry.get("servers") or []]
            if not uuids or uuids == [r.uuid for r in vol.servers]:
                return False
            records = [
                self.registry.record(
                    str(s["uuid"]), [(str(h), int(p)) for h, p in s["addrs"]], vol.cell
                )
                for s in entry["servers"]
            ]
        except (RpcError, KeyError, TypeError, ValueError) as exc:
            log.info("relocating %r failed: %r", vol, exc)
            return False
        vol.detach_all()
        for rec in records:
            vol.attach(rec)
            log_event("interest", server=rec.uuid, cell=vol.cell, volume=vol.volume_id)
        volume_break(self.ctx, vol, "moved")
        log_event("volume_moved", cell=vol.cell, volume=vol.volume_id, servers=",".join(uuids))
        return True

    def unmount(self, vol: VolumeInstance) -> None:
        """Drop a mount of ``vol``; at the last, its interests go (sends nothing)."""
        vol.mounts -= 1
        if vol.mounts <= 0:
            vol.detach_all()
            if self.volumes.get(vol.key) is vol:
                del self.volumes[vol.key]

    def forgot(self, vnode: Vnode) -> None:
        """The kernel forgot ``vnode``.  It holds nothing below a root it
        forgot (dentries pin their parents): a volume only crossed into is
        unused from then on, and released if nothing crosses into it again
        for a while (``expire_unused``; the kernel drops a mount point's
        dentries on any invalidation of it, which must not cost the
        volume's cache)."""
        vol = vnode.volume
        if vnode.fid == vol.root_fid and vol.mounts <= 0:
            vol.unused_since = trio.current_time()

    async def expire_unused(self, lifetime: float) -> None:
        """Release volumes unused (see ``forgot``) for ``lifetime`` seconds, as
        the kernel AFS client expires automounts; their server records can
        then go idle (P2)."""
        interval = max(min(lifetime / 4, 30.0), 0.01)
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            for vol in list(self.volumes.values()):
                since = vol.unused_since
                if since is not None and now - since >= lifetime:
                    self._release_crossed(vol)

    def _release_crossed(self, vol: VolumeInstance) -> None:
        """Drop a volume reached only through mount points, with its
        interests (sends nothing; an idle record is destroyed later, P2)."""
        if vol.mounts > 0 or vol.busy():
            vol.unused_since = None  # in use after all
            return
        vol.detach_all()
        if self.volumes.get(vol.key) is vol:
            del self.volumes[vol.key]
        for k in [k for k, v in self._by_name.items() if v is vol]:
            del self._by_name[k]
        log_event("volume_released", cell=vol.cell, volume=vol.volume_id)

    def find_vnode(self, cell: str, fid: Fid) -> Vnode | None:
        """The cached vnode of ``fid`` in ``cell``; never creates one (P3)."""
        vol = self.volumes.get((cell, fid.volume))
        return vol.find(fid) if vol is not None else None

    def as_dict(self) -> dict[str, Any]:
        return {
            f"{c}:{vid}": {"cb_v_break": vol.cb_v_break, "vnodes": len(vol.vnodes)}
            for (c, vid), vol in self.volumes.items()
        }


__all__ = ["RELOCATE_INTERVAL", "VolumeMounts"]

"""Volume instances: a volume as reached through one cell (the kernel's
superblock), keyed by (cell, volume id).

Each instance registers an interest with every server record it uses
(DESIGN.md P3), holds ``cb_v_break`` (bumped by a whole-volume break, P4),
and indexes its vnodes by (vnode, unique).  ``find`` never creates: the
CB service uses it, so a break for an uncached fid costs nothing (it only
bumps two counters).  A call whose reply brings a vnode its snapshot did not
know (Lookup, ReadDir, CreateFile) must still not install a promise that
such a break voided: ``break_seq`` counts every fid break in the instance,
``miss_at`` is its value at the last break that found nothing cached, each
vnode records ``broken_at``, and the snapshot compares them (P5).
``mod_clock`` orders our own completed changes the same way (a status
fetched before one of them is stale).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from afsfuse.vnode import Vnode
from protocol.errors import RpcError
from protocol.records import Fid

if TYPE_CHECKING:
    from afsfuse.server_record import ServerRecord

log = logging.getLogger(__name__)

ROOT_VNODE, ROOT_UNIQUE = 1, 1
#: Vnodes one volume instance caches before it evicts those nobody needs.
MAX_VNODES = 100_000


class VolumeInstance:
    def __init__(self, cell: str, volume_id: int, name: str) -> None:
        self.cell = cell
        self.volume_id = volume_id
        self.name = name
        self.servers: list[ServerRecord] = []
        self.cb_v_break = 0
        self.cb_miss_break = 0  # breaks that found no cached vnode (a statistic)
        self.break_seq = 0  # every fid break, cached or not
        self.miss_at = 0  # break_seq at the last break of an uncached fid
        self.mod_clock = 0  # our own completed changes in this instance
        self.creation: int | None = None  # VolSync.creation last seen
        self.vnodes: dict[tuple[int, int], Vnode] = {}
        self.max_vnodes = MAX_VNODES
        self._evict_at = MAX_VNODES
        self.evicted = 0
        self.mounts = 0
        self.located_at = -1e18  # trio time of the last VL check (moves)
        #: Since when a volume only crossed into has had its root forgotten.
        self.unused_since: float | None = None
        self.on_new_vnode: Callable[[Vnode], None] | None = None
        #: Asks VL where the volume lives now (a server answered "moved");
        #: True if it moved.  Set by the manager that made the instance.
        self.relocate: Callable[[], Awaitable[bool]] | None = None

    def __repr__(self) -> str:
        return f"<VolumeInstance {self.cell}:{self.name}({self.volume_id})>"

    @property
    def key(self) -> tuple[str, int]:
        return (self.cell, self.volume_id)

    @property
    def root_fid(self) -> Fid:
        return Fid(self.volume_id, ROOT_VNODE, ROOT_UNIQUE)

    @property
    def server(self) -> ServerRecord:
        """The record calls go to (the first listed server)."""
        if not self.servers:
            # An RpcError, so the adapter maps it to an errno like any failure.
            raise RpcError("ENODEV", f"{self!r} is unmounted or has no servers")
        return self.servers[0]

    def find(self, fid: Fid) -> Vnode | None:
        """The cached vnode for ``fid``, never creating one (ilookup_nowait)."""
        return self.vnodes.get((fid.vnode, fid.unique))

    def get(self, fid: Fid) -> Vnode:
        """The vnode for ``fid``, created (with no status) if not cached."""
        if fid.volume != self.volume_id:
            raise ValueError(f"fid {fid} is not in volume {self.volume_id}")
        key = (fid.vnode, fid.unique)
        v = self.vnodes.get(key)
        if v is None:
            if len(self.vnodes) >= self._evict_at:
                self.evict()
            v = self.vnodes[key] = Vnode(self, fid)
            if self.on_new_vnode is not None:
                self.on_new_vnode(v)
        return v

    def evict(self) -> int:
        """Drop the oldest vnodes nobody needs, down to 90% of ``max_vnodes``:
        the kernel holds none of them (``ino`` 0), none is open or has
        unstored writes or a fetch in flight.  P1: nothing is sent; their
        promises expire on the server or are broken.  Returns how many went."""
        target = int(self.max_vnodes * 0.9)
        root = (ROOT_VNODE, ROOT_UNIQUE)
        drop = []
        excess = len(self.vnodes) - target
        for key, v in self.vnodes.items():  # creation order: oldest first
            if len(drop) >= excess:
                break
            if key == root or v.ino or v.open_count or v.local_size is not None or v.inflight:
                continue
            drop.append(key)
        for key in drop:
            del self.vnodes[key]
        self.evicted += len(drop)
        # When most vnodes are held, do not rescan on every new vnode.
        self._evict_at = max(self.max_vnodes, len(self.vnodes) + self.max_vnodes // 10)
        if drop:
            log.debug("%r: evicted %d vnodes", self, len(drop))
        return len(drop)

    def adopt(self, vnode: Vnode) -> Vnode:
        """The kernel is being handed ``vnode``: make sure breaks find it.

        A forget may have dropped it from the index while the lookup that
        returned it was in flight; a vnode breaks cannot reach would keep
        trusting its promise.  Returns the vnode the index holds for the fid
        (another one if it was looked up again meanwhile)."""
        return self.vnodes.setdefault((vnode.fid.vnode, vnode.fid.unique), vnode)

    def forget(self, vnode: Vnode) -> bool:
        """Drop ``vnode`` from the index (P1: nothing is sent to the server).

        Refused (False) while it is open or holds unstored writes."""
        if vnode.open_count or vnode.local_size is not None:
            return False
        key = (vnode.fid.vnode, vnode.fid.unique)
        if self.vnodes.get(key) is vnode:
            del self.vnodes[key]
        return True

    def busy(self) -> bool:
        """Whether a vnode is open, holds unstored writes or has a fetch in
        flight (the instance must then stay).  Called when the kernel forgot
        the root, so a walk here is rare."""
        return any(
            v.open_count or v.local_size is not None or v.inflight for v in self.vnodes.values()
        )

    def attach(self, server: ServerRecord) -> None:
        if server not in self.servers:
            self.servers.append(server)
            server.add_interest(self)

    def detach_all(self) -> None:
        for server in self.servers:
            server.remove_interest(self)
        self.servers = []

"""The queue of kernel-invalidation events the FUSE adapter drains.

The core never calls into the kernel: a break (or a local change the kernel
cannot know about) puts an ``Invalidate`` here and returns at once, so the
CB.CallBack reply never waits on the kernel (DESIGN.md section 3, "Kernel
caches"; PYFUSE3-NOTES "Invalidation").  The queue is bounded and ``put``
never blocks: an event already pending is coalesced, and when the queue is
full everything pending degrades to one ``Invalidate(kind="all")``.

Draining, in the adapter (a worker task, never a request handler)::

    async for ev in cm.invalidations:
        if ev.kind == "inode":    ... invalidate_inode(ino_of(ev.vnode))
        elif ev.kind == "entry":  ... invalidate_entry(ino_of(ev.parent), ev.name)
        elif ev.kind == "volume": ... sweep kernel-known inodes of ev.volume
        elif ev.kind == "server": ... sweep inodes of every volume in ev.volumes
        elif ev.kind == "all":    ... sweep every kernel-known inode
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import trio

if TYPE_CHECKING:
    from afsfuse.server_record import ServerRecord
    from afsfuse.vnode import Vnode
    from afsfuse.volume import VolumeInstance

log = logging.getLogger(__name__)

Kind = Literal["inode", "entry", "volume", "server", "all"]


@dataclass(frozen=True, eq=False)
class Invalidate:
    """One kernel-invalidation request.

    - ``inode``: drop attributes and pages of ``vnode`` (``attr_only`` when the
      data version did not change, so pages can stay);
    - ``entry``: drop the dentry ``name`` in directory ``parent`` (a Vnode);
    - ``volume``: every inode of volume instance ``volume`` (a whole-volume
      break); ``server``: every inode of ``volumes`` (a mass break);
      ``all``: everything (the queue overflowed).
    """

    kind: Kind
    vnode: Vnode | None = None
    parent: Vnode | None = None
    name: bytes | None = None
    volume: VolumeInstance | None = None
    server: ServerRecord | None = None
    volumes: tuple[VolumeInstance, ...] = field(default=())
    attr_only: bool = False

    @property
    def fid(self) -> Any:
        """The fid of ``vnode`` (or ``parent`` for an entry event), for logs."""
        v = self.vnode or self.parent
        return v.fid if v is not None else None

    def key(self) -> tuple[Any, ...]:
        return (
            self.kind,
            id(self.vnode),
            id(self.parent),
            self.name,
            id(self.volume),
            id(self.server),
            self.attr_only,
        )


class InvalidationQueue:
    """Bounded, coalescing, never-blocking-on-put queue of ``Invalidate``."""

    def __init__(self, maxlen: int = 4096, stats: Any = None) -> None:
        self.maxlen = maxlen
        self._q: deque[Invalidate] = deque()
        self._keys: set[tuple[Any, ...]] = set()
        self._lot = trio.lowlevel.ParkingLot()
        self._stats = stats
        self._closed = False

    def __len__(self) -> int:
        return len(self._q)

    def _count(self, name: str) -> None:
        if self._stats is not None:
            setattr(self._stats, name, getattr(self._stats, name) + 1)

    def put(self, ev: Invalidate) -> None:
        """Queue ``ev`` without blocking (coalesce, or degrade when full)."""
        if self._closed:
            return
        k = ev.key()
        if k in self._keys or ("all",) in self._keys:
            self._count("invalidations_coalesced")
            return
        if len(self._q) >= self.maxlen:
            # Degrade: one broader event replaces everything pending.
            self._q.clear()
            self._keys.clear()
            ev, k = Invalidate("all"), ("all",)
            self._count("invalidations_degraded")
            log.info("invalidation queue full: degraded to a full sweep")
        self._q.append(ev)
        self._keys.add(k)
        self._count("invalidations_queued")
        self._lot.unpark()

    def get_nowait(self) -> Invalidate | None:
        if not self._q:
            return None
        ev = self._q.popleft()
        self._keys.discard(("all",) if ev.kind == "all" else ev.key())
        return ev

    async def get(self) -> Invalidate:
        """Wait for the next event; raises ``trio.EndOfChannel`` after close()."""
        await trio.lowlevel.checkpoint()
        while not self._q:
            if self._closed:
                raise trio.EndOfChannel
            await self._lot.park()
        ev = self.get_nowait()
        assert ev is not None
        return ev

    def close(self) -> None:
        self._closed = True
        self._lot.unpark_all()

    def __aiter__(self) -> InvalidationQueue:
        return self

    async def __anext__(self) -> Invalidate:
        try:
            return await self.get()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

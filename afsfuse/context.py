"""The narrow context that validation, the CB service and the operations share.

``CacheContext`` holds only what they really use: the counters (``Stats``),
the kernel-invalidation queue, the data cache (set when the manager
starts), and ``relocate`` (ask VL whether a volume moved; validation calls
it when a server says a vnode is gone).  It never holds the manager itself,
so a module handed a context can reach nothing else.

May import: ``afsfuse.stats``, ``afsfuse.invalidation``, ``afsfuse.datacache``
and ``afsfuse.volume`` (types only).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from afsfuse.invalidation import InvalidationQueue
from afsfuse.stats import Stats

if TYPE_CHECKING:
    from afsfuse.datacache import DataCache
    from afsfuse.volume import VolumeInstance


async def _never_moved(vol: VolumeInstance) -> bool:
    return False


@dataclass
class CacheContext:
    stats: Stats
    invalidations: InvalidationQueue
    #: Set by ``CacheManager.start()`` (the cache directory is locked then).
    datacache: DataCache = field(default=None)  # type: ignore[assignment]
    #: True if VL says ``vol`` moved (its instance then uses the new servers).
    relocate: Callable[[VolumeInstance], Awaitable[bool]] = _never_moved

    @classmethod
    def new(cls, queue_size: int) -> CacheContext:
        stats = Stats()
        return cls(stats, InvalidationQueue(queue_size, stats))


__all__ = ["CacheContext"]

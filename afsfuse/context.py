"""The narrow context that validation, the CB service and the operations share.

``CacheContext`` holds only what they really use: the counters (``Stats``),
the kernel-invalidation queue, the data cache (set when the manager
starts), and ``relocate`` (ask VL whether a volume moved; validation calls
it when a server says a vnode is gone).  It never holds the manager itself,
so a module handed a context can reach nothing else.

May import: ``afsfuse.stats``, ``afsfuse.invalidation``, ``afsfuse.datacache``
and ``afsfuse.volume`` (types only), ``trio``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from afsfuse.invalidation import InvalidationQueue
from afsfuse.stats import Stats

if TYPE_CHECKING:
    from afsfuse.datacache import DataCache
    from afsfuse.volume import VolumeInstance


async def _never_moved(vol: VolumeInstance) -> bool:
    return False


_T = TypeVar("_T")
#: Chunk I/O at least this large runs on a worker thread; smaller is cheaper
#: inline than the thread hop.
THREAD_MIN_BYTES = 64 * 1024


@dataclass
class CacheContext:
    stats: Stats
    invalidations: InvalidationQueue
    #: Set by ``CacheManager.start()`` (the cache directory is locked then).
    datacache: DataCache = field(default=None)  # type: ignore[assignment]
    #: True if VL says ``vol`` moved (its instance then uses the new servers).
    relocate: Callable[[VolumeInstance], Awaitable[bool]] = _never_moved
    #: Large chunk-file reads run on worker threads, so disk I/O never
    #: stalls the trio thread that serves every FUSE request.  False runs
    #: them inline (tests on trio's virtual clock, which jumps ahead while
    #: every task waits for a thread).
    chunk_threads: bool = True
    _limiter: Any = None

    async def chunk_io(self, nbytes: int, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` (a data-cache call moving ``nbytes``), on a worker
        thread when it is large enough to matter."""
        if not self.chunk_threads or nbytes < THREAD_MIN_BYTES:
            return fn(*args)
        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(2)  # the cache serialises on its lock
        self.stats.chunk_io_threaded += 1
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    @classmethod
    def new(cls, queue_size: int) -> CacheContext:
        stats = Stats()
        return cls(stats, InvalidationQueue(queue_size, stats))


__all__ = ["CacheContext"]

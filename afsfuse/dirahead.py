"""Directory read-ahead: the next listings of a tree walk, fetched early.

``ls -R``, ``find``, ``du``, ``rsync`` and ``git status`` read a directory,
then its subdirectories one after another, in listing order.  Each cold
directory costs an FS.ReadDir, and while the daemon waits for it the
server is the only one working; with read-ahead the server lists the next
directories of the walk while the daemon and the application still handle
the current one.  After an application's readdir of D, read-ahead fetches
(in the background, at most ``window`` each):

- D's first subdirectories (a depth-first walk goes there next), and
- the subdirectories that follow D in its parent's listing (where the walk
  goes once D's subtree is done).

A listing fetched ahead is an ordinary one: fetched under the directory's
write lock with the break counters of its issue time (P5), kept only for
the DV it was read at, dropped by a break like any other.  Nothing is
fetched twice, at most ``max_inflight`` fetches run at once, failures are
dropped (the application's own readdir will ask again and see the error),
and read-ahead never starts more read-ahead.

May import: ``afsfuse.vnode``, ``afsfuse.stats``, ``protocol``, ``trio``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from afsfuse.stats import Stats
from afsfuse.vnode import Vnode
from protocol.records import Fid, FileType

log = logging.getLogger(__name__)

#: Directories whose subdirectory order is remembered (least recent go).
MAX_PARENTS = 256


class DirAhead:
    def __init__(
        self,
        fetch: Callable[[Vnode, Any], Awaitable[Any]],
        spawn: Callable[..., None],
        stats: Stats,
        window: int = 2,
        max_inflight: int = 4,
    ) -> None:
        self._fetch = fetch
        self._spawn = spawn
        self._stats = stats
        self.window = window
        self.max_inflight = max_inflight
        self._inflight: set[Vnode] = set()
        #: parent directory -> (its subdirectories in listing order, their index)
        self._order: OrderedDict[Vnode, tuple[list[Vnode], dict[Vnode, int]]] = OrderedDict()

    def read(self, d: Vnode, children: Sequence[tuple[Vnode, FileType]], cred: Any) -> None:
        """The application read ``d`` (its children, in listing order): fetch
        what the walk reads next."""
        if self.window <= 0:
            return
        subdirs = [v for v, t in children if t == FileType.DIRECTORY and v is not d]
        if subdirs:
            self._order[d] = (subdirs, {v: i for i, v in enumerate(subdirs)})
            self._order.move_to_end(d)
            while len(self._order) > MAX_PARENTS:
                self._order.popitem(last=False)
        wanted = subdirs[: self.window]
        parent = self._parent(d)
        if parent is not None and parent in self._order:
            sibs, index = self._order[parent]
            i = index.get(d)
            if i is not None:
                wanted += sibs[i + 1 : i + 1 + self.window]
        for v in wanted:
            if len(self._inflight) >= self.max_inflight:
                break
            if v not in self._inflight and _needs_listing(v):
                self._inflight.add(v)
                self._stats.dir_ahead += 1
                self._spawn(self._one, v, cred)

    @staticmethod
    def _parent(d: Vnode) -> Vnode | None:
        st = d.status
        if st is None or st.parent_vnode == 0:
            return None
        return d.volume.find(Fid(d.fid.volume, st.parent_vnode, st.parent_unique))

    async def _one(self, v: Vnode, cred: Any) -> None:
        try:
            await self._fetch(v, cred)
        except trio.Cancelled:
            raise
        except Exception as exc:  # the application's own readdir sees it
            log.debug("read-ahead of directory %s failed: %r", v.fid, exc)
        finally:
            self._inflight.discard(v)


def _needs_listing(v: Vnode) -> bool:
    st = v.status
    if st is None or st.type != FileType.DIRECTORY or v.deleted:
        return False
    return v.listing is None or v.listing.dv != st.data_version


__all__ = ["DirAhead"]

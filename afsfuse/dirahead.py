"""Directory read-ahead: the next listings of a tree walk, fetched early.

``ls -R``, ``find``, ``du``, ``rsync`` and ``git status`` read a directory,
then its subdirectories one after another, in listing order.  Each cold
directory costs an FS.ReadDir, and while the daemon waits for it the
server is the only one working; with read-ahead the server lists the next
directories of the walk while the daemon and the application still handle
the current one.  A walk reads D when the application reads it
(``readdir``), when cold lookups in D fetch its listing (``stat`` of many
paths in order: ``git status``), or when the first lookup is answered from
a listing of D that was read ahead.  Read-ahead then fetches (in the
background, at most ``window`` each):

- D's first subdirectories (a depth-first walk goes there next), and
- the subdirectories that follow D in its parent's listing (where the walk
  goes once D's subtree is done).

A listing fetched ahead is an ordinary one: fetched under the directory's
write lock with the break counters of its issue time (P5), kept only for
the DV it was read at, dropped by a break like any other.  What it does
not fetch: a directory whose listing is current, one being fetched, one
larger than ``max_entries`` (a cold lookup would not read it whole
either), one whose lock is taken (someone is using it), one whose read
ahead failed at this DV (EACCES: the application's own readdir sees the
error), or anything while the server is not connected (a request for a
directory must never wait out a reconnect it did not ask for).  At most
``max_inflight`` fetches run at once; read-ahead never starts more
read-ahead.  Only fids are remembered (never vnodes: eviction and forgets
stay in charge), in bounded tables.

May import: ``afsfuse.vnode``, ``afsfuse.dircache``, ``afsfuse.stats``,
``protocol``, ``trio``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from afsfuse.dircache import DirListing
from afsfuse.stats import Stats
from afsfuse.vnode import Vnode
from protocol.errors import RpcError
from protocol.records import Fid, FileType

log = logging.getLogger(__name__)

#: Directories whose subdirectory order is remembered (least recent go) ...
MAX_PARENTS = 64
#: ... and how many subdirectories of each (a walk past them continues
#: through first subdirectories only).
MAX_ORDER = 1024
#: Listings read ahead and not used yet, and failed read-aheads, remembered.
MAX_REMEMBERED = 4096


class DirAhead:
    def __init__(
        self,
        fetch: Callable[[Vnode, Any], Awaitable[Any]],
        spawn: Callable[..., None],
        stats: Stats,
        window: int = 2,
        max_inflight: int = 4,
        max_entries: int = 4000,
    ) -> None:
        self._fetch = fetch
        self._spawn = spawn
        self._stats = stats
        self.window = window
        self.max_inflight = max_inflight
        self.max_entries = max_entries
        self._inflight: set[Fid] = set()
        #: parent fid -> (its DV, its subdirectories in listing order, index)
        self._order: OrderedDict[Fid, tuple[int, list[Fid], dict[Fid, int]]] = OrderedDict()
        #: Directories whose listing was read ahead and not used yet.
        self._unused: set[Fid] = set()
        #: (fid, DV) of read-aheads that failed: not tried again at that DV.
        self._failed: OrderedDict[tuple[Fid, int], None] = OrderedDict()

    def read(self, d: Vnode, children: Sequence[tuple[Fid, FileType]], cred: Any) -> None:
        """The walk read ``d`` (its children, in listing order): fetch what it
        reads next."""
        if self.window <= 0:
            return
        self._unused.discard(d.fid)
        dv = d.data_version
        known = self._order.get(d.fid)
        if known is not None and known[0] == dv:
            subdirs = known[1]
            self._order.move_to_end(d.fid)
        else:
            subdirs = [f for f, t in children if t == FileType.DIRECTORY and f != d.fid]
            if subdirs and dv is not None:
                kept = subdirs[:MAX_ORDER]
                self._order[d.fid] = (dv, kept, {f: i for i, f in enumerate(kept)})
                while len(self._order) > MAX_PARENTS:
                    self._order.popitem(last=False)
        wanted = subdirs[: self.window]
        st = d.status
        if st is not None and st.parent_vnode:
            parent = self._order.get(Fid(d.fid.volume, st.parent_vnode, st.parent_unique))
            i = parent[2].get(d.fid) if parent is not None else None
            if parent is not None and i is not None:
                wanted = wanted + parent[1][i + 1 : i + 1 + self.window]
        if not wanted or not _connected(d):
            return
        vol = d.volume
        for fid in wanted:
            if len(self._inflight) >= self.max_inflight:
                break
            v = vol.find(fid)
            if v is None or fid in self._inflight or not self._worth_it(v):
                continue
            try:
                self._spawn(self._one, v, cred)
            except RuntimeError as exc:  # the manager is closing
                log.debug("no read-ahead of directory %s: %s", fid, exc)
                return
            self._inflight.add(fid)
            self._stats.dir_ahead += 1

    def walked(self, d: Vnode, listing: DirListing, cred: Any) -> None:
        """Cold lookups in ``d`` fetched its listing: the walk reads it."""
        if self.window > 0:
            self.read(d, [(e.fid, e.type) for e in listing.sorted()], cred)

    def looked_up(self, d: Vnode, listing: DirListing, cred: Any) -> None:
        """A lookup in ``d`` was answered from ``listing``: the first one
        answered from a listing read ahead carries the walk on."""
        if d.fid in self._unused:
            self.walked(d, listing, cred)

    def _worth_it(self, v: Vnode) -> bool:
        st = v.status
        if st is None or st.type != FileType.DIRECTORY or v.deleted:
            return False
        if v.listing is not None and v.listing.dv == st.data_version:
            return False  # current already
        if st.size > self.max_entries or (v.fid, st.data_version) in self._failed:
            return False
        return v.lock.free_for_read()

    async def _one(self, v: Vnode, cred: Any) -> None:
        dv = v.data_version
        try:
            await self._fetch(v, cred)
            _remember(self._unused, v.fid)
        except (RpcError, OSError) as exc:  # the application's own readdir sees it
            log.debug("read-ahead of directory %s failed: %r", v.fid, exc)
            if dv is not None:
                self._failed[(v.fid, dv)] = None
                while len(self._failed) > MAX_REMEMBERED:
                    self._failed.popitem(last=False)
        except Exception:
            log.warning("read-ahead of directory %s failed", v.fid, exc_info=True)
        finally:
            self._inflight.discard(v.fid)


def _connected(d: Vnode) -> bool:
    servers = d.volume.servers
    return bool(servers) and servers[0].connected


def _remember(s: set[Fid], fid: Fid) -> None:
    if len(s) >= MAX_REMEMBERED:
        s.clear()  # walks abandoned long ago: forget them
    s.add(fid)


__all__ = ["DirAhead"]

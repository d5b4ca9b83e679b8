"""Kernel inode numbers and lookup counts for the FUSE adapter.

The kernel names files by inode number; the cache manager names them by
(volume instance, fid).  This table maps between the two and keeps the
lookup count FUSE requires: lookup, create, mkdir, symlink, link and each
readdirplus entry add one; ``forget`` subtracts.  An inode number stays bound
to its fid while the kernel knows it (count > 0) and is dropped at zero, so a
forgotten vnode costs the table nothing.  Forgetting never talks to the
server (P1): the vnode and its promise stay in the cache manager.

The adapter asks for the inode number ``fid_inode`` derives from the fid
(volume id and vnode number), so every client shows a file under the same
``st_ino``: tools that record inode numbers (git's index, rsync, tar's
incremental mode) see nothing changed when another client reads the same
tree.  When that number is taken (one volume reached through two aliased
cells is two volume instances whose fids are equal but whose inodes must
differ; a reused vnode slot while the kernel still holds the old file),
numbers are allocated sequentially instead, below any derived one.  The
generation number is the fid's uniquifier, so a reused vnode slot never
looks like the old file.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

ROOT_INODE = 1  # pyfuse3.ROOT_INODE, without importing pyfuse3 here
#: Derived inode numbers stay below 2**63 (some tools read st_ino signed).
_MAX_DERIVED = 1 << 63


def fid_inode(volume_id: int, vnode: int) -> int | None:
    """The inode number every client gives (volume id, vnode); None when it
    would not fit (or would clash with the sequential range)."""
    if volume_id <= 0:
        return None
    ino = (volume_id << 32) | vnode
    return ino if ino < _MAX_DERIVED else None


@dataclass(slots=True)
class InodeEntry:
    ino: int
    key: Hashable  # (volume instance key, vnode, unique)
    node: Any  # the cache manager's vnode object
    generation: int
    lookups: int = 0


class InodeTable:
    def __init__(self) -> None:
        self._by_ino: dict[int, InodeEntry] = {}
        self._by_key: dict[Hashable, int] = {}
        self._next = ROOT_INODE + 1

    def __len__(self) -> int:
        return len(self._by_ino)

    def set_root(self, key: Hashable, node: Any, generation: int = 0) -> InodeEntry:
        """Bind the mount's root; it is never forgotten."""
        old = self._by_ino.get(ROOT_INODE)
        if old is not None:
            self._by_key.pop(old.key, None)
        entry = InodeEntry(ROOT_INODE, key, node, generation, lookups=1)
        self._by_ino[ROOT_INODE] = entry
        self._by_key[key] = ROOT_INODE
        return entry

    def get(self, ino: int) -> InodeEntry:
        """The entry for ``ino``; KeyError when the kernel should not know it."""
        return self._by_ino[ino]

    def find_ino(self, ino: int) -> InodeEntry | None:
        return self._by_ino.get(ino)

    def find(self, key: Hashable) -> InodeEntry | None:
        ino = self._by_key.get(key)
        return None if ino is None else self._by_ino[ino]

    def remember(
        self, key: Hashable, node: Any, generation: int, count: int = 1,
        preferred: int | None = None,
    ) -> InodeEntry:  # fmt: skip
        """Hand an inode for ``key`` to the kernel, adding ``count`` lookups;
        a new binding gets ``preferred`` as its number when that is free."""
        ino = self._by_key.get(key)
        if ino is not None:
            entry = self._by_ino[ino]
            entry.node = node
        else:
            if preferred is not None and preferred > ROOT_INODE and preferred not in self._by_ino:
                ino = preferred
            else:
                while self._next in self._by_ino:
                    self._next += 1
                ino = self._next
                self._next += 1
            entry = InodeEntry(ino, key, node, generation)
            self._by_ino[ino] = entry
            self._by_key[key] = ino
        if ino != ROOT_INODE:
            entry.lookups += count
        return entry

    def forget(self, ino: int, count: int) -> bool:
        """Subtract lookups; drop the inode at zero.  Returns True if dropped.

        Never raises: pyfuse3's ``forget`` must not fail, and the kernel may
        forget an inode we already dropped (after an unmount race)."""
        entry = self._by_ino.get(ino)
        if entry is None or ino == ROOT_INODE:
            return False
        entry.lookups -= count
        if entry.lookups > 0:
            return False
        if entry.lookups < 0:
            log.warning("inode %d forgotten %d more times than looked up", ino, -entry.lookups)
        del self._by_ino[ino]
        if self._by_key.get(entry.key) == ino:
            del self._by_key[entry.key]
        return True

    def entries(self) -> Iterator[InodeEntry]:
        """Every inode the kernel knows (a snapshot, safe to mutate the table
        while iterating).  Used by background sweeps after mass breaks."""
        return iter(list(self._by_ino.values()))

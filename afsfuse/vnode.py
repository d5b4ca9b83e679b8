"""Vnodes: one cached file, directory or symlink of a volume instance.

A vnode holds the last status the server sent, the callback promise that
makes it trustworthy, and the break counters of DESIGN.md P4: ``cb_break``
(bumped by a break on this fid) and, inside the promise, the snapshots of
its server record's ``cb_s_break`` and its volume's ``cb_v_break`` taken when
the call that carried the promise was issued.  The promise is void when it
expired, was broken, or either snapshot differs from the live counter: a
mass or whole-volume break is one increment, never a walk over vnodes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import trio

from afsfuse.rwlock import RWLock
from protocol.records import CallBackType, Fid, FileStatus, FileType

if TYPE_CHECKING:
    from afsfuse.dircache import DirListing
    from afsfuse.server_record import ServerRecord
    from afsfuse.volume import VolumeInstance

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Promise:
    """A callback promise as installed: absolute expiry (from issue time) and
    the counters it was granted under."""

    version: int
    type: CallBackType
    expires_at: float
    server: ServerRecord
    cb_s_break: int
    cb_v_break: int


class Vnode:
    """A cached vnode.  ``status``/``promise`` change only together, under
    ``lock`` held for writing (P6)."""

    @property
    def io_lock(self) -> trio.Lock:
        """Serialises local writes and stores; made at first use (most
        cached vnodes are never written)."""
        if self._io_lock is None:
            self._io_lock = trio.Lock()
        return self._io_lock

    def __init__(self, volume: VolumeInstance, fid: Fid) -> None:
        self.volume = volume
        self.fid = fid
        self.status: FileStatus | None = None
        self.promise: Promise | None = None
        self.cb_break = 0  # breaks received for this fid (P4)
        self.last_break = -math.inf  # trio time of the last break of this fid
        self.broken_at = 0  # volume.break_seq at the last break of this vnode
        self.lock = RWLock()  # status + promise (P6)
        self._io_lock: trio.Lock | None = None
        self.deleted = False  # the server no longer has it (ESTALE from now on)
        self.fetch_gen = 0  # completed status fetches, to collapse validations
        self.fetch_error: BaseException | None = None
        self.mod_at = 0  # volume.mod_clock at our last completed change (stale guard)
        self.local_size: int | None = None  # size including unstored writes
        self.truncated = False  # a local O_TRUNC not yet stored: no server bytes are ours
        #: chmod/utimes of a file with unstored writes, stored with them (see
        #: afsfuse.inode): mode, mtime_ns.  Shown here until then.
        self.pending_attrs: dict[str, int] | None = None
        self.storing = False  # a store is under way (see CacheManager._store)
        self.listing: DirListing | None = None  # directories only
        self.old_listing: DirListing | None = None  # zapped one, to diff for the kernel
        self.symlink: tuple[int, bytes] | None = None  # (dv, target)
        self.xattrs: Any = None  # afsfuse.xattr.CachedXattrs, valid under its promise
        self.names: tuple[int, dict[bytes, Fid | None]] | None = None  # (dir dv, lookups)
        self.inflight: dict[tuple[int, int], trio.Event] = {}  # (dv, chunk) being fetched
        self.open_count = 0
        self.open_writers = 0  # open handles with write access
        self.kernel_dv: int | None = None  # DV the kernel's page cache was filled at
        self.kernel_attr_dv: int | None = None  # DV of the attributes last given the kernel
        self.status_creation: int | None = None  # volume creation stamp when status was set
        self.next_read = -1  # offset a sequential reader asks for next
        self.ino = 0  # the inode the kernel holds it under (0: none); set by the adapter

    def __repr__(self) -> str:
        dv = self.status.data_version if self.status else None
        return f"<Vnode {self.volume.cell}:{self.fid} dv={dv} cb_break={self.cb_break}>"

    @property
    def is_dir(self) -> bool:
        return self.status is not None and self.status.type == FileType.DIRECTORY

    @property
    def data_version(self) -> int | None:
        return self.status.data_version if self.status is not None else None

    def promise_state(self, now: float) -> str:
        """``"ok"`` when the promise holds, else why not (for logs)."""
        p = self.promise
        if self.status is None:
            return "no_status"
        if p is None:
            return "no_promise"
        if p.type == CallBackType.DROPPED:
            return "dropped"
        if now >= p.expires_at:
            return "expired"
        if p.server.destroyed or p.cb_s_break != p.server.cb_s_break:
            return "server_break"
        if p.cb_v_break != self.volume.cb_v_break:
            return "volume_break"
        return "ok"

    def touch(self) -> None:
        """Record that one of our own changes to this vnode just completed."""
        self.volume.mod_clock += 1
        self.mod_at = self.volume.mod_clock

    def type_changed(self, status: FileStatus) -> bool:
        return self.status is not None and self.status.type != status.type

    def effective_status(self) -> FileStatus | None:
        """The status with locally written but unstored size (and attributes
        waiting for that store) applied."""
        st = self.status
        if st is None:
            return st
        if self.local_size is not None and self.local_size != st.size:
            st = replace(st, size=self.local_size)
        if self.pending_attrs:
            st = replace(st, **self.pending_attrs)
        return st

    def size(self) -> int:
        st = self.status
        if self.local_size is not None:
            return self.local_size
        return st.size if st is not None else 0

    def examine(self, now: float) -> dict[str, Any]:
        p = self.promise
        return {
            "fid": str(self.fid),
            "cell": self.volume.cell,
            "volume": self.volume.name,
            "volume_id": self.volume.volume_id,
            "data_version": self.data_version,
            "size": self.size(),
            "promise": self.promise_state(now),
            "promise_expires_in": (p.expires_at - now) if p is not None else None,
            "cb_break": self.cb_break,
            "cb_s_break": p.cb_s_break if p else None,
            "cb_v_break": p.cb_v_break if p else None,
            "server_cb_s_break": p.server.cb_s_break if p else None,
            "volume_cb_v_break": self.volume.cb_v_break,
            "deleted": self.deleted,
            "open_count": self.open_count,
            "local_size": self.local_size,
        }

"""Break snapshots (P5), applying replies (P6, C1) and ``validate`` (P4).

Every RPC that can return a promise takes a ``CallSnapshot`` when it is
issued: the issue time (promise expiry counts from it), a reference to the
server record, that record's ``cb_s_break``, the volume's ``cb_v_break`` and
``break_seq`` and ``mod_clock``, and each known vnode's ``cb_break``.
``apply_reply`` installs the reply's promise only if none of them moved; the
status is applied regardless, except a status older than a local
modification that completed meanwhile (its DV is not newer), which would
otherwise undo our own change (and zap freshly written data).

The caller holds the vnode's write lock around ``apply_reply`` so status and
promise change together (P6).

Every function takes a ``CacheContext`` (counters, invalidation queue, data
cache, VL relocation), never the manager.  May import: ``afsfuse.context``,
``afsfuse.invalidation``, ``afsfuse.rpc``, ``afsfuse.stats``,
``afsfuse.vnode``, ``protocol``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from afsfuse.invalidation import Invalidate
from afsfuse.rpc import call
from afsfuse.stats import log_event
from afsfuse.vnode import Promise, Vnode
from protocol import methods as M
from protocol.errors import RpcError
from protocol.records import CallBack, CallBackType, FileStatus, VolSync

if TYPE_CHECKING:
    from afsfuse.context import CacheContext
    from afsfuse.server_record import ServerRecord
    from afsfuse.volume import VolumeInstance

log = logging.getLogger(__name__)


class CallSnapshot:
    """Break counters when a call was issued (P5)."""

    __slots__ = (
        "break_seq",
        "cb_s_break",
        "cb_v_break",
        "issued",
        "mod_clock",
        "seen",
        "server",
        "volume",
    )

    def __init__(
        self, volume: VolumeInstance, server: ServerRecord, vnodes: tuple[Vnode, ...] = ()
    ) -> None:
        self.issued = trio.current_time()
        self.volume = volume
        self.server = server  # held: the promise names the record it came from
        self.cb_s_break = server.cb_s_break
        self.cb_v_break = volume.cb_v_break
        self.break_seq = volume.break_seq
        self.mod_clock = volume.mod_clock
        self.seen: dict[int, tuple[Vnode, int]] = {}
        for v in vnodes:
            self.add(v)

    def retake(self) -> None:
        """Read the counters again: nothing was issued since they were read."""
        self.issued = trio.current_time()
        self.cb_s_break = self.server.cb_s_break
        self.cb_v_break = self.volume.cb_v_break
        self.break_seq = self.volume.break_seq
        self.mod_clock = self.volume.mod_clock
        for v, _b in list(self.seen.values()):
            self.add(v)

    def add(self, v: Vnode) -> None:
        self.seen[id(v)] = (v, v.cb_break)

    def _entry(self, v: Vnode) -> tuple[Vnode, int] | None:
        e = self.seen.get(id(v))
        return e if e is not None and e[0] is v else None

    def broken(self, v: Vnode) -> str | None:
        """Why a promise from this call must not be installed on ``v``."""
        if self.server.destroyed or self.server.cb_s_break != self.cb_s_break:
            return "server_break"
        if self.volume.cb_v_break != self.cb_v_break:
            return "volume_break"
        e = self._entry(v)
        if e is not None:
            if v.cb_break != e[1]:
                return "vnode_break"
        elif v.broken_at > self.break_seq or self.volume.miss_at > self.break_seq:
            # v was not known to this call when it was issued: it was broken
            # since, or a break found its fid (or another) uncached meanwhile.
            return "break_unseen_vnode"
        return None

    def modified_since(self, v: Vnode) -> bool:
        """Whether one of our own changes to ``v`` completed after issue."""
        return v.mod_at > self.mod_clock


def note_volsync(ctx: CacheContext, volume: VolumeInstance, volsync: Any) -> None:
    """A changed volume creation stamp voids every promise on it."""
    if volsync is None:
        return
    vs = VolSync.from_wire(volsync)
    if volume.creation is not None and vs.creation != volume.creation:
        volume_break(ctx, volume, "volume_replaced")
    volume.creation = vs.creation


def volume_break(ctx: CacheContext, volume: VolumeInstance, why: str) -> None:
    """Void every promise of one volume instance: one increment (P4)."""
    volume.cb_v_break += 1
    ctx.stats.volume_breaks += 1
    log_event("volume_break", cell=volume.cell, volume=volume.volume_id, why=why)
    ctx.invalidations.put(Invalidate("volume", volume=volume))


def break_vnode(ctx: CacheContext, v: Vnode, why: str = "callback") -> None:
    """A break on one cached vnode: the promise goes; no lock is taken (the
    server may be waiting for our CB reply while we hold a vnode lock)."""
    v.cb_break += 1
    v.last_break = trio.current_time()
    v.volume.break_seq += 1
    v.broken_at = v.volume.break_seq
    v.promise = None
    ctx.stats.breaks += 1
    log_event("break_received", fid=v.fid, cell=v.volume.cell, why=why, cb_break=v.cb_break)
    ctx.invalidations.put(Invalidate("inode", vnode=v, attr_only=False))


def zap_data(ctx: CacheContext, v: Vnode, old_dv: int, new_dv: int) -> None:
    """C1: the DV moved under us; cached data of the old DV goes.

    Unstored local writes are kept and carried to the new DV (last writer
    wins at store time, as in AFS)."""
    if v.listing is not None and v.listing.dv != new_dv:
        v.old_listing, v.listing = v.listing, None
    v.symlink = None
    v.kernel_dv = None  # C2: whatever pages the kernel has are of an old DV
    ctx.datacache.drop(v.fid, keep_dv=new_dv, keep_dirty=True)
    if ctx.datacache.dirty_chunks(v.fid):
        ctx.datacache.rekey(v.fid, old_dv, new_dv)
    log_event("data_zapped", fid=v.fid, old_dv=old_dv, new_dv=new_dv)
    ctx.invalidations.put(Invalidate("inode", vnode=v, attr_only=False))


def apply_reply(
    ctx: CacheContext,
    v: Vnode,
    status_wire: Any,
    callback_wire: Any,
    snap: CallSnapshot,
    *,
    own_from_dv: int | None = None,
) -> bool:
    """Apply a reply's status (and promise, if intact) to ``v``.

    ``own_from_dv``: the call was our own change and the DV it started from;
    a reply DV of exactly that + 1 is our change alone (nothing to zap; the
    caller rekeys its data or edits its listing).  Returns True if the status
    was applied.  Caller holds ``v.lock`` for writing.
    """
    status = FileStatus.from_wire(status_wire)
    cb = CallBack.from_wire(callback_wire) if callback_wire is not None else None
    old = v.status
    # A volume restored or recreated since this status was stored starts its
    # DVs afresh: a lower DV is then news, not a stale reply.
    replaced = old is not None and v.status_creation != v.volume.creation
    if (
        old is not None
        and own_from_dv is None
        and not replaced
        and (
            status.data_version < old.data_version
            or (snap.modified_since(v) and status.data_version <= old.data_version)
        )
    ):
        # Fetched before a local change that completed meanwhile.
        ctx.stats.statuses_stale_ignored += 1
        log_event("status_stale", fid=v.fid, dv=status.data_version, have=old.data_version)
        return False
    if old is not None and (replaced or status.data_version != old.data_version):
        own = own_from_dv is not None and own_from_dv == old.data_version and not replaced
        if not (own and status.data_version == old.data_version + 1) or v.type_changed(status):
            zap_data(ctx, v, old.data_version, status.data_version)
    v.status = status
    v.status_creation = v.volume.creation
    v.deleted = False
    if own_from_dv is not None:
        break_aliases(ctx, v)
    if cb is not None:
        why = snap.broken(v)
        if cb.type == CallBackType.DROPPED:
            v.promise = None
        elif why is None:
            v.promise = Promise(
                cb.version,
                cb.type,
                snap.issued + cb.expires_in,  # from issue time, not reply time
                snap.server,
                snap.cb_s_break,
                snap.cb_v_break,
            )
            ctx.stats.promises_installed += 1
            log_event("promise_installed", fid=v.fid, expires_in=cb.expires_in)
        else:
            v.promise = None
            ctx.stats.promises_discarded += 1
            log_event("promise_discarded", fid=v.fid, why=why)
    return True


def break_aliases(ctx: CacheContext, v: Vnode) -> None:
    """Our own change: the server breaks every client but us, so other
    instances of this volume here (reached through an aliased cell) hear of
    it from us.  Found without creating vnodes (P3); usually one instance."""
    vol = v.volume
    for server in vol.servers:
        for inst in server.instances(vol.volume_id):
            if inst is not vol:
                other = inst.find(v.fid)
                if other is not None:
                    break_vnode(ctx, other, "alias_own_change")


def mark_deleted(ctx: CacheContext, v: Vnode, *, own_removal: bool = False) -> None:
    """``v`` is gone from the server.  ``own_removal``: the kernel itself just
    removed its last name through us (unlink, rmdir, rename over it) and
    updated the inode (nlink, ctime) itself; its pages still hold the file's
    last contents, so telling it again would only cost a thread round trip,
    usually to hear that it already forgot the inode."""
    v.deleted = True
    v.promise = None
    v.listing = None
    v.local_size = None
    v.truncated = False
    v.pending_attrs = None
    ctx.datacache.drop(v.fid, keep_dirty=False)
    if own_removal:
        ctx.stats.kernel_notify_skipped += 1
    else:
        ctx.invalidations.put(Invalidate("inode", vnode=v))


def _if_promised(ctx: CacheContext, v: Vnode) -> FileStatus | None:
    """``v``'s status when its promise holds (a fast validation), else None."""
    if v.promise_state(trio.current_time()) != "ok":
        return None
    ctx.stats.validations_fast += 1
    log_event("validate_fast", fid=v.fid)
    st = v.effective_status()
    assert st is not None
    return st


async def validate(ctx: CacheContext, v: Vnode, cred: Any) -> FileStatus:
    """Make ``v``'s status trustworthy and return it (with local size).

    Fast path, no RPC: the promise holds (P4).  Otherwise one FS.FetchStatus
    under the write lock; validations that queued behind it share its result
    (P6).  A vnode the server no longer has raises ESTALE.
    """
    if v.deleted:
        raise RpcError("ESTALE", f"{v.fid} was deleted")
    # The fast path reads without awaiting, so when no writer holds or waits
    # for the lock, taking it (and its checkpoint, three per cached lookup)
    # adds nothing: none can start before we return.
    if v.lock.free_for_read() and (st := _if_promised(ctx, v)) is not None:
        return st
    async with v.lock.read():
        if (st := _if_promised(ctx, v)) is not None:
            return st
    gen = v.fetch_gen
    async with v.lock.write():
        if v.fetch_gen != gen:  # a fetch finished while we queued: share it
            if v.fetch_error is not None:
                raise v.fetch_error
        else:
            state = v.promise_state(trio.current_time())
            if state == "ok":
                ctx.stats.validations_fast += 1
                log_event("validate_fast", fid=v.fid)
            else:
                ctx.stats.validations_slow += 1
                log_event("validate_slow", fid=v.fid, why=state)
                try:
                    reply, snap = await _fetch_status(ctx, v, cred)
                except RpcError as exc:
                    err: RpcError = exc
                    if exc.code in ("ENOENT", "ESTALE"):
                        mark_deleted(ctx, v)
                        err = RpcError("ESTALE", f"{v.fid}: {exc.message}")
                    v.fetch_gen += 1
                    v.fetch_error = err
                    raise err from None
                v.fetch_gen += 1
                v.fetch_error = None
                note_volsync(ctx, v.volume, reply.get("volsync"))
                apply_reply(ctx, v, reply["status"], reply.get("callback"), snap)
        if v.deleted:
            raise RpcError("ESTALE", f"{v.fid} was deleted")
        st = v.effective_status()
        assert st is not None
        return st


async def _fetch_status(ctx: CacheContext, v: Vnode, cred: Any) -> tuple[Any, CallSnapshot]:
    """One FS.FetchStatus.  ENOENT/ESTALE may mean the volume moved to another
    server rather than the vnode being gone: VL decides, and after a move
    the call is sent once more, to the new server."""
    for attempt in range(2):
        server = v.volume.server
        snap = CallSnapshot(v.volume, server, (v,))
        try:
            return await call(server, M.FS_FETCH_STATUS, cred, v.fid, snap=snap), snap
        except RpcError as exc:
            if attempt or exc.code not in ("ENOENT", "ESTALE"):
                raise
            if not await ctx.relocate(v.volume):
                raise
    raise AssertionError("unreachable")

"""Namespace operations (kAFS dir.c): names in directories.

``Namespace`` holds lookup (cached listing first, then the per-DV name
cache, then FS.Lookup), readdir (paged FS.ReadDir into a ``DirListing``,
children's statuses primed from the pages or refreshed with
FS.InlineBulkStatus, 50 fids a call), readlink, and every change to a
directory: create, mkdir, symlink, mknod, link, unlink, rmdir, rename.  Our own
change is applied to the cached listing from the server's reply when the
directory's DV moved by exactly one (no refetch).  What a tree walk lists
next is read ahead (``afsfuse.dirahead``).

May import: ``afsfuse.context``, ``afsfuse.dirahead``, ``afsfuse.dircache``,
``afsfuse.invalidation``, ``afsfuse.rpc``, ``afsfuse.stats``,
``afsfuse.validation``, ``afsfuse.vnode``, ``afsfuse.volume``, ``protocol``.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import trio

from afsfuse.context import CacheContext
from afsfuse.dirahead import DirAhead
from afsfuse.dircache import DirListing, own_change_applies
from afsfuse.invalidation import Invalidate
from afsfuse.rpc import Cred, call, err, wire_cred
from afsfuse.stats import log_event
from afsfuse.validation import CallSnapshot, apply_reply, mark_deleted, note_volsync, validate
from afsfuse.vnode import Vnode
from afsfuse.volume import VolumeInstance
from protocol import methods as M
from protocol.errors import RpcError
from protocol.limits import MAX_BULKSTAT_FIDS, MAX_READDIR_ENTRIES, MAX_SYMLINK
from protocol.names import check_name
from protocol.records import Fid, FileStatus, FileType

log = logging.getLogger(__name__)

RENAME_NOREPLACE = 1
_MAX_NAMES = 4096  # lookup results cached per directory (per DV)
_READDIR_TRIES = 3  # listings refetched when a child vanished under them
#: Directories up to this many entries are read whole by a cold lookup.
LOOKUP_LISTING_MAX = 4 * MAX_READDIR_ENTRIES
#: Statuses one lookup fetches speculatively, and bulk calls in flight at once.
SPECULATE_MAX = 4 * MAX_BULKSTAT_FIDS
#: Siblings looked at, at most, to find them.
SPECULATE_SCAN = 4 * SPECULATE_MAX
_SPECULATE_WHEN = frozenset({"no_status", "expired"})
BULK_IN_FLIGHT = 4


def negative_token(d: Vnode) -> tuple[Any, ...]:
    """The counters whose change voids a negative answer about ``d``."""
    return (d.cb_break, d.volume.cb_v_break, tuple(r.cb_s_break for r in d.volume.servers))


def negative_holds(d: Vnode, token: tuple[Any, ...]) -> bool:
    """An ENOENT computed since ``token`` is still backed by ``d``'s promise."""
    return negative_token(d) == token and d.promise_state(trio.current_time()) == "ok"


@dataclass(frozen=True, slots=True)
class DirEntryPlus:
    name: bytes
    vnode: Vnode
    status: FileStatus


def _no_spawn(*_args: Any) -> None:
    raise RuntimeError("no nursery to read ahead in")


class Namespace:
    def __init__(
        self, ctx: CacheContext, spawn: Callable[..., None] | None = None, dir_ahead: int = 0
    ) -> None:
        self.ctx = ctx
        #: Listings a tree walk reads next, fetched early (off without ``spawn``).
        self.ahead = DirAhead(self._current_listing, spawn or _no_spawn, ctx.stats,
                              window=dir_ahead if spawn is not None else 0,
                              max_entries=LOOKUP_LISTING_MAX)  # fmt: skip

    async def _apply_locked(self, v: Vnode, status: Any, cb: Any, snap: CallSnapshot,
                            own_from_dv: int | None = None) -> None:  # fmt: skip
        async with v.lock.write():
            apply_reply(self.ctx, v, status, cb, snap, own_from_dv=own_from_dv)

    def _prime(self, v: Vnode, status: Any, cb: Any, snap: CallSnapshot) -> None:
        """Apply a bulk status if nobody holds the vnode's lock (a holder is
        fetching a fresher one; P6 forbids changing it under a reader)."""
        if v.lock.try_acquire_write():
            try:
                apply_reply(self.ctx, v, status, cb, snap)
            finally:
                v.lock.release_write()

    async def _dir_status(self, d: Vnode, cred: Any) -> FileStatus:
        st = await validate(self.ctx, d, cred)
        if st.type != FileType.DIRECTORY:
            raise err("ENOTDIR")
        return st

    async def lookup(self, dir: Vnode, name: bytes, cred: Cred = None) -> Vnode:
        """The child ``name`` of ``dir``.  Answered without an RPC from a
        listing of the directory's current DV (held under its promise: a name
        absent from it does not exist) or from the per-DV name cache.  The
        second cold lookup in one directory DV fetches the whole listing (one
        paged FS.ReadDir with statuses, as the kernel AFS client reads the
        directory), so a walk over many children costs no RPC per child; a
        child found there without a valid promise brings its stale siblings'
        statuses along (FS.InlineBulkStatus, kAFS's speculative bulk lookup)."""
        check_name(name)
        wc = wire_cred(cred)
        dst = await self._dir_status(dir, wc)
        listing = dir.listing
        if listing is not None and listing.dv == dst.data_version:
            self.ahead.looked_up(dir, listing, wc)
            return await self._from_listing(dir, listing, name, wc)
        names = dir.names
        if names is not None and names[0] == dst.data_version and name in names[1]:
            fid = names[1][name]
            if fid is None:
                self.ctx.stats.cache_hits += 1
                raise err("ENOENT")  # negative entry, valid while the DV holds
            child = dir.volume.get(fid)
            try:
                await validate(self.ctx, child, wc)
                self.ctx.stats.cache_hits += 1
                return child
            except RpcError as exc:
                if exc.code != "ESTALE":
                    raise
        if self._wants_listing(dir, dst):
            listing = await self._lookup_listing(dir, wc)
            if listing is not None and listing.dv == dir.data_version:
                self.ahead.walked(dir, listing, wc)
                return await self._from_listing(dir, listing, name, wc)
        return await self._lookup_rpc(dir, name, wc, dst.data_version)

    def _wants_listing(self, d: Vnode, dst: FileStatus) -> bool:
        """Whether a cold lookup in ``d`` should read the whole listing: some
        other child of this DV was looked up cold already, and the directory
        (whose size is its entry count) is small enough to read at once."""
        names = d.names
        cold = len(names[1]) if names is not None and names[0] == dst.data_version else 0
        return cold >= 1 and dst.size <= LOOKUP_LISTING_MAX

    async def _lookup_listing(self, d: Vnode, wc: Any) -> DirListing | None:
        try:
            return await self._fetch_listing(d, wc)
        except RpcError as exc:
            if exc.code != "EACCES":
                raise
            return None  # x without r: names can still be looked up one by one

    async def _from_listing(self, dir: Vnode, listing: DirListing, name: bytes, wc: Any) -> Vnode:
        ent = listing.lookup(name)
        if ent is None:
            self.ctx.stats.cache_hits += 1
            raise err("ENOENT")  # absent from a listing under a valid promise
        child = dir.volume.get(ent.fid)
        if child.promise_state(trio.current_time()) != "ok":
            await self._speculate(dir, listing, ent.name, wc)
        try:
            await validate(self.ctx, child, wc)
            return child
        except RpcError as exc:
            if exc.code != "ESTALE":
                raise
        # Gone under a listing that still names it (a break on its way):
        # the server decides.
        return await self._lookup_rpc(dir, name, wc, listing.dv)

    async def _speculate(self, d: Vnode, listing: DirListing, name: bytes, wc: Any) -> None:
        """The child ``name`` needs a status: fetch it together with the next
        siblings (in name order, the order a walk takes) whose status is
        unknown or whose promise expired, up to ``SPECULATE_MAX`` fids, in
        bulk calls run in parallel.  Siblings voided by a break wait for
        their own use: a mass break costs only the files used again."""
        vol = d.volume
        ent0 = listing.lookup(name)
        want = vol.get(ent0.fid) if ent0 is not None else None
        now = trio.current_time()
        entries = listing.sorted()
        n = len(entries)
        start = listing.position(name)
        stale: list[Vnode] = []
        # A bounded look, not the whole directory: where the siblings are
        # fresh a lookup would otherwise walk every entry to find none (18 ms
        # a lookup at 30,000 entries, against 0.7 ms now).
        for k in range(min(n, SPECULATE_SCAN)):
            v = vol.get(entries[(start + k) % n].fid)
            if v is not d and (v is want or v.promise_state(now) in _SPECULATE_WHEN):
                stale.append(v)
                if len(stale) >= SPECULATE_MAX:
                    break
        if len(stale) > 1:  # the child alone: a plain FetchStatus does
            self.ctx.stats.bulk_speculative += len(stale)
            await self._bulk_status(vol, stale, wc)

    async def _bulk_status(self, vol: VolumeInstance, stale: list[Vnode], wc: Any) -> None:
        """FS.InlineBulkStatus for ``stale``: 50 fids a call, up to
        ``BULK_IN_FLIGHT`` calls at once; each status is primed (P6)."""
        batches = [
            stale[i : i + MAX_BULKSTAT_FIDS] for i in range(0, len(stale), MAX_BULKSTAT_FIDS)
        ]
        failure: list[BaseException] = []
        limit = trio.CapacityLimiter(BULK_IN_FLIGHT)

        async def one(batch: list[Vnode]) -> None:
            async with limit:
                if failure:
                    return
                try:
                    await self._bulk_one(vol, batch, wc)
                except (RpcError, OSError) as exc:
                    failure.append(exc)

        if len(batches) == 1:
            await self._bulk_one(vol, batches[0], wc)
            return
        async with trio.open_nursery() as nursery:
            for batch in batches:
                nursery.start_soon(one, batch)
        if failure:
            raise failure[0]

    async def _bulk_one(self, vol: VolumeInstance, batch: list[Vnode], wc: Any) -> None:
        server = vol.server
        snap = CallSnapshot(vol, server, tuple(batch))
        reply = await call(server, M.FS_INLINE_BULK_STATUS, wc, [v.fid for v in batch], snap=snap)
        note_volsync(self.ctx, vol, reply.get("volsync"))
        for v, (error, status, cb) in zip(batch, reply["results"], strict=False):
            if error is None:
                self._prime(v, status, cb, snap)
            elif isinstance(error, list) and error and error[0] in ("ENOENT", "ESTALE"):
                mark_deleted(self.ctx, v)

    async def _lookup_rpc(self, dir: Vnode, name: bytes, wc: Any, dir_dv: int | None) -> Vnode:
        """FS.Lookup of one name; its answer (or its absence) is remembered
        for the directory's DV."""
        vol = dir.volume
        server = vol.server
        snap = CallSnapshot(vol, server, (dir,))
        try:
            reply = await call(server, M.FS_LOOKUP, wc, dir.fid, name, snap=snap)
        except RpcError as exc:
            if exc.code == "ENOENT" and dir_dv is not None:
                self._remember_name(dir, dir_dv, name, None, snap)
            raise
        note_volsync(self.ctx, vol, reply.get("volsync"))
        await self._apply_locked(dir, reply["dir_status"], reply.get("dir_callback"), snap)
        fid = Fid.from_wire(reply["fid"])
        child = vol.get(fid)
        await self._apply_locked(child, reply["status"], reply.get("callback"), snap)
        if child.deleted or child.status is None:
            raise err("ENOENT")
        new_dv = FileStatus.from_wire(reply["dir_status"]).data_version
        self._remember_name(dir, new_dv, name, fid, snap)
        return child

    def _remember_name(
        self, d: Vnode, dv: int, name: bytes, fid: Fid | None, snap: CallSnapshot
    ) -> None:
        """Cache one lookup result (None: no such name) for directory DV ``dv``,
        only if the directory is still at ``dv`` under an intact promise."""
        if snap.broken(d) is not None or d.data_version != dv:
            return
        if d.promise_state(trio.current_time()) != "ok":
            return
        if d.names is None or d.names[0] != dv or len(d.names[1]) >= _MAX_NAMES:
            d.names = (dv, {})
        d.names[1][name] = fid

    async def _fetch_listing(self, d: Vnode, cred: Any) -> DirListing:
        """Fetch the whole listing (paged, with statuses); restart when the
        directory's DV moves between pages."""
        vol = d.volume
        async with d.lock.write():
            if d.listing is not None and d.listing.dv == d.data_version:
                return d.listing
            self.ctx.stats.dir_fetches += 1
            for _attempt in range(8):
                server = vol.server
                snap = CallSnapshot(vol, server, (d,))
                pages: list[dict[str, Any]] = []
                dv: int | None = None
                cookie: Any = None
                restart = False
                while True:
                    reply = await call(
                        server, M.FS_READ_DIR, cred, d.fid, cookie, MAX_READDIR_ENTRIES, True,
                        snap=snap if not pages else None,  # issue time is the first page's
                    )  # fmt: skip
                    page_dv = FileStatus.from_wire(reply["dir_status"]).data_version
                    if dv is None:
                        dv = page_dv
                    elif page_dv != dv:
                        restart = True
                        break
                    pages.append(reply)
                    cookie = reply.get("next")
                    if cookie is None:
                        break
                if not restart:
                    break
                log_event("readdir_restart", fid=d.fid)
            else:
                raise err("EAGAIN", f"directory {d.fid} kept changing during readdir")
            assert dv is not None
            last = pages[-1]
            note_volsync(self.ctx, vol, last.get("volsync"))
            apply_reply(self.ctx, d, last["dir_status"], last.get("dir_callback"), snap)
            listing = DirListing(dv)
            for page in pages:
                for ent in page["entries"]:
                    name, fid = ent[0], Fid.from_wire(ent[1])
                    listing.add(name, fid, FileType(ent[2]))
                    if len(ent) >= 5 and ent[3] is not None:
                        child = vol.get(fid)
                        if child is not d:
                            self._prime(child, ent[3], ent[4], snap)
            self._kernel_entry_diff(d, d.old_listing, listing)
            d.old_listing = None
            if d.status is not None and d.status.data_version == dv:
                d.listing = listing
            return listing

    def _kernel_entry_diff(self, d: Vnode, old: DirListing | None, new: DirListing) -> None:
        """Tell the kernel about names that went away or changed meaning."""
        if old is None:
            return
        for name, ent in old.entries.items():
            now = new.entries.get(name)
            if now is None or now.fid != ent.fid:
                self.ctx.invalidations.put(Invalidate("entry", parent=d, name=name))

    async def readdir(self, dir: Vnode, cred: Cred = None) -> list[DirEntryPlus]:
        """All entries (no ``.``/``..``), sorted by name, each with a validated
        status (children with no valid promise are refreshed by
        FS.InlineBulkStatus, 50 at a time)."""
        wc = wire_cred(cred)
        for attempt in range(_READDIR_TRIES):
            listing = await self._current_listing(dir, wc)
            out = await self._listing_entries(dir, listing, wc)
            if out is not None:
                if self.ahead.window:
                    self.ahead.read(dir, [(e.vnode.fid, e.status.type) for e in out], wc)
                return out
            # A child the listing names is gone: the listing predates a change
            # (a rename over it, say) whose break may still be on its way to
            # us.  Ask the server for the directory again instead of dropping
            # a name that still exists.
            dir.promise = None
            log_event("readdir_retry", fid=dir.fid, attempt=attempt + 1)
        return await self._listing_entries(dir, await self._current_listing(dir, wc), wc, True)

    async def _current_listing(self, dir: Vnode, wc: Any) -> DirListing:
        dst = await self._dir_status(dir, wc)
        listing = dir.listing
        if listing is None or listing.dv != dst.data_version:
            listing = await self._fetch_listing(dir, wc)
        return listing

    async def _listing_entries(
        self, dir: Vnode, listing: DirListing, wc: Any, last_try: bool = False
    ) -> list[DirEntryPlus] | None:
        """The listing's entries with statuses; None if a child has vanished
        (unless ``last_try``: then it is left out)."""
        vol = dir.volume
        now = trio.current_time()
        stale: list[Vnode] = []
        children = [(ent.name, vol.get(ent.fid)) for ent in listing.sorted()]
        for _name, child in children:
            if child.promise_state(now) != "ok":
                stale.append(child)
        waited = False
        if stale:
            await self._bulk_status(vol, stale, wc)
            waited = True
        out: list[DirEntryPlus] = []
        for name, child in children:
            if waited:
                # An eviction may have dropped it meanwhile: breaks reach the
                # vnode the volume holds now.
                child = vol.get(child.fid)
            st = None if child.deleted else child.effective_status()
            if st is None and not child.deleted:
                # Primed by nobody (its lock was busy, or it was forgotten
                # meanwhile): ask for it rather than drop it from the listing.
                waited = True
                try:
                    st = await validate(self.ctx, child, wc)
                except RpcError as exc:
                    if exc.errno not in (errno.ENOENT, errno.ESTALE):
                        raise
            if st is None:
                if not last_try:
                    return None
                continue
            out.append(DirEntryPlus(name, child, st))
        return out

    async def _dir_change(
        self, d: Vnode, cred: Any, method: str, params: tuple[Any, ...],
        edit: Callable[[DirListing, dict[str, Any]], None],
    ) -> tuple[dict[str, Any], CallSnapshot]:  # fmt: skip
        """Our own change to directory ``d`` (held locked for writing): apply it
        to the cached listing when the reply's DV is exactly old + 1."""
        await self._dir_status(d, cred)
        vol = d.volume
        async with d.lock.write():
            old_dv = d.data_version
            server = vol.server
            snap = CallSnapshot(vol, server, (d,))
            reply = await call(server, method, cred, d.fid, *params, snap=snap)
            note_volsync(self.ctx, vol, reply.get("volsync"))
            new_dv = FileStatus.from_wire(reply["dir_status"]).data_version
            self._edit_listing(d, old_dv, new_dv, lambda lst: edit(lst, reply))
            apply_reply(
                self.ctx,
                d,
                reply["dir_status"],
                reply.get("dir_callback"),
                snap,
                own_from_dv=old_dv,
            )
            d.touch()
        return reply, snap

    def _edit_listing(
        self, d: Vnode, old_dv: int | None, new_dv: int, edit: Callable[[DirListing], None]
    ) -> None:
        if own_change_applies(d.listing, old_dv, new_dv):
            assert d.listing is not None
            edit(d.listing)
            d.listing.dv = new_dv
            self.ctx.stats.dir_local_edits += 1
            log_event("dir_local_edit", fid=d.fid, dv=new_dv)
        elif d.listing is not None and d.listing.dv != new_dv:
            d.listing = None

    async def _new_child(
        self, d: Vnode, cred: Any, method: str, params: tuple[Any, ...], ftype: FileType
    ) -> Vnode:
        def edit(lst: DirListing, reply: dict[str, Any]) -> None:
            lst.add(params[0], Fid.from_wire(reply["fid"]), ftype)

        reply, snap = await self._dir_change(d, cred, method, params, edit)
        child = d.volume.get(Fid.from_wire(reply["fid"]))
        await self._apply_locked(child, reply["status"], reply.get("callback"), snap)
        return child

    async def create(self, dir: Vnode, name: bytes, mode: int, cred: Cred = None) -> Vnode:
        check_name(name)
        return await self._new_child(
            dir, wire_cred(cred), M.FS_CREATE_FILE, (name, mode & 0o7777), FileType.FILE
        )

    async def mkdir(self, dir: Vnode, name: bytes, mode: int, cred: Cred = None) -> Vnode:
        check_name(name)
        child = await self._new_child(
            dir, wire_cred(cred), M.FS_MAKE_DIR, (name, mode & 0o7777), FileType.DIRECTORY
        )
        if child.status is not None and child.listing is None:
            child.listing = DirListing(child.status.data_version)  # known empty
        return child

    async def symlink(self, dir: Vnode, name: bytes, target: bytes, cred: Cred = None) -> Vnode:
        check_name(name)
        if not target or len(target) > MAX_SYMLINK:
            raise err("ENAMETOOLONG" if target else "EINVAL", "bad symlink target")
        child = await self._new_child(
            dir, wire_cred(cred), M.FS_SYMLINK, (name, target, 0o777), FileType.SYMLINK
        )
        if child.status is not None:
            child.symlink = (child.status.data_version, target)
        return child

    async def mknod(
        self, dir: Vnode, name: bytes, ftype: FileType, mode: int, rdev: int, cred: Cred = None
    ) -> Vnode:
        """A FIFO, socket or device node (FS.MakeNode): type, mode, rdev, no data."""
        check_name(name)
        return await self._new_child(
            dir, wire_cred(cred), M.FS_MAKE_NODE, (name, int(ftype), mode & 0o7777, rdev), ftype
        )

    async def readlink(self, vnode: Vnode, cred: Cred = None) -> bytes:
        wc = wire_cred(cred)
        st = await validate(self.ctx, vnode, wc)
        if st.type != FileType.SYMLINK:
            raise err("EINVAL", "not a symlink")
        if vnode.symlink is not None and vnode.symlink[0] == st.data_version:
            self.ctx.stats.cache_hits += 1
            return vnode.symlink[1]
        self.ctx.stats.cache_misses += 1
        server = vnode.volume.server
        snap = CallSnapshot(vnode.volume, server, (vnode,))
        reply = await call(server, M.FS_FETCH_DATA, wc, vnode.fid, 0, MAX_SYMLINK, snap=snap)
        note_volsync(self.ctx, vnode.volume, reply.get("volsync"))
        await self._apply_locked(vnode, reply["status"], reply.get("callback"), snap)
        dv = FileStatus.from_wire(reply["status"]).data_version
        target = bytes(reply["data"])
        vnode.symlink = (dv, target)
        return target

    async def link(self, vnode: Vnode, dir: Vnode, name: bytes, cred: Cred = None) -> Vnode:
        check_name(name)
        if vnode.volume is not dir.volume:
            raise err("EXDEV")
        ftype = vnode.status.type if vnode.status is not None else FileType.FILE

        def edit(lst: DirListing, reply: dict[str, Any]) -> None:
            lst.add(name, vnode.fid, ftype)

        reply, snap = await self._dir_change(
            dir, wire_cred(cred), M.FS_LINK, (name, vnode.fid), edit
        )
        await self._apply_locked(vnode, reply["status"], None, snap, vnode.data_version)
        vnode.touch()
        return vnode

    async def _victim(self, vol: VolumeInstance, fid_wire: Any, status: Any,
                      snap: CallSnapshot) -> None:  # fmt: skip
        if fid_wire is None:
            return
        v = vol.find(Fid.from_wire(fid_wire))
        if v is None:
            return
        if status is None or FileStatus.from_wire(status).nlink == 0:
            mark_deleted(self.ctx, v, own_removal=True)
        else:
            async with v.lock.write():
                apply_reply(self.ctx, v, status, None, snap, own_from_dv=v.data_version)
            v.touch()

    async def unlink(self, dir: Vnode, name: bytes, cred: Cred = None) -> None:
        check_name(name)
        reply, snap = await self._dir_change(
            dir, wire_cred(cred), M.FS_REMOVE_FILE, (name,), lambda lst, r: lst.remove(name)
        )
        await self._victim(dir.volume, reply.get("fid"), reply.get("status"), snap)

    async def rmdir(self, dir: Vnode, name: bytes, cred: Cred = None) -> None:
        check_name(name)
        reply, snap = await self._dir_change(
            dir, wire_cred(cred), M.FS_REMOVE_DIR, (name,), lambda lst, r: lst.remove(name)
        )
        await self._victim(dir.volume, reply.get("fid"), None, snap)

    async def rename(
        self, old_dir: Vnode, old_name: bytes, new_dir: Vnode, new_name: bytes,
        flags: int = 0, cred: Cred = None,
    ) -> None:  # fmt: skip
        check_name(old_name)
        check_name(new_name)
        if flags & ~RENAME_NOREPLACE:
            raise err("EINVAL", "unsupported rename flags")
        if old_dir.volume is not new_dir.volume:
            raise err("EXDEV")
        wc = wire_cred(cred)
        await self._dir_status(old_dir, wc)
        if new_dir is not old_dir:
            await self._dir_status(new_dir, wc)
        vol = old_dir.volume
        dirs = [old_dir] if new_dir is old_dir else sorted((old_dir, new_dir), key=lambda v: v.fid)
        async with AsyncExitStack() as stack:
            for d in dirs:  # a fixed order: two renames never deadlock
                await stack.enter_async_context(d.lock.write())
            old_dvs = {id(d): d.data_version for d in dirs}
            server = vol.server
            snap = CallSnapshot(vol, server, tuple(dirs))
            reply = await call(
                server, M.FS_RENAME, wc, old_dir.fid, old_name, new_dir.fid, new_name, flags,
                snap=snap,
            )  # fmt: skip
            note_volsync(self.ctx, vol, reply.get("volsync"))
            moved_fid = Fid.from_wire(reply["fid"])
            moved_type = FileStatus.from_wire(reply["status"]).type
            if new_dir is old_dir:
                new_dv = FileStatus.from_wire(reply["new_dir_status"]).data_version

                def edit_same(lst: DirListing) -> None:
                    lst.remove(old_name)
                    lst.add(new_name, moved_fid, moved_type)

                self._edit_listing(old_dir, old_dvs[id(old_dir)], new_dv, edit_same)
                apply_reply(self.ctx, old_dir, reply["new_dir_status"], None, snap,
                            own_from_dv=old_dvs[id(old_dir)])  # fmt: skip
            else:
                odv = FileStatus.from_wire(reply["old_dir_status"]).data_version
                ndv = FileStatus.from_wire(reply["new_dir_status"]).data_version
                self._edit_listing(
                    old_dir, old_dvs[id(old_dir)], odv, lambda lst: lst.remove(old_name)
                )
                self._edit_listing(
                    new_dir,
                    old_dvs[id(new_dir)],
                    ndv,
                    lambda lst: lst.add(new_name, moved_fid, moved_type),
                )
                apply_reply(self.ctx, old_dir, reply["old_dir_status"], None, snap,
                            own_from_dv=old_dvs[id(old_dir)])  # fmt: skip
                apply_reply(self.ctx, new_dir, reply["new_dir_status"], None, snap,
                            own_from_dv=old_dvs[id(new_dir)])  # fmt: skip
            for d in dirs:
                d.touch()
        moved = vol.find(moved_fid)
        if moved is not None:
            async with moved.lock.write():
                apply_reply(self.ctx, moved, reply["status"], None, snap,
                            own_from_dv=moved.data_version)  # fmt: skip
            moved.touch()
        await self._victim(vol, reply.get("replaced_fid"), reply.get("replaced_status"), snap)


__all__ = ["RENAME_NOREPLACE", "DirEntryPlus", "Namespace", "negative_holds", "negative_token"]

"""The write side of the data path (kAFS write.c): local dirty chunks, stores.

Writes land in local dirty chunks (a partly overwritten chunk starts from
its server content, fetched through the ``Reader``); an ``open(O_TRUNC)``
is a local write too.  ``store`` sends every dirty chunk with FS.StoreData
(contiguous runs, at most ``MAX_IO`` a call, up to ``STORE_DEPTH`` calls in
flight) under the vnode's io lock; our own store moves the DV by exactly
one per call and the chunks are re-labelled to it, not dropped.  Replies
of calls in flight may come in any order: they are applied in DV order,
and one that does not continue our own chain of DVs is someone else's
change (its data zapped, our dirty chunks stored again under it).  Dirty
chunks left by an earlier run for a fid nobody wrote in this one are
discarded when the vnode is first made (``on_new_vnode``): they are never
stored behind the server's back.

May import: ``afsfuse.context``, ``afsfuse.file`` (OpenFile), ``afsfuse.read``,
``afsfuse.rpc``, ``afsfuse.stats``, ``afsfuse.store_failure``, ``afsfuse.validation``,
``afsfuse.vnode``, ``protocol``.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from afsfuse.context import CacheContext
from afsfuse.file import OpenFile
from afsfuse.read import Reader
from afsfuse.rpc import Cred, call, err, wire_cred
from afsfuse.stats import log_event
from afsfuse.store_failure import forget_unstored, refused
from afsfuse.validation import CallSnapshot, apply_reply, mark_deleted, note_volsync, validate
from afsfuse.vnode import Vnode
from protocol import methods as M
from protocol.errors import RpcError
from protocol.limits import MAX_IO
from protocol.records import Fid, FileStatus, FileType

log = logging.getLogger(__name__)

#: StoreData calls in flight per file: enough to keep the connection and the
#: server busy while the next payload is gathered.
STORE_DEPTH = 4


class Writer:
    def __init__(self, ctx: CacheContext, reader: Reader) -> None:
        self.ctx = ctx
        self.reader = reader
        self.written: set[Fid] = set()  # fids written locally in this run
        #: Write-behind: full runs of a file being written sequentially are
        #: stored while the application goes on writing (see ``_Behind``).
        self.write_behind = True
        self._behind: dict[Vnode, _Behind] = {}

    def on_new_vnode(self, v: Vnode) -> None:
        """Dirty chunks of a fid nobody wrote in this run are left over from a
        run that ended before storing them.  No close() ever succeeded for
        them, and the file may have changed on the server since: they are
        dropped, never stored behind the server's back."""
        if v.fid in self.written or not self.ctx.datacache.has_chunks(v.fid):
            return
        left = self.ctx.datacache.dirty_chunks(v.fid)
        if left:
            self.ctx.datacache.drop(v.fid, keep_dirty=False)
            log.warning("%s: discarded %d unstored chunks from a previous run", v.fid, len(left))
            log_event("stale_dirty_dropped", fid=v.fid, chunks=len(left))

    @staticmethod
    def dirty(v: Vnode) -> bool:
        """Whether ``v`` holds writes not yet stored.  ``local_size`` is set by
        every write and cleared only once every dirty chunk is stored; it is
        per vnode, while chunks are per fid (shared by aliased instances)."""
        return v.local_size is not None

    async def truncate_locally(self, v: Vnode) -> None:
        """open(O_TRUNC) under write-on-close: the truncation is a local write,
        stored at close together with what follows it, so other clients go
        straight from the old contents to the new ones and never see the file
        empty in between (as OpenAFS does).  Until then none of the server's
        old bytes are part of this file: nothing is fetched as a base for
        writes, and holes read as zeros (see Reader._fetch_runs)."""
        async with v.io_lock:
            await self._drain_behind(v)
            b = self._behind.get(v)
            if b is not None:
                b.sent_runs.clear()  # the old runs are gone with the truncation
                b.stored.clear()
            self.ctx.datacache.drop(v.fid, keep_dirty=False)
            v.local_size = 0
            v.truncated = True
            _written_after_utimes(v)
            self.written.add(v.fid)

    async def write(self, target: Vnode | OpenFile, offset: int, data: bytes,
                    cred: Cred = None) -> int:  # fmt: skip
        """Write into local dirty chunks; stored at flush/fsync/last close."""
        v = target.vnode if isinstance(target, OpenFile) else target
        if isinstance(target, OpenFile):
            target.wrote = True
        if not data:
            return 0
        wc = wire_cred(cred)
        cs = self.ctx.datacache.chunk_size
        async with v.io_lock:
            st = v.status if v.status is not None else await validate(self.ctx, v, wc)
            if st.type != FileType.FILE:
                raise err("EISDIR")
            for _attempt in range(6):
                assert v.status is not None
                dv = v.status.data_version
                # After a local O_TRUNC none of the server's bytes are ours.
                server_size = 0 if v.truncated else v.status.size
                end = offset + len(data)
                need = []
                for i in {offset // cs, (end - 1) // cs}:
                    whole = offset <= i * cs and end >= (i + 1) * cs
                    if not whole and i * cs < server_size:
                        need += self.ctx.datacache.missing(v.fid, dv, i * cs, 1, server_size)
                # A partly overwritten chunk starts from its server content.
                base: dict[int, bytes] = {}
                if not need:
                    break
                if await self.reader.fetch_chunks(v, wc, dv, need, base):
                    still = [i for i in need if self.ctx.datacache.missing(v.fid, dv, i * cs, 1,
                                                                       server_size)]  # fmt: skip
                    if set(still) <= set(base):
                        break
            else:
                raise err("EIO", f"{v.fid}: data kept changing while writing")
            self.written.add(v.fid)
            self.ctx.datacache.write(v.fid, dv, offset, data, base.get)
            v.local_size = max(v.size(), end)
            _written_after_utimes(v)
            b = self._behind.get(v)
            if b is not None:
                # Written again after (or while) its store went out: it is
                # stored again by the closing store, after that one is answered.
                touched = set(range(offset // cs, (end - 1) // cs + 1))
                b.rewritten.update(touched & b.inflight)
                b.stored.difference_update(touched)
            if self.write_behind:
                await self._maybe_behind(v, wc, dv, offset)
        return len(data)

    async def _maybe_behind(self, v: Vnode, cred: Any, dv: int, offset: int) -> None:
        """A write starting in run r: store run r - 1 now if it is whole (every
        chunk full and dirty, none in flight).  Caller holds the io lock."""
        cs = self.ctx.datacache.chunk_size
        per_call = max(1, MAX_IO // cs)
        r = offset // cs // per_call - 1
        if r < 0:
            return
        b = self._behind.get(v)
        if b is not None and r in b.sent_runs:
            return
        run = list(range(r * per_call, (r + 1) * per_call))
        if not self.ctx.datacache.full_and_dirty(v.fid, dv, run):
            return
        if b is None:
            b = self._behind[v] = _Behind(dv)
        if dv != b.base_dv:
            b.tainted = True  # the DV moved under us: nothing stored counts
        if b.inflight.intersection(run):
            return
        b.sent_runs.add(r)
        chunks = [self.ctx.datacache.get(v.fid, dv, i) for i in run]
        if any(c is None or len(c) != cs for c in chunks):
            return
        # At most STORE_DEPTH in flight: a writer faster than the server waits here.
        await b.slots.acquire()
        b.inflight.update(run)
        b.calls += 1
        if b.calls == 1:
            b.drained = trio.Event()
        try:
            self.reader._spawn(self._behind_one, v, b, run, b"".join(chunks), cred)  # type: ignore[attr-defined]
        except RuntimeError:  # closing: the closing store sends these chunks
            self._behind_done(b, run)

    async def _behind_one(
        self, v: Vnode, b: _Behind, run: list[int], payload: bytes, cred: Any
    ) -> None:
        """One write-behind StoreData: no new length (the file is still
        growing; the closing store sends it), no status applied and the
        chunks left dirty: the closing store applies every reply in DV order,
        and only if the replies are our own chain are these chunks taken as
        stored (else they are sent again)."""
        off = run[0] * self.ctx.datacache.chunk_size
        try:
            server = v.volume.server
            snap = CallSnapshot(v.volume, server, (v,))
            reply = await call(
                server, M.FS_STORE_DATA, cred, v.fid, off, payload, None, None, snap=snap
            )
            self.ctx.stats.bytes_stored += len(payload)
            note_volsync(self.ctx, v.volume, reply.get("volsync"))
            b.stored.update(i for i in run if i not in b.rewritten)
            status = FileStatus.from_wire(reply["status"])
            b.replies[status.data_version] = (reply["status"], snap)
            log_event("stored_behind", fid=v.fid, offset=off, bytes=len(payload),
                      dv=status.data_version)  # fmt: skip
        except RpcError as exc:
            if exc.code in ("ENOENT", "ESTALE"):
                mark_deleted(self.ctx, v)
                exc = err("ESTALE", f"{v.fid} was removed")
            b.fail(exc)
        except Exception as exc:  # a task of the manager's nursery must not raise
            log.warning("%s: write-behind store failed: %r", v.fid, exc)
            b.fail(err("EIO", f"{v.fid}: write-behind store failed"))
        finally:
            self._behind_done(b, run)

    @staticmethod
    def _behind_done(b: _Behind, run: list[int]) -> None:
        for i in run:
            b.inflight.discard(i)
            b.rewritten.discard(i)
        b.calls -= 1
        b.slots.release()
        if b.calls == 0:
            b.drained.set()

    async def _drain_behind(self, v: Vnode) -> None:
        b = self._behind.get(v)
        if b is not None:
            await b.drained.wait()

    def _get_chunks(self, fid: Fid, dv: int, run: list[int]) -> list[bytes | None]:
        return [self.ctx.datacache.get(fid, dv, i) for i in run]

    async def store(self, v: Vnode, cred: Any) -> None:
        """Store every dirty chunk (contiguous runs, <= MAX_IO per StoreData).

        Our own store moves the DV by exactly one per call: the chunks are
        re-labelled to the final DV, not dropped.  The vnode is locked for
        writing across each call, so no status fetched meanwhile can
        interleave (P6).  Reads on this client wait for the store (``storing``)
        rather than read the server's half-stored file.  Attributes set while
        the writes waited (``Vnode.pending_attrs``) go with the StoreData
        calls (the mtime always, the mode where the server takes it), else
        in one StoreStatus right after."""
        async with v.io_lock:
            # Close-to-open: every write-behind call is answered first.
            await self._drain_behind(v)
            v.storing = True
            pending = dict(v.pending_attrs or {})
            with_data = "store-attrs" in v.volume.server.capabilities
            carried = {k: x for k, x in pending.items() if with_data or k == "mtime_ns"}
            try:
                if not await self._store_runs(v, cred, carried):
                    carried = {}  # nothing was stored: every attribute goes alone
                rest = {k: x for k, x in pending.items() if k not in carried}
                if rest:
                    await self._store_status(v, cred, rest)
                v.pending_attrs = None
            except RpcError as exc:
                if refused(exc):  # never lands: show the server's file again
                    forget_unstored(self.ctx, v, exc)
                    self._behind.pop(v, None)
                raise
            finally:
                v.storing = False
            self._behind.pop(v, None)

    async def _store_status(self, v: Vnode, cred: Any, attrs: dict[str, int]) -> None:
        """The waiting attributes a server without ``store-attrs`` could not
        take with the data."""
        async with v.lock.write():
            server = v.volume.server
            snap = CallSnapshot(v.volume, server, (v,))
            reply = await call(server, M.FS_STORE_STATUS, cred, v.fid, attrs, snap=snap)
            note_volsync(self.ctx, v.volume, reply.get("volsync"))
            apply_reply(self.ctx, v, reply["status"], None, snap, own_from_dv=v.data_version)
            v.touch()

    async def _store_runs(self, v: Vnode, cred: Any, attrs: dict[str, int]) -> bool:
        """The store's calls; False when there was nothing to store."""
        cs = self.ctx.datacache.chunk_size
        per_call = max(1, MAX_IO // cs)
        # The chunks stay filed under one DV (key_dv) for the whole store and
        # are re-labelled once at the end: re-labelling every chunk of the file
        # after each StoreData would cost the square of its size.
        key_dv: int | None = None
        made = False
        while True:
            # The vnode is write-locked across a whole batch of pipelined
            # calls: no status fetched meanwhile can interleave with our own
            # DV bumps (P6), so only the DVs of our replies need sorting out.
            async with v.lock.write():
                if v.status is None:
                    raise err("ESTALE")
                dv = v.status.data_version
                if key_dv is None:
                    for d, _i in self.ctx.datacache.dirty_chunks(v.fid):
                        if d != dv:  # written under a DV that moved since
                            self.ctx.datacache.rekey(v.fid, d, dv)
                    key_dv = dv
                    if v.truncated:
                        # After a local O_TRUNC every byte on the server is
                        # replaced: the holes we never wrote go as zeros.
                        have = {i for d, i in self.ctx.datacache.dirty_chunks(v.fid) if d == dv}
                        for i in range((v.size() + cs - 1) // cs):
                            if i not in have:
                                self.ctx.datacache.put(v.fid, dv, i, b"", dirty=True)
                idx = [i for d, i in self.ctx.datacache.dirty_chunks(v.fid) if d == key_dv]
                if not idx and v.local_size is None:
                    return made
                behind = self._behind.get(v)
                stored: set[int] = set()
                if behind is not None:
                    if not behind.tainted and behind.base_dv == key_dv:
                        # Already on the server (if the replies prove it).
                        stored = behind.stored & set(idx)
                        idx = [i for i in idx if i not in stored]
                    behind.stored = set()
                runs: list[list[int]] = []
                for i in idx:
                    if runs and i == runs[-1][-1] + 1 and len(runs[-1]) < per_call:
                        runs[-1].append(i)
                    else:
                        runs.append([i])
                batch = _Batch(v, key_dv, v.size(), attrs)
                if behind is not None:
                    # The write-behind replies are applied with this batch's.
                    batch.replies.update(behind.replies)
                    behind.replies.clear()
                    failed, behind.error = behind.error, None
                    if failed is not None and (refused(failed) or failed.code == "ESTALE"):
                        # Reported at close/fsync; what did land is sorted out
                        # as after any failed call.
                        self._settle(batch, final=True)
                        raise failed
                await self._store_batch(batch, runs or [[]], cred)
                made = True
                if stored and not batch.foreign and batch.error is None:
                    # Every reply continued our own chain: the write-behind
                    # bytes are on the server, under the DV we now hold.
                    for i in stored:
                        self.ctx.datacache.mark_clean(v.fid, key_dv, i)
                if batch.foreign:
                    # Someone else wrote too: their version's data replaced our
                    # clean chunks (zapped); what is still dirty is re-filed
                    # under the current DV at the next pass.
                    key_dv = None
                if batch.error is not None:
                    raise batch.error
                if not self.ctx.datacache.dirty_chunks(v.fid):
                    if key_dv is not None:
                        assert v.status is not None
                        self.ctx.datacache.rekey(v.fid, key_dv, v.status.data_version)
                    v.local_size = None
                    v.truncated = False
                    return made

    async def _store_batch(self, b: _Batch, runs: list[list[int]], cred: Any) -> None:
        """Send ``runs`` with up to ``STORE_DEPTH`` StoreData calls in flight.

        Every call carries the same final length and the runs are disjoint,
        so the order the server runs them in does not change the result.
        A failed call does not cancel the others (their bytes may land
        anyway): all are waited for, and the first error is kept."""
        slots = trio.Semaphore(STORE_DEPTH)
        async with trio.open_nursery() as nursery:
            for run in runs:
                await slots.acquire()
                if b.error is not None:
                    slots.release()
                    break
                try:
                    payload = await self._payload(b, run)
                except BaseException:
                    slots.release()
                    raise
                nursery.start_soon(self._store_one, b, run, payload, cred, slots)
        self._settle(b, final=True)

    async def _payload(self, b: _Batch, run: list[int]) -> bytes:
        if not run:
            return b""
        cs = self.ctx.datacache.chunk_size
        # Off the trio thread when read from disk (in memory there is no
        # I/O to wait for): the io lock and the vnode's write lock keep these
        # dirty chunks as they are.
        dc = self.ctx.datacache
        nbytes = len(run) * cs
        if dc.resident(b.v.fid, b.key_dv, run[0] * cs, nbytes):
            nbytes = 0
        chunks = await self.ctx.chunk_io(nbytes, self._get_chunks, b.v.fid, b.key_dv, run)
        parts = []
        for i, chunk in zip(run, chunks, strict=True):
            if chunk is None:
                raise err("EIO", f"{b.v.fid}: dirty chunk {i} lost")
            # A short cached chunk reads as zeros up to the file size: send
            # those zeros, so the server's old bytes there are replaced too.
            span = max(0, min(cs, b.fsize - i * cs))
            parts.append(chunk[:span].ljust(span, b"\0"))
        return b"".join(parts)[: max(0, b.fsize - run[0] * cs)]

    async def _store_one(
        self, b: _Batch, run: list[int], payload: bytes, cred: Any, slots: trio.Semaphore
    ) -> None:
        v = b.v
        off = run[0] * self.ctx.datacache.chunk_size if run else b.fsize
        try:
            server = v.volume.server
            snap = CallSnapshot(v.volume, server, (v,))
            try:
                extra = (b.attrs,) if b.attrs else ()
                reply = await call(server, M.FS_STORE_DATA, cred, v.fid, off, payload, b.fsize,
                                   b.mtime_ns, *extra, snap=snap)  # fmt: skip
            except RpcError as exc:
                if exc.code in ("ENOENT", "ESTALE"):
                    # Removed by someone else: these writes can never land.
                    mark_deleted(self.ctx, v)
                    b.fail(err("ESTALE", f"{v.fid} was removed"))
                else:
                    b.fail(exc)
                return
            self.ctx.stats.bytes_stored += len(payload)
            note_volsync(self.ctx, v.volume, reply.get("volsync"))
            # These bytes are on the server whatever order the replies come in.
            for i in run:
                self.ctx.datacache.mark_clean(v.fid, b.key_dv, i)
            status = FileStatus.from_wire(reply["status"])
            b.replies[status.data_version] = (reply["status"], snap)
            log_event("stored", fid=v.fid, offset=off, bytes=len(payload),
                      dv=status.data_version)  # fmt: skip
            self._settle(b, final=False)
        finally:
            slots.release()

    def _settle(self, b: _Batch, *, final: bool) -> None:
        """Apply the replies received so far in DV order: one that moves the
        DV by exactly one from the current status is our own change alone (as
        in the one-call-at-a-time store); at the end of the batch whatever is
        left (a gap: someone else's change, or a failed call's) is applied as
        news, the newest last, so its data is zapped."""
        v = b.v
        while v.status is not None:
            nxt = b.replies.pop(v.status.data_version + 1, None)
            if nxt is None:
                break
            self._apply(b, nxt, own=True)
        if final and b.replies:
            b.foreign = True
            stale = [d for d in b.replies if v.status is not None and d <= v.status.data_version]
            for d in stale:
                del b.replies[d]
            for d in sorted(b.replies):
                self._apply(b, b.replies.pop(d), own=False)

    def _apply(self, b: _Batch, got: tuple[Any, CallSnapshot], *, own: bool) -> None:
        v = b.v
        status_wire, snap = got
        assert v.status is not None
        dv = v.status.data_version
        new = FileStatus.from_wire(status_wire)
        # C2: the kernel's pages hold the new data only if they held the DV
        # this store started from and nobody else wrote.
        pages_current = v.kernel_dv == dv and own
        apply_reply(self.ctx, v, status_wire, None, snap, own_from_dv=dv if own else None)
        v.kernel_dv = new.data_version if pages_current else None
        v.touch()


def _written_after_utimes(v: Vnode) -> None:
    """A write after futimens moves the mtime again (to the server's clock
    at the store): the mtime that was waiting is dropped."""
    if v.pending_attrs and v.pending_attrs.pop("mtime_ns", None) is not None:
        v.pending_attrs = v.pending_attrs or None


class _Behind:
    """Write-behind state of one vnode, from its first background store to
    the closing store that applies the replies."""

    __slots__ = ("base_dv", "calls", "drained", "error", "inflight", "replies", "rewritten",
                 "sent_runs", "slots", "stored", "tainted")  # fmt: skip

    def __init__(self, base_dv: int) -> None:
        self.base_dv = base_dv  # the DV the chunks were filed under at the first call
        self.tainted = False  # a later call found another DV: resend everything
        self.stored: set[int] = set()  # chunks answered, not written again since
        self.calls = 0  # write-behind calls in flight
        self.drained = trio.Event()
        self.drained.set()
        self.slots = trio.Semaphore(STORE_DEPTH)
        self.inflight: set[int] = set()  # chunk indexes being stored
        self.rewritten: set[int] = set()  # of those, written again meanwhile
        self.sent_runs: set[int] = set()  # runs (MAX_IO each) already considered
        self.replies: dict[int, tuple[Any, CallSnapshot]] = {}  # reply DV -> reply
        self.error: RpcError | None = None

    def fail(self, exc: RpcError) -> None:
        if self.error is None:
            self.error = exc


class _Batch:
    """One batch of pipelined StoreData calls for one vnode."""

    __slots__ = ("attrs", "error", "foreign", "fsize", "key_dv", "mtime_ns", "replies", "v")

    def __init__(self, v: Vnode, key_dv: int, fsize: int,
                 attrs: dict[str, int] | None = None) -> None:  # fmt: skip
        self.v = v
        # Attributes that waited for this store (Vnode.pending_attrs), sent
        # with every call: the same values, so the calls' order is moot.
        self.mtime_ns = attrs.get("mtime_ns") if attrs else None
        self.attrs = {k: val for k, val in attrs.items() if k != "mtime_ns"} if attrs else {}
        self.key_dv = key_dv  # the DV the dirty chunks are filed under
        self.fsize = fsize  # the file's final length, sent with every call
        self.replies: dict[int, tuple[Any, CallSnapshot]] = {}  # reply DV -> reply
        self.foreign = False  # a reply did not follow our own chain of DVs
        self.error: BaseException | None = None

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc


__all__ = ["Writer"]

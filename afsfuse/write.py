"""The write side of the data path (kAFS write.c): local dirty chunks, stores.

Writes land in local dirty chunks (a partly overwritten chunk starts from
its server content, fetched through the ``Reader``); an ``open(O_TRUNC)``
is a local write too.  ``store`` sends every dirty chunk with FS.StoreData
(contiguous runs, at most ``MAX_IO`` a call) under the vnode's io lock; our
own store moves the DV by exactly one per call and the chunks are
re-labelled to it, not dropped.  Dirty chunks left by an earlier run for a
fid nobody wrote in this one are discarded when the vnode is first made
(``on_new_vnode``): they are never stored behind the server's back.

May import: ``afsfuse.context``, ``afsfuse.file`` (OpenFile), ``afsfuse.read``,
``afsfuse.rpc``, ``afsfuse.stats``, ``afsfuse.store_failure``, ``afsfuse.validation``,
``afsfuse.vnode``, ``protocol``.
"""

from __future__ import annotations

import logging
from typing import Any

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


class Writer:
    def __init__(self, ctx: CacheContext, reader: Reader) -> None:
        self.ctx = ctx
        self.reader = reader
        self.written: set[Fid] = set()  # fids written locally in this run

    def on_new_vnode(self, v: Vnode) -> None:
        """Dirty chunks of a fid nobody wrote in this run are left over from a
        run that ended before storing them.  No close() ever succeeded for
        them, and the file may have changed on the server since: they are
        dropped, never stored behind the server's back."""
        if v.fid in self.written:
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
            self.ctx.datacache.drop(v.fid, keep_dirty=False)
            v.local_size = 0
            v.truncated = True
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
        return len(data)

    def _get_chunks(self, fid: Fid, dv: int, run: list[int]) -> list[bytes | None]:
        return [self.ctx.datacache.get(fid, dv, i) for i in run]

    async def store(self, v: Vnode, cred: Any) -> None:
        """Store every dirty chunk (contiguous runs, <= MAX_IO per StoreData).

        Our own store moves the DV by exactly one per call: the chunks are
        re-labelled to the final DV, not dropped.  The vnode is locked for
        writing across each call, so no status fetched meanwhile can
        interleave (P6).  Reads on this client wait for the store (``storing``)
        rather than read the server's half-stored file."""
        async with v.io_lock:
            v.storing = True
            try:
                await self._store_runs(v, cred)
            except RpcError as exc:
                if refused(exc):  # never lands: show the server's file again
                    forget_unstored(self.ctx, v, exc)
                raise
            finally:
                v.storing = False

    async def _store_runs(self, v: Vnode, cred: Any) -> None:
        cs = self.ctx.datacache.chunk_size
        per_call = max(1, MAX_IO // cs)
        # The chunks stay filed under one DV (key_dv) for the whole store and
        # are re-labelled once at the end: re-labelling every chunk of the file
        # after each StoreData would cost the square of its size.
        key_dv: int | None = None
        while True:
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
                    return
                fsize = v.size()
                run = idx[:1]
                for i in idx[1:]:
                    if i == run[-1] + 1 and len(run) < per_call:
                        run.append(i)
                    else:
                        break
                if run:
                    parts = []
                    # Off the trio thread when large: the io lock and the
                    # vnode's write lock keep these dirty chunks as they are.
                    chunks = await self.ctx.chunk_io(
                        len(run) * cs, self._get_chunks, v.fid, key_dv, run
                    )
                    for i, chunk in zip(run, chunks, strict=True):
                        if chunk is None:
                            raise err("EIO", f"{v.fid}: dirty chunk {i} lost")
                        # A short cached chunk reads as zeros up to the file
                        # size: send those zeros, so the server's old bytes
                        # there are replaced too.
                        span = max(0, min(cs, fsize - i * cs))
                        parts.append(chunk[:span].ljust(span, b"\0"))
                    off = run[0] * cs
                    payload = b"".join(parts)[: max(0, fsize - off)]
                else:
                    off, payload = fsize, b""
                server = v.volume.server
                snap = CallSnapshot(v.volume, server, (v,))
                try:
                    reply = await call(
                        server, M.FS_STORE_DATA, cred, v.fid, off, payload, fsize, None,
                        snap=snap,
                    )  # fmt: skip
                except RpcError as exc:
                    if exc.code in ("ENOENT", "ESTALE"):
                        # Removed by someone else: these writes can never land.
                        mark_deleted(self.ctx, v)
                        raise err("ESTALE", f"{v.fid} was removed") from None
                    raise
                self.ctx.stats.bytes_stored += len(payload)
                note_volsync(self.ctx, v.volume, reply.get("volsync"))
                new = FileStatus.from_wire(reply["status"])
                for i in run:
                    self.ctx.datacache.mark_clean(v.fid, key_dv, i)
                own = new.data_version == dv + 1
                # C2: the kernel's pages hold the new data only if they held
                # the DV this store started from and nobody else wrote.
                pages_current = v.kernel_dv == dv and own
                apply_reply(self.ctx, v, reply["status"], None, snap, own_from_dv=dv)
                v.kernel_dv = new.data_version if pages_current else None
                v.touch()
                log_event("stored", fid=v.fid, offset=off, bytes=len(payload),
                          dv=new.data_version)  # fmt: skip
                if not own:
                    # Someone else wrote too: their version's data replaced our
                    # clean chunks (zapped above); what is still dirty is
                    # re-filed under the current DV at the next pass.
                    key_dv = None
                if not self.ctx.datacache.dirty_chunks(v.fid):
                    if key_dv is not None:
                        self.ctx.datacache.rekey(v.fid, key_dv, new.data_version)
                    v.local_size = None
                    v.truncated = False
                    return


__all__ = ["Writer"]

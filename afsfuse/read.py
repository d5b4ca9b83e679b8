"""The read side of the data path (kAFS file.c/read): chunks in, bytes out.

``Reader.read`` serves from the on-disk chunk cache (keyed by fid, DV,
chunk) and fetches what is missing with FS.FetchData, contiguous runs of
at most ``MAX_IO`` a call.  A sequential reader gets a few chunks past its
request in the same call, and two read-ahead windows fetched in the
background.  Chunks in flight are claimed (``Vnode.inflight``), so a
reader waits for a fetch already under way instead of sending its own.
``fetch_chunks`` is also what a partial write uses to fetch its base.

May import: ``afsfuse.context``, ``afsfuse.file`` (OpenFile), ``afsfuse.rpc``,
``afsfuse.validation``, ``afsfuse.vnode``, ``protocol``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from afsfuse.context import CacheContext
from afsfuse.file import OpenFile
from afsfuse.rpc import Cred, call, err, wire_cred
from afsfuse.validation import CallSnapshot, apply_reply, note_volsync, validate
from afsfuse.vnode import Vnode
from protocol import methods as M
from protocol.limits import MAX_IO
from protocol.records import FileStatus, FileType

log = logging.getLogger(__name__)


class Reader:
    def __init__(
        self, ctx: CacheContext, readahead_chunks: int, spawn: Callable[..., None]
    ) -> None:
        self.ctx = ctx
        self.readahead_chunks = readahead_chunks
        self._spawn = spawn

    async def read(self, target: Vnode | OpenFile, offset: int, size: int,
                   cred: Cred = None) -> bytes:  # fmt: skip
        v = target.vnode if isinstance(target, OpenFile) else target
        wc = wire_cred(cred)
        if v.storing:
            # Our own store is under way: its chunks are filed under the DV it
            # started from while the server's file is half stored.  Wait.
            async with v.io_lock:
                pass
        st = await validate(self.ctx, v, wc)
        if st.type == FileType.DIRECTORY:
            raise err("EISDIR")
        cs = self.ctx.datacache.chunk_size
        for _attempt in range(6):
            dv = st.data_version
            fsize = v.size()
            if offset >= fsize or size <= 0:
                return b""
            length = min(size, fsize - offset)
            dc = self.ctx.datacache
            # In memory: no disk I/O, so no worker thread either.
            nbytes = 0 if dc.resident(v.fid, dv, offset, length) else length
            data = await self.ctx.chunk_io(nbytes, dc.read, v.fid, dv, offset, length, fsize)
            if data is not None:
                self.ctx.stats.cache_hits += 1
                sequential = offset == v.next_read
                v.next_read = offset + len(data)
                if sequential:
                    self._read_ahead(v, wc, dv, v.next_read, fsize)
                return data
            self.ctx.stats.cache_misses += 1
            want = self.ctx.datacache.missing(v.fid, dv, offset, length, fsize)
            if offset == v.next_read and self.readahead_chunks and want:
                # Sequential: fetch a few chunks past the request in the same call.
                last_chunk = (fsize - 1) // cs
                extra = range(want[-1] + 1, min(want[-1] + self.readahead_chunks,
                                                last_chunk) + 1)  # fmt: skip
                want += self.ctx.datacache.missing(
                    v.fid, dv, extra.start * cs, len(extra) * cs, fsize
                ) if len(extra) else []  # fmt: skip
            if await self.fetch_chunks(v, wc, dv, want):
                continue
            st = await validate(self.ctx, v, wc)  # the DV moved under us: start over
        if v.local_size is None:
            # The cache cannot hold what this read needs (evicted as fast as
            # fetched): read through, uncached.
            return await self._read_through(v, wc, st.data_version, offset, size)
        raise err("EIO", f"{v.fid}: data kept changing while reading")

    def _read_ahead(self, v: Vnode, cred: Any, dv: int, pos: int, fsize: int) -> None:
        """A sequential reader at ``pos``: fetch the chunks of the next two
        read-ahead windows it lacks in the background, a window at a time, so
        the next FetchData overlaps the reads it will serve (a reader that
        gets there first waits for the chunks in flight, never refetches)."""
        n = self.readahead_chunks
        if not n or pos >= fsize:
            return
        cs = self.ctx.datacache.chunk_size
        first, eof = pos // cs, (fsize - 1) // cs
        last = min(first + 2 * n - 1, eof)
        want = [
            i
            for i in self.ctx.datacache.missing(
                v.fid, dv, first * cs, (last - first + 1) * cs, fsize
            )
            if (dv, i) not in v.inflight
        ]
        if not want or (len(want) < n and want[-1] != eof):
            return  # less than a window missing: wait until a whole one is
        for i in want:  # claimed now, so no other reader fetches them meanwhile
            v.inflight[(dv, i)] = trio.Event()
        try:
            self._spawn(self._read_ahead_task, v, cred, dv, want)
        except RuntimeError:  # closing: release the claims
            self.release_inflight(v, dv, want)

    async def _read_ahead_task(self, v: Vnode, cred: Any, dv: int, want: list[int]) -> None:
        try:
            await self._fetch_runs(v, cred, dv, want, None)
        except Exception as exc:  # a reader that needs these chunks fetches them itself
            log.debug("%s: read-ahead of %d chunks failed: %r", v.fid, len(want), exc)
        finally:
            self.release_inflight(v, dv, want)

    @staticmethod
    def release_inflight(v: Vnode, dv: int, indices: list[int]) -> None:
        for i in indices:
            ev = v.inflight.pop((dv, i), None)
            if ev is not None:
                ev.set()

    async def _read_through(self, v: Vnode, cred: Any, dv: int, offset: int, size: int) -> bytes:
        server = v.volume.server
        snap = CallSnapshot(v.volume, server, (v,))
        reply = await call(
            server, M.FS_FETCH_DATA, cred, v.fid, offset, min(size, MAX_IO), snap=snap
        )
        async with v.lock.write():
            apply_reply(self.ctx, v, reply["status"], reply.get("callback"), snap)
        if FileStatus.from_wire(reply["status"]).data_version != dv:
            raise err("EIO", f"{v.fid}: data kept changing while reading")
        data = bytes(reply["data"])
        self.ctx.stats.bytes_fetched += len(data)
        return data

    async def fetch_chunks(
        self, v: Vnode, cred: Any, dv: int, indices: list[int],
        sink: dict[int, bytes] | None = None,
    ) -> bool:  # fmt: skip
        """FetchData the chunks ``indices`` of ``dv`` (contiguous runs, <= MAX_IO
        each) into the cache, and into ``sink`` if given (the cache may evict
        them again at once when it is small).  False if the file's DV is no
        longer ``dv``."""
        # Chunks another task is fetching right now are waited for, not refetched.
        waits: list[trio.Event] = []
        mine: list[int] = []
        for i in sorted(set(indices)):
            ev = v.inflight.get((dv, i))
            if ev is not None:
                waits.append(ev)
            else:
                v.inflight[(dv, i)] = trio.Event()
                mine.append(i)
        try:
            ok = await self._fetch_runs(v, cred, dv, mine, sink)
        finally:
            self.release_inflight(v, dv, mine)
        for ev in waits:
            await ev.wait()
        return ok

    async def _fetch_runs(
        self, v: Vnode, cred: Any, dv: int, indices: list[int], sink: dict[int, bytes] | None
    ) -> bool:
        cs = self.ctx.datacache.chunk_size
        server_size = v.status.size if v.status is not None and not v.truncated else 0
        per_call = max(1, MAX_IO // cs)
        runs: list[list[int]] = []
        for i in indices:
            if i * cs >= server_size:
                # Past the server's EOF (extended locally): nothing to fetch.
                if (dv, i) not in set(self.ctx.datacache.dirty_chunks(v.fid)):
                    self.ctx.datacache.put(v.fid, dv, i, b"")
                continue
            if runs and runs[-1][-1] == i - 1 and len(runs[-1]) < per_call:
                runs[-1].append(i)
            else:
                runs.append([i])
        for run in runs:
            server = v.volume.server
            snap = CallSnapshot(v.volume, server, (v,))
            reply = await call(
                server, M.FS_FETCH_DATA, cred, v.fid, run[0] * cs, len(run) * cs, snap=snap
            )
            data = bytes(reply["data"])
            self.ctx.stats.bytes_fetched += len(data)
            async with v.lock.write():
                note_volsync(self.ctx, v.volume, reply.get("volsync"))
                apply_reply(self.ctx, v, reply["status"], reply.get("callback"), snap)
                got_dv = FileStatus.from_wire(reply["status"]).data_version
                if got_dv != dv or v.data_version != dv:
                    return False
                if v.truncated:
                    # A local O_TRUNC while this fetch was in flight (a
                    # read-ahead, say): none of these bytes are the file's
                    # any more, and a later partial write must not start
                    # from them.
                    continue
                dirty = set(self.ctx.datacache.dirty_chunks(v.fid))
                for k, i in enumerate(run):
                    piece = data[k * cs : (k + 1) * cs]
                    if sink is not None:
                        sink[i] = piece
                    if (dv, i) not in dirty:  # never overwrite a local write
                        self.ctx.datacache.put(v.fid, dv, i, piece)
        return True


__all__ = ["Reader"]

"""Open files (kAFS file.c): open, flush (close), fsync, release.

``OpenFile`` is one open of a file; it counts opens and writable opens on
the vnode so the right close stores (AFS write-on-close).  ``Files.open``
validates, handles ``O_TRUNC`` locally (through the writer) and decides
``keep_cache`` from the data version (C1); ``flush`` stores at the last
open (or last writable) handle, ``fsync`` stores now, and ``release``
stores what is still dirty at the last close and never raises.

May import: ``afsfuse.context``, ``afsfuse.rpc``, ``afsfuse.validation``,
``afsfuse.vnode``, ``afsfuse.write`` (types only), ``protocol``.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from afsfuse.context import CacheContext
from afsfuse.rpc import Cred, err, wire_cred
from afsfuse.validation import validate
from afsfuse.vnode import Vnode
from protocol.records import FileType

if TYPE_CHECKING:
    from afsfuse.write import Writer

log = logging.getLogger(__name__)

O_TRUNC = os.O_TRUNC


class OpenFile:
    """One open of a file: counts opens (and writable opens) so the right
    close stores."""

    __slots__ = ("closed", "flags", "keep_cache", "vnode", "writable", "wrote")

    def __init__(self, vnode: Vnode, flags: int, keep_cache: bool) -> None:
        self.vnode = vnode
        self.flags = flags
        self.keep_cache = keep_cache  # FileInfo.keep_cache: False when the DV moved
        self.writable = bool(flags & (os.O_WRONLY | os.O_RDWR))
        self.wrote = False
        self.closed = False


class Files:
    def __init__(self, ctx: CacheContext, writer: Writer) -> None:
        self.ctx = ctx
        self.writer = writer

    async def open(self, vnode: Vnode, cred: Cred = None, flags: int = 0) -> OpenFile:
        wc = wire_cred(cred)
        st = await validate(self.ctx, vnode, wc)
        if st.type == FileType.DIRECTORY and flags & (os.O_WRONLY | os.O_RDWR):
            raise err("EISDIR")
        truncating = bool(flags & O_TRUNC) and st.type == FileType.FILE
        if truncating:
            await self.writer.truncate_locally(vnode)
            st = vnode.effective_status() or st
        # C1: the kernel keeps its pages only if the DV is the one it read.
        keep = vnode.kernel_dv == st.data_version and not truncating
        vnode.kernel_dv = st.data_version
        handle = OpenFile(vnode, flags, keep)
        vnode.open_count += 1
        vnode.open_writers += handle.writable
        return handle

    async def flush(self, handle: OpenFile, cred: Cred = None) -> None:
        """close(2) of one descriptor (write-on-close): stores when this is the
        last open handle, or the last writable one (readers still holding
        the file open must not delay close-to-open for other clients)."""
        v = handle.vnode
        last = v.open_count <= 1 or (handle.writable and v.open_writers <= 1)
        if last and self.writer.dirty(v):
            await self.writer.store(v, wire_cred(cred))

    async def fsync(self, handle: OpenFile | Vnode, cred: Cred = None) -> None:
        v = handle.vnode if isinstance(handle, OpenFile) else handle
        if self.writer.dirty(v):
            await self.writer.store(v, wire_cred(cred))

    async def release(self, handle: OpenFile, cred: Cred = None) -> None:
        """The last reference to an open went away; never raises."""
        if handle.closed:
            return
        handle.closed = True
        v = handle.vnode
        v.open_count = max(0, v.open_count - 1)
        if handle.writable:
            v.open_writers = max(0, v.open_writers - 1)
        if v.open_count == 0 and self.writer.dirty(v) and not v.deleted:
            try:
                await self.writer.store(v, wire_cred(cred))
            except Exception as exc:  # release must never raise
                log.warning("release: storing %s failed: %r", v.fid, exc)


__all__ = ["Files", "OpenFile"]

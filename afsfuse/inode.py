"""Attributes of one vnode (kAFS inode.c): getattr, setattr, statfs.

``getattr`` is a validation (no RPC while the promise holds).  ``setattr``
sends FS.StoreStatus; a size change first stores unstored writes (write
back, then truncate), then cuts the cached chunks to the new size and,
when the reply's DV is exactly ours + 1, keeps them under the new DV.

May import: ``afsfuse.context``, ``afsfuse.invalidation``, ``afsfuse.rpc``,
``afsfuse.validation``, ``afsfuse.vnode``, ``afsfuse.write`` (types only),
``protocol``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from afsfuse.context import CacheContext
from afsfuse.invalidation import Invalidate
from afsfuse.rpc import Cred, call, wire_cred
from afsfuse.validation import CallSnapshot, apply_reply, note_volsync, validate
from afsfuse.vnode import Vnode
from protocol import methods as M
from protocol.records import FileStatus

if TYPE_CHECKING:
    from afsfuse.write import Writer


class Attributes:
    def __init__(self, ctx: CacheContext, writer: Writer) -> None:
        self.ctx = ctx
        self.writer = writer

    async def getattr(self, vnode: Vnode, cred: Cred = None) -> FileStatus:
        return await validate(self.ctx, vnode, wire_cred(cred))

    async def setattr(
        self, vnode: Vnode, cred: Cred = None, *, mode: int | None = None,
        uid: int | None = None, gid: int | None = None, size: int | None = None,
        mtime_ns: int | None = None,
    ) -> FileStatus:  # fmt: skip
        wc = wire_cred(cred)
        await validate(self.ctx, vnode, wc)
        if (size is not None or mtime_ns is not None) and self.writer.dirty(vnode):
            # Write back first: a later store would stamp the server's time
            # over the mtime set now (tar's futimens before close), or undo
            # the truncation.
            await self.writer.store(vnode, wc)
        attrs: dict[str, int] = {}
        for k, val in (("mode", mode), ("owner", uid), ("group", gid), ("size", size),
                       ("mtime_ns", mtime_ns)):  # fmt: skip
            if val is not None:
                attrs[k] = val & 0o7777 if k == "mode" else val
        if not attrs:
            return await validate(self.ctx, vnode, wc)
        datacache = self.ctx.datacache
        async with vnode.io_lock, vnode.lock.write():
            old_dv = vnode.data_version
            server = vnode.volume.server
            snap = CallSnapshot(vnode.volume, server, (vnode,))
            reply = await call(server, M.FS_STORE_STATUS, wc, vnode.fid, attrs, snap=snap)
            note_volsync(self.ctx, vnode.volume, reply.get("volsync"))
            new = FileStatus.from_wire(reply["status"])
            if size is not None and old_dv is not None:
                datacache.truncate(vnode.fid, old_dv, size)
                if new.data_version == old_dv + 1:
                    datacache.rekey(vnode.fid, old_dv, new.data_version)
                vnode.local_size = None
                vnode.truncated = False
            apply_reply(self.ctx, vnode, reply["status"], None, snap, own_from_dv=old_dv)
            vnode.touch()
            if size is not None:
                self.ctx.invalidations.put(Invalidate("inode", vnode=vnode))
            st = vnode.effective_status()
            assert st is not None
            return st

    async def statfs(self, vnode: Vnode, cred: Cred = None) -> dict[str, Any]:
        vol = vnode.volume
        reply = await call(vol.server, M.FS_GET_VOLUME_STATUS, wire_cred(cred), vol.volume_id)
        return dict(reply)


__all__ = ["Attributes"]

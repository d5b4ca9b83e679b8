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
        st = await validate(self.ctx, vnode, wc)
        attrs: dict[str, int] = {}
        for k, val in (("mode", mode), ("owner", uid), ("group", gid), ("size", size),
                       ("mtime_ns", mtime_ns)):  # fmt: skip
            if val is not None:
                attrs[k] = val & 0o7777 if k == "mode" else val
        privileged = wc is None or wc[0] in (0, st.owner)
        if privileged:
            # chown to the owner it has moves nothing (setuid is cleared by a
            # mode the kernel sends with it): no call, as the server would
            # change nothing either.
            for k in ("owner", "group"):
                if k in attrs and attrs[k] == getattr(st, k):
                    del attrs[k]
        if not attrs:
            return st
        if privileged and self.writer.dirty(vnode) and _deferrable(st, attrs):
            async with vnode.io_lock:  # a store under way finishes first
                if self.writer.dirty(vnode):
                    # Stored with the writes at close or fsync, in their last
                    # StoreData (afsfuse.write): tar's futimens + fchmod
                    # before close cost no calls of their own.
                    vnode.pending_attrs = {**(vnode.pending_attrs or {}), **attrs}
                    self.ctx.stats.attrs_deferred += 1
                    st = vnode.effective_status()
                    assert st is not None
                    return st
        if (size is not None or mtime_ns is not None) and self.writer.dirty(vnode):
            # Write back first: a later store would stamp the server's time
            # over the mtime set now, or undo the truncation.  The store
            # takes any waiting attributes with it.
            await self.writer.store(vnode, wc)
        datacache = self.ctx.datacache
        async with vnode.io_lock, vnode.lock.write():
            pending = vnode.pending_attrs
            if pending:
                # A change that cannot wait takes the waiting ones along (not
                # the mtime: the writes still to be stored would move it).
                attrs = {**{k: v for k, v in pending.items() if k != "mtime_ns"}, **attrs}
            old_dv = vnode.data_version
            server = vnode.volume.server
            snap = CallSnapshot(vnode.volume, server, (vnode,))
            reply = await call(server, M.FS_STORE_STATUS, wc, vnode.fid, attrs, snap=snap)
            note_volsync(self.ctx, vnode.volume, reply.get("volsync"))
            if pending:
                left = {k: v for k, v in pending.items() if k == "mtime_ns" and k not in attrs}
                vnode.pending_attrs = left or None
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


def _deferrable(st: FileStatus, attrs: dict[str, int]) -> bool:
    """Attributes that may wait for the store of a file's unstored writes:
    times, and a mode that only adds permission bits.  Anything that takes
    access away (a narrower mode), hands the file to someone else, touches
    setuid/setgid/sticky or the size goes to the server at once."""
    if not attrs.keys() <= {"mode", "mtime_ns"}:
        return False
    mode = attrs.get("mode")
    if mode is None:
        return True
    return (mode | st.mode) & 0o7000 == 0 and st.mode & ~mode == 0


__all__ = ["Attributes"]

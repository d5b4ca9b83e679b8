"""What a store the server refused leaves on the client: the server's view.

Under write-on-close a store that the fileserver answers with an error
(EDQUOT, ENOSPC, EFBIG, EACCES, ...) can never land: ``close()``/``fsync()``
report that error, and the unstored writes must not live on as a phantom
size or phantom contents that only this client shows.  So the dirty chunks
and the local size go, the promise is dropped (the next ``stat`` or
``open`` fetches the status the server and every other client see), and the
kernel is told to drop its attributes and pages of the file.

Errors that say "not now" rather than "never" (no connection, a timeout,
EAGAIN, an offline volume's EBUSY) keep the writes dirty: the next fsync or
the last close stores them again.

May import: ``afsfuse.context``, ``afsfuse.invalidation``, ``afsfuse.stats``,
``afsfuse.vnode``, ``protocol``.
"""

from __future__ import annotations

from afsfuse.context import CacheContext
from afsfuse.invalidation import Invalidate
from afsfuse.stats import log_event
from afsfuse.vnode import Vnode
from protocol.errors import RemoteError, RpcError

#: Server answers after which a store may still succeed later.
RETRY_LATER = frozenset({"EAGAIN", "EBUSY"})


def refused(exc: BaseException) -> bool:
    """Whether the server refused the store for good."""
    return isinstance(exc, RemoteError) and exc.code not in RETRY_LATER


def forget_unstored(ctx: CacheContext, v: Vnode, exc: RpcError) -> None:
    """Drop ``v``'s unstored writes after a refused store (see the module doc)."""
    ctx.datacache.drop(v.fid, keep_dirty=False)
    v.local_size = None
    v.truncated = False
    v.pending_attrs = None  # set while the writes waited: refused with them
    v.kernel_dv = None  # the kernel's pages may hold the refused bytes
    v.promise = None  # revalidate: the status the server has is the truth
    log_event("store_refused", fid=v.fid, error=exc.code)
    ctx.invalidations.put(Invalidate("inode", vnode=v, attr_only=False))


__all__ = ["forget_unstored", "refused"]

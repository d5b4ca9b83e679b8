"""User extended attributes (``user.*``), kept on the server with the file.

One FS.FetchXattrs brings every name and value of a file (at most
``MAX_XATTR_TOTAL`` bytes) with its status and a promise; they are cached
on the vnode for as long as *that* promise holds (any break, expiry or later
promise makes the next get fetch again), so a second client sees a change
once the server's break reached it, as with file data.  Our own changes go
to the server (FS.SetXattr / FS.RemoveXattr, which break the other holders
before replying) and drop the cache.

XATTR_CREATE / XATTR_REPLACE: pyfuse3 checks them itself with a getxattr
before calling setxattr (it does not pass the flags on), so across clients
the check and the set are two steps; the server's own flag checks are there
for peers that send them.

May import: ``afsfuse.context``, ``afsfuse.rpc``, ``afsfuse.validation``,
``afsfuse.vnode``, ``protocol``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import trio

from afsfuse.context import CacheContext
from afsfuse.rpc import Cred, call, err, maps_errors, wire_cred
from afsfuse.validation import CallSnapshot, apply_reply, note_volsync
from afsfuse.vnode import Promise, Vnode
from protocol import methods as M
from protocol.errors import RpcError
from protocol.limits import MAX_XATTR_NAME, MAX_XATTR_VALUE

USER_PREFIX = b"user."


@dataclass(frozen=True, slots=True)
class CachedXattrs:
    """A file's attributes as fetched under ``promise`` (values None: the
    fetching caller could not read the file, so only the names are known)."""

    promise: Promise
    names: tuple[bytes, ...]
    values: dict[bytes, bytes] | None


def _check_name(name: bytes) -> None:
    if len(name) > MAX_XATTR_NAME:
        raise err("ERANGE", "xattr name too long")
    if not name.startswith(USER_PREFIX) or len(name) == len(USER_PREFIX):
        raise err("EOPNOTSUPP" if not name.startswith(USER_PREFIX) else "EINVAL")


class Xattrs:
    def __init__(self, ctx: CacheContext) -> None:
        self.ctx = ctx

    def _cached(self, v: Vnode, need_values: bool) -> CachedXattrs | None:
        c = v.xattrs
        if not isinstance(c, CachedXattrs) or v.promise is not c.promise:
            return None
        if v.promise_state(trio.current_time()) != "ok":
            return None
        if need_values and c.values is None:
            return None
        return c

    async def _current(self, v: Vnode, cred: Cred, need_values: bool) -> tuple[Any, Any]:
        c = self._cached(v, need_values)
        if c is not None:
            self.ctx.stats.cache_hits += 1
            return c.names, c.values
        self.ctx.stats.cache_misses += 1
        wc = wire_cred(cred)
        server = v.volume.server
        snap = CallSnapshot(v.volume, server, (v,))
        try:
            reply = await call(server, M.FS_FETCH_XATTRS, wc, v.fid, snap=snap)
        except RpcError as exc:
            if exc.code == "ENOSYS":  # a server from before extended attributes
                if not need_values:
                    return (), None
                raise err("EOPNOTSUPP", "the server stores no extended attributes") from None
            raise
        note_volsync(self.ctx, v.volume, reply.get("volsync"))
        names = tuple(bytes(n) for n in reply["names"])
        raw = reply.get("values")
        values = None if raw is None else dict(zip(names, (bytes(x) for x in raw), strict=True))
        async with v.lock.write():
            apply_reply(self.ctx, v, reply["status"], reply.get("callback"), snap)
            # Not over a break, nor over our own change that completed meanwhile.
            p = v.promise
            fresh = snap.broken(v) is None and not snap.modified_since(v)
            v.xattrs = CachedXattrs(p, names, values) if p and fresh else None
        return names, values

    @maps_errors
    async def get(self, v: Vnode, name: bytes, cred: Cred = None) -> bytes:
        _check_name(name)
        _names, values = await self._current(v, cred, True)
        if values is None:
            raise err("EACCES", "no read permission")
        if name not in values:
            raise err("ENODATA", "no such attribute")
        return values[name]

    @maps_errors
    async def list(self, v: Vnode, cred: Cred = None) -> list[bytes]:
        names, _ = await self._current(v, cred, False)
        return list(names)

    @maps_errors
    async def set(self, v: Vnode, name: bytes, value: bytes, cred: Cred = None,
                  flags: int = 0) -> None:  # fmt: skip
        _check_name(name)
        if len(value) > MAX_XATTR_VALUE:
            raise err("E2BIG", "xattr value too large")
        await self._change(v, M.FS_SET_XATTR, cred, name, value, flags)

    @maps_errors
    async def remove(self, v: Vnode, name: bytes, cred: Cred = None) -> None:
        _check_name(name)
        await self._change(v, M.FS_REMOVE_XATTR, cred, name)

    async def _change(self, v: Vnode, method: str, cred: Cred, *params: Any) -> None:
        wc = wire_cred(cred)
        async with v.lock.write():
            v.xattrs = None
            server = v.volume.server
            snap = CallSnapshot(v.volume, server, (v,))
            try:
                reply = await call(server, method, wc, v.fid, *params, snap=snap)
            except RpcError as exc:
                if exc.code == "ENOSYS":
                    raise err("EOPNOTSUPP", "the server stores no extended attributes") from None
                raise
            note_volsync(self.ctx, v.volume, reply.get("volsync"))
            apply_reply(self.ctx, v, reply["status"], None, snap, own_from_dv=v.data_version)
            v.xattrs = None
            v.touch()

"""FS.FetchXattrs / FS.SetXattr / FS.RemoveXattr: user extended attributes.

Only the ``user.`` namespace is stored (SPEC "Extended attributes"); the
rows live in the volume with their vnode (``Volume.set_xattr``) and go with
it.  The rules are Linux's: user attributes only on regular files and
directories (EPERM elsewhere), setting or removing needs write permission,
reading needs read permission (a caller without it gets the names only, as
listxattr(2) needs none).  A change bumps the file's ctime and, like every
change, breaks the other holders' promises on the fid before the reply.

Imports: ``fileserver.fsops`` (the handler context), ``fileserver.perms``,
``protocol``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fileserver.perms import R, W, access, require
from fileserver.volume import XATTR_CREATE, XATTR_REPLACE, Vnode
from protocol import methods as m
from protocol.errors import RpcError
from protocol.limits import MAX_XATTR_NAME, MAX_XATTR_VALUE
from protocol.records import CallBack, Fid, FileType, VolSync


def _st(v: Vnode, c: Any) -> Any:
    return v.status(access(v, c))


if TYPE_CHECKING:
    from fileserver.breaker import ClientState
    from fileserver.fsops import FsOps

USER_PREFIX = b"user."
_XATTR_TYPES = (FileType.FILE, FileType.DIRECTORY)


def check_xattr_name(name: Any) -> bytes:
    """A ``user.`` name: ERANGE past 255 bytes (as Linux), EOPNOTSUPP for other namespaces."""
    if type(name) is not bytes:
        raise RpcError("EINVAL", "xattr name must be bin")
    if len(name) > MAX_XATTR_NAME:
        raise RpcError("ERANGE", f"xattr name over {MAX_XATTR_NAME} bytes")
    if not name.startswith(USER_PREFIX):
        raise RpcError("EOPNOTSUPP", "only user.* extended attributes are stored")
    if len(name) == len(USER_PREFIX) or b"\0" in name:
        raise RpcError("EINVAL", "bad xattr name")
    return name


def _may_change(v: Vnode, c: Any) -> None:
    if v.type not in _XATTR_TYPES:
        raise RpcError("EPERM", "user extended attributes only on files and directories")
    require(v, c, W, "set an extended attribute of")


async def fetch_xattrs(ops: FsOps, st: ClientState, cred: Any, fid: Any) -> dict[str, Any]:
    """All names, and their values when the caller may read the file; a promise on the fid."""
    c = ops.caller(cred)
    f = Fid.from_wire(fid)
    h = ops._vol(f)
    cb: list[CallBack] = []

    def read() -> tuple[Vnode, dict[bytes, bytes], VolSync]:
        v, attrs = h.vol.xattrs(f.vnode, f.unique)
        return v, attrs, h.vol.volsync()

    v, attrs, vs = await h.read(read, lambda _: (f.vnode,),
                                then=lambda _: cb.append(ops.grant(st, f)))  # fmt: skip
    names = list(attrs)
    values = list(attrs.values()) if access(v, c) & R else None
    return {"status": _st(v, c), "callback": cb[0], "volsync": vs, "names": names,
            "values": values}  # fmt: skip


async def set_xattr(
    ops: FsOps, st: ClientState, cred: Any, fid: Any, name: Any, value: Any, flags: Any
) -> dict[str, Any]:
    name = check_xattr_name(name)
    if type(value) is not bytes:
        raise RpcError("EINVAL", "xattr value must be bin")
    if len(value) > MAX_XATTR_VALUE:
        raise RpcError("E2BIG", f"xattr value over {MAX_XATTR_VALUE} bytes")
    if type(flags) is not int or flags & ~(XATTR_CREATE | XATTR_REPLACE) or flags == 3:
        raise RpcError("EINVAL", "flags must be 0, 1 (create) or 2 (replace)")

    def apply(vol: Any, f: Fid) -> Vnode:
        return vol.set_xattr(f.vnode, f.unique, name, value, flags)

    return await _change(ops, st, cred, fid, m.FS_SET_XATTR, apply)


async def remove_xattr(
    ops: FsOps, st: ClientState, cred: Any, fid: Any, name: Any
) -> dict[str, Any]:
    name = check_xattr_name(name)
    return await _change(ops, st, cred, fid, m.FS_REMOVE_XATTR,
                         lambda vol, f: vol.remove_xattr(f.vnode, f.unique, name))  # fmt: skip


async def _change(ops: FsOps, st: ClientState, cred: Any, fid: Any, op: str,
                  apply: Any) -> dict[str, Any]:  # fmt: skip
    c = ops.caller(cred)
    f = Fid.from_wire(fid)
    h = ops._vol(f)

    def write() -> tuple[Vnode, VolSync]:
        _may_change(h.vol.get(f.vnode, f.unique), c)
        return apply(h.vol, f), h.vol.volsync()

    v, vs = await h.commit(write, op=op)
    await ops._changed(st, f)  # other holders broken before the reply
    return {"status": _st(v, c), "volsync": vs}

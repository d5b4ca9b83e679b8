"""POSIX permission checks for the ``cred`` each FS request carries.

The server trusts the uid and groups an *authenticated* client machine sends
(as NFS does with AUTH_SYS; see SECURITY.md) and enforces owner, group and
mode bits on them: read/write/search, create and delete in a directory
(w+x), the sticky bit, chmod/chown rules.  uid 0 is root unless the server
squashes it to nobody.  Checks run inside the volume operation (under the
volume lock), so nothing changes between the check and the change.

Imports: ``fileserver.volume`` (the Vnode record), ``fileserver.privs``
(setuid/setgid clearing) and ``protocol``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fileserver import privs
from fileserver.volume import Vnode
from protocol.errors import RpcError

log = logging.getLogger(__name__)

R, W, X = 4, 2, 1
S_ISVTX = 0o1000
S_ISGID = 0o2000
S_ISUID = 0o4000
NOBODY = 65534


@dataclass(frozen=True, slots=True)
class Caller:
    uid: int
    gid: int
    groups: frozenset[int]

    @property
    def root(self) -> bool:
        return self.uid == 0

    def in_group(self, gid: int) -> bool:
        return gid == self.gid or gid in self.groups

    def squashed(self) -> Caller:
        """Root squash: uid 0 (and gid 0) become nobody."""
        if self.uid != 0:
            return self
        gid = NOBODY if self.gid == 0 else self.gid
        return Caller(NOBODY, gid, frozenset(g for g in self.groups if g != 0))


ROOT = Caller(0, 0, frozenset())


def access(v: Vnode, c: Caller) -> int:
    """The caller's rwx bits on ``v`` (FileStatus.access)."""
    if c.root:
        # Root may read and write anything, search any directory, and execute
        # a file when someone may.
        return R | W | (X if v.is_dir or v.mode & 0o111 else 0)
    if c.uid == v.owner:
        return (v.mode >> 6) & 7
    if c.in_group(v.group):
        return (v.mode >> 3) & 7
    return v.mode & 7


def require(v: Vnode, c: Caller, bits: int, what: str) -> None:
    if access(v, c) & bits != bits:
        raise RpcError("EACCES", f"{what}: permission denied")


def require_dir_change(d: Vnode, c: Caller, what: str) -> None:
    """Adding or removing an entry needs write and search on the directory."""
    require(d, c, W | X, what)


def check_sticky(d: Vnode, victim: Vnode, c: Caller, what: str) -> None:
    """In a sticky directory only the owner of the entry or of the directory
    (or root) may remove or rename it."""
    if d.mode & S_ISVTX and not c.root and c.uid not in (d.owner, victim.owner):
        raise RpcError("EPERM", f"{what}: sticky directory")


def check_store_status(v: Vnode, c: Caller, attrs: dict[str, int]) -> dict[str, int]:
    """chmod/chown/utimes/truncate rules; returns the attrs to apply."""
    out = dict(attrs)
    owner = c.root or c.uid == v.owner
    if "mode" in attrs and attrs["mode"] != v.mode:
        if not owner:
            if not privs.only_drops_privs(v.mode, attrs["mode"]):
                raise RpcError("EPERM", "chmod: not the owner")
            require_write(v, c, "chmod")  # the kernel clearing setuid for a writer
        group = out.get("group", v.group)
        if not c.root and not v.is_dir and not c.in_group(group):
            out["mode"] &= ~S_ISGID  # as POSIX: cannot grant a group one is not in
    if "owner" in attrs and attrs["owner"] != v.owner and not c.root:
        raise RpcError("EPERM", "chown: only root gives a file away")
    if "group" in attrs and attrs["group"] != v.group and not c.root:
        if not owner:
            raise RpcError("EPERM", "chgrp: not the owner")
        if not c.in_group(attrs["group"]):
            raise RpcError("EPERM", "chgrp: not a member of that group")
    gives = ("owner" in attrs and attrs["owner"] != v.owner) or (
        "group" in attrs and attrs["group"] != v.group
    )
    if gives:
        out["mode"] = privs.mode_after_chown(v, out.get("mode", v.mode))
    if "mtime_ns" in attrs and not owner and not access(v, c) & W:
        raise RpcError("EPERM", "utimes: not the owner")
    if "size" in attrs:
        require_write(v, c, "truncate")
        if privs.mode_after_write(v, c.root) is not None:
            out["mode"] = privs.cleared(out.get("mode", v.mode))
    return out


def require_write(v: Vnode, c: Caller, what: str) -> None:
    """Writing file data: w, or being the owner.  The owner could chmod u+w
    at will, and this lets a file created read-only be written through the
    descriptor that created it, as POSIX allows; local opens are checked by
    the kernel (default_permissions) against the mode anyway."""
    if c.uid == v.owner or access(v, c) & W:
        return
    raise RpcError("EACCES", f"{what}: permission denied")

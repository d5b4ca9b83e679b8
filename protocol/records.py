"""Record types and their exact wire forms (msgpack arrays, see SPEC.md).

Every record converts with ``to_wire()`` to a list of plain msgpack values and
back with ``from_wire()``, which checks shape, types and ranges and raises
``RpcError("EINVAL")`` for anything else, so a handler never sees a malformed
record.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, NamedTuple

from protocol.errors import RpcError
from protocol.limits import MAX_UINT32, MAX_UINT64

_MAX_INT64 = 2**63 - 1
_MIN_INT64 = -(2**63)


def _bad(what: str, obj: Any) -> RpcError:
    return RpcError("EINVAL", f"malformed {what}: {obj!r:.200}")


def _array(obj: Any, n: int, what: str) -> list[Any] | tuple[Any, ...]:
    if not isinstance(obj, list | tuple) or len(obj) != n:
        raise _bad(what, obj)
    return obj


def _uint(v: Any, hi: int, what: str) -> int:
    # bool is an int subclass; it is never a valid count on the wire.
    if type(v) is not int or v < 0 or v > hi:
        raise _bad(what, v)
    return v


def _int64(v: Any, what: str) -> int:
    if type(v) is not int or v < _MIN_INT64 or v > _MAX_INT64:
        raise _bad(what, v)
    return v


class FileType(enum.IntEnum):
    FILE = 1
    DIRECTORY = 2
    SYMLINK = 3
    # Special files (FS.MakeNode): a type, mode and rdev, never any data.
    FIFO = 4
    SOCKET = 5
    CHARDEV = 6
    BLOCKDEV = 7


#: The types FS.MakeNode makes; the device ones only for root.
SPECIAL_TYPES = frozenset({FileType.FIFO, FileType.SOCKET, FileType.CHARDEV, FileType.BLOCKDEV})
DEVICE_TYPES = frozenset({FileType.CHARDEV, FileType.BLOCKDEV})


class CallBackType(enum.IntEnum):
    EXCLUSIVE = 1
    SHARED = 2
    DROPPED = 3


class Fid(NamedTuple):
    """(volume id, vnode, uniquifier).  vnode 0 + unique 0 names a whole volume."""

    volume: int
    vnode: int
    unique: int

    def to_wire(self) -> list[int]:
        return [self.volume, self.vnode, self.unique]

    @classmethod
    def from_wire(cls, obj: Any) -> Fid:
        a = _array(obj, 3, "Fid")
        return cls(_uint(a[0], MAX_UINT32, "Fid"), _uint(a[1], MAX_UINT32, "Fid"),
                   _uint(a[2], MAX_UINT32, "Fid"))  # fmt: skip

    @property
    def is_volume(self) -> bool:
        return self.vnode == 0 and self.unique == 0

    def __str__(self) -> str:
        return f"{self.volume}.{self.vnode}.{self.unique}"

    @classmethod
    def parse(cls, text: str) -> Fid:
        """Parse the ``VOL.VNODE.UNIQUE`` form used by tools and logs."""
        parts = text.split(".")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise ValueError(f"not a fid: {text!r} (want VOLUME.VNODE.UNIQUE)")
        return cls.from_wire([int(p) for p in parts])


# Access bits in FileStatus.access: what the caller may do (rwx of the caller).
ACCESS_READ = 4
ACCESS_WRITE = 2
ACCESS_EXEC = 1


#: FileType by wire value, for the fast decode (a dict lookup, not an enum call).
_FILE_TYPES = {int(t): t for t in FileType}


@dataclass(frozen=True, slots=True)
class FileStatus:
    type: FileType
    mode: int  # permission bits, 0o7777
    nlink: int
    size: int
    data_version: int
    owner: int
    group: int
    mtime_ns: int
    ctime_ns: int
    parent_vnode: int
    parent_unique: int
    access: int = ACCESS_READ | ACCESS_WRITE | ACCESS_EXEC
    rdev: int = 0  # device number of a CHARDEV/BLOCKDEV node, else 0

    N_FIELDS = 13
    #: Peers from before special files send 12 fields (no rdev): accepted, rdev 0.
    N_FIELDS_OLD = 12

    def to_wire(self) -> list[int]:
        return [int(self.type), self.mode, self.nlink, self.size, self.data_version,
                self.owner, self.group, self.mtime_ns, self.ctime_ns,
                self.parent_vnode, self.parent_unique, self.access, self.rdev]  # fmt: skip

    @classmethod
    def from_wire(cls, obj: Any) -> FileStatus:
        # The fast path: a well-formed current status, as every reply and
        # every listing entry carries (a cold ``ls -lR`` decodes one per
        # file); anything else takes the checked path, which names the
        # faulty field.
        if type(obj) is list and len(obj) == cls.N_FIELDS:
            t, mode, nlink, size, dv, owner, group, mt, ct, pv, pu, acc, rdev = obj
            ftype = _FILE_TYPES.get(t) if type(t) is int else None
            if (
                ftype is not None
                and type(mode) is int and 0 <= mode <= 0o7777
                and type(nlink) is int and 0 <= nlink <= MAX_UINT32
                and type(size) is int and 0 <= size <= MAX_UINT64
                and type(dv) is int and 0 <= dv <= MAX_UINT64
                and type(owner) is int and 0 <= owner <= MAX_UINT32
                and type(group) is int and 0 <= group <= MAX_UINT32
                and type(mt) is int and _MIN_INT64 <= mt <= _MAX_INT64
                and type(ct) is int and _MIN_INT64 <= ct <= _MAX_INT64
                and type(pv) is int and 0 <= pv <= MAX_UINT32
                and type(pu) is int and 0 <= pu <= MAX_UINT32
                and type(acc) is int and 0 <= acc <= 7
                and type(rdev) is int and 0 <= rdev <= MAX_UINT64
            ):  # fmt: skip
                return cls(ftype, mode, nlink, size, dv, owner, group, mt, ct, pv, pu, acc, rdev)
        return cls._from_wire_checked(obj)

    @classmethod
    def _from_wire_checked(cls, obj: Any) -> FileStatus:
        if isinstance(obj, list | tuple) and len(obj) == cls.N_FIELDS_OLD:
            obj = [*obj, 0]
        a = _array(obj, cls.N_FIELDS, "FileStatus")
        try:
            ftype = FileType(_uint(a[0], 255, "FileStatus.type"))
        except ValueError:
            raise _bad("FileStatus.type", a[0]) from None
        w = "FileStatus"
        return cls(
            type=ftype,
            mode=_uint(a[1], 0o7777, w),
            nlink=_uint(a[2], MAX_UINT32, w),
            size=_uint(a[3], MAX_UINT64, w),
            data_version=_uint(a[4], MAX_UINT64, w),
            owner=_uint(a[5], MAX_UINT32, w),
            group=_uint(a[6], MAX_UINT32, w),
            mtime_ns=_int64(a[7], w),
            ctime_ns=_int64(a[8], w),
            parent_vnode=_uint(a[9], MAX_UINT32, w),
            parent_unique=_uint(a[10], MAX_UINT32, w),
            access=_uint(a[11], 7, w),
            rdev=_uint(a[12], MAX_UINT64, w),
        )


@dataclass(frozen=True, slots=True)
class CallBack:
    """A callback promise as sent: valid for ``expires_in`` seconds from the
    moment the client *issued* the call that returned it."""

    version: int
    expires_in: int
    type: CallBackType = CallBackType.SHARED

    def to_wire(self) -> list[int]:
        return [self.version, self.expires_in, int(self.type)]

    @classmethod
    def from_wire(cls, obj: Any) -> CallBack:
        a = _array(obj, 3, "CallBack")
        try:
            cbtype = CallBackType(_uint(a[2], 255, "CallBack.type"))
        except ValueError:
            raise _bad("CallBack.type", a[2]) from None
        return cls(_uint(a[0], MAX_UINT32, "CallBack"), _uint(a[1], MAX_UINT32, "CallBack"),
                   cbtype)  # fmt: skip


@dataclass(frozen=True, slots=True)
class VolSync:
    """Volume identity at reply time: a changed ``creation`` means the volume
    was restored or replaced, and every promise on it is void."""

    creation: int
    update: int

    def to_wire(self) -> list[int]:
        return [self.creation, self.update]

    @classmethod
    def from_wire(cls, obj: Any) -> VolSync:
        a = _array(obj, 2, "VolSync")
        return cls(_int64(a[0], "VolSync"), _int64(a[1], "VolSync"))

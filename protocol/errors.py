"""Error encoding on the wire.

An error travels as ``[code, message]``: ``code`` is the symbolic name of a
POSIX errno (``"ENOENT"``), so peers on other systems map it to their own
numbers; ``message`` is human text.  Protocol-level failures use errno names
too (ENOSYS for an unknown method, EINVAL for bad params, EPROTO for a bad
message, EMSGSIZE for a frame over the limit, EAGAIN when a connection is
saturated, EIO for an internal error).
"""

from __future__ import annotations

import errno
import os
from typing import Any


def code_for_errno(num: int) -> str:
    return errno.errorcode.get(num, "EIO")


def errno_for_code(code: str) -> int:
    num = getattr(errno, code, None)
    return num if isinstance(num, int) else errno.EIO


#: A server's answer for a volume it no longer holds because it moved to
#: another server (SPEC section 7): the client asks VL again.
MOVED = "EREMCHG"


class RpcError(Exception):
    """Raised by a handler to send an error reply, and by a call that got one."""

    def __init__(self, code: str | int, message: str = "") -> None:
        if isinstance(code, int):
            code = code_for_errno(code)
        self.code: str = code
        self.message: str = message or os.strerror(errno_for_code(code))
        super().__init__(f"{self.code}: {self.message}")

    @property
    def errno(self) -> int:  # type: ignore[override]
        return errno_for_code(self.code)

    def to_wire(self) -> list[str]:
        return [self.code, self.message]

    @classmethod
    def from_wire(cls, obj: Any) -> RpcError:
        if (
            isinstance(obj, list | tuple)
            and len(obj) >= 1
            and isinstance(obj[0], str)
            and (len(obj) < 2 or isinstance(obj[1], str))
        ):
            return RemoteError(obj[0], obj[1] if len(obj) > 1 else "")
        return RemoteError("EPROTO", f"malformed error from peer: {obj!r:.200}")


class RemoteError(RpcError):
    """An error reply received from the peer."""


class AuthError(RpcError):
    """Authentication failed: after this error reply the connection is closed."""

    def __init__(self, message: str = "not authenticated") -> None:
        super().__init__("EACCES", message)

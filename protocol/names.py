"""Directory entry names: what either end accepts (see SPEC.md, "Names")."""

from __future__ import annotations

from typing import Any

from protocol.errors import RpcError
from protocol.limits import MAX_NAME


def check_name(name: Any) -> bytes:
    """Return ``name`` if it is a valid entry name, else raise EINVAL/ENAMETOOLONG.

    Names are raw bytes (POSIX names need not be UTF-8): 1..255 bytes, no
    ``/`` or NUL, and not ``.`` or ``..``.
    """
    if type(name) is not bytes:
        raise RpcError("EINVAL", f"name must be bytes, not {type(name).__name__}")
    if not name:
        raise RpcError("EINVAL", "empty name")
    if len(name) > MAX_NAME:
        raise RpcError("ENAMETOOLONG", f"name of {len(name)} bytes (limit {MAX_NAME})")
    if name in (b".", b".."):
        raise RpcError("EINVAL", "'.' and '..' are not entry names")
    if b"/" in name or b"\0" in name:
        raise RpcError("EINVAL", "name contains '/' or NUL")
    return name

"""Setuid and setgid bits that a change must clear, as Linux does.

- A write or truncation by a caller without privilege (not root) clears
  S_ISUID, and S_ISGID when the group may execute (setgid without group
  execute marks mandatory locking and stays), on regular files
  (``should_remove_suid`` in the kernel).  The server applies it itself with
  the store, so a client that never sends the kernel's "kill privileges"
  chmod (a protocol client, a store at unmount) cannot leave a file
  setuid with someone else's contents.
- A change of owner or group clears the same bits on a non-directory,
  whoever makes it (``chown_common``, root included since Linux 2.2.13).
- The kernel turns its own clearing (on write, truncate, chown) into a chmod
  that drops only those bits; a writer who is not the owner may make that
  chmod (:func:`only_drops_privs`), any other chmod stays the owner's.

Imports: ``fileserver.volume`` (the Vnode record) and ``protocol``
(``fileserver.perms`` calls these rules).
"""

from __future__ import annotations

from fileserver.volume import Vnode
from protocol.records import FileType

S_ISUID = 0o4000
S_ISGID = 0o2000
S_IXGRP = 0o010
PRIVS = S_ISUID | S_ISGID


def cleared(mode: int) -> int:
    """``mode`` without the bits a data or ownership change clears."""
    kill = S_ISUID | (S_ISGID if mode & S_IXGRP else 0)
    return mode & ~kill


def mode_after_write(v: Vnode, root: bool) -> int | None:
    """The mode a write or truncation of ``v`` leaves, or None when it leaves
    the mode alone (by root, not a regular file, nothing to clear)."""
    if root or v.type != FileType.FILE:
        return None
    new = cleared(v.mode)
    return new if new != v.mode else None


def mode_after_chown(v: Vnode, mode: int) -> int:
    """The mode a change of owner or group leaves (``mode`` is the one the
    same request sets, or the current one)."""
    return mode if v.is_dir else cleared(mode)


def only_drops_privs(old: int, new: int) -> bool:
    """Whether chmod ``old`` -> ``new`` clears setuid/setgid and nothing else."""
    return new != old and new & ~old == 0 and (old ^ new) & ~PRIVS == 0


__all__ = ["cleared", "mode_after_chown", "mode_after_write", "only_drops_privs"]

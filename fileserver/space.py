"""Free space and inodes of the partition that holds a volume (for statfs).

A volume without a quota can grow until its partition is full, so the
truthful answer to a client's ``statfs`` is the partition's free space next
to the volume's own usage; with a quota, the smaller of the quota's room and
the partition's.  This module only measures (``os.statvfs``, a cheap
syscall); the client turns the figures into a ``statvfs`` reply
(``afsfuse.statfs``).

Imports: ``protocol`` and the standard library.
"""

from __future__ import annotations

import os
from pathlib import Path

from protocol.limits import MAX_UINT32


def partition_space(path: Path | str, next_vnode: int) -> dict[str, int]:
    """The ``partition_*`` and ``files_free`` keys of a volume status.

    ``files_free`` is how many more vnodes the volume can take: the
    partition's inodes available to the server (each file has a data file
    there), never more than the vnode numbers left; a filesystem without a
    fixed inode table (``f_files`` 0, as btrfs) limits only by the latter.
    """
    s = os.statvfs(path)
    numbers_left = max(MAX_UINT32 + 1 - next_vnode, 0)
    files_free = min(s.f_favail, numbers_left) if s.f_files else numbers_left
    return {
        "partition_bytes": s.f_blocks * s.f_frsize,
        "partition_bytes_free": s.f_bfree * s.f_frsize,
        "partition_bytes_avail": s.f_bavail * s.f_frsize,
        "files_free": files_free,
    }


__all__ = ["partition_space"]

"""What ``statfs`` reports for a volume, from its FS.GetVolumeStatus reply.

``df`` computes Used as ``f_blocks - f_bfree``, so the figures are chosen
to make that the volume's own usage and Avail what the volume can still
take:

- no quota: Avail is the free space of the server partition that holds the
  volume, Size is usage plus that free space;
- a quota: Size is the quota, Avail the smaller of its room and the
  partition's free space;
- inodes: used is the volume's vnode count, free what the server says it
  can still create (``files_free``).

A server that does not report its partition (an older one) gets the old
estimate: twice the usage or 1 TiB, and 2^20 free inodes.

May import: the standard library only (no pyfuse3: ``fuse_ops`` copies the
fields into a ``StatvfsData``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Free inodes claimed for a server that does not say (the old estimate).
_UNKNOWN_FILES_FREE = 1 << 20


@dataclass(frozen=True, slots=True)
class VolumeSpace:
    bsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int

    @classmethod
    def from_status(cls, info: dict[str, Any]) -> VolumeSpace:
        bsize = int(info.get("block_size") or 4096)
        used = -(-int(info.get("bytes_used") or 0) // bsize)  # whole blocks, rounded up
        quota = -(-int(info.get("quota_bytes") or 0) // bsize)
        files = int(info.get("files") or 0)
        if "partition_bytes_free" in info:
            part_free = int(info["partition_bytes_free"]) // bsize
            part_avail = int(info["partition_bytes_avail"]) // bsize
            files_free = int(info.get("files_free") or 0)
        else:
            total = quota if quota else max(used * 2, (1 << 40) // bsize)
            part_free = part_avail = max(total - used, 0)
            files_free = _UNKNOWN_FILES_FREE
        if quota:
            room = max(quota - used, 0)
            blocks, bfree, bavail = quota, min(room, part_free), min(room, part_avail)
        else:
            blocks, bfree, bavail = used + part_free, part_free, part_avail
        return cls(bsize, blocks, bfree, bavail, files + files_free, files_free)


__all__ = ["VolumeSpace"]

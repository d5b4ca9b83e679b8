"""The kernel's read-ahead window for this mount.

The kernel sizes a FUSE mount's read-ahead from its backing device info
(``/sys/class/bdi/MAJOR:MINOR/read_ahead_kb``), 128 KiB by default, and
never above it whatever the daemon offers at FUSE_INIT.  Sequential reads
then reach the daemon as 128 KiB requests: eight per MiB, each paying a FUSE
round trip and a handler's Python work, which on a cold read made the
daemon's event loop the bottleneck.  With a window of a few MiB the kernel
asks in requests of ``max_pages`` (1 MiB here), as NFS mounts do with their
15 x rsize window.

The daemon sets it once FUSE_INIT is answered: that reply caps the window
at what the kernel offered in its request, the default, so a setting made
between mount(2) and the reply is undone.  Only root may write it; for
anyone else the kernel's default stays and the mount works as before.  The
device numbers come from ``/proc/self/mountinfo``, never from a ``stat`` of
the mount point: the process serving a mount must not touch it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from protocol.limits import MAX_IO

log = logging.getLogger(__name__)

#: Default window, KiB: one FetchData's worth (MAX_IO, 4 MiB).
DEFAULT_KIB = MAX_IO // 1024


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as ``\\ooo``."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_device(mountpoint: Path, mountinfo: str) -> str | None:
    """``MAJOR:MINOR`` of the newest FUSE mount at ``mountpoint`` in a
    mountinfo text, or None."""
    want = str(mountpoint)
    found = None
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 10 or "-" not in fields:
            continue
        fstype = fields[fields.index("-") + 1]
        if _unescape(fields[4]) == want and fstype.startswith("fuse"):
            found = fields[2]  # a later line is a mount stacked on top
    return found


def set_readahead(mountpoint: Path, kib: int, *, proc: Path = Path("/proc/self/mountinfo"),
                  sysfs: Path = Path("/sys/class/bdi")) -> bool:  # fmt: skip
    """Set the kernel's read-ahead window of the FUSE mount at ``mountpoint``
    to ``kib`` KiB; False (logged) if it could not be, which is harmless."""
    try:
        dev = mount_device(mountpoint, proc.read_text())
        if dev is None:
            log.info("read-ahead: no FUSE mount at %s in %s", mountpoint, proc)
            return False
        (sysfs / dev / "read_ahead_kb").write_text(f"{kib}\n")
    except OSError as exc:
        log.info("read-ahead: kernel default kept for %s: %s", mountpoint, exc)
        return False
    log.debug("read-ahead of %s (bdi %s): %d KiB", mountpoint, dev, kib)
    return True

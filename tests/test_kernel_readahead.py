"""The kernel's read-ahead window of a mount (afsfuse/kernel_readahead.py).

A mount asks the kernel for a 4 MiB window, so a sequential read reaches
the daemon in 1 MiB requests instead of 128 KiB ones; ``--kernel-readahead
0`` keeps the kernel's default.  The device numbers are found in mountinfo
(with its octal escapes), never by touching the mount point.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from afsfuse.kernel_readahead import mount_device, set_readahead
from afsfuse.lab.mount import ClientMount
from afsfuse.lab.server import ServerProcess

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from bench import drop_caches

MIB = 1 << 20

MOUNTINFO = """\
22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
97 22 0:51 / /tmp/a\\040b/mnt rw,nosuid,nodev shared:50 - fuse.afsfuse 127.0.0.1:7000/root.cell rw
98 22 0:52 / /tmp/other rw shared:51 - fuse.sshfs host:/ rw
99 97 0:53 / /tmp/a\\040b/mnt rw,nosuid,nodev shared:52 - fuse.afsfuse 127.0.0.1:7000/x rw
100 22 0:54 / /tmp/plain rw shared:53 - tmpfs tmpfs rw
"""


def test_the_newest_fuse_mount_at_the_path_is_found_through_its_escapes():
    assert mount_device(Path("/tmp/a b/mnt"), MOUNTINFO) == "0:53"  # stacked on 0:51
    assert mount_device(Path("/tmp/other"), MOUNTINFO) == "0:52"
    assert mount_device(Path("/tmp/plain"), MOUNTINFO) is None  # not FUSE
    assert mount_device(Path("/tmp/a\\040b/mnt"), MOUNTINFO) is None  # the raw text is not a path


def test_setting_writes_the_bdi_and_a_missing_mount_or_sysfs_is_harmless(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    bdi = tmp_path / "bdi"
    (bdi / "0:52").mkdir(parents=True)
    assert set_readahead(Path("/tmp/other"), 4096, proc=info, sysfs=bdi)
    assert (bdi / "0:52" / "read_ahead_kb").read_text() == "4096\n"
    assert not set_readahead(Path("/tmp/nowhere"), 4096, proc=info, sysfs=bdi)
    assert not set_readahead(Path("/tmp/a b/mnt"), 4096, proc=info, sysfs=bdi)  # no such bdi dir


def cold_read_requests(m: ClientMount, name: str, size: int) -> int:
    """Kernel read requests the daemon got for a sequential read of a file
    this mount wrote, with the kernel's page cache dropped first."""
    p = m.mnt / name
    p.write_bytes(os.urandom(size))
    assert drop_caches(), "dropping the page cache needs root (the suite runs as root)"
    before = m.fuse_requests().get("read", 0)
    with open(p, "rb") as f:
        while f.read(MIB):
            pass
    return m.fuse_requests().get("read", 0) - before


@pytest.mark.mount
def test_a_sequential_read_reaches_the_daemon_in_large_requests(tmp_path, require_fuse):
    size = 16 * MIB
    with (
        ServerProcess(tmp_path / "fs") as srv,
        ClientMount(srv, tmp_path / "a") as a,
        ClientMount(srv, tmp_path / "b", extra_args=("--kernel-readahead", "0")) as b,
    ):
        wide = cold_read_requests(a, "wide", size)
        default = cold_read_requests(b, "default", size)
        dev = mount_device(a.mnt.resolve(), Path("/proc/self/mountinfo").read_text())
        assert dev is not None
        assert Path(f"/sys/class/bdi/{dev}/read_ahead_kb").read_text().strip() == "4096"
    # 1 MiB requests (max_pages), against the kernel's default 128 KiB ones.
    assert wide <= 2 * size // MIB, wide
    assert default >= 6 * size // MIB, default

"""``statfs`` tells the truth (issue 14 item 3): ``df`` on a mount agrees
with ``afs-fileserver vol examine`` and with the partition that holds the
volume.

The server's data directory is a tmpfs of its own (32 MiB, 4000 inodes), so
nobody else's writes move the figures while we compare them.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from afsfuse.lab.mount import ClientMount
from afsfuse.lab.server import ServerProcess
from afsfuse.statfs import VolumeSpace
from tests.posix_support import admin_json, tmpfs

pytestmark = pytest.mark.mount

BS = 4096


def df(mnt) -> dict[str, int]:
    cols = ["size", "used", "avail", "itotal", "iused", "iavail"]
    out = subprocess.run(
        ["df", "-B1", "--output=" + ",".join(cols), str(mnt)],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    return dict(zip(cols, (int(x) for x in out.splitlines()[1].split()), strict=True))


def blocks(n: int) -> int:
    return -(-n // BS) * BS


@pytest.fixture
def setup(tmp_path, require_fuse):
    with (
        tmpfs(tmp_path / "fs", size="32m", nr_inodes=4000) as part,
        ServerProcess(part) as srv,
        ClientMount(srv, tmp_path / "a") as a,
    ):
        yield srv, a, part


def test_df_without_quota_is_the_partition_and_the_volume(setup):
    srv, a, part = setup
    (a.mnt / "big").write_bytes(os.urandom(300_000))
    (a.mnt / "small").write_bytes(b"x" * 5000)
    (a.mnt / "dir").mkdir()
    os.symlink("small", a.mnt / "link")
    seen = df(a.mnt)
    vol = admin_json(srv.data_dir, "vol", "examine", "root.cell")
    real = os.statvfs(part)
    # The volume's real usage: what was written (plus the symlink's target).
    assert vol["quota_bytes"] == 0 and vol["bytes_used"] == 305_005
    assert vol["files"] == 5  # root, two files, a directory, a symlink
    # The server reports its partition as it is...
    assert vol["partition_bytes_avail"] == real.f_bavail * real.f_frsize
    assert vol["partition_bytes"] == real.f_blocks * real.f_frsize <= 32 << 20
    assert vol["files_free"] == real.f_favail
    # ... and df on the mount says the same, not an invented terabyte.
    assert seen["used"] == blocks(vol["bytes_used"])
    assert seen["avail"] == vol["partition_bytes_avail"] // BS * BS
    assert seen["size"] == seen["used"] + vol["partition_bytes_free"] // BS * BS
    assert seen["iused"] == vol["files"]
    assert seen["iavail"] == vol["files_free"]
    assert seen["itotal"] == vol["files"] + vol["files_free"]


def test_df_follows_the_partition_filling(setup):
    srv, a, part = setup
    before = df(a.mnt)
    (a.mnt / "fill").write_bytes(os.urandom(8 << 20))
    after = df(a.mnt)
    vol = admin_json(srv.data_dir, "vol", "examine", "root.cell")
    # 8 MiB of data went to the partition: Avail shrank by at least that.
    assert before["avail"] - after["avail"] >= 8 << 20
    assert after["avail"] == os.statvfs(part).f_bavail * os.statvfs(part).f_frsize // BS * BS
    assert after["used"] == blocks(vol["bytes_used"]) == blocks(8 << 20)
    assert after["iused"] == before["iused"] + 1


def test_df_with_quota(setup):
    srv, a, _ = setup
    (a.mnt / "f").write_bytes(b"y" * 100_000)
    admin_json(srv.data_dir, "vol", "quota", "root.cell", str(1 << 20))
    seen = df(a.mnt)
    vol = admin_json(srv.data_dir, "vol", "examine", "root.cell")
    assert vol["quota_bytes"] == 1 << 20
    assert seen["size"] == 1 << 20
    assert seen["used"] == blocks(100_000)
    assert seen["avail"] == (1 << 20) - blocks(100_000)
    # A quota larger than the partition: the partition's free space is the limit.
    admin_json(srv.data_dir, "vol", "quota", "root.cell", str(1 << 30))
    seen = df(a.mnt)
    vol = admin_json(srv.data_dir, "vol", "examine", "root.cell")
    assert seen["size"] == 1 << 30
    assert seen["avail"] == vol["partition_bytes_avail"] // BS * BS < 32 << 20


def test_volume_space_from_an_older_server_keeps_the_estimate():
    old = {"block_size": 4096, "bytes_used": 8192, "quota_bytes": 0, "files": 3}
    s = VolumeSpace.from_status(old)
    assert (s.blocks, s.bfree, s.files, s.ffree) == (1 << 28, (1 << 28) - 2, 3 + (1 << 20), 1 << 20)
    new = dict(old, partition_bytes=1 << 30, partition_bytes_free=40960,
               partition_bytes_avail=20480, files_free=7)  # fmt: skip
    s = VolumeSpace.from_status(new)
    assert (s.blocks, s.bfree, s.bavail, s.files, s.ffree) == (12, 10, 5, 10, 7)

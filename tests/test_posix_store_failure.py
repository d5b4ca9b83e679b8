"""A failed store leaves no phantom (issue 14 item 6).

When the store at ``close()`` fails (EDQUOT here), ``close()`` reports it
and the writer's client shows the server's file again: the old size and
contents, as every other client sees them.  Two real mounts.
"""

from __future__ import annotations

import errno
import os

import pytest

from afsfuse.lab.mount import ClientMount
from afsfuse.lab.server import ServerProcess
from tests.posix_support import admin_json, eventually

pytestmark = pytest.mark.mount

OLD = b"old contents\n"


@pytest.fixture
def pair(tmp_path, require_fuse):
    with (
        ServerProcess(tmp_path / "fs") as srv,
        ClientMount(srv, tmp_path / "a") as a,
        ClientMount(srv, tmp_path / "b") as b,
    ):
        yield srv, a, b


def test_close_over_quota_reports_edquot_and_shows_the_old_file(pair):
    srv, a, b = pair
    (a.mnt / "f").write_bytes(OLD)
    assert (b.mnt / "f").read_bytes() == OLD
    admin_json(srv.data_dir, "vol", "quota", "root.cell", str(64 << 10))
    f = open(a.mnt / "f", "r+b")  # noqa: SIM115 - close() is what is tested
    f.write(os.urandom(256 << 10))
    with pytest.raises(OSError) as ei:
        f.close()
    assert ei.value.errno == errno.EDQUOT
    # A shows what the server has (the kernel is told asynchronously).
    assert eventually(lambda: os.stat(a.mnt / "f").st_size == len(OLD))
    assert (a.mnt / "f").read_bytes() == OLD
    assert os.stat(b.mnt / "f").st_size == len(OLD)
    assert (b.mnt / "f").read_bytes() == OLD
    assert a.examine(a.mnt / "f")["local_size"] is None
    # The mount still works: a store within the quota lands everywhere.
    (a.mnt / "f").write_bytes(b"new\n")
    assert (b.mnt / "f").read_bytes() == b"new\n"


def test_fsync_over_quota_then_close_stores_nothing_more(pair):
    srv, a, b = pair
    (a.mnt / "g").write_bytes(OLD)
    admin_json(srv.data_dir, "vol", "quota", "root.cell", str(64 << 10))
    fd = os.open(a.mnt / "g", os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"x" * (256 << 10))
        with pytest.raises(OSError) as ei:
            os.fsync(fd)
        assert ei.value.errno == errno.EDQUOT
    finally:
        os.close(fd)  # nothing dirty is left to fail again
    assert eventually(lambda: os.stat(a.mnt / "g").st_size == len(OLD))
    assert (a.mnt / "g").read_bytes() == OLD == (b.mnt / "g").read_bytes()

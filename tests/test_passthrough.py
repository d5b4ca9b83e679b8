"""scripts/passthrough.py, the benchmarks' FUSE-plus-Python floor, does what a
filesystem must: the basic operations through a real mount match the source."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from afsfuse.lab.mount import unmount

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.mount


@contextmanager
def passthrough(src: Path, mnt: Path, timeout: str) -> Iterator[None]:
    cmd = [sys.executable, str(REPO / "scripts" / "passthrough.py"), str(src), str(mnt),
           "--attr-timeout", timeout, "--entry-timeout", timeout]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not os.path.ismount(mnt):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "passthrough did not mount in 10 s"
            time.sleep(0.02)
        yield
    finally:
        unmount(mnt)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0


def test_passthrough_basic_ops(tmp_path: Path, require_fuse: None) -> None:
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    (src / "old").write_bytes(b"before")
    with passthrough(src, mnt, "0"):
        assert (mnt / "old").read_bytes() == b"before"
        (mnt / "d").mkdir()
        (mnt / "d" / "f").write_bytes(b"x" * 300_000)
        assert (src / "d" / "f").read_bytes() == b"x" * 300_000
        assert (mnt / "d" / "f").stat().st_size == 300_000
        os.truncate(mnt / "d" / "f", 5)
        assert (mnt / "d" / "f").read_bytes() == b"xxxxx"
        os.rename(mnt / "d" / "f", mnt / "g")
        assert sorted(os.listdir(mnt)) == ["d", "g", "old"]
        assert (mnt / "g").read_bytes() == b"xxxxx"
        os.symlink("g", mnt / "s")
        assert os.readlink(mnt / "s") == "g"
        os.unlink(mnt / "old")
        os.rmdir(mnt / "d")
        assert sorted(os.listdir(src)) == ["g", "s"]
        for i in range(20):  # the source reuses inode numbers of removed files
            (mnt / f"gone{i}").write_bytes(b"g")
            os.unlink(mnt / f"gone{i}")
            (mnt / f"dir{i}").mkdir()
            (mnt / f"dir{i}" / "x").write_bytes(b"ok")
            assert (mnt / f"dir{i}" / "x").read_bytes() == b"ok"
            (mnt / f"dir{i}" / "x").unlink()
            (mnt / f"dir{i}").rmdir()
        assert not (mnt / "outside").exists()
        (src / "outside").write_bytes(b"new")  # timeouts 0: seen at once
        assert (mnt / "outside").read_bytes() == b"new"


def test_long_timeouts_keep_negative_entries_and_changes_through_the_mount_replace_them(
    tmp_path: Path, require_fuse: None
) -> None:
    """ptlong, the floor, caches a missing name as afsfuse does: a file made
    behind the mount's back stays unseen (the lookup never reached the
    daemon), while creating, removing and re-making names through the mount
    is seen at once."""
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    with passthrough(src, mnt, "3600"):
        assert not (mnt / "outside").exists()
        (src / "outside").write_bytes(b"behind its back")
        assert not (mnt / "outside").exists()  # the negative entry answered
        assert not (mnt / "f").exists()
        (mnt / "f").write_bytes(b"made")
        assert (mnt / "f").read_bytes() == b"made"
        os.unlink(mnt / "f")
        assert not (mnt / "f").exists()
        (mnt / "f").mkdir()
        assert (mnt / "f").is_dir() and sorted(os.listdir(mnt)) == ["f", "outside"]

"""scripts/passthrough.py, the benchmarks' FUSE-plus-Python floor, does what a
filesystem must: the basic operations through a real mount match the source."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from afsfuse.lab.mount import unmount

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.mount


def test_passthrough_basic_ops(tmp_path: Path, require_fuse: None) -> None:
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    (src / "old").write_bytes(b"before")
    cmd = [sys.executable, str(REPO / "scripts" / "passthrough.py"), str(src), str(mnt),
           "--attr-timeout", "0", "--entry-timeout", "0"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not os.path.ismount(mnt):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "passthrough did not mount in 10 s"
            time.sleep(0.02)
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
        (src / "outside").write_bytes(b"new")  # timeouts 0: seen at once
        assert (mnt / "outside").read_bytes() == b"new"
    finally:
        unmount(mnt)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0

"""The pyfuse3 patch (patches/pyfuse3): lock requests and fallocate reach the
file system, with the owner, range, pid and sleep flag libfuse gives, and
close() drops the closer's locks.  A tiny filesystem (pyfuse3_lockfs.py),
mounted for real, logs every call it gets."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import pytest

from afsfuse.lab.mount import is_mounted, unmount

pytestmark = pytest.mark.mount
LOCKFS = Path(__file__).with_name("pyfuse3_lockfs.py")
FLOCK_FMT = "hhqqi"  # struct flock on x86-64 Linux: type, whence, start, len, pid


class Mounted:
    def __init__(self, tmp: Path) -> None:
        self.mnt = tmp / "mnt"
        self.log = tmp / "calls.jsonl"
        self.file = self.mnt / "f"

    def wait_for(self, op: str) -> None:
        """The kernel sends RELEASE after close() returned: wait (bounded)."""
        deadline = time.monotonic() + 30
        while not self.calls(op):
            assert time.monotonic() < deadline, f"no {op} call"
            time.sleep(0.02)

    def calls(self, op: str | None = None) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        out = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [c for c in out if op is None or c["op"] == op]


@pytest.fixture
def lockfs(tmp_path: Path, require_fuse: None) -> Iterator[Mounted]:
    m = Mounted(tmp_path)
    m.mnt.mkdir()
    proc = subprocess.Popen([sys.executable, str(LOCKFS), str(m.mnt), str(m.log)])
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(m.mnt):
            assert proc.poll() is None, "lockfs exited before mounting"
            assert time.monotonic() < deadline, "lockfs did not mount"
            time.sleep(0.05)
        yield m
    finally:
        unmount(m.mnt)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        assert not is_mounted(m.mnt)


def holder(path: Path, how: str) -> subprocess.Popen[str]:
    """Another process (so another lock owner) that takes a lock on ``path``
    and keeps it until a line arrives on its stdin."""
    code = (
        "import fcntl, sys\n"
        f"f = open({str(path)!r}, 'r+')\n"
        f"{how}\n"
        "print('locked', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "locked"
    return p


def finish(p: subprocess.Popen[str]) -> None:
    assert p.stdin is not None
    p.stdin.write("\n")
    p.stdin.flush()
    p.wait(30)


def test_the_installed_pyfuse3_is_the_patched_build() -> None:
    assert pyfuse3.AFSFUSE_EXTENSION == 1
    assert "+afsfuse." in pyfuse3.__version__


def test_expire_entry_is_there_and_needs_a_session() -> None:
    """0002-expire-entry.patch: ``expire_entry`` writes FUSE_EXPIRE_ONLY to the
    session's device; with no session (this process mounts nothing) it says
    so instead of writing to a stray descriptor.  What the kernel does with
    it is tested through afsfuse mounts (test_fuse_clients.py: a working
    directory survives another client's change of its parent)."""
    with pytest.raises(OSError) as err:
        pyfuse3.expire_entry(1, b"name")
    assert err.value.errno == errno.ENOTCONN


def test_fcntl_requests_carry_owner_range_pid_and_close_drops_them(lockfs: Mounted) -> None:
    with open(lockfs.file, "r+b") as f:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 5)  # bytes 5..14
        (setlk,) = lockfs.calls("setlk")
        assert setlk["lock"] == [fcntl.F_WRLCK, 5, 10, os.getpid()]
        assert setlk["sleep"] is False
        assert setlk["ctx_pid"] == os.getpid()
        owner = setlk["owner"]

        # Another process is another owner: the file system's EAGAIN reaches it,
        # and F_GETLK returns the conflicting lock the file system reported.
        other = subprocess.run(
            [sys.executable, "-c",
             "import fcntl, struct, sys\n"
             f"f = open({str(lockfs.file)!r}, 'r+')\n"
             "try:\n"
             "    fcntl.lockf(f, fcntl.LOCK_SH | fcntl.LOCK_NB)\n"
             "    print('granted')\n"
             "except OSError as e:\n"
             "    print('errno', e.errno)\n"
             f"q = struct.pack({FLOCK_FMT!r}, fcntl.F_RDLCK, 0, 0, 0, 0)\n"
             f"print(*struct.unpack({FLOCK_FMT!r}, fcntl.fcntl(f, fcntl.F_GETLK, q)))\n"],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        first, second = other.stdout.splitlines()
        assert first == f"errno {errno.EAGAIN}"
        l_type, _whence, _start, _len, l_pid = map(int, second.split())
        assert (l_type, l_pid) == (fcntl.F_WRLCK, os.getpid())
        (getlk,) = lockfs.calls("getlk")
        assert getlk["owner"] != owner
        assert getlk["lock"][0] == fcntl.F_RDLCK
    # close(): the owner's POSIX locks are dropped (after flush).
    drops = [c for c in lockfs.calls("release_locks") if c["owner"] == owner]
    assert drops and all(c["flock"] is False for c in drops)


def test_flock_is_passed_up_and_the_last_close_drops_it(lockfs: Mounted) -> None:
    fd = os.open(lockfs.file, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        (call,) = lockfs.calls("flock")
        assert call["flock_op"] == fcntl.LOCK_EX | fcntl.LOCK_NB
        dup = os.dup(fd)
        os.close(dup)  # not the last descriptor: the flock lock stays
        assert not [c for c in lockfs.calls("release_locks") if c["flock"]]
    finally:
        os.close(fd)
    lockfs.wait_for("release")
    calls = lockfs.calls()
    drop = [i for i, c in enumerate(calls) if c["op"] == "release_locks" and c["flock"]]
    assert len(drop) == 1
    assert calls[drop[0]]["owner"] == call["owner"]
    rel = [i for i, c in enumerate(calls) if c["op"] == "release"]
    assert rel and drop[0] < rel[-1]  # dropped before the file system's release


class Interrupted(Exception):
    pass


def test_a_sleeping_lock_request_is_interrupted_by_a_signal(lockfs: Mounted) -> None:
    p = holder(lockfs.file, "fcntl.lockf(f, fcntl.LOCK_EX)")
    rearmed = [0]

    def on_alarm(*_: object) -> None:
        # Interrupt only once the sleeping request reached the file system (a
        # loaded machine may be slow to get there); until then, look again
        # (bounded).  Returning makes Python retry the fcntl (PEP 475).
        waiting = [c for c in lockfs.calls("setlk") if c["ctx_pid"] == os.getpid()]
        if waiting or rearmed[0] >= 300:
            raise Interrupted()
        rearmed[0] += 1
        signal.setitimer(signal.ITIMER_REAL, 0.1)

    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        with open(lockfs.file, "r+b") as f:
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            with pytest.raises(Interrupted):
                fcntl.lockf(f, fcntl.LOCK_EX)  # F_SETLKW: waits for the holder
            signal.setitimer(signal.ITIMER_REAL, 0)
            mine = [c for c in lockfs.calls("setlk") if c["ctx_pid"] == os.getpid()]
            assert mine and mine[-1]["sleep"] is True
            assert [c for c in lockfs.calls("interrupted") if c["owner"] == mine[-1]["owner"]]

            # A waiter that is not interrupted gets the lock once the holder goes.
            got: list[bool] = []
            t = threading.Thread(target=lambda: (fcntl.lockf(f, fcntl.LOCK_EX), got.append(True)))
            t.start()
            finish(p)
            t.join(30)
            assert got == [True]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if p.poll() is None:
            p.kill()
            p.wait(10)


def test_fallocate_modes_are_passed_up(lockfs: Mounted) -> None:
    with open(lockfs.file, "r+b") as f:
        os.posix_fallocate(f.fileno(), 0, 1 << 20)
    assert os.stat(lockfs.file).st_size == 1 << 20
    assert lockfs.calls("fallocate")[0] == {
        "op": "fallocate", "mode": 0, "offset": 0, "length": 1 << 20,
    }  # fmt: skip
    # PUNCH_HOLE | KEEP_SIZE arrives as such; this file system refuses it.
    r = subprocess.run(
        ["fallocate", "--punch-hole", "--keep-size", "-o", "4096", "-l", "8192",
         str(lockfs.file)], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode != 0
    assert lockfs.calls("fallocate")[-1] == {
        "op": "fallocate", "mode": 0x01 | 0x02, "offset": 4096, "length": 8192,
    }  # fmt: skip

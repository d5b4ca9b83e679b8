"""A tiny pyfuse3 filesystem for testing the pyfuse3 lock/fallocate patch.

One regular file, ``/f``, held in memory.  Every lock, release_locks and
fallocate call is appended as one JSON line to the log file, so the test
sees exactly what the patched pyfuse3 passed up.  Locks are whole-file, one
holder at a time (enough to make a second owner conflict and a sleeping
request wait).  Imports only pyfuse3 and trio: it runs as its own process.

    python tests/pyfuse3_lockfs.py MOUNTPOINT LOGFILE
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import stat
import sys
import threading
from typing import Any

import pyfuse3
import trio

FILE_INODE = pyfuse3.ROOT_INODE + 1


class LockFS(pyfuse3.Operations):
    def __init__(self, log_path: str) -> None:
        super().__init__()
        self.log = open(log_path, "a", buffering=1)  # noqa: SIM115 (lives with the process)
        self.data = bytearray()
        self.holder: int | None = None  # the owner holding the (whole-file) lock
        self.holder_pid = 0
        self.freed = trio.Event()

    def record(self, **kw: Any) -> None:
        self.log.write(json.dumps(kw) + "\n")

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        if ino == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
        else:
            a.st_mode = stat.S_IFREG | 0o666
            a.st_nlink = 1
            a.st_size = len(self.data)
        a.attr_timeout = 0
        a.entry_timeout = 0
        return a

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        if parent_inode == pyfuse3.ROOT_INODE and name == b"f":
            return self._attrs(FILE_INODE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return bytes(self.data[off : off + size])

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        end = off + len(buf)
        if end > len(self.data):
            self.data.extend(b"\0" * (end - len(self.data)))
        self.data[off:end] = buf
        return len(buf)

    async def flush(self, fh: int) -> None:
        pass

    async def release(self, fh: int) -> None:
        self.record(op="release", fh=fh)

    # -- the patch's handlers ---------------------------------------------------

    async def _take(self, owner: int, sleep: bool) -> None:
        while self.holder not in (None, owner):
            if not sleep:
                raise pyfuse3.FUSEError(errno.EAGAIN)
            try:
                await self.freed.wait()
            except trio.Cancelled:
                self.record(op="interrupted", owner=owner)
                raise
        self.holder = owner

    def _free(self, owner: int) -> None:
        if self.holder == owner:
            self.holder = None
            self.freed.set()
            self.freed = trio.Event()

    async def getlk(self, fh: int, owner: int, lock: pyfuse3.FileLock, ctx: Any) -> Any:
        self.record(op="getlk", owner=owner, lock=list(lock), ctx_pid=ctx.pid)
        if self.holder not in (None, owner):
            return pyfuse3.FileLock(fcntl.F_WRLCK, 0, 0, self.holder_pid)
        return lock._replace(type=fcntl.F_UNLCK)

    async def setlk(
        self, fh: int, owner: int, lock: pyfuse3.FileLock, sleep: bool, ctx: Any
    ) -> None:
        self.record(op="setlk", owner=owner, lock=list(lock), sleep=sleep, ctx_pid=ctx.pid)
        if lock.type == fcntl.F_UNLCK:
            self._free(owner)
        else:
            await self._take(owner, sleep)
            self.holder_pid = lock.pid

    async def flock(self, fh: int, owner: int, op: int, ctx: Any) -> None:
        self.record(op="flock", owner=owner, flock_op=op)
        if op & fcntl.LOCK_UN:
            self._free(owner)
        else:
            await self._take(owner, not op & fcntl.LOCK_NB)

    async def release_locks(self, fh: int, owner: int, flock: bool) -> None:
        self.record(op="release_locks", owner=owner, flock=flock)
        self._free(owner)

    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        self.record(op="fallocate", mode=mode, offset=offset, length=length)
        if mode != 0:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        if offset + length > len(self.data):
            self.data.extend(b"\0" * (offset + length - len(self.data)))


def main() -> None:
    mnt, log_path = sys.argv[1], sys.argv[2]
    ops = LockFS(log_path)
    pyfuse3.init(ops, mnt, set(pyfuse3.default_options) | {"fsname=lockfs"})

    def stop(*_: Any) -> None:
        def later() -> None:
            trio.from_thread.run_sync(pyfuse3.terminate, trio_token=pyfuse3.trio_token)

        threading.Thread(target=later, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)
    os._exit(0)


if __name__ == "__main__":
    main()

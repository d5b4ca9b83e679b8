#!/usr/bin/env python3
"""A minimal pyfuse3 + trio passthrough of a local directory: the FUSE-plus-
Python floor the benchmarks compare afsfuse against.

Every request is answered from the local directory with plain (blocking)
``os`` calls, so what is measured is the cost of FUSE plus a Python daemon
and nothing else.  Inode numbers are the source's own; the kernel's lookup
counts are kept so ``forget`` can drop paths it no longer needs.

    .venv/bin/python scripts/passthrough.py SOURCE MOUNTPOINT \\
        [--attr-timeout 0] [--entry-timeout 0]

It runs in the foreground until unmounted (``fusermount3 -u MOUNTPOINT``) or
sent SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import stat
import sys
from collections import defaultdict
from pathlib import Path

import pyfuse3
import trio

log = logging.getLogger(__name__)


def _fuse_error(exc: OSError) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(exc.errno or errno.EIO)


class Passthrough(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, source: str, attr_timeout: float, entry_timeout: float) -> None:
        super().__init__()
        self.attr_timeout = attr_timeout
        self.entry_timeout = entry_timeout
        self._paths: dict[int, set[str]] = {pyfuse3.ROOT_INODE: {source}}
        self._lookups: dict[int, int] = defaultdict(int)
        self._fd_inode: dict[int, int] = {}
        self._inode_fd: dict[int, int] = {}
        self._fd_opens: dict[int, int] = defaultdict(int)
        self._root_ino = os.lstat(source).st_ino

    # -- inode <-> path ---------------------------------------------------------

    def _path(self, inode: int) -> str:
        paths = self._paths.get(inode)
        if not paths:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return next(iter(paths))

    def _child(self, parent: int, name: bytes) -> str:
        return os.path.join(self._path(parent), os.fsdecode(name))

    def _ino(self, st_ino: int) -> int:
        # The source's root may have any inode number; FUSE wants ROOT_INODE.
        return pyfuse3.ROOT_INODE if st_ino == self._root_ino else st_ino

    def _remember(self, inode: int, path: str, count: int = 1) -> None:
        if inode == pyfuse3.ROOT_INODE:
            return
        self._lookups[inode] += count
        self._paths.setdefault(inode, set()).add(path)

    def _forget_path(self, inode: int, path: str) -> None:
        """``path`` no longer names ``inode``.  With no name left the entry goes:
        the source file system may reuse the inode number for a new file."""
        paths = self._paths.get(inode)
        if paths is None or inode == pyfuse3.ROOT_INODE:
            return
        paths.discard(path)
        if not paths:
            del self._paths[inode]

    def _attrs(self, st: os.stat_result) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                     "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):  # fmt: skip
            setattr(a, name, getattr(st, name))
        a.st_ino = self._ino(st.st_ino)
        a.generation = 0
        a.st_blksize = 512
        a.st_blocks = (st.st_size + 511) // 512
        a.attr_timeout = self.attr_timeout
        a.entry_timeout = self.entry_timeout
        return a

    def _stat(self, path: str, fd: int | None = None) -> os.stat_result:
        try:
            return os.fstat(fd) if fd is not None else os.lstat(path)
        except OSError as exc:
            raise _fuse_error(exc) from None

    # -- names --------------------------------------------------------------------

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name) if name != b"." else self._path(parent_inode)
        if name == b"..":
            path = os.path.dirname(self._path(parent_inode))
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if not self.entry_timeout:
                raise pyfuse3.FUSEError(errno.ENOENT) from None
            # A negative entry the kernel keeps as long as a positive one
            # (afsfuse gives them too): the floor must not pay lookups a
            # well-behaved daemon saves.  Changes through this mount replace it.
            neg = pyfuse3.EntryAttributes()
            neg.st_ino = 0
            neg.entry_timeout = self.entry_timeout
            return neg
        except OSError as exc:
            raise _fuse_error(exc) from None
        if name not in (b".", b".."):
            self._remember(self._ino(st.st_ino), path)
        return self._attrs(st)

    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        fd = self._inode_fd.get(inode)  # an open file may have no name left
        return self._attrs(self._stat("" if fd is not None else self._path(inode), fd))

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        path = self._path(inode)
        try:
            if fields.update_size:
                if fh is not None:
                    os.ftruncate(fh, attr.st_size)
                else:
                    os.truncate(path, attr.st_size)
            if fields.update_mode:
                os.chmod(path, stat.S_IMODE(attr.st_mode), follow_symlinks=False)
            if fields.update_uid or fields.update_gid:
                uid = attr.st_uid if fields.update_uid else -1
                gid = attr.st_gid if fields.update_gid else -1
                os.chown(path, uid, gid, follow_symlinks=False)
            if fields.update_atime or fields.update_mtime:
                st = os.lstat(path)
                atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
                mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
                os.utime(path, ns=(atime, mtime), follow_symlinks=False)
        except OSError as exc:
            raise _fuse_error(exc) from None
        return await self.getattr(inode)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        try:
            return os.fsencode(os.readlink(self._path(inode)))
        except OSError as exc:
            raise _fuse_error(exc) from None

    def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for inode, n in inode_list:
            left = self._lookups.get(inode, 0) - n
            if left > 0:
                self._lookups[inode] = left
            else:
                self._lookups.pop(inode, None)
                if inode != pyfuse3.ROOT_INODE and inode not in self._inode_fd:
                    self._paths.pop(inode, None)

    # -- directories --------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        path = self._path(fh)
        try:
            # Sorted by inode, with the inode as next_id: stable offsets while
            # entries come and go between calls.
            with os.scandir(path) as it:
                entries = sorted((e.inode(), e.name) for e in it)
        except OSError as exc:
            raise _fuse_error(exc) from None
        for ino, name in entries:
            if ino <= start_id:
                continue
            child = os.path.join(path, name)
            try:
                st = os.lstat(child)
            except FileNotFoundError:
                continue  # removed meanwhile
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attrs(st), ino):
                return
            self._remember(self._ino(st.st_ino), child)  # readdirplus: one lookup

    async def releasedir(self, fh: int) -> None:
        return None

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        try:
            os.mkdir(path, mode & ~ctx.umask)
        except OSError as exc:
            raise _fuse_error(exc) from None
        st = self._stat(path)
        self._remember(st.st_ino, path)
        return self._attrs(st)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = self._child(parent_inode, name)
        try:
            ino = os.lstat(path).st_ino
            os.rmdir(path)
        except OSError as exc:
            raise _fuse_error(exc) from None
        self._forget_path(ino, path)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = self._child(parent_inode, name)
        try:
            ino = os.lstat(path).st_ino
            os.unlink(path)
        except OSError as exc:
            raise _fuse_error(exc) from None
        self._forget_path(ino, path)

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        try:
            st = os.lstat(old)
            try:
                replaced: int | None = self._ino(os.lstat(new).st_ino)
            except FileNotFoundError:
                replaced = None
            os.rename(old, new)
        except OSError as exc:
            raise _fuse_error(exc) from None
        if replaced is not None and replaced != self._ino(st.st_ino):
            self._forget_path(replaced, new)
        paths = self._paths.get(self._ino(st.st_ino))
        if paths is not None:
            paths.discard(old)
            paths.add(new)
            if stat.S_ISDIR(st.st_mode):
                # Paths remembered under a renamed directory move with it.
                prefix = old + os.sep
                for other in self._paths.values():
                    for p in [p for p in other if p.startswith(prefix)]:
                        other.discard(p)
                        other.add(new + p[len(old) :])

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        try:
            os.symlink(os.fsdecode(target), path)
        except OSError as exc:
            raise _fuse_error(exc) from None
        st = self._stat(path)
        self._remember(st.st_ino, path)
        return self._attrs(st)

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(new_parent_inode, new_name)
        try:
            os.link(self._path(inode), path, follow_symlinks=False)
        except OSError as exc:
            raise _fuse_error(exc) from None
        self._remember(inode, path)
        return await self.getattr(inode)

    # -- files --------------------------------------------------------------------

    def _opened(self, inode: int, fd: int) -> pyfuse3.FileInfo:
        self._fd_inode[fd] = inode
        self._inode_fd.setdefault(inode, fd)
        self._fd_opens[fd] += 1
        # keep_cache: the source changes only through us, so pages stay valid.
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        try:
            fd = os.open(self._path(inode), flags & ~os.O_CREAT)
        except OSError as exc:
            raise _fuse_error(exc) from None
        return self._opened(inode, fd)

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path = self._child(parent_inode, name)
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_TRUNC, mode & ~ctx.umask)
        except OSError as exc:
            raise _fuse_error(exc) from None
        st = self._stat(path, fd)
        self._remember(st.st_ino, path)
        return self._opened(st.st_ino, fd), self._attrs(st)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        try:
            return os.pread(fh, size, off)
        except OSError as exc:
            raise _fuse_error(exc) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        try:
            return os.pwrite(fh, buf, off)
        except OSError as exc:
            raise _fuse_error(exc) from None

    async def flush(self, fh: int) -> None:
        return None

    async def fsync(self, fh: int, datasync: bool) -> None:
        try:
            (os.fdatasync if datasync else os.fsync)(fh)
        except OSError as exc:
            raise _fuse_error(exc) from None

    async def release(self, fh: int) -> None:
        self._fd_opens[fh] -= 1
        if self._fd_opens[fh] > 0:
            return
        del self._fd_opens[fh]
        inode = self._fd_inode.pop(fh)
        if self._inode_fd.get(inode) == fh:
            del self._inode_fd[inode]
            for fd, ino in self._fd_inode.items():  # another open of it stays usable
                if ino == inode:
                    self._inode_fd[inode] = fd
                    break
        os.close(fh)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = os.statvfs(self._path(pyfuse3.ROOT_INODE))
        out = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail", "f_namemax"):  # fmt: skip
            setattr(out, name, getattr(sv, name))
        return out

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return True  # default_permissions: the kernel checked the mode bits


async def _serve(ops: Passthrough, mountpoint: str, debug: bool) -> None:
    options = set(pyfuse3.default_options) | {"fsname=passthrough", "subtype=passthrough"}
    if debug:
        options.add("debug")
    pyfuse3.init(ops, mountpoint, options)
    try:
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _sig in signals:
                        pyfuse3.terminate()
                        return

            nursery.start_soon(watch_signals)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("source", type=Path)
    ap.add_argument("mountpoint", type=Path)
    ap.add_argument("--attr-timeout", type=float, default=0.0, help="kernel attribute cache (s)")
    ap.add_argument("--entry-timeout", type=float, default=0.0, help="kernel entry cache (s)")
    ap.add_argument("--debug", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")  # fmt: skip
    source = str(args.source.resolve())
    if not os.path.isdir(source):
        log.error("%s is not a directory", source)
        return 1
    ops = Passthrough(source, args.attr_timeout, args.entry_timeout)
    trio.run(_serve, ops, str(args.mountpoint.resolve()), args.debug)
    return 0


if __name__ == "__main__":
    sys.exit(main())

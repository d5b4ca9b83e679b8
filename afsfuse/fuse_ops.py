"""The pyfuse3 adapter: kernel requests in, cache-manager calls out.

Each handler is thin: find the vnode for the inode, make one call on the
cache manager with the caller's credentials, and turn the result into what
the kernel wants.  The ``_handler`` decorator maps every failure to a
``FUSEError`` with an errno (an uncaught exception would end pyfuse3's main
loop and leave a dead mount); ``forget`` never raises.

What lives here and not in the core: inode numbers and lookup counts
(``InodeTable``), open file and directory handles, the readdir snapshots that
keep ``next_id`` offsets stable, AFS mount points (symlinks of mode 0644
whose target is ``#VOLUME.`` or ``%CELL:VOLUME.``, shown as the root
directory of that volume, its own volume instance), the ``afs.*`` extended
attributes the ``fs`` commands use (``user.*`` ones go to ``afsfuse.xattr``),
and the kernel cache timeouts.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import re
import stat
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pyfuse3
import trio

from afsfuse.cache_manager import CacheManager, OpenFile
from afsfuse.inode_table import ROOT_INODE, InodeEntry, InodeTable
from afsfuse.invalidation import Invalidate
from afsfuse.kernel_notify import ExpiringEntries, KernelNotifier, inode_key, preferred_inode
from afsfuse.locks import CacheManagerLocks, LockManager, fallocate, flock_type
from afsfuse.statfs import VolumeSpace
from afsfuse.stats import as_ms
from afsfuse.vnode import Vnode
from protocol.errors import RpcError
from protocol.gc_schedule import gc_stats
from protocol.limits import MAX_NAME
from protocol.methods import FS_GET_CAPABILITIES
from protocol.records import FileStatus, FileType

log = logging.getLogger(__name__)

_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])

_TYPE_BITS = {FileType.FILE: stat.S_IFREG, FileType.DIRECTORY: stat.S_IFDIR,
              FileType.SYMLINK: stat.S_IFLNK, FileType.FIFO: stat.S_IFIFO,
              FileType.SOCKET: stat.S_IFSOCK, FileType.CHARDEV: stat.S_IFCHR,
              FileType.BLOCKDEV: stat.S_IFBLK}  # fmt: skip
_NODE_TYPES = {v: k for k, v in _TYPE_BITS.items() if k not in (FileType.FILE, FileType.DIRECTORY,
                                                                 FileType.SYMLINK)}  # fmt: skip
# A lost or timed-out server connection is an I/O error to applications;
# ENOTCONN would read as "the FUSE mount itself is dead".
_ERRNO_REMAP = {errno.ENOTCONN: errno.EIO, errno.ENODEV: errno.EIO}
MOUNTPOINT_MODE = 0o644
#: Kernel cache timeout for a mount point whose volume could not be reached.
UNRESOLVED_TIMEOUT = 1.0
#: A file broken this recently (seconds) is opened with direct_io.
HOT_WINDOW = 2.0
#: Seconds `fs checkservers` waits for each server.
PROBE_TIMEOUT = 5.0
_MOUNTPOINT_RE = re.compile(rb"([#%])(?:([^:]+):)?([^:]+)\.")
XATTR_PREFIX = b"afs."
USER_XATTR_PREFIX = b"user."  # stored on the server (afsfuse.xattr)
XATTRS = (b"afs.fid", b"afs.cell", b"afs.volume")


def _looks_like_mountpoint(st: FileStatus) -> bool:
    """A symlink of mode 0644: what ``fs mkmount`` makes (its target says
    whether it really is one)."""
    return st.type == FileType.SYMLINK and st.mode == MOUNTPOINT_MODE


def _handler(fn: _F) -> _F:
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: AfsOperations, *args: Any, **kwargs: Any) -> Any:
        self.requests[name] += 1  # what the kernel asks of us, for `fs stats`
        t0 = time.perf_counter()
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except RpcError as exc:
            raise pyfuse3.FUSEError(_ERRNO_REMAP.get(exc.errno, exc.errno)) from None
        except OSError as exc:
            num = exc.errno or errno.EIO
            raise pyfuse3.FUSEError(_ERRNO_REMAP.get(num, num)) from None
        except Exception:
            log.exception("%s failed", name)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            # Time in the handler, waits included (the kernel's side of a
            # request, its queueing and copies, is not in it).
            self.request_seconds[name] += time.perf_counter() - t0

    return wrapper  # type: ignore[return-value]


#: Seconds a process's supplementary groups are reused without reading
#: /proc again (one read per FUSE request cost ~5% of the daemon's CPU in a
#: git clone); a setgroups() is seen within this time, as with NFS's
#: credential caches.
GROUPS_TTL = 1.0
_groups: dict[tuple[int, int, int], tuple[float, list[int]]] = {}


def cred_of(ctx: pyfuse3.RequestContext | None) -> tuple[int, int, list[int]] | None:
    if ctx is None:
        return None
    key = (ctx.pid, ctx.uid, ctx.gid)
    now = time.monotonic()
    hit = _groups.get(key)
    if hit is not None and now - hit[0] < GROUPS_TTL:
        return (ctx.uid, ctx.gid, hit[1])
    try:
        gids = sorted(pyfuse3.get_sup_groups(ctx.pid))
    except (OSError, ValueError):
        return (ctx.uid, ctx.gid, [])  # the process may already be gone
    if len(_groups) >= 4096:
        _groups.clear()
    _groups[key] = (now, gids)
    return (ctx.uid, ctx.gid, gids)


@dataclass
class DirHandle:
    vnode: Vnode
    ino: int
    cred: tuple[int, int, list[int]] | None
    entries: list[tuple[bytes, Vnode, FileStatus, bool]] | None = None


@dataclass
class FileHandle:
    handle: OpenFile
    ino: int
    cred: tuple[int, int, list[int]] | None


class AfsOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    # Off: with it the kernel trusts its own size and times of a regular file
    # over ours, so another client's change never shows (tried 2026-12-03:
    # B kept size 3 after A wrote 10 bytes, and B's append then overwrote A's
    # bytes at offset 3; test_b_stat_follows_within_bound fails), and small
    # files were slower (304 against 460 per s).
    enable_writeback_cache = False

    def __init__(
        self,
        cm: CacheManager,
        root: Vnode,
        *,
        attr_timeout: float = 3600.0,
        entry_timeout: float = 3600.0,
        hot_window: float = HOT_WINDOW,
    ) -> None:
        super().__init__()
        self.cm = cm
        #: Set once the kernel's FUSE_INIT was answered (its settings final).
        self.initialized = trio.Event()
        self.hot_window = hot_window
        self.attr_timeout = attr_timeout
        self.entry_timeout = entry_timeout
        self.inodes = InodeTable()
        self.requests: Counter[str] = Counter()  # FUSE requests by handler
        self.request_seconds: Counter[str] = Counter()  # their time in the handler
        root.ino = self.inodes.set_root(inode_key(root), root, root.fid.unique).ino
        self.entry_inval = ExpiringEntries(getattr(pyfuse3, "expire_entry", None),
                                           pyfuse3.invalidate_entry)  # fmt: skip
        self.notifier = KernelNotifier(
            self.inodes, self._kernel_inval_inode, self.entry_inval,
            is_open=self._is_open, reading=self._is_reading,
        )  # fmt: skip
        self._reads: dict[int, int] = {}  # read requests in flight, per inode
        self.locks = LockManager(CacheManagerLocks(cm), self._drop_pages)
        self._files: dict[int, FileHandle] = {}
        self._dirs: dict[int, DirHandle] = {}
        self._open_inos: dict[int, int] = {}
        self._next_fh = 1
        # Volume roots reached through a mount point: ".." of such a root is
        # the directory holding the mount point.
        self._mount_parent: dict[Any, int] = {}
        # Inodes unlinked while open: (directory, hidden name, cred) to remove
        # at the last release.
        self._silly: dict[int, tuple[Vnode, bytes, Any]] = {}

    # -- kernel invalidation (called from the notifier's worker thread) ------

    @staticmethod
    def _kernel_inval_inode(ino: int, attr_only: bool) -> None:
        pyfuse3.invalidate_inode(ino, attr_only)

    def _is_open(self, ino: int) -> bool:
        return self._open_inos.get(ino, 0) > 0

    def _is_reading(self, ino: int) -> bool:
        return self._reads.get(ino, 0) > 0

    # -- helpers ----------------------------------------------------------------

    def _entry(self, ino: int) -> InodeEntry:
        try:
            return self.inodes.get(ino)
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def _vnode(self, ino: int) -> Vnode:
        return self._entry(ino).node

    def _attrs(
        self, ino: int, vnode: Vnode, st: FileStatus, *, short: bool = False
    ) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = vnode.fid.unique
        a.st_mode = _TYPE_BITS[st.type] | st.mode
        a.st_nlink = max(st.nlink, 1)
        a.st_size = vnode.size() if st.type == FileType.FILE else st.size
        a.st_rdev = st.rdev
        vnode.kernel_attr_dv = st.data_version
        a.st_uid = st.owner
        a.st_gid = st.group
        a.st_mtime_ns = st.mtime_ns
        a.st_ctime_ns = st.ctime_ns
        a.st_atime_ns = st.mtime_ns  # AFS keeps no access times
        a.st_blksize = 128 * 1024
        a.st_blocks = (a.st_size + 511) // 512
        a.attr_timeout = min(self.attr_timeout, UNRESOLVED_TIMEOUT) if short else self.attr_timeout
        a.entry_timeout = (
            min(self.entry_timeout, UNRESOLVED_TIMEOUT) if short else self.entry_timeout
        )
        return a

    async def _resolve_mountpoint(
        self, parent_ino: int, vnode: Vnode, st: FileStatus, cred: Any
    ) -> tuple[Vnode, FileStatus]:
        """A mount point (symlink, mode 0644, ``#vol.``) becomes its volume's root."""
        if not _looks_like_mountpoint(st):
            return vnode, st
        target = await self.cm.readlink(vnode, cred)
        m = _MOUNTPOINT_RE.fullmatch(target)
        if m is None:
            return vnode, st
        cell = m.group(2).decode() if m.group(2) else vnode.volume.cell
        root = await self.cm.mount_volume(cell, m.group(3).decode(), cred, crossing=True)
        self._mount_parent.setdefault(root.volume.key, parent_ino)
        rst = await self.cm.getattr(root, cred)
        return root, rst

    async def _adopt(self, vnode: Vnode, st: FileStatus, cred: Any) -> tuple[Vnode, FileStatus]:
        """The vnode the kernel may hold: one that breaks reach (see
        VolumeInstance.adopt), with its status."""
        held = vnode.volume.adopt(vnode)
        if held is not vnode:
            st = await self.cm.getattr(held, cred)
        return held, st

    async def _reply_entry(
        self, parent_ino: int, name: bytes, vnode: Vnode, st: FileStatus, cred: Any
    ) -> pyfuse3.EntryAttributes:
        vnode, st, unresolved = await self._entry_target(parent_ino, vnode, st, cred)
        vnode, st = await self._adopt(vnode, st, cred)
        entry = self.inodes.remember(
            inode_key(vnode), vnode, vnode.fid.unique, preferred=preferred_inode(vnode)
        )
        vnode.ino = entry.ino  # held by the kernel: never evicted
        self.notifier.learned(parent_ino, name)
        return self._attrs(entry.ino, vnode, st, short=unresolved)

    async def _entry_target(
        self, dir_ino: int, vnode: Vnode, st: FileStatus, cred: Any
    ) -> tuple[Vnode, FileStatus, bool]:
        """What an entry shows: a mount point's volume root, or, when that
        volume cannot be reached, the mount point itself as a symlink, flagged
        so the kernel caches it only briefly (the failure may pass).  Never
        fails because of the mount point, so one dangling mount point cannot
        end (or empty) the listing of its whole directory."""
        try:
            vnode, st = await self._resolve_mountpoint(dir_ino, vnode, st, cred)
        except (RpcError, OSError) as exc:
            log.info("mount point %s unresolved, shown as a symlink: %s", vnode.fid, exc)
            return vnode, st, True
        return vnode, st, False

    def _names_changed(self, d: Vnode, name: bytes) -> None:
        """A name the daemon made without the kernel asking (a silly rename,
        ``fs mkmount``): a negative entry the kernel may hold for it goes."""
        self.cm.invalidations.put(Invalidate("entry", parent=d, name=name))

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    # -- lifecycle ------------------------------------------------------------

    def init(self) -> None:
        log.info("FUSE session initialised")
        # libfuse replies right after this returns, before any task runs:
        # a waiter sees the kernel's state after the reply.
        self.initialized.set()
        if not getattr(pyfuse3, "AFSFUSE_EXTENSION", 0):
            log.warning("pyfuse3 lacks patches/pyfuse3: locks stay local to this machine")

    # -- names ----------------------------------------------------------------

    @_handler
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        cred = cred_of(ctx)
        parent = self._entry(parent_inode)
        if name == b".":
            st = await self.cm.getattr(parent.node, cred)
            self.inodes.remember(parent.key, parent.node, parent.generation)
            return self._attrs(parent.ino, parent.node, st)
        if name == b"..":
            return await self._lookup_dotdot(parent, cred)
        if len(name) > MAX_NAME:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        token = self.cm.dir_token(parent.node)
        try:
            child = await self.cm.lookup(parent.node, name, cred)
        except RpcError as exc:
            if exc.errno == errno.ENOENT and self._negative_ok(parent.node, token):
                # A negative entry the kernel keeps: a break of the directory
                # drops it with the names learned there (no await from the
                # check to here, so no break can slip in between).
                self.notifier.learned(parent_inode, name)
                return self._negative_entry()
            raise
        st = await self.cm.getattr(child, cred)
        return await self._reply_entry(parent_inode, name, child, st, cred)

    def _negative_ok(self, d: Vnode, token: tuple[Any, ...]) -> bool:
        """Whether the kernel may cache "no such name" in ``d``: the answer is
        backed by an intact promise, and nobody else changed ``d`` in the last
        ``hot_window`` seconds.  The kernel learns of a break asynchronously,
        so a negative entry can outlive another client's create by that
        delay; in a directory others are changing right now the kernel asks
        us every time instead (as files there are read with direct_io)."""
        if trio.current_time() - d.last_break < self.hot_window:
            return False
        return self.cm.negative_holds(d, token)

    def _negative_entry(self) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = 0  # "no such name", cached for the entry timeout
        a.entry_timeout = self.entry_timeout
        a.attr_timeout = self.attr_timeout
        return a

    async def _lookup_dotdot(self, entry: InodeEntry, cred: Any) -> pyfuse3.EntryAttributes:
        v: Vnode = entry.node
        if v.fid == v.volume.root_fid:
            pino = self._mount_parent.get(v.volume.key, ROOT_INODE)
            pentry = self._entry(pino)
            st = await self.cm.getattr(pentry.node, cred)
            if pino != ROOT_INODE:
                self.inodes.remember(pentry.key, pentry.node, pentry.generation)
            return self._attrs(pino, pentry.node, st)
        st = await self.cm.getattr(v, cred)
        pfid = type(v.fid)(v.fid.volume, st.parent_vnode, st.parent_unique)
        parent = v.volume.get(pfid)
        pst = await self.cm.getattr(parent, cred)
        pe = self.inodes.remember(
            inode_key(parent), parent, pfid.unique, preferred=preferred_inode(parent)
        )
        parent.ino = pe.ino
        return self._attrs(pe.ino, parent, pst)

    @_handler
    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        v = self._vnode(inode)
        st = await self.cm.getattr(v, cred_of(ctx))
        return self._attrs(inode, v, st)

    @_handler
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        v = self._vnode(inode)
        kw: dict[str, Any] = {}
        if fields.update_mode:
            kw["mode"] = stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            kw["uid"] = attr.st_uid
        if fields.update_gid:
            kw["gid"] = attr.st_gid
        if fields.update_size:
            kw["size"] = attr.st_size
        if fields.update_mtime:
            kw["mtime_ns"] = attr.st_mtime_ns
        cred = cred_of(ctx)
        if kw:
            st = await self.cm.setattr(v, cred, **kw)
        else:  # atime/ctime only: AFS keeps neither; nothing to store
            st = await self.cm.getattr(v, cred)
        return self._attrs(inode, v, st)

    @_handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return await self.cm.readlink(self._vnode(inode), cred_of(ctx))

    # -- directories ------------------------------------------------------------

    @_handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        v = self._vnode(inode)
        st = await self.cm.getattr(v, cred_of(ctx))
        if st.type != FileType.DIRECTORY:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self._new_fh()
        self._dirs[fh] = DirHandle(v, inode, cred_of(ctx))
        return fh

    @_handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        dh = self._dirs.get(fh)
        if dh is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if start_id == 0 or dh.entries is None:
            # A snapshot per opendir/rewind keeps next_id offsets stable while
            # entries come and go on the server.  Everything that can fail or
            # wait happens here, before the first readdir_reply: an error after
            # it would discard entries whose lookups we already counted.
            listing = await self.cm.readdir(dh.vnode, dh.cred)
            entries = []
            for e in listing:
                st = e.status
                if _looks_like_mountpoint(st):
                    child, st, short = await self._entry_target(dh.ino, e.vnode, st, dh.cred)
                    entries.append((e.name, child, st, short))
                else:  # what _entry_target returns for anything else, without an await
                    entries.append((e.name, e.vnode, st, False))
            dh.entries = entries
        for i in range(start_id, len(dh.entries)):
            name, child, st, short = dh.entries[i]
            # Hand the kernel the vnode breaks reach (see VolumeInstance.adopt):
            # a forget may have dropped ours since the snapshot was taken.
            held = child.volume.adopt(child)
            if held is not child:
                child, st = held, held.effective_status() or st
            entry = self.inodes.remember(
                inode_key(child), child, child.fid.unique, count=0,
                preferred=preferred_inode(child),
            )  # fmt: skip
            attrs = self._attrs(entry.ino, child, st, short=short)
            if not pyfuse3.readdir_reply(token, name, attrs, i + 1):
                self.inodes.forget(entry.ino, 0)  # drop it if the kernel holds none
                return
            entry.lookups += 1  # the kernel took the entry: one lookup
            child.ino = entry.ino
            self.notifier.learned(dh.ino, name)

    @_handler
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @_handler
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        cred = cred_of(ctx)
        v = await self.cm.mkdir(self._vnode(parent_inode), name, stat.S_IMODE(mode), cred)
        return await self._reply_entry(parent_inode, name, v, await self.cm.getattr(v, cred), cred)

    @_handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.cm.rmdir(self._vnode(parent_inode), name, cred_of(ctx))
        self.notifier.unlearned(parent_inode, name)

    @_handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent, cred = self._vnode(parent_inode), cred_of(ctx)
        child = await self.cm.lookup(parent, name, cred)
        if not await self._silly_rename(parent, name, child, cred):
            await self.cm.unlink(parent, name, cred)
        self.notifier.unlearned(parent_inode, name)

    async def _silly_rename(self, parent: Vnode, name: bytes, child: Vnode, cred: Any) -> bool:
        """Keep a file that is open here alive under a hidden name when its
        last link goes (unlink, or rename over it), as the kernel AFS and NFS
        clients do: open descriptors keep reading it; the last close removes
        it.  Returns True if it did so."""
        entry = self.inodes.find(inode_key(child))
        st = child.status
        if entry is None or not self._is_open(entry.ino) or st is None:
            return False
        if st.type != FileType.FILE or st.nlink > 1 or entry.ino in self._silly:
            return False
        silly = b".__afs%X.%X" % (child.fid.vnode, child.fid.unique)
        await self.cm.rename(parent, name, parent, silly, 0, cred)
        self._names_changed(parent, silly)
        self._silly[entry.ino] = (parent, silly, cred)
        return True

    @_handler
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)  # AFS has no atomic exchange
        wire_flags = 1 if flags & pyfuse3.RENAME_NOREPLACE else 0
        old_dir, new_dir, cred = (
            self._vnode(parent_inode_old),
            self._vnode(parent_inode_new),
            cred_of(ctx),
        )
        if not wire_flags:
            # Renaming over a file open here ("atomic save") must not make the
            # open descriptors stale: the target goes to a hidden name first.
            source = await self.cm.lookup(old_dir, name_old, cred)
            try:
                target = await self.cm.lookup(new_dir, name_new, cred)
            except RpcError as exc:
                if exc.errno != errno.ENOENT:
                    raise
            else:
                if target is not source and target.volume is source.volume:
                    await self._silly_rename(new_dir, name_new, target, cred)
        await self.cm.rename(old_dir, name_old, new_dir, name_new, wire_flags, cred)
        # The kernel moved its dentry: the new name is one it now holds, to be
        # dropped when that directory is broken.
        self.notifier.unlearned(parent_inode_old, name_old)
        self.notifier.learned(parent_inode_new, name_new)

    @_handler
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        cred = cred_of(ctx)
        v = await self.cm.symlink(self._vnode(parent_inode), name, target, cred)
        return await self._reply_entry(parent_inode, name, v, await self.cm.getattr(v, cred), cred)

    @_handler
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        # A FIFO, socket or device node.  The kernel does FIFO and socket I/O
        # itself for such an inode (init_special_inode): opens never reach us,
        # so FIFO data stays on this machine, as on NFS.  A regular file made
        # through mknod(2) (S_IFREG) is an ordinary create.
        cred = cred_of(ctx)
        parent = self._vnode(parent_inode)
        fmt = stat.S_IFMT(mode)
        if fmt in (0, stat.S_IFREG):
            v = await self.cm.create(parent, name, stat.S_IMODE(mode), cred)
        else:
            ftype = _NODE_TYPES.get(fmt)
            if ftype is None:
                raise pyfuse3.FUSEError(errno.EINVAL)
            v = await self.cm.mknod(parent, name, ftype, stat.S_IMODE(mode), rdev, cred)
        return await self._reply_entry(parent_inode, name, v, await self.cm.getattr(v, cred), cred)

    @_handler
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        cred = cred_of(ctx)
        v = await self.cm.link(self._vnode(inode), self._vnode(new_parent_inode), new_name, cred)
        st = await self.cm.getattr(v, cred)
        return await self._reply_entry(new_parent_inode, new_name, v, st, cred)

    # -- files ------------------------------------------------------------------

    def _track_open(self, ino: int, delta: int) -> None:
        n = self._open_inos.get(ino, 0) + delta
        if n > 0:
            self._open_inos[ino] = n
        else:
            self._open_inos.pop(ino, None)

    def _file_info(self, ino: int, handle: OpenFile, cred: Any) -> pyfuse3.FileInfo:
        fh = self._new_fh()
        self._files[fh] = FileHandle(handle, ino, cred)
        self._track_open(ino, 1)
        # A file another client is changing right now (broken moments ago)
        # is read around the page cache: the kernel would clamp reads to a
        # size it caches, or zero-fill a read that came back short, mixing
        # two versions.  Reads then return exactly one version.  Shared
        # mmaps of such a file fail (ENODEV) for that window; private ones
        # (exec) work.
        hot = trio.current_time() - handle.vnode.last_break < self.hot_window
        return pyfuse3.FileInfo(fh=fh, keep_cache=handle.keep_cache and not hot, direct_io=hot)

    def _file(self, fh: int) -> FileHandle:
        f = self._files.get(fh)
        if f is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return f

    @_handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        cred = cred_of(ctx)
        handle = await self.cm.open(self._vnode(inode), cred, flags)
        v = handle.vnode
        if not handle.keep_cache and v.status and v.kernel_attr_dv != v.status.data_version:
            # Close-to-open: the data changed since the kernel cached its
            # attributes, and the kernel clamps reads to the size it has
            # cached until the (asynchronous) break invalidation lands.
            # Dropping attributes takes no page locks, so it is safe inside
            # this handler.  Not when they are current (a first open): the
            # GETATTR it causes mid-read can cost pages already read.
            self._drop_kernel_attrs(inode)
        return self._file_info(inode, handle, cred)

    @staticmethod
    def _drop_kernel_attrs(ino: int) -> None:
        try:
            pyfuse3.invalidate_inode(ino, True)
        except OSError:
            pass  # the kernel does not know it (yet): nothing cached to drop

    @_handler
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        cred = cred_of(ctx)
        parent = self._vnode(parent_inode)
        try:
            v = await self.cm.create(parent, name, stat.S_IMODE(mode), cred)
            open_flags = flags & ~os.O_TRUNC  # it is new: nothing to truncate
        except RpcError as exc:
            # Another client created the name after the kernel's lookup:
            # open(O_CREAT) without O_EXCL opens (and maybe truncates) it.
            if exc.errno != errno.EEXIST or flags & os.O_EXCL:
                raise
            v = await self.cm.lookup(parent, name, cred)
            open_flags = flags
        handle = await self.cm.open(v, cred, open_flags)
        attrs = await self._reply_entry(parent_inode, name, v, await self.cm.getattr(v, cred), cred)
        return self._file_info(attrs.st_ino, handle, cred), attrs

    @_handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        f = self._file(fh)
        # Counted so a break's invalidation of this inode waits for the reply
        # (KernelNotifier._after_reads): the notifier's thread looks at the
        # count right before it tells the kernel.  pyfuse3 sends the reply in
        # this task step, after this returns, and the notifier's thread can
        # run in between: so the count drops only after the step, from trio's
        # run_sync_soon queue.
        self._reads[f.ino] = self._reads.get(f.ino, 0) + 1
        try:
            return await self.cm.read(f.handle, off, size, f.cred)
        finally:
            trio.lowlevel.current_trio_token().run_sync_soon(self._read_replied, f.ino)

    def _read_replied(self, ino: int) -> None:
        # From run_sync_soon: must not raise.
        n = self._reads.pop(ino, 1) - 1
        if n > 0:
            self._reads[ino] = n

    @_handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        f = self._file(fh)
        return await self.cm.write(f.handle, off, buf, f.cred)

    @_handler
    async def flush(self, fh: int) -> None:
        f = self._file(fh)
        await self.cm.flush(f.handle, f.cred)

    @_handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        f = self._file(fh)
        await self.cm.fsync(f.handle, f.cred)

    @_handler
    async def release(self, fh: int) -> None:
        f = self._files.pop(fh, None)
        if f is None:
            return
        self._track_open(f.ino, -1)
        await self.cm.release(f.handle, f.cred)
        if not self._is_open(f.ino) and f.ino in self._silly:
            parent, silly, cred = self._silly.pop(f.ino)
            await self.cm.unlink(parent, silly, cred)

    # -- the rest ---------------------------------------------------------------

    # -- locks and fallocate (afsfuse.locks; needs the patched pyfuse3) ----------

    async def _drop_pages(self, v: Vnode, attr_only: bool) -> None:
        """Lock-to-unlock: the kernel's pages of ``v`` are from an old DV.
        From a worker thread, awaited (the requester is blocked in fcntl)."""
        if v.ino:
            try:
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, v.ino, attr_only)
            except OSError:
                pass  # the kernel no longer knows the inode: nothing cached

    @_handler
    async def getlk(self, fh: int, owner: int, lock: Any, ctx: pyfuse3.RequestContext) -> Any:
        f = self._file(fh)
        res = await self.locks.getlk(f.handle.vnode, owner, flock=False, type_=lock.type,
                                     start=lock.start, length=lock.length, cred=f.cred)  # fmt: skip
        return pyfuse3.FileLock(*res)

    @_handler
    async def setlk(
        self, fh: int, owner: int, lock: Any, sleep: bool, ctx: pyfuse3.RequestContext
    ) -> None:
        f = self._file(fh)
        await self.locks.setlk(f.handle.vnode, owner, flock=False, type_=lock.type,
                               start=lock.start, length=lock.length, pid=lock.pid,
                               sleep=sleep, cred=f.cred)  # fmt: skip

    @_handler
    async def flock(self, fh: int, owner: int, op: int, ctx: pyfuse3.RequestContext) -> None:
        f = self._file(fh)
        type_, sleep = flock_type(op)
        await self.locks.setlk(f.handle.vnode, owner, flock=True, type_=type_, pid=ctx.pid,
                               sleep=sleep, cred=f.cred)  # fmt: skip

    async def release_locks(self, fh: int, owner: int, flock: bool) -> None:
        """Called inside pyfuse3's flush/release: must never raise."""
        f = self._files.get(fh)
        if f is None:
            return
        try:
            await self.locks.release_owner(f.handle.vnode, owner, flock=flock)
        except Exception:
            log.exception("dropping locks of owner %#x at close failed", owner)

    @_handler
    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        f = self._file(fh)
        await fallocate(self.cm, f.handle, mode, offset, length, f.cred)

    @_handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        info = await self.cm.statfs(self._vnode(ROOT_INODE), cred_of(ctx))
        space = VolumeSpace.from_status(info)  # afsfuse/statfs.py says why these figures
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = space.bsize
        s.f_blocks, s.f_bfree, s.f_bavail = space.blocks, space.bfree, space.bavail
        s.f_files, s.f_ffree, s.f_favail = space.files, space.ffree, space.ffree
        s.f_namemax = MAX_NAME
        return s

    def forget(self, inode_list: list[tuple[int, int]]) -> None:
        # P1: forgetting never talks to the server; and forget must not raise.
        for ino, n in inode_list:
            try:
                entry = self.inodes.find_ino(ino)
                if self.inodes.forget(ino, n):
                    self.notifier.forgot(ino)
                    if entry is not None:
                        entry.node.ino = 0
                        self.cm.kernel_forgot(entry.node)
            except Exception:
                log.exception("forget(%d, %d) failed", ino, n)

    @_handler
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        # The kernel checks mode bits itself (default_permissions); this only
        # confirms the file still exists on the server.
        await self.cm.getattr(self._vnode(inode), cred_of(ctx))
        return True

    # -- extended attributes: the fs commands' channel ---------------------------

    @_handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if name.startswith(USER_XATTR_PREFIX):
            return await self.cm.xattrs.get(self._vnode(inode), name, cred_of(ctx))
        if not name.startswith(XATTR_PREFIX):
            # Like the kernel AFS client: no handler for other namespaces.
            # EOPNOTSUPP, not ENODATA, is what lets `ls -l` remember per
            # device that there are no SELinux labels or POSIX ACLs here
            # instead of asking twice for every file it lists.
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        v = self._vnode(inode)
        fid = v.fid
        if name == b"afs.fid":  # as the Linux kernel AFS client formats it
            return f"{fid.volume:x}:{fid.vnode:x}:{fid.unique:x}".encode()
        if name == b"afs.cell":
            return v.volume.cell.encode()
        if name == b"afs.volume":
            return v.volume.name.encode()
        if name == b"afs.pid":
            return str(os.getpid()).encode()
        info = await self._info(name, inode, v, ctx)
        if info is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return json.dumps(info, sort_keys=True, default=str).encode()

    async def _info(self, name: bytes, ino: int, v: Vnode, ctx: Any) -> Any:
        if name == b"afs.examine":
            await self.cm.getattr(v, cred_of(ctx))
            info = self.cm.examine(v)
            info["inode"] = ino
            return info
        if name == b"afs.stats":
            return {**self.cm.stats_dict(), "kernel_requests": dict(self.requests),
                    "kernel_request_ms": as_ms(self.request_seconds), "gc": gc_stats(),
                    "kernel_notify": {**self.notifier.stats,
                                      "entries_expire": self.entry_inval.expiring},
                    "locks": {**self.locks.stats, "files": self.locks.listing()}}  # fmt: skip
        if name == b"afs.whereis":
            return {
                "fid": str(v.fid),
                "cell": v.volume.cell,
                "volume": v.volume.name,
                "servers": [
                    {"uuid": r.uuid, "addrs": [list(a) for a in getattr(r, "addrs", [])]}
                    for r in v.volume.servers
                ],
            }
        if name == b"afs.checkservers":
            return await self._probe_servers()
        if name == b"afs.lsmount":
            if v.fid != v.volume.root_fid or v.volume.key not in self._mount_parent:
                raise pyfuse3.FUSEError(errno.EINVAL)  # not a mount point
            return {"cell": v.volume.cell, "volume": v.volume.name, "id": v.volume.volume_id}
        return None

    async def _probe_servers(self) -> dict[str, Any]:
        """``fs checkservers``: one round trip to every server this mount uses."""
        out: dict[str, Any] = {}
        for rec in list(self.cm.servers.values()):
            info: dict[str, Any] = {"addrs": [list(a) for a in rec.addrs]}
            t0 = trio.current_time()
            try:
                with trio.fail_after(PROBE_TIMEOUT):
                    await rec.call(FS_GET_CAPABILITIES)
            except (RpcError, OSError, trio.TooSlowError) as exc:
                info.update(up=False, error=str(exc) or type(exc).__name__)
            else:
                info.update(up=True, rtt_ms=round((trio.current_time() - t0) * 1000, 2))
            out[rec.uuid] = info
        return out

    @_handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        v = self._vnode(inode)
        return [*XATTRS, *await self.cm.xattrs.list(v, cred_of(ctx))]

    @_handler
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        v = self._vnode(inode)
        if name.startswith(USER_XATTR_PREFIX):
            # XATTR_CREATE / XATTR_REPLACE were checked by pyfuse3 (through getxattr).
            await self.cm.xattrs.set(v, name, value, cred_of(ctx))
        elif name == b"afs.flush":
            self.cm.flush_vnode(v)
        elif name == b"afs.flushvolume":
            self.cm.flush_volume(v.volume)
        elif name == b"afs.mkmount":
            await self._mkmount(inode, v, value, cred_of(ctx))
        else:
            raise pyfuse3.FUSEError(errno.ENOTSUP)

    async def _mkmount(self, inode: int, d: Vnode, value: bytes, cred: Any) -> None:
        name, _, spec = value.partition(b"\0")
        if not name or not spec:
            raise pyfuse3.FUSEError(errno.EINVAL)
        target = b"%" + spec + b"." if b":" in spec else b"#" + spec + b"."
        m = await self.cm.symlink(d, name, target, cred)
        self._names_changed(d, name)
        await self.cm.setattr(m, cred, mode=MOUNTPOINT_MODE)

    @_handler
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if not name.startswith(USER_XATTR_PREFIX):
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        await self.cm.xattrs.remove(self._vnode(inode), name, cred_of(ctx))


async def drain_invalidations(ops: AfsOperations) -> None:
    """The worker that tells the kernel about breaks (see kernel_notify)."""
    await ops.notifier.run(ops.cm.invalidations)


__all__ = ["AfsOperations", "drain_invalidations"]

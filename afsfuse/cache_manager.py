"""The cache manager: the object the FUSE adapter drives.

Construct and run::

    cfg = CacheConfig(cells=CellDB.single("fs.example.org:7000"),
                      cache_dir="/var/cache/afsfuse")
    async with CacheManager(cfg) as cm:          # or: await cm.start() ... await cm.close()
        root = await cm.mount_volume(None, "root.cell")   # None: the default cell
        ...

``start()``/``close()`` must run in the same task (they open and close the
manager's nursery); ``async with`` does that for you.  ``close()`` stores
unstored writes (best effort) and destroys every server record, each sending
``FS.GiveUpAllCallBacks`` once (P2).

``CacheConfig`` holds: ``cells`` (``CellDB.load(path)`` or
``CellDB.single(addr)``), ``cache_dir`` (client UUID in ``client-uuid``, data
chunks under ``data/``), ``cache_bytes``, ``chunk_size``,
``idle_record_lifetime``, ``rpc_timeout``, ``connect_timeout``,
``readahead_chunks``, ``invalidation_queue_size``, ``reconnect_backoff_max``,
``connector`` (tests pass one over memory streams), ``key`` (the cell key
that authenticates servers; a cell's ``key_file`` in the cells file is used
when it is None) and ``keepalive_interval``.  VL lookups are made without
authentication (AFS VL data is public; a lying VL server can only point at
servers that then fail the key handshake).

Operations (``async`` unless marked sync; ``cred`` is ``(uid, gid, gids)`` or
None for the machine).  Only two kinds of exception leave them:
``protocol.RpcError`` (``.errno`` is the POSIX errno; ``ConnectionLost`` is
ENOTCONN, ``RpcTimeout`` ETIMEDOUT, a vnode deleted on the server ESTALE, a
malformed reply EIO) and, from the local disk cache, ``OSError``.  Read-only
calls lost with a dropped connection are retried once after the reconnect::

    mount_volume(cell: str | None, volume: str, cred=None, *, crossing=False) -> Vnode  # root
    unmount_volume(vol: VolumeInstance) -> None
    find_vnode(cell: str, fid: Fid) -> Vnode | None        # never creates (sync)
    forget(vnode) -> None                                   # P1: sends nothing (sync)
    kernel_forgot(vnode) -> None     # the kernel dropped it; it stays cached (sync)
    getattr(vnode, cred) -> FileStatus                      # validated; size incl. unstored writes
    lookup(dir, name: bytes, cred) -> Vnode
    dir_token(dir) / negative_holds(dir, token) -> bool   # may the kernel cache an ENOENT (sync)
    readdir(dir, cred) -> list[DirEntryPlus]      # sorted by name; .name .vnode .status
    open(vnode, cred, flags=0) -> OpenFile        # .keep_cache for FileInfo; O_TRUNC done here
    read(vnode_or_handle, offset, size, cred) -> bytes
    write(vnode_or_handle, offset, data, cred) -> int       # local dirty chunks
    flush(handle, cred) -> None     # stores at the last open (or last writable) handle
    fsync(handle, cred) -> None     # stores now
    release(handle, cred=None) -> None   # last close stores what is still dirty
    create(dir, name, mode, cred) -> Vnode       mkdir(dir, name, mode, cred) -> Vnode
    symlink(dir, name, target: bytes, cred) -> Vnode        readlink(vnode, cred) -> bytes
    link(vnode, dir, name, cred) -> Vnode
    unlink(dir, name, cred) -> None              rmdir(dir, name, cred) -> None
    rename(old_dir, old_name, new_dir, new_name, flags, cred) -> None   # flags 1 = NOREPLACE
    setattr(vnode, cred, *, mode=None, uid=None, gid=None, size=None, mtime_ns=None) -> FileStatus
    statfs(vnode, cred) -> dict                  # FS.GetVolumeStatus result
    relocate_volume(vol, *, force=False) -> bool  # VL says it moved: re-attach, volume break
    examine(vnode) -> dict                        # fid, volume, DV, promise, counters
    flush_vnode(vnode) / flush_volume(vol)        # `fs flush`, `fs flushvolume` (sync)
    stats_dict() -> dict                          # counters for `fs stats`

A ``Vnode`` exposes ``fid``, ``volume`` (``.key`` = (cell, volume id)),
``status`` and ``ino`` (free for the adapter).  ``cm.uuid`` is the client's
persistent UUID.

Layout (after the kernel AFS client's file map): ``config`` (CacheConfig,
client UUID), ``vl_client`` (VL queries on kept connections),
``server_registry`` (server records, idle reaper), ``mounting`` (volumes,
relocation), ``namespace`` (dir.c), ``inode`` (attributes), ``file`` /
``read`` / ``write`` (the data path), ``validation`` and ``cb_service``
(callback rules).  This module only wires them; each gets the narrow
``CacheContext`` (counters, invalidation queue, data cache), never the
manager.

Kernel invalidations: ``cm.invalidations`` is an ``InvalidationQueue`` of
``afsfuse.invalidation.Invalidate`` events (kinds ``inode``, ``entry``,
``volume``, ``server``, ``all``).  The adapter drains it from a worker task
(``async for ev in cm.invalidations``) and maps ``ev.vnode``/``ev.parent``
to inode numbers itself; the queue never blocks a CB reply.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

from afsfuse.cb_service import CallbackService
from afsfuse.config import CacheConfig, load_client_uuid
from afsfuse.context import CacheContext
from afsfuse.datacache import DataCache
from afsfuse.file import Files, OpenFile
from afsfuse.inode import Attributes
from afsfuse.invalidation import Invalidate, InvalidationQueue
from afsfuse.mounting import VolumeMounts
from afsfuse.namespace import (
    RENAME_NOREPLACE,
    DirEntryPlus,
    Namespace,
    negative_holds,
    negative_token,
)
from afsfuse.read import Reader
from afsfuse.rpc import Cred, maps_errors
from afsfuse.rpc import call as rpc_call
from afsfuse.server_record import ServerRecord
from afsfuse.server_registry import ServerRegistry
from afsfuse.stats import Stats
from afsfuse.validation import CallSnapshot, volume_break
from afsfuse.vl_client import VLClient
from afsfuse.vnode import Vnode
from afsfuse.volume import VolumeInstance
from afsfuse.write import Writer
from afsfuse.xattr import Xattrs
from protocol.records import Fid, FileStatus, FileType

log = logging.getLogger(__name__)


class CacheManager:
    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        self.cells = config.cells
        self.cache_dir = Path(config.cache_dir)
        self.uuid = load_client_uuid(self.cache_dir / "client-uuid")
        self.ctx = CacheContext.new(config.invalidation_queue_size)
        self.ctx.chunk_threads = config.chunk_threads
        self.cb = CallbackService(self.ctx, self.uuid)
        self.registry = ServerRegistry(config, self.ctx, self.uuid, self.cb, self._spawn)
        self.vl = VLClient(
            config.connector,
            self.ctx.stats,
            connect_timeout=config.connect_timeout,
            rpc_timeout=config.rpc_timeout,
            cell_connector=config.connector_for,
        )
        self.reader = Reader(self.ctx, config.readahead_chunks, self._spawn)
        self.writer = Writer(self.ctx, self.reader)
        self.files = Files(self.ctx, self.writer)
        self.attributes = Attributes(self.ctx, self.writer)
        self.namespace = Namespace(self.ctx, self._spawn, config.dir_ahead)
        self.xattrs = Xattrs(self.ctx)  # user.* extended attributes
        self.mounts = VolumeMounts(
            self.ctx, self.cells, self.vl, self.registry, self.writer.on_new_vnode
        )
        self.ctx.relocate = self.mounts.relocate
        self._stack: AsyncExitStack | None = None
        self._nursery: trio.Nursery | None = None
        self._closed = False

    # What the adapter, tests and scripts reach directly.
    @property
    def stats(self) -> Stats:
        return self.ctx.stats

    @property
    def invalidations(self) -> InvalidationQueue:
        return self.ctx.invalidations

    @property
    def datacache(self) -> DataCache:
        return self.ctx.datacache

    @property
    def servers(self) -> dict[str, ServerRecord]:
        return self.registry.servers

    @property
    def volumes(self) -> dict[tuple[str, int], VolumeInstance]:
        return self.mounts.volumes

    # -- lifetime -------------------------------------------------------------

    async def start(self) -> CacheManager:
        if self._nursery is not None:
            return self
        self.ctx.datacache = DataCache(
            self.cache_dir / "data",
            self.config.cache_bytes,
            self.config.chunk_size,
            mem_bytes=self.config.cache_mem_bytes,
        )
        self._stack = AsyncExitStack()
        self._nursery = await self._stack.enter_async_context(trio.open_nursery())
        self.vl.start(self._nursery)
        self._nursery.start_soon(self.registry.reaper)
        self._nursery.start_soon(self.mounts.expire_unused, self.config.idle_record_lifetime)
        return self

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            for vol in list(self.volumes.values()):
                for v in list(vol.vnodes.values()):
                    if self.writer.dirty(v):
                        with trio.move_on_after(self.config.rpc_timeout):
                            try:
                                await self.writer.store(v, None)
                            except Exception as exc:  # unmount goes on regardless
                                log.warning("close: could not store %s: %r", v.fid, exc)
            await self.registry.destroy_all()
            await self.vl.aclose()
        self.invalidations.close()
        if self._nursery is not None and self._stack is not None:
            self._nursery.cancel_scope.cancel()
            await self._stack.aclose()
        if self.datacache is not None:
            self.datacache.close()

    async def __aenter__(self) -> CacheManager:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._nursery is None:
            raise RuntimeError("CacheManager.start() was not called")
        self._nursery.start_soon(fn, *args)

    def _on_mass_break(self, rec: ServerRecord, why: str) -> None:
        self.registry.on_mass_break(rec, why)

    async def rpc(
        self, server: ServerRecord, method: str, *params: Any, snap: CallSnapshot | None = None
    ) -> Any:
        """One call on ``server``'s connection (see ``afsfuse.rpc.call``)."""
        return await rpc_call(server, method, *params, snap=snap)

    # -- volumes ----------------------------------------------------------------

    @maps_errors
    async def mount_volume(
        self, cell: str | None, volume: str, cred: Cred = None, *, crossing: bool = False
    ) -> Vnode:
        return await self.mounts.mount(cell, volume, cred, crossing=crossing)

    async def relocate_volume(self, vol: VolumeInstance, *, force: bool = False) -> bool:
        return await self.mounts.relocate(vol, force=force)

    def unmount_volume(self, vol: VolumeInstance) -> None:
        self.mounts.unmount(vol)

    def find_vnode(self, cell: str, fid: Fid) -> Vnode | None:
        return self.mounts.find_vnode(cell, fid)

    def forget(self, vnode: Vnode) -> None:
        """The kernel forgot ``vnode``: drop it locally.  P1: nothing is sent;
        the promise is not given back (it expires or is broken on the server)."""
        vnode.volume.forget(vnode)
        self.mounts.forgot(vnode)

    def kernel_forgot(self, vnode: Vnode) -> None:
        """The kernel dropped its inode (memory reclaim, an invalidated entry):
        the vnode stays cached, status, promise, listing and chunks, until the
        volume evicts vnodes nobody holds.  Breaks still find it (P3), so the
        next lookup of it costs no RPC.  P1: nothing is sent."""
        self.stats.kernel_forgets += 1

    # -- attributes -----------------------------------------------------------------

    @maps_errors
    async def getattr(self, vnode: Vnode, cred: Cred = None) -> FileStatus:
        return await self.attributes.getattr(vnode, cred)

    @maps_errors
    async def setattr(
        self, vnode: Vnode, cred: Cred = None, *, mode: int | None = None,
        uid: int | None = None, gid: int | None = None, size: int | None = None,
        mtime_ns: int | None = None,
    ) -> FileStatus:  # fmt: skip
        return await self.attributes.setattr(
            vnode, cred, mode=mode, uid=uid, gid=gid, size=size, mtime_ns=mtime_ns
        )

    @maps_errors
    async def statfs(self, vnode: Vnode, cred: Cred = None) -> dict[str, Any]:
        return await self.attributes.statfs(vnode, cred)

    # -- names ------------------------------------------------------------------------

    @maps_errors
    async def lookup(self, dir: Vnode, name: bytes, cred: Cred = None) -> Vnode:
        return await self.namespace.lookup(dir, name, cred)

    @staticmethod
    def dir_token(dir: Vnode) -> tuple[Any, ...]:
        """The break counters ``dir`` answers under, taken before a lookup."""
        return negative_token(dir)

    @staticmethod
    def negative_holds(dir: Vnode, token: tuple[Any, ...]) -> bool:
        """Whether an ENOENT from a lookup that started at ``token`` may be
        cached by the kernel: the directory's promise holds and nothing broke
        it since (a later break drops the kernel's entry, see kernel_notify)."""
        return negative_holds(dir, token)

    @maps_errors
    async def readdir(self, dir: Vnode, cred: Cred = None) -> list[DirEntryPlus]:
        return await self.namespace.readdir(dir, cred)

    @maps_errors
    async def create(self, dir: Vnode, name: bytes, mode: int, cred: Cred = None) -> Vnode:
        return await self.namespace.create(dir, name, mode, cred)

    @maps_errors
    async def mkdir(self, dir: Vnode, name: bytes, mode: int, cred: Cred = None) -> Vnode:
        return await self.namespace.mkdir(dir, name, mode, cred)

    @maps_errors
    async def symlink(self, dir: Vnode, name: bytes, target: bytes, cred: Cred = None) -> Vnode:
        return await self.namespace.symlink(dir, name, target, cred)

    @maps_errors
    async def mknod(self, dir: Vnode, name: bytes, ftype: FileType, mode: int, rdev: int,
                    cred: Cred = None) -> Vnode:  # fmt: skip
        return await self.namespace.mknod(dir, name, ftype, mode, rdev, cred)

    @maps_errors
    async def readlink(self, vnode: Vnode, cred: Cred = None) -> bytes:
        return await self.namespace.readlink(vnode, cred)

    @maps_errors
    async def link(self, vnode: Vnode, dir: Vnode, name: bytes, cred: Cred = None) -> Vnode:
        return await self.namespace.link(vnode, dir, name, cred)

    @maps_errors
    async def unlink(self, dir: Vnode, name: bytes, cred: Cred = None) -> None:
        await self.namespace.unlink(dir, name, cred)

    @maps_errors
    async def rmdir(self, dir: Vnode, name: bytes, cred: Cred = None) -> None:
        await self.namespace.rmdir(dir, name, cred)

    @maps_errors
    async def rename(
        self, old_dir: Vnode, old_name: bytes, new_dir: Vnode, new_name: bytes,
        flags: int = 0, cred: Cred = None,
    ) -> None:  # fmt: skip
        await self.namespace.rename(old_dir, old_name, new_dir, new_name, flags, cred)

    # -- data ---------------------------------------------------------------------------

    @maps_errors
    async def open(self, vnode: Vnode, cred: Cred = None, flags: int = 0) -> OpenFile:
        return await self.files.open(vnode, cred, flags)

    @maps_errors
    async def read(self, target: Vnode | OpenFile, offset: int, size: int,
                   cred: Cred = None) -> bytes:  # fmt: skip
        return await self.reader.read(target, offset, size, cred)

    @maps_errors
    async def write(self, target: Vnode | OpenFile, offset: int, data: bytes,
                    cred: Cred = None) -> int:  # fmt: skip
        return await self.writer.write(target, offset, data, cred)

    @maps_errors
    async def flush(self, handle: OpenFile, cred: Cred = None) -> None:
        await self.files.flush(handle, cred)

    @maps_errors
    async def fsync(self, handle: OpenFile | Vnode, cred: Cred = None) -> None:
        await self.files.fsync(handle, cred)

    async def release(self, handle: OpenFile, cred: Cred = None) -> None:
        """The last reference to an open went away; never raises."""
        await self.files.release(handle, cred)

    # -- admin ----------------------------------------------------------------------

    def examine(self, vnode: Vnode) -> dict[str, Any]:
        info = vnode.examine(trio.current_time())
        p = vnode.promise
        rec = p.server if p is not None else (
            vnode.volume.servers[0] if vnode.volume.servers else None
        )  # fmt: skip
        info["server"] = rec.uuid if rec is not None else None
        dv, size = vnode.data_version, vnode.size()
        if dv is not None and size:
            cs = self.datacache.chunk_size
            total = (size + cs - 1) // cs
            info["cached_chunks"] = total - len(
                self.datacache.missing(vnode.fid, dv, 0, size, size)
            )
        info["dirty_chunks"] = len(self.datacache.dirty_chunks(vnode.fid))
        return info

    def flush_vnode(self, vnode: Vnode) -> None:
        """``fs flush``: forget status trust and clean cached data of one vnode."""
        vnode.promise = None
        vnode.listing = None
        vnode.symlink = None
        self.datacache.drop(vnode.fid, keep_dirty=True)
        self.invalidations.put(Invalidate("inode", vnode=vnode))

    def flush_volume(self, vol: VolumeInstance) -> None:
        """``fs flushvolume``: one ``cb_v_break`` increment, then clean data goes."""
        volume_break(self.ctx, vol, "flush")
        for v in list(vol.vnodes.values()):
            v.listing = None
            self.datacache.drop(v.fid, keep_dirty=True)

    def stats_dict(self) -> dict[str, Any]:
        out = self.stats.as_dict()
        out["datacache"] = self.datacache.stats() if self.datacache is not None else {}
        out["servers"] = self.registry.as_dict()
        out["volumes"] = self.mounts.as_dict()
        return out


__all__ = [
    "RENAME_NOREPLACE",
    "CacheConfig",
    "CacheManager",
    "DirEntryPlus",
    "OpenFile",
    "errno",
    "load_client_uuid",
]

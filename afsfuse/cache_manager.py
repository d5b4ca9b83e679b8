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

    mount_volume(cell: str | None, volume: str, cred=None) -> Vnode   # the root
    unmount_volume(vol: VolumeInstance) -> None
    find_vnode(cell: str, fid: Fid) -> Vnode | None        # never creates (sync)
    forget(vnode) -> None                                   # P1: sends nothing (sync)
    getattr(vnode, cred) -> FileStatus                      # validated; size incl. unstored writes
    lookup(dir, name: bytes, cred) -> Vnode
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
    relocate_volume(vol) -> bool                 # VL says it moved: re-attach, volume break
    examine(vnode) -> dict                        # fid, volume, DV, promise, counters
    flush_vnode(vnode) / flush_volume(vol)        # `fs flush`, `fs flushvolume` (sync)
    stats_dict() -> dict                          # counters for `fs stats`

A ``Vnode`` exposes ``fid``, ``volume`` (``.key`` = (cell, volume id)),
``status`` and ``ino`` (free for the adapter).  ``cm.uuid`` is the client's
persistent UUID.

Kernel invalidations: ``cm.invalidations`` is an ``InvalidationQueue`` of
``afsfuse.invalidation.Invalidate`` events (kinds ``inode``, ``entry``,
``volume``, ``server``, ``all``).  The adapter drains it from a worker task
(``async for ev in cm.invalidations``) and maps ``ev.vnode``/``ev.parent``
to inode numbers itself; the queue never blocks a CB reply.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import uuid as uuidlib
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from afsfuse.cb_service import CallbackService
from afsfuse.cells import Address, Cell, CellDB
from afsfuse.datacache import DataCache
from afsfuse.dircache import DirListing, own_change_applies
from afsfuse.invalidation import Invalidate, InvalidationQueue
from afsfuse.server_record import Connector, NoConnection, ServerRecord, tcp_connector
from afsfuse.stats import Stats, log_event
from afsfuse.validation import (
    CallSnapshot,
    apply_reply,
    mark_deleted,
    note_volsync,
    validate,
    volume_break,
)
from afsfuse.vnode import Vnode
from afsfuse.volume import VolumeInstance
from protocol import methods as M
from protocol.auth import load_key
from protocol.connection import Connection, ConnectionLost, RpcTimeout
from protocol.errors import MOVED, RpcError
from protocol.limits import MAX_BULKSTAT_FIDS, MAX_IO, MAX_READDIR_ENTRIES, MAX_SYMLINK
from protocol.names import check_name
from protocol.records import Fid, FileStatus, FileType

log = logging.getLogger(__name__)

Cred = tuple[int, int, Sequence[int]] | None

O_TRUNC = os.O_TRUNC
#: Calls that change nothing: safe to send again after a reconnect.
_RETRYABLE = frozenset(
    {
        M.FS_FETCH_STATUS,
        M.FS_FETCH_DATA,
        M.FS_LOOKUP,
        M.FS_READ_DIR,
        M.FS_INLINE_BULK_STATUS,
        M.FS_GET_VOLUME_STATUS,
    }
)
RENAME_NOREPLACE = 1
_MAX_NAMES = 4096  # lookup results cached per directory (per DV)
_READDIR_TRIES = 3  # listings refetched when a child vanished under them
_RELOCATE_INTERVAL = 10.0  # seconds between VL checks of one volume


@dataclass
class CacheConfig:
    cells: CellDB
    cache_dir: str | Path
    cache_bytes: int = 1 << 30
    chunk_size: int = 256 * 1024
    idle_record_lifetime: float = 600.0  # a record with no interests lives this long
    rpc_timeout: float = 30.0
    connect_timeout: float = 10.0
    readahead_chunks: int = 4
    invalidation_queue_size: int = 4096
    reconnect_backoff_max: float = 10.0
    connector: Connector = field(default=tcp_connector)
    #: The cell key for every cell without its own ``key_file`` (SPEC section 4).
    #: None with no cell key file: no handshake (only fake in-memory servers
    #: accept that; the daemon refuses to start without a key).
    key: bytes | None = None
    #: Seconds between keepalives on an idle server connection (None: a third
    #: of the idle timeout the server announces at Hello).
    keepalive_interval: float | None = None

    def key_for(self, cell: str) -> bytes | None:
        """The key that authenticates the servers of ``cell``."""
        try:
            c = self.cells.get(cell)
        except KeyError:
            return self.key
        if c.key_file is not None and self.key is None:
            return load_key(c.key_file)
        return self.key

    @classmethod
    def for_server(cls, server: str | Address, cache_dir: str | Path, **kw: Any) -> CacheConfig:
        """The no-cells-file default: one cell served by ``server``."""
        return cls(cells=CellDB.single(server), cache_dir=cache_dir, **kw)


@dataclass(frozen=True, slots=True)
class DirEntryPlus:
    name: bytes
    vnode: Vnode
    status: FileStatus


class OpenFile:
    """One open of a file: counts opens (and writable opens) so the right
    close stores."""

    __slots__ = ("closed", "flags", "keep_cache", "vnode", "writable", "wrote")

    def __init__(self, vnode: Vnode, flags: int, keep_cache: bool) -> None:
        self.vnode = vnode
        self.flags = flags
        self.keep_cache = keep_cache  # FileInfo.keep_cache: False when the DV moved
        self.writable = bool(flags & (os.O_WRONLY | os.O_RDWR))
        self.wrote = False
        self.closed = False


_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])


def _maps_errors(fn: _F) -> _F:
    """Only ``RpcError``/``OSError`` leave an operation: a malformed reply (or a
    bug) becomes EIO instead of an exception that would end the FUSE daemon."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except (RpcError, OSError):
            raise
        except ExceptionGroup as eg:
            inner = eg.exceptions[0] if len(eg.exceptions) == 1 else None
            if isinstance(inner, RpcError | OSError):
                raise inner from eg
            log.warning("%s failed: %r", fn.__name__, eg, exc_info=True)
            raise RpcError("EIO", f"{fn.__name__}: internal error") from eg
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            log.warning("%s failed: %r", fn.__name__, exc, exc_info=True)
            raise RpcError("EIO", f"{fn.__name__}: malformed reply or internal error") from exc

    return wrapper  # type: ignore[return-value]


def _wire_cred(cred: Any) -> Any:
    if cred is None:
        return None
    uid, gid, gids = cred
    return [int(uid), int(gid), [int(g) for g in gids]]


def _err(code: str, msg: str = "") -> RpcError:
    return RpcError(code, msg)


def load_client_uuid(path: Path) -> str:
    """The client's persistent UUID (CB.ProbeUuid answers with it)."""
    try:
        text = path.read_text().strip()
        return str(uuidlib.UUID(text))
    except (OSError, ValueError):
        pass
    value = str(uuidlib.uuid4())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(value + "\n")
    os.replace(tmp, path)
    return value


class CacheManager:
    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        self.cells = config.cells
        self.cache_dir = Path(config.cache_dir)
        self.uuid = load_client_uuid(self.cache_dir / "client-uuid")
        self.stats = Stats()
        self.invalidations = InvalidationQueue(config.invalidation_queue_size, self.stats)
        self.cb = CallbackService(self)
        self.servers: dict[str, ServerRecord] = {}
        self.volumes: dict[tuple[str, int], VolumeInstance] = {}
        self.datacache: DataCache = None  # type: ignore[assignment]  # set by start()
        self._stack: AsyncExitStack | None = None
        self._nursery: trio.Nursery | None = None
        self._closed = False
        self._written: set[Fid] = set()  # fids written locally in this run
        self._by_name: dict[tuple[str, str], VolumeInstance] = {}  # (cell, name) mounted

    # -- lifetime -------------------------------------------------------------

    async def start(self) -> CacheManager:
        if self._nursery is not None:
            return self
        self.datacache = DataCache(
            self.cache_dir / "data", self.config.cache_bytes, self.config.chunk_size
        )
        self._stack = AsyncExitStack()
        self._nursery = await self._stack.enter_async_context(trio.open_nursery())
        self._nursery.start_soon(self._reaper)
        return self

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            for vol in list(self.volumes.values()):
                for v in list(vol.vnodes.values()):
                    if self._dirty(v):
                        with trio.move_on_after(self.config.rpc_timeout):
                            try:
                                await self._store(v, None)
                            except Exception as exc:  # unmount goes on regardless
                                log.warning("close: could not store %s: %r", v.fid, exc)
            for rec in list(self.servers.values()):
                await rec.destroy()
            self.servers.clear()
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

    # -- server records (P2) --------------------------------------------------

    def _record(self, uuid: str, addrs: list[Address], cell: str) -> ServerRecord:
        rec = self.servers.get(uuid)
        if rec is not None and not rec.destroyed:
            for a in addrs:
                if a not in rec.addrs:
                    rec.addrs.append(a)
            return rec
        rec = ServerRecord(
            uuid,
            addrs,
            client_uuid=self.uuid,
            connector=self.config.connector,
            handlers=self.cb.handlers,
            stats=self.stats,
            rpc_timeout=self.config.rpc_timeout,
            connect_timeout=self.config.connect_timeout,
            backoff_max=self.config.reconnect_backoff_max,
            on_mass_break=self._on_mass_break,
            key=self.config.key_for(cell),
            keepalive_interval=self.config.keepalive_interval,
        )
        self.servers[uuid] = rec
        self._spawn(rec.run)
        return rec

    def _new_vnode(self, v: Vnode) -> None:
        """Dirty chunks of a fid nobody wrote in this run are left over from a
        run that ended before storing them.  No close() ever succeeded for
        them, and the file may have changed on the server since: they are
        dropped, never stored behind the server's back."""
        if v.fid in self._written:
            return
        left = self.datacache.dirty_chunks(v.fid)
        if left:
            self.datacache.drop(v.fid, keep_dirty=False)
            log.warning("%s: discarded %d unstored chunks from a previous run", v.fid, len(left))
            log_event("stale_dirty_dropped", fid=v.fid, chunks=len(left))

    def _on_mass_break(self, rec: ServerRecord, why: str) -> None:
        self.invalidations.put(CallbackService.server_invalidation(rec))

    async def _reaper(self) -> None:
        """Destroy records idle (no interests) past the lifetime: only then is
        GiveUpAllCallBacks sent (P2)."""
        lifetime = self.config.idle_record_lifetime
        interval = max(min(lifetime / 4, 30.0), 0.01)
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            for rec in list(self.servers.values()):
                idle = not rec.interests and rec.idle_since is not None
                if idle and rec.idle_for(now) >= lifetime:
                    if self.servers.get(rec.uuid) is rec:
                        del self.servers[rec.uuid]
                    await rec.destroy()

    async def rpc(
        self, server: ServerRecord, method: str, *params: Any, snap: CallSnapshot | None = None
    ) -> Any:
        """One call on ``server``'s connection (counted per method).

        ``snap`` is re-taken at the moment the call is issued, after any wait
        for a (re)connection, whose Hello may itself bring breaks.  A server
        answering "moved" (EREMCHG: it did not run the call) sends us to VL
        and the call to the volume's new server."""
        retries = 1 if method in _RETRYABLE else 0
        follows = 2  # "moved" answers followed (the call did not run there)
        while True:
            try:
                return await server.call(method, *params, on_issue=snap.retake if snap else None)
            except NoConnection:
                raise
            except ConnectionLost:
                # A read-only call lost to a dropped connection is sent again
                # once the record has reconnected (bounded by connect_timeout);
                # its snapshot is re-taken then, so breaks delivered at the
                # reconnect still void the promise it returns.
                if retries <= 0 or server.destroyed:
                    raise
                retries -= 1
                log.info("%s: connection lost, retrying after reconnect", method)
            except RpcError as exc:
                if exc.code != MOVED or follows <= 0:
                    raise
                follows -= 1
                moved_to = await self._follow_move(server, params, snap)
                if moved_to is None:
                    raise
                server = moved_to
            except OSError as exc:
                raise ConnectionLost(f"{method}: {exc!r}") from exc

    # -- volume location ----------------------------------------------------

    async def _vl_call(self, cell: Cell, method: str, *params: Any) -> Any:
        last: BaseException | None = None
        for host, port in cell.vlservers:
            try:
                with trio.fail_after(self.config.connect_timeout):
                    stream = await self.config.connector(host, port)
            except (OSError, trio.TooSlowError) as exc:
                last = exc
                continue
            conn = Connection(
                stream, {}, name=f"vl-{host}:{port}", default_timeout=self.config.rpc_timeout
            )
            error: RpcError | None = None
            # Nothing is raised inside the nursery (it would come out wrapped
            # in an ExceptionGroup): the outcome is carried out of it.
            async with trio.open_nursery() as nursery:
                await nursery.start(conn.run)
                try:
                    self.stats.rpc[method] += 1
                    result = await conn.call(method, *params)
                except RpcError as exc:
                    error = exc
                finally:
                    with trio.CancelScope(shield=True):
                        await conn.aclose()
                    nursery.cancel_scope.cancel()
            if error is None:
                return result
            if not isinstance(error, ConnectionLost | RpcTimeout):
                raise error
            last = error
        raise ConnectionLost(f"no VL server of cell {cell.name} answered: {last!r}")

    def _volume_from_entry(self, cell: str, entry: dict[str, Any]) -> VolumeInstance:
        volume_id = int(entry["volume_id"])
        vol = self.volumes.get((cell, volume_id))
        if vol is None:
            vol = VolumeInstance(cell, volume_id, str(entry.get("name", volume_id)))
            vol.on_new_vnode = self._new_vnode
            vol.located_at = trio.current_time()
            self.volumes[vol.key] = vol
        servers = entry.get("servers") or []
        if not servers and not vol.servers:
            raise _err("ENXIO", f"volume {vol.name} has no servers")
        for s in servers:
            addrs = [(str(h), int(p)) for h, p in s["addrs"]]
            vol.attach(self._record(str(s["uuid"]), addrs, cell))  # registers interest (P3)
        return vol

    @_maps_errors
    async def mount_volume(
        self, cell: str | None, volume: str, cred: Cred = None, *, crossing: bool = False
    ) -> Vnode:
        """Find ``volume`` through the cell's VL servers; return its root vnode.

        A volume already mounted through this cell is not looked up again
        (mount points are crossed often).  Each call counts one mount, except
        a mount-point ``crossing``: that volume is in use while the kernel
        holds its root, and released when the kernel forgets it (``forget``),
        so its server record can go idle (P2)."""
        try:
            c = self.cells.get(cell)
        except KeyError:
            raise _err("ENOENT", f"unknown cell {cell!r}") from None
        vol = self._by_name.get((c.name, volume))
        if vol is None or self.volumes.get(vol.key) is not vol:
            if volume.isdigit():
                entry = await self._vl_call(c, M.VL_GET_ENTRY_BY_ID, int(volume))
            else:
                entry = await self._vl_call(c, M.VL_GET_ENTRY_BY_NAME, volume)
            vol = self._volume_from_entry(c.name, entry)
            self._by_name[(c.name, volume)] = vol
        if not crossing:
            vol.mounts += 1
        root = vol.get(vol.root_fid)
        try:
            await validate(self, root, _wire_cred(cred))
        except BaseException:
            if crossing:
                self._release_crossed(vol)
            else:
                self.unmount_volume(vol)
            raise
        log_event("volume_mounted", cell=c.name, volume=vol.name, id=vol.volume_id)
        return root

    async def relocate_volume(self, vol: VolumeInstance, *, force: bool = False) -> bool:
        """Ask VL where ``vol`` lives now; True if it moved (its instance now
        uses the new servers and every promise on it is void).  At most one
        VL query per volume per ``_RELOCATE_INTERVAL`` seconds, unless
        ``force`` (the server said the volume moved)."""
        now = trio.current_time()
        if now - vol.located_at < _RELOCATE_INTERVAL and not force:
            return False
        vol.located_at = now
        try:
            entry = await self._vl_call(
                self.cells.get(vol.cell), M.VL_GET_ENTRY_BY_ID, vol.volume_id
            )
            uuids = [str(s["uuid"]) for s in entry.get("servers") or []]
            if not uuids or uuids == [r.uuid for r in vol.servers]:
                return False
            records = [
                self._record(str(s["uuid"]), [(str(h), int(p)) for h, p in s["addrs"]], vol.cell)
                for s in entry["servers"]
            ]
        except (RpcError, KeyError, TypeError, ValueError) as exc:
            log.info("relocating %r failed: %r", vol, exc)
            return False
        vol.detach_all()
        for rec in records:
            vol.attach(rec)
        volume_break(self, vol, "moved")
        log_event("volume_moved", cell=vol.cell, volume=vol.volume_id, servers=",".join(uuids))
        return True

    async def _follow_move(
        self, server: ServerRecord, params: tuple[Any, ...], snap: CallSnapshot | None
    ) -> ServerRecord | None:
        """``server`` answered "moved" (EREMCHG) for the volume of a call: ask
        VL again (a whole-volume break, interests on the new record, P3) and
        return the record to send the call to, None if VL knows no better."""
        if snap is not None:
            vols = [snap.volume]
        else:
            vid = params[1] if len(params) > 1 and isinstance(params[1], int) else None
            fid = next((p for p in params if isinstance(p, Fid)), None)
            vid = fid.volume if fid is not None else vid
            vols = list(server.instances(vid)) if vid is not None else []
        for vol in vols:
            await self.relocate_volume(vol, force=True)
        if not vols or vols[0].server is server:
            return None
        if snap is not None:
            snap.server = vols[0].server  # the promise names the record it came from
        return vols[0].server

    def unmount_volume(self, vol: VolumeInstance) -> None:
        """Drop a mount of ``vol``; at the last, its interests go (sends nothing)."""
        vol.mounts -= 1
        if vol.mounts <= 0:
            vol.detach_all()
            if self.volumes.get(vol.key) is vol:
                del self.volumes[vol.key]

    # -- lookups without creating (P1, P3) ------------------------------------

    def find_vnode(self, cell: str, fid: Fid) -> Vnode | None:
        vol = self.volumes.get((cell, fid.volume))
        return vol.find(fid) if vol is not None else None

    def forget(self, vnode: Vnode) -> None:
        """The kernel forgot ``vnode``: drop it locally.  P1: nothing is sent;
        the promise is not given back (it expires or is broken on the server)."""
        vnode.volume.forget(vnode)
        if vnode.fid == vnode.volume.root_fid:
            # The kernel holds nothing below a root it forgot (dentries pin
            # their parents): a volume only crossed into is no longer used.
            self._release_crossed(vnode.volume)

    def _release_crossed(self, vol: VolumeInstance) -> None:
        """Drop a volume reached only through mount points, with its
        interests (sends nothing; an idle record is destroyed later, P2)."""
        if vol.mounts > 0 or vol.busy():
            return
        vol.detach_all()
        if self.volumes.get(vol.key) is vol:
            del self.volumes[vol.key]
        for k in [k for k, v in self._by_name.items() if v is vol]:
            del self._by_name[k]
        log_event("volume_released", cell=vol.cell, volume=vol.volume_id)

    # -- status -----------------------------------------------------------------

    @_maps_errors
    async def getattr(self, vnode: Vnode, cred: Cred = None) -> FileStatus:
        return await validate(self, vnode, _wire_cred(cred))

    async def _apply_locked(self, v: Vnode, status: Any, cb: Any, snap: CallSnapshot,
                            own_from_dv: int | None = None) -> None:  # fmt: skip
        async with v.lock.write():
            apply_reply(self, v, status, cb, snap, own_from_dv=own_from_dv)

    def _prime(self, v: Vnode, status: Any, cb: Any, snap: CallSnapshot) -> None:
        """Apply a bulk status if nobody holds the vnode's lock (a holder is
        fetching a fresher one; P6 forbids changing it under a reader)."""
        if v.lock.try_acquire_write():
            try:
                apply_reply(self, v, status, cb, snap)
            finally:
                v.lock.release_write()

    # -- directories ----------------------------------------------------------

    async def _dir_status(self, d: Vnode, cred: Any) -> FileStatus:
        st = await validate(self, d, cred)
        if st.type != FileType.DIRECTORY:
            raise _err("ENOTDIR")
        return st

    @_maps_errors
    async def lookup(self, dir: Vnode, name: bytes, cred: Cred = None) -> Vnode:
        check_name(name)
        wc = _wire_cred(cred)
        dst = await self._dir_status(dir, wc)
        listing = dir.listing
        if listing is not None and listing.dv == dst.data_version:
            ent = listing.lookup(name)
            if ent is None:
                raise _err("ENOENT")
            child = dir.volume.get(ent.fid)
            try:
                await validate(self, child, wc)
                return child
            except RpcError as exc:
                if exc.code != "ESTALE":
                    raise
        names = dir.names
        if names is not None and names[0] == dst.data_version and name in names[1]:
            fid = names[1][name]
            if fid is None:
                self.stats.cache_hits += 1
                raise _err("ENOENT")  # negative entry, valid while the DV holds
            child = dir.volume.get(fid)
            try:
                await validate(self, child, wc)
                self.stats.cache_hits += 1
                return child
            except RpcError as exc:
                if exc.code != "ESTALE":
                    raise
        vol = dir.volume
        server = vol.server
        snap = CallSnapshot(vol, server, (dir,))
        try:
            reply = await self.rpc(server, M.FS_LOOKUP, wc, dir.fid, name, snap=snap)
        except RpcError as exc:
            if exc.code == "ENOENT":
                self._remember_name(dir, dst.data_version, name, None, snap)
            raise
        note_volsync(self, vol, reply.get("volsync"))
        await self._apply_locked(dir, reply["dir_status"], reply.get("dir_callback"), snap)
        fid = Fid.from_wire(reply["fid"])
        child = vol.get(fid)
        await self._apply_locked(child, reply["status"], reply.get("callback"), snap)
        if child.deleted or child.status is None:
            raise _err("ENOENT")
        dir_dv = FileStatus.from_wire(reply["dir_status"]).data_version
        self._remember_name(dir, dir_dv, name, fid, snap)
        return child

    def _remember_name(
        self, d: Vnode, dv: int, name: bytes, fid: Fid | None, snap: CallSnapshot
    ) -> None:
        """Cache one lookup result (None: no such name) for directory DV ``dv``,
        only if the directory is still at ``dv`` under an intact promise."""
        if snap.broken(d) is not None or d.data_version != dv:
            return
        if d.promise_state(trio.current_time()) != "ok":
            return
        if d.names is None or d.names[0] != dv or len(d.names[1]) >= _MAX_NAMES:
            d.names = (dv, {})
        d.names[1][name] = fid

    async def _fetch_listing(self, d: Vnode, cred: Any) -> DirListing:
        """Fetch the whole listing (paged, with statuses); restart when the
        directory's DV moves between pages."""
        vol = d.volume
        async with d.lock.write():
            if d.listing is not None and d.listing.dv == d.data_version:
                return d.listing
            self.stats.dir_fetches += 1
            for _attempt in range(8):
                server = vol.server
                snap = CallSnapshot(vol, server, (d,))
                pages: list[dict[str, Any]] = []
                dv: int | None = None
                cookie: Any = None
                restart = False
                while True:
                    reply = await self.rpc(
                        server, M.FS_READ_DIR, cred, d.fid, cookie, MAX_READDIR_ENTRIES, True,
                        snap=snap if not pages else None,  # issue time is the first page's
                    )  # fmt: skip
                    page_dv = FileStatus.from_wire(reply["dir_status"]).data_version
                    if dv is None:
                        dv = page_dv
                    elif page_dv != dv:
                        restart = True
                        break
                    pages.append(reply)
                    cookie = reply.get("next")
                    if cookie is None:
                        break
                if not restart:
                    break
                log_event("readdir_restart", fid=d.fid)
            else:
                raise _err("EAGAIN", f"directory {d.fid} kept changing during readdir")
            assert dv is not None
            last = pages[-1]
            note_volsync(self, vol, last.get("volsync"))
            apply_reply(self, d, last["dir_status"], last.get("dir_callback"), snap)
            listing = DirListing(dv)
            for page in pages:
                for ent in page["entries"]:
                    name, fid = ent[0], Fid.from_wire(ent[1])
                    listing.add(name, fid, FileType(ent[2]))
                    if len(ent) >= 5 and ent[3] is not None:
                        child = vol.get(fid)
                        if child is not d:
                            self._prime(child, ent[3], ent[4], snap)
            self._kernel_entry_diff(d, d.old_listing, listing)
            d.old_listing = None
            if d.status is not None and d.status.data_version == dv:
                d.listing = listing
            return listing

    def _kernel_entry_diff(self, d: Vnode, old: DirListing | None, new: DirListing) -> None:
        """Tell the kernel about names that went away or changed meaning."""
        if old is None:
            return
        for name, ent in old.entries.items():
            now = new.entries.get(name)
            if now is None or now.fid != ent.fid:
                self.invalidations.put(Invalidate("entry", parent=d, name=name))

    @_maps_errors
    async def readdir(self, dir: Vnode, cred: Cred = None) -> list[DirEntryPlus]:
        """All entries (no ``.``/``..``), sorted by name, each with a validated
        status (children with no valid promise are refreshed by
        FS.InlineBulkStatus, 50 at a time)."""
        wc = _wire_cred(cred)
        for attempt in range(_READDIR_TRIES):
            listing = await self._current_listing(dir, wc)
            out = await self._listing_entries(dir, listing, wc)
            if out is not None:
                return out
            # A child the listing names is gone: the listing predates a change
            # (a rename over it, say) whose break may still be on its way to
            # us.  Ask the server for the directory again instead of dropping
            # a name that still exists.
            dir.promise = None
            log_event("readdir_retry", fid=dir.fid, attempt=attempt + 1)
        return await self._listing_entries(dir, await self._current_listing(dir, wc), wc, True)

    async def _current_listing(self, dir: Vnode, wc: Any) -> DirListing:
        dst = await self._dir_status(dir, wc)
        listing = dir.listing
        if listing is None or listing.dv != dst.data_version:
            listing = await self._fetch_listing(dir, wc)
        return listing

    async def _listing_entries(
        self, dir: Vnode, listing: DirListing, wc: Any, last_try: bool = False
    ) -> list[DirEntryPlus] | None:
        """The listing's entries with statuses; None if a child has vanished
        (unless ``last_try``: then it is left out)."""
        vol = dir.volume
        now = trio.current_time()
        stale: list[Vnode] = []
        for ent in listing.sorted():
            child = vol.get(ent.fid)
            if child.promise_state(now) != "ok":
                stale.append(child)
        for i in range(0, len(stale), MAX_BULKSTAT_FIDS):
            batch = stale[i : i + MAX_BULKSTAT_FIDS]
            server = vol.server
            snap = CallSnapshot(vol, server, tuple(batch))
            reply = await self.rpc(
                server, M.FS_INLINE_BULK_STATUS, wc, [v.fid for v in batch], snap=snap
            )
            note_volsync(self, vol, reply.get("volsync"))
            for v, (error, status, cb) in zip(batch, reply["results"], strict=False):
                if error is None:
                    self._prime(v, status, cb, snap)
                elif isinstance(error, list) and error and error[0] in ("ENOENT", "ESTALE"):
                    mark_deleted(self, v)
        out: list[DirEntryPlus] = []
        for ent in listing.sorted():
            child = vol.get(ent.fid)
            st = None if child.deleted else child.effective_status()
            if st is None and not child.deleted:
                # Primed by nobody (its lock was busy, or it was forgotten
                # meanwhile): ask for it rather than drop it from the listing.
                try:
                    st = await validate(self, child, wc)
                except RpcError as exc:
                    if exc.errno not in (errno.ENOENT, errno.ESTALE):
                        raise
            if st is None:
                if not last_try:
                    return None
                continue
            out.append(DirEntryPlus(ent.name, child, st))
        return out

    async def _dir_change(
        self, d: Vnode, cred: Any, method: str, params: tuple[Any, ...],
        edit: Callable[[DirListing, dict[str, Any]], None],
    ) -> tuple[dict[str, Any], CallSnapshot]:  # fmt: skip
        """Our own change to directory ``d`` (held locked for writing): apply it
        to the cached listing when the reply's DV is exactly old + 1."""
        await self._dir_status(d, cred)
        vol = d.volume
        async with d.lock.write():
            old_dv = d.data_version
            server = vol.server
            snap = CallSnapshot(vol, server, (d,))
            reply = await self.rpc(server, method, cred, d.fid, *params, snap=snap)
            note_volsync(self, vol, reply.get("volsync"))
            new_dv = FileStatus.from_wire(reply["dir_status"]).data_version
            self._edit_listing(d, old_dv, new_dv, lambda lst: edit(lst, reply))
            apply_reply(
                self, d, reply["dir_status"], reply.get("dir_callback"), snap, own_from_dv=old_dv
            )
            d.touch()
        return reply, snap

    def _edit_listing(
        self, d: Vnode, old_dv: int | None, new_dv: int, edit: Callable[[DirListing], None]
    ) -> None:
        if own_change_applies(d.listing, old_dv, new_dv):
            assert d.listing is not None
            edit(d.listing)
            d.listing.dv = new_dv
            self.stats.dir_local_edits += 1
            log_event("dir_local_edit", fid=d.fid, dv=new_dv)
        elif d.listing is not None and d.listing.dv != new_dv:
            d.listing = None

    async def _new_child(
        self, d: Vnode, cred: Any, method: str, params: tuple[Any, ...], ftype: FileType
    ) -> Vnode:
        def edit(lst: DirListing, reply: dict[str, Any]) -> None:
            lst.add(params[0], Fid.from_wire(reply["fid"]), ftype)

        reply, snap = await self._dir_change(d, cred, method, params, edit)
        child = d.volume.get(Fid.from_wire(reply["fid"]))
        await self._apply_locked(child, reply["status"], reply.get("callback"), snap)
        return child

    @_maps_errors
    async def create(self, dir: Vnode, name: bytes, mode: int, cred: Cred = None) -> Vnode:
        check_name(name)
        return await self._new_child(
            dir, _wire_cred(cred), M.FS_CREATE_FILE, (name, mode & 0o7777), FileType.FILE
        )

    @_maps_errors
    async def mkdir(self, dir: Vnode, name: bytes, mode: int, cred: Cred = None) -> Vnode:
        check_name(name)
        child = await self._new_child(
            dir, _wire_cred(cred), M.FS_MAKE_DIR, (name, mode & 0o7777), FileType.DIRECTORY
        )
        if child.status is not None and child.listing is None:
            child.listing = DirListing(child.status.data_version)  # known empty
        return child

    @_maps_errors
    async def symlink(self, dir: Vnode, name: bytes, target: bytes, cred: Cred = None) -> Vnode:
        check_name(name)
        if not target or len(target) > MAX_SYMLINK:
            raise _err("ENAMETOOLONG" if target else "EINVAL", "bad symlink target")
        child = await self._new_child(
            dir, _wire_cred(cred), M.FS_SYMLINK, (name, target, 0o777), FileType.SYMLINK
        )
        if child.status is not None:
            child.symlink = (child.status.data_version, target)
        return child

    @_maps_errors
    async def readlink(self, vnode: Vnode, cred: Cred = None) -> bytes:
        wc = _wire_cred(cred)
        st = await validate(self, vnode, wc)
        if st.type != FileType.SYMLINK:
            raise _err("EINVAL", "not a symlink")
        if vnode.symlink is not None and vnode.symlink[0] == st.data_version:
            self.stats.cache_hits += 1
            return vnode.symlink[1]
        self.stats.cache_misses += 1
        server = vnode.volume.server
        snap = CallSnapshot(vnode.volume, server, (vnode,))
        reply = await self.rpc(server, M.FS_FETCH_DATA, wc, vnode.fid, 0, MAX_SYMLINK, snap=snap)
        note_volsync(self, vnode.volume, reply.get("volsync"))
        await self._apply_locked(vnode, reply["status"], reply.get("callback"), snap)
        dv = FileStatus.from_wire(reply["status"]).data_version
        target = bytes(reply["data"])
        vnode.symlink = (dv, target)
        return target

    @_maps_errors
    async def link(self, vnode: Vnode, dir: Vnode, name: bytes, cred: Cred = None) -> Vnode:
        check_name(name)
        if vnode.volume is not dir.volume:
            raise _err("EXDEV")
        ftype = vnode.status.type if vnode.status is not None else FileType.FILE

        def edit(lst: DirListing, reply: dict[str, Any]) -> None:
            lst.add(name, vnode.fid, ftype)

        reply, snap = await self._dir_change(
            dir, _wire_cred(cred), M.FS_LINK, (name, vnode.fid), edit
        )
        await self._apply_locked(vnode, reply["status"], None, snap, vnode.data_version)
        vnode.touch()
        return vnode

    async def _victim(self, vol: VolumeInstance, fid_wire: Any, status: Any,
                      snap: CallSnapshot) -> None:  # fmt: skip
        if fid_wire is None:
            return
        v = vol.find(Fid.from_wire(fid_wire))
        if v is None:
            return
        if status is None or FileStatus.from_wire(status).nlink == 0:
            mark_deleted(self, v)
        else:
            async with v.lock.write():
                apply_reply(self, v, status, None, snap, own_from_dv=v.data_version)
            v.touch()

    @_maps_errors
    async def unlink(self, dir: Vnode, name: bytes, cred: Cred = None) -> None:
        check_name(name)
        reply, snap = await self._dir_change(
            dir, _wire_cred(cred), M.FS_REMOVE_FILE, (name,), lambda lst, r: lst.remove(name)
        )
        await self._victim(dir.volume, reply.get("fid"), reply.get("status"), snap)

    @_maps_errors
    async def rmdir(self, dir: Vnode, name: bytes, cred: Cred = None) -> None:
        check_name(name)
        reply, snap = await self._dir_change(
            dir, _wire_cred(cred), M.FS_REMOVE_DIR, (name,), lambda lst, r: lst.remove(name)
        )
        await self._victim(dir.volume, reply.get("fid"), None, snap)

    @_maps_errors
    async def rename(
        self, old_dir: Vnode, old_name: bytes, new_dir: Vnode, new_name: bytes,
        flags: int = 0, cred: Cred = None,
    ) -> None:  # fmt: skip
        check_name(old_name)
        check_name(new_name)
        if flags & ~RENAME_NOREPLACE:
            raise _err("EINVAL", "unsupported rename flags")
        if old_dir.volume is not new_dir.volume:
            raise _err("EXDEV")
        wc = _wire_cred(cred)
        await self._dir_status(old_dir, wc)
        if new_dir is not old_dir:
            await self._dir_status(new_dir, wc)
        vol = old_dir.volume
        dirs = [old_dir] if new_dir is old_dir else sorted((old_dir, new_dir), key=lambda v: v.fid)
        async with AsyncExitStack() as stack:
            for d in dirs:  # a fixed order: two renames never deadlock
                await stack.enter_async_context(d.lock.write())
            old_dvs = {id(d): d.data_version for d in dirs}
            server = vol.server
            snap = CallSnapshot(vol, server, tuple(dirs))
            reply = await self.rpc(
                server, M.FS_RENAME, wc, old_dir.fid, old_name, new_dir.fid, new_name, flags,
                snap=snap,
            )  # fmt: skip
            note_volsync(self, vol, reply.get("volsync"))
            moved_fid = Fid.from_wire(reply["fid"])
            moved_type = FileStatus.from_wire(reply["status"]).type
            if new_dir is old_dir:
                new_dv = FileStatus.from_wire(reply["new_dir_status"]).data_version

                def edit_same(lst: DirListing) -> None:
                    lst.remove(old_name)
                    lst.add(new_name, moved_fid, moved_type)

                self._edit_listing(old_dir, old_dvs[id(old_dir)], new_dv, edit_same)
                apply_reply(self, old_dir, reply["new_dir_status"], None, snap,
                            own_from_dv=old_dvs[id(old_dir)])  # fmt: skip
            else:
                odv = FileStatus.from_wire(reply["old_dir_status"]).data_version
                ndv = FileStatus.from_wire(reply["new_dir_status"]).data_version
                self._edit_listing(
                    old_dir, old_dvs[id(old_dir)], odv, lambda lst: lst.remove(old_name)
                )
                self._edit_listing(
                    new_dir,
                    old_dvs[id(new_dir)],
                    ndv,
                    lambda lst: lst.add(new_name, moved_fid, moved_type),
                )
                apply_reply(self, old_dir, reply["old_dir_status"], None, snap,
                            own_from_dv=old_dvs[id(old_dir)])  # fmt: skip
                apply_reply(self, new_dir, reply["new_dir_status"], None, snap,
                            own_from_dv=old_dvs[id(new_dir)])  # fmt: skip
            for d in dirs:
                d.touch()
        moved = vol.find(moved_fid)
        if moved is not None:
            async with moved.lock.write():
                apply_reply(self, moved, reply["status"], None, snap,
                            own_from_dv=moved.data_version)  # fmt: skip
            moved.touch()
        await self._victim(vol, reply.get("replaced_fid"), reply.get("replaced_status"), snap)

    # -- attributes ---------------------------------------------------------------

    @_maps_errors
    async def setattr(
        self, vnode: Vnode, cred: Cred = None, *, mode: int | None = None,
        uid: int | None = None, gid: int | None = None, size: int | None = None,
        mtime_ns: int | None = None,
    ) -> FileStatus:  # fmt: skip
        wc = _wire_cred(cred)
        await validate(self, vnode, wc)
        if size is not None and self._dirty(vnode):
            await self._store(vnode, wc)  # write back first, then truncate
        attrs: dict[str, int] = {}
        for k, val in (("mode", mode), ("owner", uid), ("group", gid), ("size", size),
                       ("mtime_ns", mtime_ns)):  # fmt: skip
            if val is not None:
                attrs[k] = val & 0o7777 if k == "mode" else val
        if not attrs:
            return await validate(self, vnode, wc)
        async with vnode.io_lock, vnode.lock.write():
            old_dv = vnode.data_version
            server = vnode.volume.server
            snap = CallSnapshot(vnode.volume, server, (vnode,))
            reply = await self.rpc(server, M.FS_STORE_STATUS, wc, vnode.fid, attrs, snap=snap)
            note_volsync(self, vnode.volume, reply.get("volsync"))
            new = FileStatus.from_wire(reply["status"])
            if size is not None and old_dv is not None:
                self.datacache.truncate(vnode.fid, old_dv, size)
                if new.data_version == old_dv + 1:
                    self.datacache.rekey(vnode.fid, old_dv, new.data_version)
                vnode.local_size = None
                vnode.truncated = False
            apply_reply(self, vnode, reply["status"], None, snap, own_from_dv=old_dv)
            vnode.touch()
            if size is not None:
                self.invalidations.put(Invalidate("inode", vnode=vnode))
            st = vnode.effective_status()
            assert st is not None
            return st

    @_maps_errors
    async def statfs(self, vnode: Vnode, cred: Cred = None) -> dict[str, Any]:
        vol = vnode.volume
        reply = await self.rpc(vol.server, M.FS_GET_VOLUME_STATUS, _wire_cred(cred), vol.volume_id)
        return dict(reply)

    # -- data -------------------------------------------------------------------------

    @staticmethod
    def _dirty(v: Vnode) -> bool:
        """Whether ``v`` holds writes not yet stored.  ``local_size`` is set by
        every write and cleared only once every dirty chunk is stored; it is
        per vnode, while chunks are per fid (shared by aliased instances)."""
        return v.local_size is not None

    @_maps_errors
    async def open(self, vnode: Vnode, cred: Cred = None, flags: int = 0) -> OpenFile:
        wc = _wire_cred(cred)
        st = await validate(self, vnode, wc)
        if st.type == FileType.DIRECTORY and flags & (os.O_WRONLY | os.O_RDWR):
            raise _err("EISDIR")
        truncating = bool(flags & O_TRUNC) and st.type == FileType.FILE
        if truncating:
            await self._truncate_locally(vnode)
            st = vnode.effective_status() or st
        # C1: the kernel keeps its pages only if the DV is the one it read.
        keep = vnode.kernel_dv == st.data_version and not truncating
        vnode.kernel_dv = st.data_version
        handle = OpenFile(vnode, flags, keep)
        vnode.open_count += 1
        vnode.open_writers += handle.writable
        return handle

    async def _truncate_locally(self, v: Vnode) -> None:
        """open(O_TRUNC) under write-on-close: the truncation is a local write,
        stored at close together with what follows it, so other clients go
        straight from the old contents to the new ones and never see the file
        empty in between (as OpenAFS does).  Until then none of the server's
        old bytes are part of this file: nothing is fetched as a base for
        writes, and holes read as zeros (see _fetch_runs)."""
        async with v.io_lock:
            self.datacache.drop(v.fid, keep_dirty=False)
            v.local_size = 0
            v.truncated = True
            self._written.add(v.fid)

    @_maps_errors
    async def read(self, target: Vnode | OpenFile, offset: int, size: int,
                   cred: Cred = None) -> bytes:  # fmt: skip
        v = target.vnode if isinstance(target, OpenFile) else target
        wc = _wire_cred(cred)
        if v.storing:
            # Our own store is under way: its chunks are filed under the DV it
            # started from while the server's file is half stored.  Wait.
            async with v.io_lock:
                pass
        st = await validate(self, v, wc)
        if st.type == FileType.DIRECTORY:
            raise _err("EISDIR")
        cs = self.datacache.chunk_size
        for _attempt in range(6):
            dv = st.data_version
            fsize = v.size()
            if offset >= fsize or size <= 0:
                return b""
            length = min(size, fsize - offset)
            data = self.datacache.read(v.fid, dv, offset, length, fsize)
            if data is not None:
                self.stats.cache_hits += 1
                sequential = offset == v.next_read
                v.next_read = offset + len(data)
                if sequential:
                    self._read_ahead(v, wc, dv, v.next_read, fsize)
                return data
            self.stats.cache_misses += 1
            want = self.datacache.missing(v.fid, dv, offset, length, fsize)
            if offset == v.next_read and self.config.readahead_chunks and want:
                # Sequential: fetch a few chunks past the request in the same call.
                last_chunk = (fsize - 1) // cs
                extra = range(want[-1] + 1, min(want[-1] + self.config.readahead_chunks,
                                                last_chunk) + 1)  # fmt: skip
                want += self.datacache.missing(
                    v.fid, dv, extra.start * cs, len(extra) * cs, fsize
                ) if len(extra) else []  # fmt: skip
            if await self._fetch_chunks(v, wc, dv, want):
                continue
            st = await validate(self, v, wc)  # the DV moved under us: start over
        if v.local_size is None:
            # The cache cannot hold what this read needs (evicted as fast as
            # fetched): read through, uncached.
            return await self._read_through(v, wc, st.data_version, offset, size)
        raise _err("EIO", f"{v.fid}: data kept changing while reading")

    def _read_ahead(self, v: Vnode, cred: Any, dv: int, pos: int, fsize: int) -> None:
        """A sequential reader at ``pos``: fetch the chunks of the next two
        read-ahead windows it lacks in the background, a window at a time, so
        the next FetchData overlaps the reads it will serve (a reader that
        gets there first waits for the chunks in flight, never refetches)."""
        n = self.config.readahead_chunks
        if not n or pos >= fsize:
            return
        cs = self.datacache.chunk_size
        first, eof = pos // cs, (fsize - 1) // cs
        last = min(first + 2 * n - 1, eof)
        want = [
            i
            for i in self.datacache.missing(v.fid, dv, first * cs, (last - first + 1) * cs, fsize)
            if (dv, i) not in v.inflight
        ]
        if not want or (len(want) < n and want[-1] != eof):
            return  # less than a window missing: wait until a whole one is
        for i in want:  # claimed now, so no other reader fetches them meanwhile
            v.inflight[(dv, i)] = trio.Event()
        try:
            self._spawn(self._read_ahead_task, v, cred, dv, want)
        except RuntimeError:  # closing: release the claims
            self._release_inflight(v, dv, want)

    async def _read_ahead_task(self, v: Vnode, cred: Any, dv: int, want: list[int]) -> None:
        try:
            await self._fetch_runs(v, cred, dv, want, None)
        except Exception as exc:  # a reader that needs these chunks fetches them itself
            log.debug("%s: read-ahead of %d chunks failed: %r", v.fid, len(want), exc)
        finally:
            self._release_inflight(v, dv, want)

    @staticmethod
    def _release_inflight(v: Vnode, dv: int, indices: list[int]) -> None:
        for i in indices:
            ev = v.inflight.pop((dv, i), None)
            if ev is not None:
                ev.set()

    async def _read_through(self, v: Vnode, cred: Any, dv: int, offset: int, size: int) -> bytes:
        server = v.volume.server
        snap = CallSnapshot(v.volume, server, (v,))
        reply = await self.rpc(
            server, M.FS_FETCH_DATA, cred, v.fid, offset, min(size, MAX_IO), snap=snap
        )
        async with v.lock.write():
            apply_reply(self, v, reply["status"], reply.get("callback"), snap)
        if FileStatus.from_wire(reply["status"]).data_version != dv:
            raise _err("EIO", f"{v.fid}: data kept changing while reading")
        data = bytes(reply["data"])
        self.stats.bytes_fetched += len(data)
        return data

    async def _fetch_chunks(
        self, v: Vnode, cred: Any, dv: int, indices: list[int],
        sink: dict[int, bytes] | None = None,
    ) -> bool:  # fmt: skip
        """FetchData the chunks ``indices`` of ``dv`` (contiguous runs, <= MAX_IO
        each) into the cache, and into ``sink`` if given (the cache may evict
        them again at once when it is small).  False if the file's DV is no
        longer ``dv``."""
        # Chunks another task is fetching right now are waited for, not refetched.
        waits: list[trio.Event] = []
        mine: list[int] = []
        for i in sorted(set(indices)):
            ev = v.inflight.get((dv, i))
            if ev is not None:
                waits.append(ev)
            else:
                v.inflight[(dv, i)] = trio.Event()
                mine.append(i)
        try:
            ok = await self._fetch_runs(v, cred, dv, mine, sink)
        finally:
            self._release_inflight(v, dv, mine)
        for ev in waits:
            await ev.wait()
        return ok

    async def _fetch_runs(
        self, v: Vnode, cred: Any, dv: int, indices: list[int], sink: dict[int, bytes] | None
    ) -> bool:
        cs = self.datacache.chunk_size
        server_size = v.status.size if v.status is not None and not v.truncated else 0
        per_call = max(1, MAX_IO // cs)
        runs: list[list[int]] = []
        for i in indices:
            if i * cs >= server_size:
                # Past the server's EOF (extended locally): nothing to fetch.
                if (dv, i) not in set(self.datacache.dirty_chunks(v.fid)):
                    self.datacache.put(v.fid, dv, i, b"")
                continue
            if runs and runs[-1][-1] == i - 1 and len(runs[-1]) < per_call:
                runs[-1].append(i)
            else:
                runs.append([i])
        for run in runs:
            server = v.volume.server
            snap = CallSnapshot(v.volume, server, (v,))
            reply = await self.rpc(
                server, M.FS_FETCH_DATA, cred, v.fid, run[0] * cs, len(run) * cs, snap=snap
            )
            data = bytes(reply["data"])
            self.stats.bytes_fetched += len(data)
            async with v.lock.write():
                note_volsync(self, v.volume, reply.get("volsync"))
                apply_reply(self, v, reply["status"], reply.get("callback"), snap)
                got_dv = FileStatus.from_wire(reply["status"]).data_version
                if got_dv != dv or v.data_version != dv:
                    return False
                if v.truncated:
                    # A local O_TRUNC while this fetch was in flight (a
                    # read-ahead, say): none of these bytes are the file's
                    # any more, and a later partial write must not start
                    # from them.
                    continue
                dirty = set(self.datacache.dirty_chunks(v.fid))
                for k, i in enumerate(run):
                    piece = data[k * cs : (k + 1) * cs]
                    if sink is not None:
                        sink[i] = piece
                    if (dv, i) not in dirty:  # never overwrite a local write
                        self.datacache.put(v.fid, dv, i, piece)
        return True

    @_maps_errors
    async def write(self, target: Vnode | OpenFile, offset: int, data: bytes,
                    cred: Cred = None) -> int:  # fmt: skip
        """Write into local dirty chunks; stored at flush/fsync/last close."""
        v = target.vnode if isinstance(target, OpenFile) else target
        if isinstance(target, OpenFile):
            target.wrote = True
        if not data:
            return 0
        wc = _wire_cred(cred)
        cs = self.datacache.chunk_size
        async with v.io_lock:
            st = v.status if v.status is not None else await validate(self, v, wc)
            if st.type != FileType.FILE:
                raise _err("EISDIR")
            for _attempt in range(6):
                assert v.status is not None
                dv = v.status.data_version
                # After a local O_TRUNC none of the server's bytes are ours.
                server_size = 0 if v.truncated else v.status.size
                end = offset + len(data)
                need = []
                for i in {offset // cs, (end - 1) // cs}:
                    whole = offset <= i * cs and end >= (i + 1) * cs
                    if not whole and i * cs < server_size:
                        need += self.datacache.missing(v.fid, dv, i * cs, 1, server_size)
                # A partly overwritten chunk starts from its server content.
                base: dict[int, bytes] = {}
                if not need:
                    break
                if await self._fetch_chunks(v, wc, dv, need, base):
                    still = [i for i in need if self.datacache.missing(v.fid, dv, i * cs, 1,
                                                                       server_size)]  # fmt: skip
                    if set(still) <= set(base):
                        break
            else:
                raise _err("EIO", f"{v.fid}: data kept changing while writing")
            self._written.add(v.fid)
            self.datacache.write(v.fid, dv, offset, data, base.get)
            v.local_size = max(v.size(), end)
        return len(data)

    async def _store(self, v: Vnode, cred: Any) -> None:
        """Store every dirty chunk (contiguous runs, <= MAX_IO per StoreData).

        Our own store moves the DV by exactly one per call: the chunks are
        re-labelled to the final DV, not dropped.  The vnode is locked for
        writing across each call, so no status fetched meanwhile can
        interleave (P6).  Reads on this client wait for the store (``storing``)
        rather than read the server's half-stored file."""
        async with v.io_lock:
            v.storing = True
            try:
                await self._store_runs(v, cred)
            finally:
                v.storing = False

    async def _store_runs(self, v: Vnode, cred: Any) -> None:
        cs = self.datacache.chunk_size
        per_call = max(1, MAX_IO // cs)
        # The chunks stay filed under one DV (key_dv) for the whole store and
        # are re-labelled once at the end: re-labelling every chunk of the file
        # after each StoreData would cost the square of its size.
        key_dv: int | None = None
        while True:
            async with v.lock.write():
                if v.status is None:
                    raise _err("ESTALE")
                dv = v.status.data_version
                if key_dv is None:
                    for d, _i in self.datacache.dirty_chunks(v.fid):
                        if d != dv:  # written under a DV that moved since
                            self.datacache.rekey(v.fid, d, dv)
                    key_dv = dv
                    if v.truncated:
                        # After a local O_TRUNC every byte on the server is
                        # replaced: the holes we never wrote go as zeros.
                        have = {i for d, i in self.datacache.dirty_chunks(v.fid) if d == dv}
                        for i in range((v.size() + cs - 1) // cs):
                            if i not in have:
                                self.datacache.put(v.fid, dv, i, b"", dirty=True)
                idx = [i for d, i in self.datacache.dirty_chunks(v.fid) if d == key_dv]
                if not idx and v.local_size is None:
                    return
                fsize = v.size()
                run = idx[:1]
                for i in idx[1:]:
                    if i == run[-1] + 1 and len(run) < per_call:
                        run.append(i)
                    else:
                        break
                if run:
                    parts = []
                    for i in run:
                        chunk = self.datacache.get(v.fid, key_dv, i)
                        if chunk is None:
                            raise _err("EIO", f"{v.fid}: dirty chunk {i} lost")
                        # A short cached chunk reads as zeros up to the file
                        # size: send those zeros, so the server's old bytes
                        # there are replaced too.
                        span = max(0, min(cs, fsize - i * cs))
                        parts.append(chunk[:span].ljust(span, b"\0"))
                    off = run[0] * cs
                    payload = b"".join(parts)[: max(0, fsize - off)]
                else:
                    off, payload = fsize, b""
                server = v.volume.server
                snap = CallSnapshot(v.volume, server, (v,))
                try:
                    reply = await self.rpc(
                        server, M.FS_STORE_DATA, cred, v.fid, off, payload, fsize, None,
                        snap=snap,
                    )  # fmt: skip
                except RpcError as exc:
                    if exc.code in ("ENOENT", "ESTALE"):
                        # Removed by someone else: these writes can never land.
                        mark_deleted(self, v)
                        raise _err("ESTALE", f"{v.fid} was removed") from None
                    raise
                self.stats.bytes_stored += len(payload)
                note_volsync(self, v.volume, reply.get("volsync"))
                new = FileStatus.from_wire(reply["status"])
                for i in run:
                    self.datacache.mark_clean(v.fid, key_dv, i)
                own = new.data_version == dv + 1
                # C2: the kernel's pages hold the new data only if they held
                # the DV this store started from and nobody else wrote.
                pages_current = v.kernel_dv == dv and own
                apply_reply(self, v, reply["status"], None, snap, own_from_dv=dv)
                v.kernel_dv = new.data_version if pages_current else None
                v.touch()
                log_event("stored", fid=v.fid, offset=off, bytes=len(payload),
                          dv=new.data_version)  # fmt: skip
                if not own:
                    # Someone else wrote too: their version's data replaced our
                    # clean chunks (zapped above); what is still dirty is
                    # re-filed under the current DV at the next pass.
                    key_dv = None
                if not self.datacache.dirty_chunks(v.fid):
                    if key_dv is not None:
                        self.datacache.rekey(v.fid, key_dv, new.data_version)
                    v.local_size = None
                    v.truncated = False
                    return

    @_maps_errors
    async def flush(self, handle: OpenFile, cred: Cred = None) -> None:
        """close(2) of one descriptor (write-on-close): stores when this is the
        last open handle, or the last writable one (readers still holding
        the file open must not delay close-to-open for other clients)."""
        v = handle.vnode
        last = v.open_count <= 1 or (handle.writable and v.open_writers <= 1)
        if last and self._dirty(v):
            await self._store(v, _wire_cred(cred))

    @_maps_errors
    async def fsync(self, handle: OpenFile | Vnode, cred: Cred = None) -> None:
        v = handle.vnode if isinstance(handle, OpenFile) else handle
        if self._dirty(v):
            await self._store(v, _wire_cred(cred))

    async def release(self, handle: OpenFile, cred: Cred = None) -> None:
        """The last reference to an open went away; never raises."""
        if handle.closed:
            return
        handle.closed = True
        v = handle.vnode
        v.open_count = max(0, v.open_count - 1)
        if handle.writable:
            v.open_writers = max(0, v.open_writers - 1)
        if v.open_count == 0 and self._dirty(v) and not v.deleted:
            try:
                await self._store(v, _wire_cred(cred))
            except Exception as exc:  # release must never raise
                log.warning("release: storing %s failed: %r", v.fid, exc)

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
        volume_break(self, vol, "flush")
        for v in list(vol.vnodes.values()):
            v.listing = None
            self.datacache.drop(v.fid, keep_dirty=True)

    def stats_dict(self) -> dict[str, Any]:
        out = self.stats.as_dict()
        out["datacache"] = self.datacache.stats() if self.datacache is not None else {}
        out["servers"] = {
            r.uuid: {"cb_s_break": r.cb_s_break, "epoch": r.epoch, "connected": r.conn is not None}
            for r in self.servers.values()
        }
        out["volumes"] = {
            f"{c}:{vid}": {"cb_v_break": vol.cb_v_break, "vnodes": len(vol.vnodes)}
            for (c, vid), vol in self.volumes.items()
        }
        return out


__all__ = [
    "CacheConfig",
    "CacheManager",
    "DirEntryPlus",
    "OpenFile",
    "errno",
]

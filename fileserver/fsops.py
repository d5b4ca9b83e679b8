"""FS.* request handlers (SPEC section 5), apart from FS.Hello.

Each handler validates its params (EINVAL for wrong types, names through
``check_name``), then:

- a read runs in a worker thread beside any commit (``VolumeHandle.read``)
  and grants its promises only if nothing it returns changed meanwhile;
- a change runs as one job of the volume's group commit
  (``VolumeHandle.commit``): its checks and its SQL run in the commit thread
  in order with every other change, its grants right after the commit, and
  then every other holder's promises on the changed fids are broken before
  the reply (or the break timeout passed).  ``_changed`` tells the handle
  first, so reads that overlapped the change read again.  A removal
  starts its breaks as soon as its SQL ran, while its commit syncs
  (``_telling``): the two waits overlap, and until the commit is done no
  other client is granted a promise on those fids (a promise on the state
  before the change, granted after its break went out, would never be
  broken);
- a store holds its file's lock: checks, the bytes into the data file (in a
  worker thread, beside other commits), then its metadata in a group commit.

``cred`` is the caller (uid, gid, groups) on the client machine; the
permission checks of ``fileserver.perms`` run inside the volume operation
(in the commit thread for changes) and every returned status carries the
caller's ``access`` bits.  Server limits (name length, directory entries, file size)
are checked here too.

Imports: the parts it uses (store, callback table, breaker, metrics,
config, perms, privs, volume records), ``protocol`` and trio; never ``fileserver.server``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import trio

from fileserver import xattrs
from fileserver.breaker import Breaker, ClientState
from fileserver.callback import CallbackTable
from fileserver.config import ServerConfig
from fileserver.events import event
from fileserver.metrics import Metrics
from fileserver.perms import (
    ROOT,
    S_ISGID,
    Caller,
    R,
    W,
    X,
    access,
    check_sticky,
    check_store_status,
    require,
    require_dir_change,
    require_write,
)
from fileserver.privs import mode_after_write
from fileserver.store import VolumeHandle, VolumeStore
from fileserver.volume import Vnode
from protocol import methods as m
from protocol.errors import RpcError
from protocol.limits import (
    MAX_BULKSTAT_FIDS,
    MAX_IO,
    MAX_NAME,
    MAX_READDIR_ENTRIES,
    MAX_SYMLINK,
    MAX_UINT32,
    MAX_UINT64,
)
from protocol.names import check_name
from protocol.records import (
    DEVICE_TYPES,
    SPECIAL_TYPES,
    CallBack,
    CallBackType,
    Fid,
    FileType,
    VolSync,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

CAPABILITIES = ["readdir-status", "bulkstat", "rename-noreplace", "volume-break", "locks",
                "special-files", "xattrs", "store-attrs"]  # fmt: skip
#: Stores up to this size go into their commit as a redo record (bytes
#: written twice, no data fsync on the reply's path); larger ones are written
#: into the data file beside other commits and fdatasynced.
SMALL_STORE = 64 * 1024
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


# -- param checks ------------------------------------------------------------


def _uint(v: Any, hi: int, what: str) -> int:
    if type(v) is not int or not 0 <= v <= hi:
        raise RpcError("EINVAL", f"{what} must be an int in 0..{hi}, not {v!r:.50}")
    return v


def _int64(v: Any, what: str) -> int:
    if type(v) is not int or not _INT64_MIN <= v <= _INT64_MAX:
        raise RpcError("EINVAL", f"{what} must be an int64, not {v!r:.50}")
    return v


def _bytes(v: Any, what: str) -> bytes:
    if type(v) is not bytes:
        raise RpcError("EINVAL", f"{what} must be bin, not {type(v).__name__}")
    return v


def parse_cred(cred: Any) -> Caller:
    """The caller; nil means the client machine itself (root)."""
    if cred is None:
        return ROOT
    if not isinstance(cred, list) or len(cred) != 3 or not isinstance(cred[2], list):
        raise RpcError("EINVAL", f"malformed cred {cred!r:.100}")
    if len(cred[2]) > 1024:
        raise RpcError("EINVAL", "more than 1024 groups")
    uid = _uint(cred[0], MAX_UINT32, "cred uid")
    gid = _uint(cred[1], MAX_UINT32, "cred gid")
    groups = frozenset(_uint(g, MAX_UINT32, "cred gid") for g in cred[2])
    return Caller(uid, gid, groups)


def _changeable(v: Vnode) -> tuple[int, ...]:
    """What a change to a file's data or status moves (to see if a failed one did)."""
    return (v.dv, v.mode, v.owner, v.group, v.size, v.mtime_ns, v.ctime_ns)


def _st(v: Vnode, c: Caller) -> Any:
    """The status as this caller sees it (its access bits)."""
    return v.status(access(v, c))


def parse_mode(mode: Any) -> int:
    # Clients may pass a full st_mode; only the permission bits are kept.
    return _uint(mode, 0o177777, "mode") & 0o7777


def parse_attrs(attrs: Any, allowed: tuple[str, ...]) -> dict[str, int]:
    """A StoreStatus (or StoreData) attribute map, checked key by key."""
    if not isinstance(attrs, dict):
        raise RpcError("EINVAL", "attrs must be a map")
    clean: dict[str, int] = {}
    for k, val in attrs.items():
        if k not in allowed:
            raise RpcError("EINVAL", f"unknown attribute {k!r:.50}")
        if k == "mode":
            clean[k] = _uint(val, 0o7777, "mode")
        elif k in ("owner", "group"):
            clean[k] = _uint(val, MAX_UINT32, k)
        elif k == "mtime_ns":
            clean[k] = _int64(val, k)
        else:
            clean[k] = _uint(val, MAX_UINT64, k)
    return clean


def _callback(told: int) -> CallBack:
    return CallBack(1, told, CallBackType.SHARED)


class FsOps:
    """The FS.* handlers over the parts they use (no back reference to the server)."""

    def __init__(
        self,
        store: VolumeStore,
        table: CallbackTable,
        breaker: Breaker,
        metrics: Metrics,
        config: ServerConfig,
    ) -> None:
        self.store = store
        self.table = table
        self.breaker = breaker
        self.metrics = metrics
        self.config = config
        #: fid -> the clients whose change of it is being committed with its
        #: breaks already on their way: nobody else gets a promise on it.
        self._telling: dict[Fid, list[int]] = {}

    def caller(self, cred: Any) -> Caller:
        c = parse_cred(cred)
        return c.squashed() if self.config.root_squash else c

    @staticmethod
    def _over(code: str, message: str) -> RpcError:
        """A server limit was hit: logged, and the error goes to that caller only."""
        log.info("limit: %s: %s", code, message)
        return RpcError(code, message)

    def _name(self, name: Any) -> bytes:
        name = check_name(name)
        if len(name) > self.config.max_name:
            raise self._over("ENAMETOOLONG", f"name over {self.config.max_name} bytes")
        return name

    def _room(self, d: Vnode) -> None:
        if d.size >= self.config.max_dir_entries:
            raise self._over("ENOSPC", f"directory has {self.config.max_dir_entries} entries")

    # -- helpers -------------------------------------------------------------

    def grant(self, st: ClientState, fid: Fid) -> CallBack:
        changers = self._telling.get(fid) if self._telling else None
        if changers is not None and any(cid != st.cid for cid in changers):
            # What was read may predate a change whose break already went:
            # no promise (the client asks again next time).
            self.metrics.inc("grants_withheld")
            return CallBack(1, 0, CallBackType.DROPPED)
        stats = self.table.stats
        before = stats["grants"]
        told = self.table.grant(st.cid, fid)
        self.metrics.inc("grants" if stats["grants"] != before else "renewals")
        event("grant", fid=fid, client=st.uuid, expires_in=told)
        return _callback(told)

    def _vol(self, fid: Fid) -> VolumeHandle:
        return self.store.get(fid.volume)

    async def _differs(self, h: VolumeHandle, f: Fid, then: tuple[int, ...]) -> bool:
        """Whether ``f`` changed since it was ``then`` (False if it is gone)."""

        def read() -> tuple[int, ...] | None:
            try:
                return _changeable(h.vol.get(f.vnode, f.unique))
            except RpcError:
                return None

        now = await h.read(read, lambda _: ())
        return now is not None and now != then

    async def _changed(self, st: ClientState, *fids: Fid | None) -> None:
        changed = [f for f in fids if f is not None]
        event("change", client=st.uuid, fids=[str(f) for f in changed])
        for f in changed:
            h = self.store.by_id.get(f.volume)
            if h is not None:
                h.changed((f.vnode,))
        await self.breaker.break_fids(changed, st)

    # -- reads -------------------------------------------------------------------

    async def fetch_status(self, st: ClientState, cred: Any, fid: Any) -> dict[str, Any]:
        c = self.caller(cred)
        f = Fid.from_wire(fid)
        h = self._vol(f)
        cb: list[CallBack] = []

        def read() -> tuple[Vnode, VolSync]:
            return h.vol.get(f.vnode, f.unique), h.vol.volsync()

        v, vs = await h.read(read, lambda _: (f.vnode,),
                             then=lambda _: cb.append(self.grant(st, f)), inline=True)  # fmt: skip
        return {"status": _st(v, c), "callback": cb[0], "volsync": vs}

    async def fetch_data(
        self, st: ClientState, cred: Any, fid: Any, offset: Any, length: Any
    ) -> dict[str, Any]:
        c = self.caller(cred)
        f = Fid.from_wire(fid)
        offset = _uint(offset, MAX_UINT64, "offset")
        length = _uint(length, MAX_IO, "length")
        h = self._vol(f)
        cb: list[CallBack] = []

        def read() -> tuple[Vnode, bytes, VolSync]:
            v = h.vol.get(f.vnode, f.unique)
            if v.type == FileType.FILE and not access(v, c) & R:
                # Writers may read back what they write (the client merges
                # partial chunks); see perms.require_write.
                require_write(v, c, "read")
            v, data = h.vol.fetch_data(f.vnode, f.unique, offset, length)
            return v, data, h.vol.volsync()

        v, data, vs = await h.read(
            read, lambda _: (f.vnode,), then=lambda _: cb.append(self.grant(st, f)), file=f.vnode
        )
        self.metrics.inc("bytes_fetched", len(data))
        return {"status": _st(v, c), "callback": cb[0], "volsync": vs, "data": data}

    async def lookup(self, st: ClientState, cred: Any, dir_fid: Any, name: Any) -> dict[str, Any]:
        c = self.caller(cred)
        d = Fid.from_wire(dir_fid)
        name = self._name(name)
        h = self._vol(d)
        cbs: list[CallBack] = []

        def read() -> tuple[Vnode, Vnode, VolSync]:
            require(h.vol.get_dir(d.vnode, d.unique), c, X, "lookup")
            v, dv = h.vol.lookup(d.vnode, d.unique, name)
            return v, dv, h.vol.volsync()

        def then(r: tuple[Vnode, Vnode, VolSync]) -> None:
            cbs.append(self.grant(st, Fid(d.volume, r[0].vnode, r[0].unique)))
            cbs.append(self.grant(st, d))

        v, dv, vs = await h.read(read, lambda r: (r[0].vnode, d.vnode), then=then, inline=True)
        return {"fid": Fid(d.volume, v.vnode, v.unique), "status": _st(v, c),
                "callback": cbs[0], "dir_status": _st(dv, c), "dir_callback": cbs[1],
                "volsync": vs}  # fmt: skip

    async def read_dir(
        self,
        st: ClientState,
        cred: Any,
        dir_fid: Any,
        cookie: Any,
        max_entries: Any,
        with_status: Any,
    ) -> dict[str, Any]:
        c = self.caller(cred)
        d = Fid.from_wire(dir_fid)
        if cookie is not None and (type(cookie) is not bytes or len(cookie) > MAX_NAME):
            raise RpcError("EINVAL", "cookie must be nil or a name (bin)")
        if type(max_entries) is not int or not 1 <= max_entries <= MAX_READDIR_ENTRIES:
            raise RpcError("EINVAL", f"max_entries must be in 1..{MAX_READDIR_ENTRIES}")
        if type(with_status) is not bool:
            raise RpcError("EINVAL", "with_status must be a bool")
        h = self._vol(d)
        out: list[list[Any]] = []
        dir_cb: list[CallBack] = []

        def read() -> tuple[list[tuple[bytes, Vnode]], bytes | None, Vnode, VolSync]:
            require(h.vol.get_dir(d.vnode, d.unique), c, R, "readdir")
            entries, nxt, dv = h.vol.readdir(d.vnode, d.unique, cookie, max_entries)
            return entries, nxt, dv, h.vol.volsync()

        def then(r: tuple[list[tuple[bytes, Vnode]], bytes | None, Vnode, VolSync]) -> None:
            for name, v in r[0]:
                fid = Fid(d.volume, v.vnode, v.unique)
                if with_status:
                    out.append([name, fid, v.type, _st(v, c), self.grant(st, fid)])
                else:
                    out.append([name, fid, v.type])
            dir_cb.append(self.grant(st, d))

        def keys(r: tuple[list[tuple[bytes, Vnode]], bytes | None, Vnode, VolSync]) -> list[int]:
            return [d.vnode, *(v.vnode for _, v in r[0])] if with_status else [d.vnode]

        _, nxt, dv, vs = await h.read(read, keys, then=then)
        return {"entries": out, "next": nxt, "dir_status": _st(dv, c),
                "dir_callback": dir_cb[0], "volsync": vs}  # fmt: skip

    async def inline_bulk_status(self, st: ClientState, cred: Any, fids: Any) -> dict[str, Any]:
        c = self.caller(cred)
        if not isinstance(fids, list) or len(fids) > MAX_BULKSTAT_FIDS:
            raise RpcError("EINVAL", f"fids must be a list of at most {MAX_BULKSTAT_FIDS}")
        parsed = [Fid.from_wire(f) for f in fids]
        results: list[list[Any] | None] = [None] * len(parsed)
        volsync: VolSync | None = None
        by_vol: dict[int, list[int]] = {}
        for i, f in enumerate(parsed):
            by_vol.setdefault(f.volume, []).append(i)
        for vol_id, idxs in by_vol.items():
            h = self.store.by_id.get(vol_id)
            if h is None:
                for i in idxs:
                    results[i] = [["ESTALE", f"no volume {vol_id}"], None, None]
                continue

            def read(h: VolumeHandle = h, idxs: list[int] = idxs) -> tuple[list[Any], VolSync]:
                got: list[Any] = []
                for i in idxs:
                    f = parsed[i]
                    try:
                        got.append(h.vol.get(f.vnode, f.unique))
                    except RpcError as exc:
                        got.append(exc)
                return got, h.vol.volsync()

            def then(r: tuple[list[Any], VolSync], idxs: list[int] = idxs) -> None:
                for i, v in zip(idxs, r[0], strict=True):
                    if isinstance(v, RpcError):
                        results[i] = [v.to_wire(), None, None]
                    else:
                        results[i] = [None, _st(v, c), self.grant(st, parsed[i])]

            def keys(r: tuple[list[Any], VolSync]) -> list[int]:
                return [v.vnode for v in r[0] if not isinstance(v, RpcError)]

            _, vs = await h.read(read, keys, then=then, inline=True)
            if parsed and vol_id == parsed[0].volume:
                volsync = vs
        return {"results": results, "volsync": volsync or VolSync(0, 0)}

    async def get_volume_status(self, st: ClientState, cred: Any, volume_id: Any) -> dict[str, Any]:
        self.caller(cred)
        vid = _uint(volume_id, MAX_UINT32, "volume_id")
        h = self.store.by_id.get(vid)
        if h is None:
            raise RpcError("ENOENT", f"no volume {vid}")
        return h.vol.volume_status()  # in memory

    # -- data changes ----------------------------------------------------------

    async def store_data(
        self,
        st: ClientState,
        cred: Any,
        fid: Any,
        offset: Any,
        data: Any,
        new_length: Any,
        mtime_ns: Any,
        attrs: Any = None,
    ) -> dict[str, Any]:
        c = self.caller(cred)
        f = Fid.from_wire(fid)
        offset = _uint(offset, MAX_UINT64, "offset")
        data = _bytes(data, "data")
        if len(data) > MAX_IO:
            raise RpcError("EINVAL", f"data over MAX_IO ({MAX_IO} bytes)")
        if new_length is not None:
            new_length = _uint(new_length, MAX_UINT64, "new_length")
        if mtime_ns is not None:
            mtime_ns = _int64(mtime_ns, "mtime_ns")
        # chmod/chown that waited for the bytes on the client ("store-attrs"):
        # checked before any byte lands, applied after them in their commit.
        status = parse_attrs(attrs, ("mode", "owner", "group")) if attrs is not None else {}
        h = self._vol(f)

        limit = self.config.max_file_size
        if offset + len(data) > limit or (new_length is not None and new_length > limit):
            raise self._over("EFBIG", f"file would be larger than {limit} bytes")

        before: list[tuple[int, ...]] = []  # the file when the store began

        def checked() -> Vnode:
            """The caller's checks of the file, on the row the store changes."""
            old = h.vol.get(f.vnode, f.unique)
            require_write(old, c, "write")
            if status:
                check_store_status(old, c, status)
            before.append(_changeable(old))
            return old

        def then_status(v: Vnode) -> Vnode:
            # After the bytes, as the client's chmod came after its writes
            # (a write's setuid clearing must not undo a chmod that followed).
            if not status:
                return v
            return h.vol.store_status(f.vnode, f.unique, check_store_status(v, c, status))

        def drop_privs() -> Vnode:
            old = h.vol.get(f.vnode, f.unique)
            require_write(old, c, "write")
            mode = mode_after_write(old, c.root)
            return old if mode is None else h.vol.store_status(f.vnode, f.unique, {"mode": mode})

        try:
            cur = await h.read(lambda: h.vol.get(f.vnode, f.unique), lambda _: (), inline=True)
            if mode_after_write(cur, c.root) is not None:
                # setuid/setgid go in a commit of their own before any byte
                # lands, and stay gone if the store then fails (as on Linux).
                before.append(_changeable(cur))
                await h.commit(drop_privs, op="FS.StoreData:privs")
            v = await self._store(
                h, f, checked, data, offset, new_length, mtime_ns, then_status, cur.size
            )
        except Exception:
            # A store that failed may still have changed the file (bytes
            # landed and the DV moved, or setuid went): holders hear of it
            # before the error reply, as after any change.
            if before and await self._differs(h, f, before[0]):
                await self._changed(st, f)
            raise
        vs = h.vol.volsync()
        self.metrics.inc("bytes_stored", len(data))
        await self._changed(st, f)
        return {"status": _st(v, c), "volsync": vs}

    async def _store(
        self,
        h: VolumeHandle,
        f: Fid,
        checked: Callable[[], Vnode],
        data: bytes,
        offset: int,
        new_length: int | None,
        mtime_ns: int | None,
        then: Callable[[Vnode], Vnode],
        size: int,
    ) -> Vnode:
        """Checks, intent (unless the file is armed), bytes, metadata commit
        (``then`` adds to it: the attributes that came with the store).
        ``checked()``: the caller's checks, returning the file's row.
        ``size``: the file's size before it (read without its lock: a
        truncation meanwhile that grows it past ``inline_max`` spills it then).

        Under the file's lock; the bytes go in beside other commits.  Shielded:
        a store that started finishes (or settles) even when the server stops.
        """
        vol, vn = h.vol, f.vnode
        if len(data) <= SMALL_STORE:
            # Into the commit itself (Volume.store_small): one WAL sync, shared.
            def small() -> Vnode:
                # store_small runs store_begin's checks on the row read here.
                old = checked()
                return then(vol.store_small(vn, f.unique, offset, data, new_length, mtime_ns, old))

            async with h.active(), h.file_lock(vn):
                # Light unless the file may outgrow its inline bytes (a spill
                # writes and syncs a data file inside the change); an inline
                # file already over the limit (lowered since) spills too.
                after = max(offset + len(data), size if new_length is None else new_length)
                light = after <= vol.inline_max
                with h.writing(vn):
                    return await h.commit(small, op=m.FS_STORE_DATA, light=light)

        def begin() -> tuple[Vnode, int]:
            return vol.store_begin(vn, f.unique, offset, len(data), new_length, checked())

        async with h.active(), h.file_lock(vn):
            with trio.CancelScope(shield=True):
                # Redo records a failed post-commit step left go in first:
                # this store's commit drops them (Volume.store_finish).
                await h.repair(vn, locked=True)
                vol._storing.add(vn)  # before the checks: see Volume.run_batch
                try:
                    _v, new_size = await h.read(begin, lambda _: ())
                    # Its bytes to a data file first (read on the trio thread's
                    # own read connection, never the writer's).
                    if await h.read(partial(vol.is_inline, vn), lambda _: (), inline=True):
                        await h.commit(partial(vol.uninline, vn, f.unique), op="FS.StoreData:spill")
                    if vn not in vol._armed:
                        try:
                            await h.commit(partial(vol.arm, vn, f.unique), op="FS.StoreData:intent")
                        except BaseException:
                            await h.commit(partial(vol.store_failed, vn), op="FS.StoreData:settle")
                            raise
                    with h.writing(vn):
                        try:
                            await trio.to_thread.run_sync(
                                vol.store_write,
                                vn,
                                f.unique,
                                offset,
                                data,
                                new_size,
                                m.FS_STORE_DATA,
                            )
                            return await h.commit(
                                lambda: then(vol.store_finish(vn, f.unique, new_size, mtime_ns)),
                                op=m.FS_STORE_DATA,
                            )
                        except BaseException:
                            # Bytes may have changed: a new DV now (see
                            # Volume.store_data), settled before FetchData may
                            # read the file again (no torn bytes under the old DV).
                            await h.commit(partial(vol.store_failed, vn), op="FS.StoreData:settle")
                            raise
                finally:
                    vol._storing.discard(vn)

    async def store_status(
        self, st: ClientState, cred: Any, fid: Any, attrs: Any
    ) -> dict[str, Any]:
        c = self.caller(cred)
        f = Fid.from_wire(fid)
        clean = parse_attrs(attrs, ("mode", "owner", "group", "mtime_ns", "size"))
        limit = self.config.max_file_size
        if clean.get("size", 0) > limit:
            raise self._over("EFBIG", f"file would be larger than {limit} bytes")
        h = self._vol(f)

        before: list[tuple[int, ...]] = []

        def write() -> tuple[Vnode, VolSync]:
            old = h.vol.get(f.vnode, f.unique)
            allowed = check_store_status(old, c, clean)
            before.append(_changeable(old))
            return h.vol.store_status(f.vnode, f.unique, allowed), h.vol.volsync()

        try:
            if "size" in clean:
                # A truncation changes the data file after its commit: not beside a store.
                async with h.active(), h.file_lock(f.vnode):
                    with h.writing(f.vnode):
                        v, vs = await h.commit(write, op=m.FS_STORE_STATUS)
            else:
                v, vs = await h.commit(write, op=m.FS_STORE_STATUS, light=True)
        except Exception:
            # A change that failed may still have moved the file (a failed
            # post-commit step does not fail it: see Volume.run_batch):
            # holders hear of any change before the error reply.
            if before and await self._differs(h, f, before[0]):
                await self._changed(st, f)
            raise
        await self._changed(st, f)
        return {"status": _st(v, c), "volsync": vs}

    # -- namespace changes -----------------------------------------------------

    async def _create(
        self,
        st: ClientState,
        cred: Any,
        dir_fid: Any,
        name: Any,
        mode: Any,
        ftype: FileType,
        target: bytes | None = None,
        rdev: int = 0,
    ) -> dict[str, Any]:
        c = self.caller(cred)
        d = Fid.from_wire(dir_fid)
        name = self._name(name)
        mode = parse_mode(mode)
        h = self._vol(d)
        cbs: list[CallBack] = []

        def write() -> tuple[Vnode, Vnode, VolSync]:
            dv = h.vol.get_dir(d.vnode, d.unique)
            require_dir_change(dv, c, "create")
            self._room(dv)
            gid, m = c.gid, mode
            if dv.mode & S_ISGID:
                # BSD group semantics in a setgid directory; subdirectories inherit it.
                gid = dv.group
                if ftype == FileType.DIRECTORY:
                    m |= S_ISGID
            elif m & S_ISGID and not c.root and ftype != FileType.DIRECTORY:
                m &= ~S_ISGID
            v, dv = h.vol.create_vnode(d.vnode, d.unique, name, ftype, m, c.uid, gid, target,
                                       rdev, dv)  # fmt: skip
            return v, dv, h.vol.volsync()

        def then(r: tuple[Vnode, Vnode, VolSync]) -> None:
            cbs.append(self.grant(st, Fid(d.volume, r[0].vnode, r[0].unique)))
            cbs.append(self.grant(st, d))

        op = {FileType.FILE: m.FS_CREATE_FILE, FileType.DIRECTORY: m.FS_MAKE_DIR,
              FileType.SYMLINK: m.FS_SYMLINK}.get(ftype, m.FS_MAKE_NODE)  # fmt: skip
        v, dv, vs = await h.commit(write, then=then, op=op, light=True)
        await self._changed(st, d)
        return {"fid": Fid(d.volume, v.vnode, v.unique), "status": _st(v, c),
                "callback": cbs[0], "dir_status": _st(dv, c), "dir_callback": cbs[1],
                "volsync": vs}  # fmt: skip

    async def create_file(
        self, st: ClientState, cred: Any, dir_fid: Any, name: Any, mode: Any
    ) -> dict[str, Any]:
        return await self._create(st, cred, dir_fid, name, mode, FileType.FILE)

    async def make_dir(
        self, st: ClientState, cred: Any, dir_fid: Any, name: Any, mode: Any
    ) -> dict[str, Any]:
        return await self._create(st, cred, dir_fid, name, mode, FileType.DIRECTORY)

    async def symlink(
        self, st: ClientState, cred: Any, dir_fid: Any, name: Any, target: Any, mode: Any
    ) -> dict[str, Any]:
        target = _bytes(target, "target")
        if not target:
            raise RpcError("EINVAL", "empty symlink target")
        if len(target) > MAX_SYMLINK:
            raise RpcError("ENAMETOOLONG", f"symlink target over {MAX_SYMLINK} bytes")
        return await self._create(st, cred, dir_fid, name, mode, FileType.SYMLINK, target)

    async def make_node(
        self, st: ClientState, cred: Any, dir_fid: Any, name: Any, ftype: Any, mode: Any,
        rdev: Any,
    ) -> dict[str, Any]:  # fmt: skip
        """A FIFO, socket or device node: a vnode with type, mode and rdev, no data.
        Checked before anything reaches the volume: an unknown type is EINVAL,
        a device node by anyone but root EPERM (the kernel's CAP_MKNOD rule)."""
        if type(ftype) is not int or ftype not in SPECIAL_TYPES:
            raise RpcError("EINVAL", f"MakeNode type must be one of 4..7, not {ftype!r:.50}")
        kind = FileType(ftype)
        rdev = _uint(rdev, MAX_UINT64, "rdev")
        if kind in DEVICE_TYPES:
            if not self.caller(cred).root:
                raise RpcError("EPERM", "only root makes device nodes")
        else:
            rdev = 0  # as Linux: a FIFO or socket has no device number
        return await self._create(st, cred, dir_fid, name, mode, kind, None, rdev)

    async def link(
        self, st: ClientState, cred: Any, dir_fid: Any, name: Any, fid: Any
    ) -> dict[str, Any]:
        c = self.caller(cred)
        d = Fid.from_wire(dir_fid)
        name = self._name(name)
        f = Fid.from_wire(fid)
        if f.volume != d.volume:
            raise RpcError("EXDEV", "hard link across volumes")
        h = self._vol(d)
        cbs: list[CallBack] = []

        def write() -> tuple[Vnode, Vnode, VolSync]:
            dv = h.vol.get_dir(d.vnode, d.unique)
            require_dir_change(dv, c, "link")
            self._room(dv)
            v, dv = h.vol.link(d.vnode, d.unique, name, f.vnode, f.unique)
            return v, dv, h.vol.volsync()

        v, dv, vs = await h.commit(write, then=lambda _: cbs.append(self.grant(st, d)), light=True,
                                   op=m.FS_LINK)  # fmt: skip
        await self._changed(st, d, f)
        return {"status": _st(v, c), "dir_status": _st(dv, c), "dir_callback": cbs[0],
                "volsync": vs}  # fmt: skip

    async def remove_file(
        self, st: ClientState, cred: Any, dir_fid: Any, name: Any
    ) -> dict[str, Any]:
        c, f, v, dv, vs, cb = await self._remove(st, cred, dir_fid, name, "unlink")
        return {"fid": f, "status": _st(v, c), "dir_status": _st(dv, c),
                "dir_callback": cb, "volsync": vs}  # fmt: skip

    async def remove_dir(
        self, st: ClientState, cred: Any, dir_fid: Any, name: Any
    ) -> dict[str, Any]:
        c, f, _v, dv, vs, cb = await self._remove(st, cred, dir_fid, name, "rmdir")
        return {"fid": f, "dir_status": _st(dv, c), "dir_callback": cb, "volsync": vs}

    async def _remove(
        self, st: ClientState, cred: Any, dir_fid: Any, name: Any, what: str
    ) -> tuple[Caller, Fid, Vnode, Vnode, VolSync, CallBack]:
        """unlink or rmdir: checked and applied under the volume lock, the
        directory's promise granted to the caller, every other holder broken
        before the reply."""
        c = self.caller(cred)
        d = Fid.from_wire(dir_fid)
        name = check_name(name)
        h = self._vol(d)
        remove = h.vol.remove_file if what == "unlink" else h.vol.remove_dir
        cbs: list[CallBack] = []

        def may(dv: Vnode, v: Vnode | None) -> None:
            if v is None:
                require_dir_change(dv, c, what)
            else:
                check_sticky(dv, v, c, what)

        def write() -> tuple[Vnode, Vnode, VolSync]:
            v, dv = remove(d.vnode, d.unique, name, may)
            return v, dv, h.vol.volsync()

        op = m.FS_REMOVE_FILE if what == "unlink" else m.FS_REMOVE_DIR
        v, dv, vs = await self._commit_telling(
            st, h, write, lambda r: [d, Fid(d.volume, r[0].vnode, r[0].unique)],
            then=lambda _: cbs.append(self.grant(st, d)), op=op,
        )  # fmt: skip
        return c, Fid(d.volume, v.vnode, v.unique), v, dv, vs, cbs[0]

    async def _commit_telling(
        self, st: ClientState, h: VolumeHandle, write: Callable[[], T],
        changed: Callable[[T], list[Fid]], *, then: Callable[[T], None], op: str,
    ) -> T:  # fmt: skip
        """A change whose breaks go out while its commit syncs, so the reply
        waits for the longer of the two, not their sum.  When its SQL ran
        (the change is decided, see ``VolumeHandle.commit``) and another
        client holds a promise on ``changed(result)``, they are sent; from then
        until the commit is done no other client gets a promise on
        ``changed(result)`` (``grant``), so none is left on the state
        before the change.  A commit that fails after the breaks went out
        leaves only spurious breaks: the clients fetch again.  When nobody
        else held one then, the breaks follow the commit as for other
        changes (a promise granted meanwhile is found by them)."""
        told: list[Fid] = []
        marked = False  # whether _telling holds ``told`` for this change
        failed: Exception | None = None

        def others_hold(result: T) -> bool:  # commit thread: only then wake trio
            table = self.table
            return any(table.others_hold(f, st.cid) for f in changed(result))

        def unmark() -> None:
            nonlocal marked
            if marked:
                self._told(told, st)
                marked = False

        async def tell() -> None:
            event("change", client=st.uuid, fids=[str(f) for f in told])
            await self.breaker.break_fids(told, st)

        try:
            async with trio.open_nursery() as nursery:

                def on_decided(result: T) -> None:  # trio thread, the commit syncing
                    # Run by trio's entry queue, where an exception would end
                    # the server: on any failure the breaks follow the commit.
                    nonlocal marked
                    try:
                        told[:] = changed(result)
                        self._tell(told, st)
                        marked = True
                        nursery.start_soon(tell)
                    except Exception:
                        log.exception("early breaks of %s failed; sent after the commit", op)
                        unmark()
                        told.clear()

                try:
                    result = await h.commit(write, then=then, op=op, decided=on_decided, light=True,
                                            decided_if=others_hold)  # fmt: skip
                except Exception as exc:  # raised below as itself, not in a group
                    # A tell under way runs to its end: break_fids has already
                    # dropped the holders' promises from the table, so a break
                    # cut short would leave them trusting a promise nothing
                    # breaks any more.  A spurious break only makes them fetch.
                    failed = exc
                else:
                    if marked:
                        h.changed(f.vnode for f in told)  # reads meanwhile read again
                        unmark()  # reads see the new state now: promises on it are right
        finally:
            unmark()
        if failed is not None:
            raise failed
        if not told:  # nobody else held a promise when the SQL ran: break as usual
            await self._changed(st, *changed(result))
        return result

    def _tell(self, fids: list[Fid], st: ClientState) -> None:
        for f in fids:
            self._telling.setdefault(f, []).append(st.cid)

    def _told(self, fids: list[Fid], st: ClientState) -> None:
        for f in fids:
            changers = self._telling.get(f)
            if changers is not None:
                changers.remove(st.cid)
                if not changers:
                    del self._telling[f]

    async def rename(
        self,
        st: ClientState,
        cred: Any,
        old_dir: Any,
        old_name: Any,
        new_dir: Any,
        new_name: Any,
        flags: Any,
    ) -> dict[str, Any]:
        c = self.caller(cred)
        od = Fid.from_wire(old_dir)
        nd = Fid.from_wire(new_dir)
        old_name = check_name(old_name)
        new_name = self._name(new_name)
        if type(flags) is not int:
            raise RpcError("EINVAL", "flags must be an int")
        if od.volume != nd.volume:
            raise RpcError("EXDEV", "rename across volumes")
        h = self._vol(od)

        def write() -> tuple[Any, VolSync]:
            self._may_rename(h, od, old_name, nd, new_name, c)
            r = h.vol.rename(od.vnode, od.unique, old_name, nd.vnode, nd.unique, new_name, flags)
            return r, h.vol.volsync()

        r, vs = await h.commit(write, op=m.FS_RENAME, light=True)
        vol = od.volume
        moved = Fid(vol, r.moved.vnode, r.moved.unique)
        repl = Fid(vol, r.replaced.vnode, r.replaced.unique) if r.replaced is not None else None
        if r.changed_nothing:
            return self._rename_result(moved, r, None, vs, c)
        await self._changed(st, od, nd, moved, repl)
        return self._rename_result(moved, r, repl, vs, c)

    @staticmethod
    def _rename_result(
        moved: Fid, r: Any, repl: Fid | None, vs: VolSync, c: Caller
    ) -> dict[str, Any]:
        return {
            "fid": moved,
            "status": _st(r.moved, c),
            "old_dir_status": _st(r.old_dir, c),
            "new_dir_status": _st(r.new_dir, c),
            "replaced_fid": repl,
            "replaced_status": _st(r.replaced, c) if r.replaced is not None else None,
            "volsync": vs,
        }

    # -- permission checks that need several vnodes (run under the volume lock) --

    def _may_rename(
        self, h: VolumeHandle, od: Fid, old_name: bytes, nd: Fid, new_name: bytes, c: Caller
    ) -> None:
        odv = h.vol.get_dir(od.vnode, od.unique)
        ndv = h.vol.get_dir(nd.vnode, nd.unique)
        require_dir_change(odv, c, "rename")
        require_dir_change(ndv, c, "rename")
        v, _ = h.vol.lookup(od.vnode, od.unique, old_name)
        check_sticky(odv, v, c, "rename")
        try:
            tgt, _ = h.vol.lookup(nd.vnode, nd.unique, new_name)
        except RpcError:
            tgt = None
        if tgt is not None:
            check_sticky(ndv, tgt, c, "rename")
        elif ndv.vnode != odv.vnode:
            self._room(ndv)
        if v.is_dir and ndv.vnode != odv.vnode:
            # Its ".." changes: write permission on the directory itself.
            require(v, c, W, "rename")

    # -- callbacks ---------------------------------------------------------------

    async def give_up_all_callbacks(self, st: ClientState) -> None:
        n = self.table.give_up(st.cid)
        self.metrics.inc("giveups")
        self.metrics.inc("promises_given_up", n)
        event("giveup", client=st.uuid, promises=n)
        return None

    async def get_capabilities(self, st: ClientState) -> dict[str, Any]:
        return {"capabilities": list(CAPABILITIES)}

    def handlers(self) -> dict[str, Callable[..., Any]]:
        return {
            m.FS_FETCH_STATUS: self.fetch_status,
            m.FS_FETCH_DATA: self.fetch_data,
            m.FS_STORE_DATA: self.store_data,
            m.FS_STORE_STATUS: self.store_status,
            m.FS_CREATE_FILE: self.create_file,
            m.FS_MAKE_DIR: self.make_dir,
            m.FS_SYMLINK: self.symlink,
            m.FS_LINK: self.link,
            m.FS_REMOVE_FILE: self.remove_file,
            m.FS_REMOVE_DIR: self.remove_dir,
            m.FS_RENAME: self.rename,
            m.FS_LOOKUP: self.lookup,
            m.FS_READ_DIR: self.read_dir,
            m.FS_INLINE_BULK_STATUS: self.inline_bulk_status,
            m.FS_GET_VOLUME_STATUS: self.get_volume_status,
            m.FS_GIVE_UP_ALL_CALLBACKS: self.give_up_all_callbacks,
            m.FS_GET_CAPABILITIES: self.get_capabilities,
            m.FS_MAKE_NODE: self.make_node,
            m.FS_FETCH_XATTRS: partial(xattrs.fetch_xattrs, self),
            m.FS_SET_XATTR: partial(xattrs.set_xattr, self),
            m.FS_REMOVE_XATTR: partial(xattrs.remove_xattr, self),
        }

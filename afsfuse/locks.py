"""Client locks: ``flock()`` and ``fcntl()`` locks as fileserver locks.

What it holds.  ``LockManager`` keeps, per file, the locks the local
processes hold (POSIX record locks by kernel lock owner and byte range,
flock locks by open file) and the one whole-file server lock
(FS.SetLock, SPEC 5.1) that covers them: exclusive while any local lock is a
write lock, shared while all are read locks, none when there are none.  So
local processes are arbitrated byte-range by byte-range here (what the
kernel AFS client does with the VFS), and across machines a lock is
whole-file: a read lock on bytes 0..9 on one client conflicts with a write
lock on bytes 100..109 on another.  flock and fcntl locks conflict with each
other (as on NFS), since both are server locks.

Waiting.  The server never queues: a conflict is EAGAIN, and ``F_SETLKW`` /
blocking ``flock`` retry with back-off (``BACKOFF_MIN`` doubling to
``BACKOFF_MAX``), woken early when a local lock goes.  The wait is the only
place a request can be cancelled (a signal: pyfuse3 cancels the handler and
replies EINTR); server transitions are shielded, so no lock is left half
taken.

Holding.  A background task extends every server lock at a third of the
lifetime the server granted.  An extension that gets ENOLCK (the server let
the lock expire, or restarted and the grace period passed) marks the file's
lock *lost*: logged, counted, and the next lock request on it starts over.
A request that cannot reach the server fails with ENOLCK, never succeeds.

Lock-to-unlock consistency.  Taking the server lock (none -> held) voids
the file's promise and fetches its status, and when its data version is not
the one the kernel's pages hold, drops those pages (and waits for that)
before the request returns: the new holder reads what the last holder
stored.  Dropping the server lock, or downgrading it, first stores this
client's dirty data of the file.

Imports: trio, ``protocol`` and ``afsfuse.stats``; the cache manager only
through the narrow ``LockContext`` (``CacheManagerLocks`` adapts its public
``rpc``, ``getattr`` and ``fsync``); never pyfuse3 (the kernel page drop is a
callable the FUSE adapter passes in).
"""

from __future__ import annotations

import errno
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import trio

from afsfuse.stats import log_event
from protocol import methods as M
from protocol.connection import ConnectionLost, RpcTimeout
from protocol.errors import RpcError

if TYPE_CHECKING:
    from afsfuse.cache_manager import CacheManager
    from afsfuse.vnode import Vnode

log = logging.getLogger(__name__)

F_RDLCK, F_WRLCK, F_UNLCK = 0, 1, 2  # Linux fcntl.h values
LOCK_SH, LOCK_EX, LOCK_NB, LOCK_UN = 1, 2, 4, 8
INF = 1 << 63  # "to the end of the file, however long it grows"
BACKOFF_MIN = 0.01
BACKOFF_MAX = 0.5
SHARED, EXCLUSIVE = 0, 1


class LockContext(Protocol):
    """What the lock manager needs from the rest of the client."""

    async def call(self, vnode: Vnode, method: str, *params: Any) -> Any:
        """One RPC to the server holding ``vnode``'s volume."""

    async def revalidate(self, vnode: Vnode, cred: Any) -> int:
        """Fetch the status afresh (no promise trusted); returns the DV."""

    async def store_dirty(self, vnode: Vnode, cred: Any) -> None:
        """Store this client's unstored writes of ``vnode``."""


#: Drop the kernel's cached pages and attributes of a vnode (``attr_only``:
#: attributes only), and return once the kernel did.
DropPages = Callable[["Vnode", bool], Awaitable[None]]


@dataclass
class LocalLock:
    owner: int
    flock: bool
    write: bool
    start: int
    end: int  # exclusive; INF for "to EOF"
    pid: int

    def overlaps(self, start: int, end: int) -> bool:
        return self.start < end and start < self.end


@dataclass
class FileLocks:
    vnode: Vnode
    locks: list[LocalLock] = field(default_factory=list)
    server: int | None = None  # SHARED / EXCLUSIVE held on the server, or None
    cred: Any = None  # the credentials the server lock was taken with
    lost: bool = False
    users: int = 0  # requests in progress on it
    mutex: trio.Lock = field(default_factory=trio.Lock)  # server transitions
    changed: trio.Event = field(default_factory=trio.Event)

    def need(self) -> int | None:
        if not self.locks:
            return None
        return EXCLUSIVE if any(lk.write for lk in self.locks) else SHARED

    def conflict(
        self, owner: int, flock: bool, write: bool, start: int, end: int
    ) -> LocalLock | None:
        for lk in self.locks:
            if (lk.owner, lk.flock) == (owner, flock):
                continue
            if (write or lk.write) and lk.overlaps(start, end):
                return lk
        return None

    def wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


def _range(start: int, length: int) -> tuple[int, int]:
    if start < 0 or length < 0:
        raise OSError(errno.EINVAL, "bad lock range")
    return start, (start + length if length else INF)


def _unreachable(exc: BaseException) -> bool:
    return isinstance(exc, ConnectionLost | RpcTimeout | OSError | trio.TooSlowError)


class LockManager:
    def __init__(self, ctx: LockContext, drop_pages: DropPages | None = None) -> None:
        self.ctx = ctx
        self.drop_pages = drop_pages
        # This daemon run's holder id: a restarted daemon is a new holder, and
        # the server drops its predecessor's locks (SPEC 5.1).
        self.holder = random.getrandbits(63)
        self.files: dict[Any, FileLocks] = {}
        self.interval = 60.0  # extension period; a third of the granted lifetime
        self._kick = trio.Event()
        self.stats = {"set": 0, "conflicts": 0, "waits": 0, "released": 0, "extended": 0,
                      "lost": 0, "unreachable": 0, "revalidated": 0,
                      "pages_dropped": 0}  # fmt: skip

    # -- requests from the FUSE adapter --------------------------------------------

    async def setlk(
        self, vnode: Vnode, owner: int, *, flock: bool, type_: int, start: int = 0,
        length: int = 0, pid: int = 0, sleep: bool = False, cred: Any = None,
    ) -> None:  # fmt: skip
        """Take, convert or (``F_UNLCK``) drop a lock of ``owner``."""
        lo, hi = (0, INF) if flock else _range(start, length)
        if type_ == F_UNLCK:
            await self._unlock(vnode, owner, flock, lo, hi)
            return
        if type_ not in (F_RDLCK, F_WRLCK):
            raise OSError(errno.EINVAL, "bad lock type")
        write = type_ == F_WRLCK
        with self._using(vnode) as fl:
            if flock and any(lk.owner == owner and lk.flock and lk.write != write
                             for lk in fl.locks):  # fmt: skip
                # flock(2) converts by dropping the old lock first (so two
                # holders upgrading shared to exclusive cannot deadlock), as
                # Linux does; a failed LOCK_NB conversion leaves no lock.
                await self._unlock(vnode, owner, True, 0, INF)
            await self._take(fl, LocalLock(owner, flock, write, lo, hi, pid), sleep, cred)

    async def _take(self, fl: FileLocks, new: LocalLock, sleep: bool, cred: Any) -> None:
        owner, flock, write, lo, hi = new.owner, new.flock, new.write, new.start, new.end
        delay = BACKOFF_MIN
        while True:
            if fl.conflict(owner, flock, write, lo, hi) is None:
                want = EXCLUSIVE if write or fl.need() == EXCLUSIVE else SHARED
                with trio.CancelScope(shield=True):
                    granted = await self._acquire(fl, want, cred)
                    # Another local owner may have locked while we asked.
                    if granted and fl.conflict(owner, flock, write, lo, hi) is None:
                        self._apply(fl, new)
                        self.stats["set"] += 1
                        return
                    if granted:
                        await self._settle(fl)  # give back what we took for nothing
            self.stats["conflicts"] += 1
            if not sleep:
                raise OSError(errno.EAGAIN, "locked")
            self.stats["waits"] += 1
            # Woken early by a local unlock; remote ones are polled.
            with trio.move_on_after(delay):
                await fl.changed.wait()
            delay = min(delay * 2, BACKOFF_MAX)

    async def getlk(
        self, vnode: Vnode, owner: int, *, flock: bool, type_: int, start: int, length: int,
        cred: Any = None,
    ) -> tuple[int, int, int, int]:  # fmt: skip
        """``F_GETLK``: (type, start, length, pid) of a conflicting lock, or
        ``F_UNLCK`` and the range asked for.  A conflicting lock on another
        client is reported as the whole file, pid 0."""
        with self._using(vnode) as fl:
            return await self._test(fl, owner, flock, type_, start, length, cred)

    async def _test(
        self, fl: FileLocks, owner: int, flock: bool, type_: int, start: int, length: int,
        cred: Any,
    ) -> tuple[int, int, int, int]:  # fmt: skip
        lo, hi = _range(start, length)
        write = type_ == F_WRLCK
        other = fl.conflict(owner, flock, write, lo, hi)
        if other is not None:
            return (F_WRLCK if other.write else F_RDLCK, other.start,
                    0 if other.end == INF else other.end - other.start, other.pid)  # fmt: skip
        want = EXCLUSIVE if write else SHARED
        if fl.server is not None and fl.server >= want:
            return (F_UNLCK, start, length, 0)
        # Ask the server by trying the lock and giving it back at once.
        with trio.CancelScope(shield=True):
            async with fl.mutex:
                if fl.server is not None and fl.server >= want:
                    return (F_UNLCK, start, length, 0)
                if await self._probe(fl, want, cred):
                    return (F_UNLCK, start, length, 0)
                if want == EXCLUSIVE and fl.server is None and await self._probe(fl, SHARED, cred):
                    return (F_RDLCK, 0, 0, 0)
        return (F_WRLCK, 0, 0, 0)

    async def release_owner(self, vnode: Vnode, owner: int, *, flock: bool) -> None:
        """close(): drop ``owner``'s POSIX locks (or the open file's flock
        lock) on ``vnode``.  Never raises (the close goes on)."""
        fl = self.files.get(self._key(vnode))
        if fl is None or not any((lk.owner, lk.flock) == (owner, flock) for lk in fl.locks):
            return
        try:
            await self._unlock(vnode, owner, flock, 0, INF)
        except (OSError, RpcError) as exc:
            log.warning("%s: dropping locks at close: %s", vnode.fid, exc)

    # -- local table ---------------------------------------------------------------

    @staticmethod
    def _key(vnode: Vnode) -> Any:
        return (vnode.volume.key, vnode.fid)

    @contextmanager
    def _using(self, vnode: Vnode) -> Iterator[FileLocks]:
        """The file's entry, kept while a request uses it (so a server lock is
        never taken on an entry already dropped) and dropped once idle (so a
        vnode the cache evicts is not kept here)."""
        k = self._key(vnode)
        fl = self.files.get(k)
        if fl is None:
            fl = self.files[k] = FileLocks(vnode)
        fl.users += 1
        try:
            yield fl
        finally:
            fl.users -= 1
            if not fl.users and not fl.locks and fl.server is None and self.files.get(k) is fl:
                del self.files[k]

    @staticmethod
    def _cut(fl: FileLocks, owner: int, flock: bool, lo: int, hi: int) -> None:
        """Remove [lo, hi) from ``owner``'s locks, splitting ranges (POSIX)."""
        out: list[LocalLock] = []
        for lk in fl.locks:
            if (lk.owner, lk.flock) != (owner, flock) or not lk.overlaps(lo, hi):
                out.append(lk)
                continue
            if lk.start < lo:
                out.append(LocalLock(lk.owner, lk.flock, lk.write, lk.start, lo, lk.pid))
            if hi < lk.end:
                out.append(LocalLock(lk.owner, lk.flock, lk.write, hi, lk.end, lk.pid))
        fl.locks = out

    def _apply(self, fl: FileLocks, new: LocalLock) -> None:
        self._cut(fl, new.owner, new.flock, new.start, new.end)
        fl.locks.append(new)
        fl.wake()  # a conversion (write -> read) may let a waiter in

    async def _unlock(self, vnode: Vnode, owner: int, flock: bool, lo: int, hi: int) -> None:
        if self._key(vnode) not in self.files:
            return
        with self._using(vnode) as fl, trio.CancelScope(shield=True):
            self._cut(fl, owner, flock, lo, hi)
            self.stats["released"] += 1
            try:
                await self._settle(fl)
            finally:
                fl.wake()

    # -- the server lock -------------------------------------------------------------

    async def _acquire(self, fl: FileLocks, want: int, cred: Any) -> bool:
        """Hold at least ``want`` on the server; False on a conflict there."""
        async with fl.mutex:
            if fl.server is not None and fl.server >= want and not fl.lost:
                return True
            first = fl.server is None or fl.lost
            try:
                r = await self.ctx.call(fl.vnode, M.FS_SET_LOCK, cred, fl.vnode.fid, want,
                                        self.holder)  # fmt: skip
            except RpcError as exc:
                if exc.code == "EAGAIN":
                    return False
                raise self._error(fl, exc) from None
            except (OSError, trio.TooSlowError) as exc:
                raise self._error(fl, exc) from None
            fl.server, fl.cred, fl.lost = want, cred, False
            self._granted(r)
            log_event("lock_set", fid=fl.vnode.fid, exclusive=want)
            if first:
                try:
                    await self._revalidate(fl, cred)
                except (RpcError, OSError, trio.TooSlowError) as exc:
                    # No lock without a current view of the file: give it back.
                    await self._server_release(fl)
                    raise self._error(fl, exc) from None
            return True

    async def _probe(self, fl: FileLocks, want: int, cred: Any) -> bool:
        """Whether ``want`` could be had now (taken and given back); mutex held."""
        try:
            await self.ctx.call(fl.vnode, M.FS_SET_LOCK, cred, fl.vnode.fid, want, self.holder)
        except RpcError as exc:
            if exc.code == "EAGAIN":
                return False
            raise self._error(fl, exc) from None
        except (OSError, trio.TooSlowError) as exc:
            raise self._error(fl, exc) from None
        if fl.server is None:
            await self._server_release(fl)
        else:  # we held a shared lock: back to it
            await self.ctx.call(fl.vnode, M.FS_SET_LOCK, cred, fl.vnode.fid, fl.server,
                                self.holder)  # fmt: skip
        return True

    async def _settle(self, fl: FileLocks) -> None:
        """Bring the server lock down to what the local locks need."""
        async with fl.mutex:
            need = fl.need()
            if fl.server is None or (need is not None and need >= fl.server):
                return
            # Lock-to-unlock: what this client wrote goes to the server before
            # another client can lock the file and read it.  A store that
            # fails is reported to the unlocker, but the lock goes regardless
            # (the data stays dirty, stored at close as always).
            stored: BaseException | None = None
            try:
                await self.ctx.store_dirty(fl.vnode, fl.cred)
            except (RpcError, OSError) as exc:
                stored = exc
            if need is None:
                await self._server_release(fl)
            else:
                try:
                    await self.ctx.call(fl.vnode, M.FS_SET_LOCK, fl.cred, fl.vnode.fid, need,
                                        self.holder)  # fmt: skip
                    fl.server = need
                except (RpcError, OSError, trio.TooSlowError) as exc:
                    # Keeping the exclusive lock is safe; the extender keeps it.
                    log.warning("%s: downgrading the lock failed: %s", fl.vnode.fid, exc)
            if stored is not None:
                raise stored

    async def _server_release(self, fl: FileLocks) -> None:
        fl.server, lost, fl.lost = None, fl.lost, False
        if lost:
            return
        try:
            await self.ctx.call(fl.vnode, M.FS_RELEASE_LOCK, fl.vnode.fid, self.holder)
            log_event("lock_released", fid=fl.vnode.fid)
        except (RpcError, OSError, trio.TooSlowError) as exc:
            # The server lets it expire; locally it is gone either way.
            log.warning("%s: releasing the server lock failed: %s", fl.vnode.fid, exc)

    async def _revalidate(self, fl: FileLocks, cred: Any) -> None:
        v = fl.vnode
        dv = await self.ctx.revalidate(v, cred)
        self.stats["revalidated"] += 1
        if self.drop_pages is None:
            return
        if getattr(v, "kernel_dv", None) != dv:
            await self.drop_pages(v, False)
            v.kernel_dv = dv
            self.stats["pages_dropped"] += 1
        elif getattr(v, "kernel_attr_dv", dv) != dv:
            # Pages are current but the kernel may still clamp reads to an
            # old size until the (asynchronous) break invalidation lands.
            await self.drop_pages(v, True)

    def _granted(self, reply: Any) -> None:
        life = reply.get("expires_in") if isinstance(reply, dict) else None
        if isinstance(life, int | float) and life > 0 and life / 3 < self.interval:
            self.interval = life / 3
            self._kick.set()

    def _error(self, fl: FileLocks, exc: BaseException) -> OSError:
        if isinstance(exc, RpcError) and not _unreachable(exc):
            return OSError(exc.errno, f"lock: {exc}")
        self.stats["unreachable"] += 1
        log_event("lock_unreachable", fid=fl.vnode.fid, error=type(exc).__name__)
        return OSError(errno.ENOLCK, f"lock: server unreachable ({exc})")

    # -- extension -------------------------------------------------------------------

    async def run(self) -> None:
        """Extend every held server lock, a third of its lifetime apart."""
        while True:
            self._kick = trio.Event()
            with trio.move_on_after(self.interval) as waited:
                await self._kick.wait()
            if waited.cancelled_caught:
                await self.extend_all()
            # else: a grant shortened the interval; wait the new one from now

    async def extend_all(self) -> None:
        for fl in list(self.files.values()):
            async with fl.mutex:  # not racing a release or a change of mode
                await self._extend(fl)

    async def _extend(self, fl: FileLocks) -> None:
        if fl.server is None or fl.lost:
            return
        try:
            r = await self.ctx.call(fl.vnode, M.FS_EXTEND_LOCK, fl.vnode.fid, fl.server,
                                    self.holder)  # fmt: skip
            self.stats["extended"] += 1
            self._granted(r)
        except RpcError as exc:
            if exc.code != "ENOLCK":
                log.info("%s: extending the lock failed (will retry): %s", fl.vnode.fid, exc)
                return
            fl.lost = True
            self.stats["lost"] += 1
            log.warning("%s: the server no longer has our lock: lost", fl.vnode.fid)
            log_event("lock_lost", fid=fl.vnode.fid)
        except (OSError, trio.TooSlowError) as exc:
            log.info("%s: extending the lock failed (will retry): %s", fl.vnode.fid, exc)

    def listing(self) -> list[dict[str, Any]]:
        return [{"fid": str(fl.vnode.fid), "server": fl.server, "lost": fl.lost,
                 "locks": [[lk.owner, int(lk.flock), int(lk.write), lk.start,
                            None if lk.end == INF else lk.end, lk.pid] for lk in fl.locks]}
                for fl in self.files.values()]  # fmt: skip


def flock_type(op: int) -> tuple[int, bool]:
    """flock(2) ``op`` -> (fcntl lock type, whether to wait)."""
    sleep = not op & LOCK_NB
    if op & LOCK_UN:
        return F_UNLCK, False
    if op & LOCK_EX:
        return F_WRLCK, sleep
    if op & LOCK_SH:
        return F_RDLCK, sleep
    raise OSError(errno.EINVAL, f"bad flock op {op:#x}")


FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_ZEROS = 1 << 20  # a hole is punched by writing zeros, this much per write


async def fallocate(cm: Any, handle: Any, mode: int, offset: int, length: int, cred: Any) -> None:
    """fallocate(2) on an open file.  Mode 0 extends the file to
    ``offset + length`` if it is shorter (the server stores files sparsely:
    nothing is reserved, so ENOSPC/EDQUOT come at the writes as before);
    ``KEEP_SIZE`` alone does nothing; ``PUNCH_HOLE | KEEP_SIZE`` writes zeros
    over the range inside the file (stored at close, like any write).  Any
    other mode is EOPNOTSUPP."""
    if offset < 0 or length <= 0:
        raise OSError(errno.EINVAL, "bad fallocate range")
    v = handle.vnode
    if mode in (0, FALLOC_FL_KEEP_SIZE):
        if mode == 0 and offset + length > v.size():
            await cm.setattr(v, cred, size=offset + length)
        return
    if mode != FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE:
        raise OSError(errno.EOPNOTSUPP, f"fallocate mode {mode:#x}")
    end = min(offset + length, v.size())
    pos = offset
    while pos < end:
        n = min(_ZEROS, end - pos)
        await cm.write(handle, pos, bytes(n), cred)
        pos += n


class CacheManagerLocks:
    """``LockContext`` over the cache manager."""

    def __init__(self, cm: CacheManager) -> None:
        self.cm = cm

    async def call(self, vnode: Vnode, method: str, *params: Any) -> Any:
        return await self.cm.rpc(vnode.volume.server, method, *params)

    async def revalidate(self, vnode: Vnode, cred: Any) -> int:
        vnode.promise = None  # a break may still be on its way: ask the server
        st = await self.cm.getattr(vnode, cred)
        return st.data_version

    async def store_dirty(self, vnode: Vnode, cred: Any) -> None:
        await self.cm.fsync(vnode, cred)


__all__ = [
    "F_RDLCK",
    "F_UNLCK",
    "F_WRLCK",
    "CacheManagerLocks",
    "LockManager",
    "fallocate",
    "flock_type",
]

"""Whole-file advisory locks: FS.SetLock, FS.ExtendLock, FS.ReleaseLock (SPEC
section "Locks") and ``Admin.Locks``.

A lock is shared or exclusive on one fid, held by a *holder*: the client's
UUID plus a 64-bit id the client daemon picks at start (so a restarted
daemon with the same UUID is a new holder, and its predecessor's locks die
the moment it takes a lock of its own).  Setting never waits: a conflict is
EAGAIN and the client retries with back-off (``F_SETLKW``).  A holder may
upgrade shared to exclusive when it is the only holder, and downgrade.

A lock lives ``lifetime`` seconds (``--lock-lifetime``, default 300 s as in
OpenAFS) after it was set or last extended; the client extends it while
held.  So a client that dies, or that the server cannot hear from, loses its
locks one lifetime after its last extension at the latest.

**Restart.**  The table is volatile: a restarted server starts empty and, if
the data directory shows locks were granted in its previous run (the
``locks.used`` marker, written at the first grant of a run), in a *grace
period* of one lifetime.  During grace it grants no new lock
(EAGAIN), and an ``FS.ExtendLock`` of a lock it does not know re-creates it
if that does not conflict with locks already reclaimed.  Every live holder
extends within a lifetime, so by the end of grace the table holds every
lock still alive before the restart, and never two exclusive holders: a
reclaim that conflicts gets ENOLCK, as does an extension after grace of a
lock that expired.

Imports ``protocol`` (records, errors, methods) and, from the fileserver,
events, the permission helpers and (for types) ClientState and the volume
store it is handed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fileserver.events import event
from fileserver.perms import R, W, access
from protocol.errors import RpcError
from protocol.limits import MAX_UINT64
from protocol.methods import FS_EXTEND_LOCK, FS_RELEASE_LOCK, FS_SET_LOCK
from protocol.records import Fid

if TYPE_CHECKING:
    from fileserver.breaker import ClientState
    from fileserver.perms import Caller
    from fileserver.store import VolumeStore

log = logging.getLogger(__name__)

SHARED, EXCLUSIVE = 0, 1
MARKER = "locks.used"
DEFAULT_LIFETIME = 300.0
ADMIN_LOCKS = "Admin.Locks"

Holder = tuple[str, int]  # (client uuid, the daemon's lock id)


@dataclass
class FileLock:
    exclusive: bool = False
    holders: dict[Holder, float] = field(default_factory=dict)  # -> expires at (monotonic)


class LockTable:
    """The locks, keyed by fid.  Expired holders are dropped as they are met;
    ``clock`` is injectable for tests."""

    def __init__(
        self,
        lifetime: float = DEFAULT_LIFETIME,
        *,
        grace: bool = False,
        clock: Callable[[], float] = time.monotonic,
        on_first_grant: Callable[[], None] = lambda: None,
    ) -> None:
        self.lifetime = lifetime
        self.clock = clock
        self.grace_until = clock() + lifetime if grace else 0.0
        self._on_first_grant: Callable[[], None] | None = on_first_grant
        self.locks: dict[Fid, FileLock] = {}
        self._runs: dict[str, int] = {}  # client uuid -> holder id of its latest SetLock
        self.stats = {"set": 0, "conflicts": 0, "extended": 0, "reclaimed": 0, "released": 0,
                      "expired": 0, "superseded": 0}  # fmt: skip

    def in_grace(self) -> bool:
        return self.clock() < self.grace_until

    def _live(self, fid: Fid) -> FileLock | None:
        lk = self.locks.get(fid)
        if lk is None:
            return None
        now = self.clock()
        for h, until in list(lk.holders.items()):
            if until <= now:
                del lk.holders[h]
                self.stats["expired"] += 1
                event("lock_expired", fid=fid, client=h[0])
        if not lk.holders:
            del self.locks[fid]
            return None
        return lk

    def _supersede(self, holder: Holder) -> None:
        """A new daemon run of the same client: its predecessor's locks die.
        The table is scanned only when a client's holder id changes."""
        uuid, lid = holder
        if self._runs.get(uuid) == lid:
            return
        self._runs[uuid] = lid
        for fid in list(self.locks):
            lk = self.locks[fid]
            for h in [h for h in lk.holders if h[0] == uuid and h[1] != lid]:
                del lk.holders[h]
                self.stats["superseded"] += 1
            if not lk.holders:
                del self.locks[fid]

    def _grant(self, fid: Fid, holder: Holder, exclusive: bool) -> bool:
        lk = self._live(fid)
        others = [h for h in lk.holders if h != holder] if lk else []
        if others and (exclusive or (lk is not None and lk.exclusive)):
            return False
        if self._on_first_grant is not None:
            first, self._on_first_grant = self._on_first_grant, None
            first()
        if lk is None:
            lk = self.locks[fid] = FileLock()
        lk.exclusive = exclusive
        lk.holders[holder] = self.clock() + self.lifetime
        return True

    def set(self, fid: Fid, holder: Holder, exclusive: bool) -> float:
        """Set, upgrade or downgrade; returns the lifetime granted."""
        self._supersede(holder)
        lk = self._live(fid)
        held = lk is not None and holder in lk.holders
        if self.in_grace() and not held:
            self.stats["conflicts"] += 1
            raise RpcError("EAGAIN", "server restarted: no new locks during the grace period")
        if not self._grant(fid, holder, exclusive):
            self.stats["conflicts"] += 1
            raise RpcError("EAGAIN", f"{fid} is locked by another client")
        self.stats["set"] += 1
        event("lock_set", fid=fid, client=holder[0], exclusive=int(exclusive))
        return self.lifetime

    def extend(self, fid: Fid, holder: Holder, exclusive: bool) -> float:
        lk = self._live(fid)
        if lk is not None and holder in lk.holders:
            lk.holders[holder] = self.clock() + self.lifetime
            self.stats["extended"] += 1
            return self.lifetime
        if self.in_grace() and self._grant(fid, holder, exclusive):
            self.stats["reclaimed"] += 1
            event("lock_reclaimed", fid=fid, client=holder[0], exclusive=int(exclusive))
            return self.lifetime
        raise RpcError("ENOLCK", f"no lock on {fid} for this client (expired or lost)")

    def release(self, fid: Fid, holder: Holder) -> None:
        lk = self._live(fid)
        if lk is not None and lk.holders.pop(holder, None) is not None:
            self.stats["released"] += 1
            event("lock_released", fid=fid, client=holder[0])
            if not lk.holders:
                del self.locks[fid]

    def listing(self) -> list[dict[str, Any]]:
        now = self.clock()
        out = []
        for fid in list(self.locks):
            lk = self._live(fid)
            if lk is None:
                continue
            for (uuid, lid), until in lk.holders.items():
                out.append({"fid": str(fid), "client": uuid, "holder": lid,
                            "type": "exclusive" if lk.exclusive else "shared",
                            "expires_in": round(until - now, 1)})  # fmt: skip
        return out


def _fid(v: Any) -> Fid:
    try:
        return Fid.from_wire(v)
    except (TypeError, ValueError) as exc:
        raise RpcError("EINVAL", f"bad fid {v!r:.60}") from exc


def _type(v: Any) -> bool:
    if v not in (SHARED, EXCLUSIVE) or type(v) is not int:
        raise RpcError("EINVAL", f"lock type must be 0 (shared) or 1 (exclusive), not {v!r:.30}")
    return v == EXCLUSIVE


def _holder(st: ClientState, lid: Any) -> Holder:
    if type(lid) is not int or not 0 <= lid <= MAX_UINT64:
        raise RpcError("EINVAL", "lock holder id must be a uint64")
    return (st.uuid, lid)


class LockService:
    """The RPC handlers over one LockTable."""

    def __init__(
        self,
        store: VolumeStore,
        caller: Callable[[Any], Caller],
        lifetime: float = DEFAULT_LIFETIME,
        data_dir: Path | None = None,
    ) -> None:
        self.store = store
        self.caller = caller  # cred -> Caller (root squash applied)
        self.marker = Path(data_dir) / MARKER if data_dir is not None else None
        grace = self.marker is not None and self.marker.exists()
        self.table = LockTable(lifetime, grace=grace, on_first_grant=self._mark)
        if grace:
            log.info("locks were granted before this start: %.0fs grace period", lifetime)

    def _mark(self) -> None:
        if self.marker is not None:
            try:
                self.marker.write_text("locks were granted in this server run\n")
            except OSError as exc:  # only a restart's grace depends on it
                log.warning("cannot write %s: %s", self.marker, exc)

    async def _check_file(self, cred: Any, fid: Fid, exclusive: bool) -> None:
        """The fid must be a file the caller may read (shared) or write
        (exclusive), as open(2) would require before flock(2)."""
        c = self.caller(cred)
        h = self.store.get(fid.volume)
        v = await h.run(lambda: h.vol.get(fid.vnode, fid.unique))
        if v.is_dir:
            raise RpcError("EISDIR", f"{fid} is a directory")
        need = W if exclusive else R
        if access(v, c) & need != need:
            raise RpcError("EACCES", "lock: permission denied")

    async def set_lock(
        self, st: ClientState, cred: Any, fid: Any, type_: Any, holder: Any
    ) -> dict[str, Any]:
        f, excl, h = _fid(fid), _type(type_), _holder(st, holder)
        await self._check_file(cred, f, excl)
        return {"expires_in": self.table.set(f, h, excl)}

    async def extend_lock(
        self, st: ClientState, fid: Any, type_: Any, holder: Any
    ) -> dict[str, Any]:
        return {"expires_in": self.table.extend(_fid(fid), _holder(st, holder), _type(type_))}

    async def release_lock(self, st: ClientState, fid: Any, holder: Any) -> None:
        self.table.release(_fid(fid), _holder(st, holder))

    async def admin_locks(self, conn: Any) -> dict[str, Any]:
        if not conn.context.get("admin"):  # the rule of every Admin.* call
            raise RpcError("EACCES", "admin call on a connection that did not Admin.Auth")
        t = self.table
        return {"locks": t.listing(), "lifetime": t.lifetime,
                "grace_remaining": round(max(0.0, t.grace_until - t.clock()), 1),
                "stats": dict(t.stats)}  # fmt: skip

    def handlers(self) -> dict[str, Callable[..., Any]]:
        """FS.* handlers (called with the session's ClientState)."""
        return {FS_SET_LOCK: self.set_lock, FS_EXTEND_LOCK: self.extend_lock,
                FS_RELEASE_LOCK: self.release_lock}  # fmt: skip

    def admin_handlers(self) -> dict[str, Callable[..., Any]]:
        return {ADMIN_LOCKS: self.admin_locks}

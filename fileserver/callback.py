"""The callback table: which client holds a promise on which fid, until when.

Pure data structure (no I/O, no trio): the server drives it and a test drives
it with a fake clock.  Grant, renew and break of one fid are O(1) in the size
of the table; giving up or revoking a client is O(its promises); a
whole-volume break is O(promises the holders have).

Memory is the design constraint (goal: < 300 bytes per promise with a million
held).  So there are no per-promise objects:

- a fid is one int key ``volume << 64 | vnode << 32 | unique``;
- a client is a small int id (``cid``);
- an expiry is whole seconds since the table was made, and the int object for
  the current second is shared by every grant made in that second;
- ``_by_fid[key]`` is, for the usual single holder, one packed int
  ``expiry << CID_BITS | cid``; with two or more holders a dict ``{cid: expiry}``;
- ``_by_client[cid]`` is the set of fid keys the client holds (the per-client
  index needed for GiveUpAllCallBacks, revocation and admin listings).

Imports: ``protocol.records`` only.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator

from protocol.records import Fid

log = logging.getLogger(__name__)

CID_BITS = 24
CID_MASK = (1 << CID_BITS) - 1
MAX_CLIENTS = CID_MASK

# OpenAFS-like: the more clients hold a promise on a fid, the shorter each
# promise, so a popular file does not pin breaks to hundreds of clients for hours.
# (max holders already present, seconds)
DURATION_SCHEDULE: tuple[tuple[int, int], ...] = (
    (4, 4 * 3600),
    (8, 3 * 3600),
    (16, 2 * 3600),
    (32, 3600),
    (48, 30 * 60),
    (63, 15 * 60),
)
DURATION_MANY = 7 * 60


def fid_key(fid: Fid | tuple[int, int, int]) -> int:
    return (fid[0] << 64) | (fid[1] << 32) | fid[2]


def key_fid(key: int) -> Fid:
    return Fid(key >> 64, (key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF)


def schedule_duration(holders: int) -> int:
    for limit, seconds in DURATION_SCHEDULE:
        if holders <= limit:
            return seconds
    return DURATION_MANY


def server_grace(told: int) -> int:
    """Extra seconds the server keeps a promise beyond what it told the client
    (clock skew, reply latency): the client gives up first."""
    return max(1, min(300, told // 10))


class CallbackTable:
    """Promises keyed by fid with a per-client index.  Not thread-safe."""

    def __init__(
        self,
        *,
        max_duration: float = 4 * 3600,
        max_promises: int = 4_000_000,
        clock: Callable[[], float] = time.monotonic,
        on_revoke: Callable[[int, list[Fid]], None] | None = None,
    ) -> None:
        self.max_duration = max(1, int(max_duration))
        self.max_promises = max(1, max_promises)
        self._clock = clock
        self._t0 = clock()
        self.on_revoke = on_revoke
        self._by_fid: dict[int, int | dict[int, int]] = {}
        self._by_client: dict[int, set[int]] = {}
        self._vol_holders: dict[int, dict[int, int]] = {}  # volume -> {cid: promises}
        self._lru: OrderedDict[int, None] = OrderedDict()  # least recently active first
        self._free_cids: list[int] = []
        self._next_cid = 1
        self._exp_cache = (-1, 0)  # (value, shared int object)
        self.count = 0
        self.stats = {"grants": 0, "renewals": 0, "broken": 0, "expired": 0, "given_up": 0,
                      "revoked_clients": 0, "revoked_promises": 0}  # fmt: skip
        self._overflow_logged = False

    # -- clients -----------------------------------------------------------

    def new_client(self) -> int:
        if self._free_cids:
            cid = self._free_cids.pop()
        else:
            if self._next_cid > MAX_CLIENTS:
                raise RuntimeError("client ids exhausted")
            cid = self._next_cid
            self._next_cid += 1
        self._by_client[cid] = set()
        self._lru[cid] = None
        return cid

    def forget_client(self, cid: int) -> int:
        """Drop a client's promises and its id (the id may be reused)."""
        n = self.drop_client(cid)
        if self._by_client.pop(cid, None) is not None:
            self._lru.pop(cid, None)
            self._free_cids.append(cid)
        return n

    def touch(self, cid: int) -> None:
        """Record activity: the least recently active client is revoked first."""
        if cid in self._lru:
            self._lru.move_to_end(cid)

    def clients(self) -> list[int]:
        return list(self._by_client)

    # -- time --------------------------------------------------------------

    def now(self) -> int:
        return int(self._clock() - self._t0)

    def _exp(self, value: int) -> int:
        cached = self._exp_cache
        if cached[0] == value:
            return cached[1]
        self._exp_cache = (value, value)
        return value

    def duration(self, holders: int) -> int:
        """Seconds a new promise is told to last, given ``holders`` already there."""
        return min(schedule_duration(holders), self.max_duration)

    # -- grant ----------------------------------------------------------------

    def grant(self, cid: int, fid: Fid | tuple[int, int, int]) -> int:
        """Record (or renew) ``cid``'s promise on ``fid``; returns ``expires_in`` to tell."""
        key = fid_key(fid)
        by_fid = self._by_fid
        cur = by_fid.get(key)
        if cur is None:
            holders = 0
        elif type(cur) is int:
            holders = 0 if cur & CID_MASK == cid else 1
        else:
            holders = len(cur) - (1 if cid in cur else 0)  # type: ignore[operator]
        told = self.duration(holders)
        exp = self._exp(self.now() + told + server_grace(told))
        new = True
        if cur is None:
            by_fid[key] = (exp << CID_BITS) | cid
        elif type(cur) is int:
            if cur & CID_MASK == cid:
                by_fid[key] = (exp << CID_BITS) | cid
                new = False
            else:
                by_fid[key] = {cur & CID_MASK: cur >> CID_BITS, cid: exp}
        else:
            new = cid not in cur  # type: ignore[operator]
            cur[cid] = exp  # type: ignore[index]
        if self._lru:
            self._lru.move_to_end(cid)
        if not new:
            self.stats["renewals"] += 1
            return told
        self._by_client[cid].add(key)
        vh = self._vol_holders.get(key >> 64)
        if vh is None:
            self._vol_holders[key >> 64] = {cid: 1}
        else:
            vh[cid] = vh.get(cid, 0) + 1
        self.count += 1
        self.stats["grants"] += 1
        if self.count > self.max_promises:
            self._overflow(cid)
        return told

    def _overflow(self, granting: int) -> None:
        while self.count > self.max_promises:
            for victim in self._lru:
                if victim != granting and self._by_client.get(victim):
                    break
            else:
                return  # only the granting client holds anything: let it exceed
            self._revoke(victim)

    def _revoke(self, victim: int) -> None:
        if not self._overflow_logged:
            log.warning(
                "callback table full (%d promises): revoking least recently active clients "
                "with InitCallBackState3 (logged once)", self.max_promises,
            )  # fmt: skip
            self._overflow_logged = True
        else:
            log.debug("callback table full: revoking client %d", victim)
        held = [key_fid(k) for k in self._by_client.get(victim, ())]
        n = self.drop_client(victim)
        self.stats["revoked_clients"] += 1
        self.stats["revoked_promises"] += n
        if self.on_revoke is not None:
            self.on_revoke(victim, held)

    # -- removal -------------------------------------------------------------

    def _unindex(self, cid: int, key: int) -> None:
        s = self._by_client.get(cid)
        if s is not None:
            s.discard(key)
        vol = key >> 64
        vh = self._vol_holders.get(vol)
        if vh is not None:
            n = vh.get(cid, 0) - 1
            if n > 0:
                vh[cid] = n
            else:
                vh.pop(cid, None)
                if not vh:
                    del self._vol_holders[vol]
        self.count -= 1

    def _remove_one(self, cid: int, key: int) -> int | None:
        """Remove ``cid``'s promise on ``key``; returns its expiry or None."""
        cur = self._by_fid.get(key)
        if cur is None:
            return None
        if type(cur) is int:
            if cur & CID_MASK != cid:
                return None
            del self._by_fid[key]
            exp = cur >> CID_BITS
        else:
            exp = cur.pop(cid, None)  # type: ignore[union-attr]
            if exp is None:
                return None
            if len(cur) == 1:  # type: ignore[arg-type]
                ((c, e),) = cur.items()  # type: ignore[union-attr]
                self._by_fid[key] = (e << CID_BITS) | c
        self._unindex(cid, key)
        return exp

    def break_fid(
        self, fid: Fid | tuple[int, int, int], except_cid: int | None = None
    ) -> list[int]:
        """Break every promise on ``fid`` except ``except_cid``'s.

        Returns the clients whose (unexpired) promise was broken: they must be told.
        """
        key = fid_key(fid)
        cur = self._by_fid.get(key)
        if cur is None:
            return []
        now = self.now()
        out: list[int] = []
        if type(cur) is int:
            cid = cur & CID_MASK
            if cid == except_cid:
                return []
            del self._by_fid[key]
            self._unindex(cid, key)
            if cur >> CID_BITS > now:
                out.append(cid)
        else:
            keep = cur.get(except_cid) if except_cid is not None else None  # type: ignore[union-attr]
            for cid, exp in cur.items():  # type: ignore[union-attr]
                if cid == except_cid:
                    continue
                self._unindex(cid, key)
                if exp > now:
                    out.append(cid)
            if keep is None:
                del self._by_fid[key]
            else:
                self._by_fid[key] = (keep << CID_BITS) | except_cid  # type: ignore[operator]
        self.stats["broken"] += len(out)
        return out

    def break_volume(self, volume: int, except_cid: int | None = None) -> list[int]:
        """Break every promise on a volume; returns the clients to tell."""
        vh = self._vol_holders.get(volume)
        if not vh:
            return []
        out = []
        for cid in list(vh):
            if cid == except_cid:
                continue
            keys = [k for k in self._by_client.get(cid, ()) if k >> 64 == volume]
            for k in keys:
                self._remove_one(cid, k)
            out.append(cid)
        self.stats["broken"] += len(out)
        return out

    def drop_client(self, cid: int) -> int:
        """Drop every promise ``cid`` holds (give up, revoke, InitCallBackState)."""
        keys = self._by_client.get(cid)
        if not keys:
            return 0
        n = 0
        for k in list(keys):
            if self._remove_one(cid, k) is not None:
                n += 1
        keys.clear()
        return n

    def give_up(self, cid: int) -> int:
        n = self.drop_client(cid)
        self.stats["given_up"] += n
        return n

    def sweep(self, chunk: int = 10_000) -> Iterator[int]:
        """Drop expired promises, ``chunk`` fids at a time; yields the running
        count between chunks so an async caller can let other work run."""
        now = self.now()
        removed = 0
        keys = list(self._by_fid)
        for i in range(0, len(keys), chunk):
            for key in keys[i : i + chunk]:
                cur = self._by_fid.get(key)
                if cur is None:
                    continue
                if type(cur) is int:
                    if cur >> CID_BITS <= now:
                        del self._by_fid[key]
                        self._unindex(cur & CID_MASK, key)
                        removed += 1
                else:
                    for cid in [c for c, e in cur.items() if e <= now]:  # type: ignore[union-attr]
                        self._remove_one(cid, key)
                        removed += 1
            yield removed
        self.stats["expired"] += removed

    def sweep_all(self) -> int:
        n = 0
        for n in self.sweep():  # noqa: B007
            pass
        return n

    # -- queries -------------------------------------------------------------

    def others_hold(self, fid: Fid | tuple[int, int, int], cid: int) -> bool:
        """Whether a client other than ``cid`` holds a promise on ``fid``
        (expired or not).  Cheap, and safe to call from another thread: a
        dict changed meanwhile answers True."""
        cur = self._by_fid.get(fid_key(fid))
        if cur is None:
            return False
        if type(cur) is int:
            return cur & CID_MASK != cid
        try:
            return any(c != cid for c in cur)  # type: ignore[union-attr]
        except RuntimeError:  # changed size under us
            return True

    def holders(self, fid: Fid | tuple[int, int, int]) -> dict[int, int]:
        """{cid: seconds left (server side)} of unexpired promises on ``fid``."""
        cur = self._by_fid.get(fid_key(fid))
        now = self.now()
        if cur is None:
            return {}
        items = [(cur & CID_MASK, cur >> CID_BITS)] if type(cur) is int else cur.items()  # type: ignore[union-attr]
        return {c: e - now for c, e in items if e > now}

    def client_fids(self, cid: int) -> dict[Fid, int]:
        """{fid: seconds left} of ``cid``'s unexpired promises."""
        now = self.now()
        out = {}
        for k in self._by_client.get(cid, ()):
            cur = self._by_fid.get(k)
            if cur is None:
                continue
            exp = (cur >> CID_BITS if cur & CID_MASK == cid else None) if type(cur) is int else (
                cur.get(cid))  # type: ignore[union-attr]  # fmt: skip
            if exp is not None and exp > now:
                out[key_fid(k)] = exp - now
        return out

    def volume_holders(self, volume: int) -> dict[int, int]:
        """{cid: promises held in ``volume``} (a copy)."""
        return dict(self._vol_holders.get(volume, ()))

    def client_count(self, cid: int) -> int:
        return len(self._by_client.get(cid, ()))

    def has(self, cid: int, fid: Fid | tuple[int, int, int]) -> bool:
        return cid in self.holders(fid)

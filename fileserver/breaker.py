"""Client sessions as the callback machinery sees them, and break delivery.

A ``ClientState`` lives for the whole server run, keyed by the client's UUID,
across its connections: while it has no connection, or after it failed to
answer a break in time, it is *down* and breaks for it are kept as *delayed*
fids, delivered (batched) when it comes back, or replaced by one
``CB.InitCallBackState3`` when there were too many.

``Breaker.break_fids`` is what a change calls before replying: it removes the
promises from the table and delivers ``CB.CallBack`` to every other holder,
all clients in parallel, at most ``MAX_CALLBACK_FIDS`` fids per call, and
returns within the break timeout whatever the clients do.  A holder whose
break for one of the fids is still on its way (an earlier change removed its
promise from the table) is waited for too: until that break lands, the client
still trusts what it cached, so a later change replying first would let it
miss a change that had completed.  A client revoked because the callback
table is full is waited for the same way until its ``CB.InitCallBackState3``
is answered or it is marked down (``track`` / ``untrack``).

Imports: ``fileserver.callback``, ``.metrics``, ``.events``, ``protocol``, trio.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import trio

from fileserver.callback import CallbackTable
from fileserver.events import event
from fileserver.metrics import Metrics
from fileserver.nemesis import Nemesis
from protocol.connection import Connection
from protocol.errors import RemoteError, RpcError
from protocol.limits import MAX_CALLBACK_FIDS
from protocol.methods import CB_CALLBACK, CB_INIT_CALLBACK_STATE3
from protocol.records import Fid

log = logging.getLogger(__name__)


class ClientState:
    """What the server remembers about one client UUID during this run."""

    __slots__ = ("addr", "cid", "conn", "delayed", "down", "hello_count", "last_seen",
                 "lock", "needs_init", "uuid")  # fmt: skip

    def __init__(self, uuid: str, cid: int) -> None:
        self.uuid = uuid
        self.cid = cid
        self.conn: Connection | None = None
        self.down = True  # until its Hello completes
        self.delayed: set[Fid] = set()
        # Its promises were dropped (revoked, reset, too many delayed): it must
        # get CB.InitCallBackState3 before anything else.
        self.needs_init = True
        self.hello_count = 0
        self.last_seen = 0.0
        self.addr = ""
        # Serializes Hello / catch-up for this client (two connections racing).
        self.lock = trio.Lock()

    def to_dict(self, promises: int) -> dict[str, object]:
        return {
            "uuid": self.uuid,
            "cid": self.cid,
            "up": not self.down,
            "connected": self.conn is not None and not self.conn.closed,
            "addr": self.addr,
            "promises": promises,
            "delayed": len(self.delayed),
            "needs_init": self.needs_init,
            "hellos": self.hello_count,
            "last_seen": self.last_seen,
        }


def _chunks(fids: list[Fid], n: int = MAX_CALLBACK_FIDS) -> Iterable[list[Fid]]:
    for i in range(0, len(fids), n):
        yield fids[i : i + n]


class Breaker:
    def __init__(
        self,
        table: CallbackTable,
        metrics: Metrics,
        server_uuid: str,
        *,
        break_timeout: float,
        max_delayed: int,
    ) -> None:
        self.table = table
        self.metrics = metrics
        self.server_uuid = server_uuid
        self.break_timeout = break_timeout
        self.max_delayed = max_delayed
        self.clients: dict[str, ClientState] = {}
        self.by_cid: dict[int, ClientState] = {}
        self.nemesis = Nemesis()  # injected faults, off unless asked (fileserver/nemesis.py)
        # fid -> (client cid, done) of every CB.CallBack for it on its way.
        self._inflight: dict[Fid, list[tuple[int, trio.Event]]] = {}
        self._tracked: dict[int, list[Fid]] = {}  # id(done) -> its fids

    # -- client registry --------------------------------------------------

    def client(self, uuid: str) -> tuple[ClientState, bool]:
        st = self.clients.get(uuid)
        if st is not None:
            return st, False
        st = ClientState(uuid, self.table.new_client())
        self.clients[uuid] = st
        self.by_cid[st.cid] = st
        return st, True

    def forget(self, st: ClientState) -> None:
        """Drop all state for a client; at its next Hello it is new again (and
        gets CB.InitCallBackState3), so forgetting is always safe."""
        self.table.forget_client(st.cid)
        self.clients.pop(st.uuid, None)
        self.by_cid.pop(st.cid, None)
        event("forget", client=st.uuid)

    def mark_down(self, st: ClientState, reason: str) -> None:
        if not st.down:
            st.down = True
            self.metrics.inc("clients_marked_down")
            log.info("client %s marked down: %s", st.uuid, reason)
            event("client_down", client=st.uuid, reason=reason)

    def _delay(self, st: ClientState, fids: Iterable[Fid]) -> None:
        if st.needs_init:
            return  # an InitCallBackState3 is owed anyway and covers these
        before = len(st.delayed)
        st.delayed.update(fids)
        self.metrics.inc("breaks_delayed", len(st.delayed) - before)
        if len(st.delayed) > self.max_delayed:
            # Too many to replay: one InitCallBackState3 replaces them all.
            st.delayed.clear()
            st.needs_init = True
            self.table.drop_client(st.cid)

    # -- breaking -------------------------------------------------------------

    async def break_fids(self, fids: Iterable[Fid], origin: ClientState | None) -> None:
        """Break every holder's promise on ``fids`` except ``origin``'s; returns
        once every holder acknowledged, or within the break timeout."""
        except_cid = origin.cid if origin is not None else None
        per_client: dict[int, list[Fid]] = {}
        pending: dict[int, trio.Event] = {}  # earlier tellings of these fids on their way
        for fid in dict.fromkeys(fids):  # dedupe, keep order
            self._pending_for(fid, except_cid, pending)
            if fid.is_volume:
                self.metrics.inc("volume_breaks")
                event("break_volume", volume=fid.volume,
                      origin=origin.uuid if origin else "admin")  # fmt: skip
                holders = self.table.break_volume(fid.volume, except_cid)
            else:
                holders = self.table.break_fid(fid, except_cid)
            for cid in holders:
                per_client.setdefault(cid, []).append(fid)
        if not per_client and not pending:
            return
        if pending:
            self.metrics.inc("breaks_awaited", len(pending))
        # Tracked before the first checkpoint: a change released by the same
        # group commit must find these breaks on their way, not a bare table.
        sends = self._prepare(per_client, origin.uuid if origin is not None else "admin")
        # Shielded (each send ends by its break deadline): the table has
        # dropped these promises, so a send cut short (the changer's
        # connection closing cancels its request) would leave a holder
        # trusting a promise that nothing breaks any more.
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for args in sends:
                    nursery.start_soon(self._send_tracked, *args)
                for ev in pending.values():  # each ends within its own break deadline
                    nursery.start_soon(ev.wait)

    def _pending_for(self, fid: Fid, except_cid: int | None, out: dict[int, trio.Event]) -> None:
        """Add the tellings on their way that cover ``fid``: its own, its
        volume's whole-volume break, and for a volume fid every one in it."""
        keys = [fid, Fid(fid.volume, 0, 0)] if not fid.is_volume else [
            f for f in self._inflight if f.volume == fid.volume]  # fmt: skip
        for key in keys:
            for cid, ev in self._inflight.get(key, ()):
                if cid != except_cid:
                    out[id(ev)] = ev

    async def break_volume_all(self, volume: int) -> None:
        """Whole-volume break to every client that might cache it.

        Sent to every client with promises in the volume, and also to every
        connected client, since a client may cache data whose promise expired.
        """
        fid = Fid(volume, 0, 0)
        self.metrics.inc("volume_breaks")
        event("break_volume", volume=volume, origin="admin")
        holders = set(self.table.break_volume(volume))
        holders.update(st.cid for st in self.clients.values() if not st.down)
        await self.deliver({cid: [fid] for cid in holders}, "admin")

    async def deliver(self, per_client: dict[int, list[Fid]], origin: str = "") -> None:
        sends = self._prepare(per_client, origin)
        with trio.CancelScope(shield=True):  # as in break_fids
            async with trio.open_nursery() as nursery:
                for args in sends:
                    nursery.start_soon(self._send_tracked, *args)

    def _prepare(
        self, per_client: dict[int, list[Fid]], origin: str
    ) -> list[tuple[ClientState, Connection, list[Fid], float, str, trio.Event]]:
        """Synchronously: keep the breaks of down clients as delayed, and
        track the others as on their way; returns the sends to start."""
        deadline = trio.current_time() + self.break_timeout
        sends = []
        for cid, fids in per_client.items():
            st = self.by_cid.get(cid)
            if st is None:
                continue
            if st.down or st.conn is None or st.conn.closed:
                self._delay(st, fids)
                for f in fids:
                    event("break", fid=f, client=st.uuid, result="delayed", origin=origin)
                continue
            sends.append((st, st.conn, fids, deadline, origin, self.track(cid, fids)))
        return sends

    def track(self, cid: int, fids: Iterable[Fid]) -> trio.Event:
        """Note that ``cid`` is being told its promises on ``fids`` are gone
        (a break, a revocation's InitCallBackState3); changes to them wait
        for the returned event, which ``untrack`` sets."""
        done = trio.Event()
        fids = list(fids)
        for f in fids:
            self._inflight.setdefault(f, []).append((cid, done))
        self._tracked[id(done)] = fids
        return done

    def untrack(self, done: trio.Event) -> None:
        done.set()
        for f in self._tracked.pop(id(done), ()):
            left = [e for e in self._inflight.get(f, ()) if e[1] is not done]
            if left:
                self._inflight[f] = left
            else:
                self._inflight.pop(f, None)

    async def _send_tracked(
        self,
        st: ClientState,
        conn: Connection,
        fids: list[Fid],
        deadline: float,
        origin: str,
        done: trio.Event,
    ) -> None:
        try:
            await self._send(st, conn, fids, deadline, origin)
        finally:
            self.untrack(done)

    async def _send(
        self,
        st: ClientState,
        conn: Connection,
        fids: list[Fid],
        deadline: float,
        origin: str = "",
    ) -> None:
        sent = 0
        try:
            for chunk in _chunks(fids):
                remaining = deadline - trio.current_time()
                if remaining <= 0:
                    raise trio.TooSlowError
                try:
                    await self.nemesis.before_break(st.uuid, chunk, remaining)
                    remaining = deadline - trio.current_time()
                    await conn.call(CB_CALLBACK, [f.to_wire() for f in chunk], timeout=remaining)
                except RemoteError as exc:
                    # It answered: it is alive.  Its handler failing is its bug.
                    log.warning("client %s: CB.CallBack error: %s", st.uuid, exc)
                    self.metrics.inc("breaks_failed", len(chunk))
                sent += len(chunk)
                self.metrics.inc("breaks_sent", len(chunk))
                for f in chunk:
                    event("break", fid=f, client=st.uuid, result="sent", origin=origin)
        except (RpcError, trio.TooSlowError) as exc:
            rest = fids[sent:]
            newer = st.conn
            if newer is not None and newer is not conn and not st.down:
                # The client reconnected meanwhile (a newer connection replaced
                # this one and finished its Hello): tell it there, same deadline.
                await self._send(st, newer, rest, deadline, origin)
                return
            self.metrics.inc("breaks_failed", len(rest))
            for f in rest:
                event("break", fid=f, client=st.uuid, result="failed", origin=origin)
            if st.conn is conn:
                reason = "timeout" if not isinstance(exc, RpcError) or exc.code == "ETIMEDOUT" \
                    else exc.code  # fmt: skip
                self.mark_down(st, f"break not answered ({reason})")
            self._delay(st, rest)

    # -- resets ----------------------------------------------------------------

    async def init_callback_state(self, st: ClientState, conn: Connection, reason: str) -> None:
        """Void every promise of ``st``: drop them here, tell the client.  Raises
        RpcError (or TooSlowError) when the client does not answer in time."""
        st.needs_init = True
        st.delayed.clear()
        # Until it is told, it trusts these: changes to them wait (``track``).
        done = self.track(st.cid, self.table.client_fids(st.cid))
        try:
            self.table.drop_client(st.cid)
            self.metrics.inc("mass_resets")
            event("init_callback_state", client=st.uuid, reason=reason)
            await conn.call(CB_INIT_CALLBACK_STATE3, self.server_uuid, timeout=self.break_timeout)
        finally:
            self.untrack(done)
        st.needs_init = False

    async def catch_up(self, st: ClientState, conn: Connection) -> int:
        """Deliver what a returning client is owed, before anything else.

        Returns the number of delayed fids delivered.  Raises when the client
        does not answer; it then stays down and keeps what it is owed.
        """
        delivered = 0
        if st.needs_init:
            await self.init_callback_state(st, conn, "hello" if st.hello_count else "new_client")
        while st.delayed:
            fids = sorted(st.delayed)
            for chunk in _chunks(fids):
                with trio.fail_after(self.break_timeout):
                    await conn.call(CB_CALLBACK, [f.to_wire() for f in chunk],
                                    timeout=self.break_timeout)  # fmt: skip
                st.delayed.difference_update(chunk)
                delivered += len(chunk)
                self.metrics.inc("delayed_delivered", len(chunk))
                for f in chunk:
                    event("break", fid=f, client=st.uuid, result="sent", delayed=1)
            if st.needs_init:  # overflowed while we were sending
                await self.init_callback_state(st, conn, "too_many_delayed")
        return delivered

    async def reset_client(
        self, st: ClientState, reason: str, done: trio.Event | None = None
    ) -> bool:
        """Revoke all of a client's promises (admin reset, table full);
        ``done`` (from ``track``) is released when the client was told or
        marked down."""
        try:
            return await self._reset_client(st, reason)
        finally:
            if done is not None:
                self.untrack(done)

    async def _reset_client(self, st: ClientState, reason: str) -> bool:
        conn = st.conn
        if st.down or conn is None or conn.closed:
            st.needs_init = True
            st.delayed.clear()
            self.table.drop_client(st.cid)
            event("init_callback_state", client=st.uuid, reason=reason, deferred=1)
            return False
        try:
            await self.init_callback_state(st, conn, reason)
            return True
        except (RpcError, trio.TooSlowError):
            if st.conn is conn:
                self.mark_down(st, "InitCallBackState3 not answered")
            return False

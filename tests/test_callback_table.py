"""The callback table and break delivery against a simple model (hypothesis).

The table runs on a fake clock; the breaker talks to fake connections, so no
socket and no sleeping is involved.  The model is a plain dict
``{(client, fid): expiry}`` plus per-client delayed sets and flags.
"""

from __future__ import annotations

import tracemalloc

import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fileserver.breaker import Breaker
from fileserver.callback import CallbackTable, schedule_duration, server_grace
from fileserver.metrics import Metrics
from protocol.connection import RpcTimeout
from protocol.records import Fid

N_CLIENTS = 4
FIDS = [Fid(v, n, n) for v in (7, 8) for n in (1, 2)]
MAX_PROMISES = 9
MAX_DELAYED = 2
MAX_DURATION = 100


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeConn:
    """Stands in for a protocol Connection: records CB.* calls or times out."""

    def __init__(self) -> None:
        self.closed = False
        self.hang = False
        self.calls: list[tuple[str, tuple[object, ...]]] = []

    async def call(self, method: str, *params: object, timeout: float | None = None) -> None:
        if self.hang:
            raise RpcTimeout("fake timeout")
        self.calls.append((method, params))


def _broken_fids(conn: FakeConn) -> list[Fid]:
    return [Fid(*w) for m, p in conn.calls if m == "CB.CallBack" for w in p[0]]  # type: ignore[attr-defined]


class TableMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.clock = FakeClock()
        self.revoked: list[int] = []
        self.table = CallbackTable(max_duration=MAX_DURATION, max_promises=MAX_PROMISES,
                                   clock=self.clock, on_revoke=self._on_revoke)  # fmt: skip
        self.breaker = Breaker(self.table, Metrics(), "server-uuid", break_timeout=1,
                               max_delayed=MAX_DELAYED)  # fmt: skip
        self.clients = []
        self.conns: dict[int, FakeConn] = {}
        for i in range(N_CLIENTS):
            st_, _ = self.breaker.client(f"c{i}")
            st_.down = False
            st_.needs_init = False
            conn = FakeConn()
            st_.conn = conn  # type: ignore[assignment]
            self.clients.append(st_)
            self.conns[st_.cid] = conn
        # model
        self.m: dict[tuple[int, Fid], int] = {}
        self.lru = [c.cid for c in self.clients]
        self.delayed: dict[int, set[Fid]] = {c.cid: set() for c in self.clients}
        self.needs_init = {c.cid: False for c in self.clients}
        self.down = {c.cid: False for c in self.clients}

    def _on_revoke(self, cid: int, held: list[Fid]) -> None:
        # What FileServer._on_revoke does, minus the async InitCallBackState3.
        self.revoked.append(cid)
        st_ = self.breaker.by_cid[cid]
        st_.needs_init = True
        st_.delayed.clear()

    def now(self) -> int:
        return int(self.clock.t)

    def _drop_model(self, cid: int) -> None:
        for k in [k for k in self.m if k[0] == cid]:
            del self.m[k]

    # -- rules -------------------------------------------------------------

    @rule(c=st.integers(0, N_CLIENTS - 1), f=st.sampled_from(FIDS))
    def grant(self, c: int, f: Fid) -> None:
        cid = self.clients[c].cid
        holders = sum(1 for (cc, ff) in self.m if ff == f and cc != cid)
        told = self.table.grant(cid, f)
        want = min(schedule_duration(holders), MAX_DURATION)
        assert told == want
        self.m[(cid, f)] = self.now() + told + server_grace(told)
        self.lru.remove(cid)
        self.lru.append(cid)
        while len(self.m) > MAX_PROMISES:
            victims = [v for v in self.lru if v != cid and any(k[0] == v for k in self.m)]
            assert victims
            v = victims[0]
            self._drop_model(v)
            self.needs_init[v] = True
            self.delayed[v].clear()
            assert self.revoked[-1] == v

    @rule(origin=st.one_of(st.none(), st.integers(0, N_CLIENTS - 1)),
          fids=st.lists(st.sampled_from(FIDS), min_size=1, max_size=3))  # fmt: skip
    def break_fids(self, origin: int | None, fids: list[Fid]) -> None:
        ocid = self.clients[origin].cid if origin is not None else None
        before = {cid: len(_broken_fids(conn)) for cid, conn in self.conns.items()}
        expect: dict[int, list[Fid]] = {}
        now = self.now()
        for f in dict.fromkeys(fids):
            for (cid, ff), exp in list(self.m.items()):
                if ff == f and cid != ocid:
                    del self.m[(cid, ff)]
                    if exp > now:
                        expect.setdefault(cid, []).append(f)
        origin_st = self.clients[origin] if origin is not None else None
        trio.run(self.breaker.break_fids, fids, origin_st)
        for cid, conn in self.conns.items():
            got = _broken_fids(conn)[before[cid] :]
            want = expect.get(cid, [])
            if self.down[cid] or conn.hang:
                assert got == []
                if want:
                    # An unanswered break marks the client down even when an
                    # InitCallBackState3 is owed (a promise granted after its
                    # revocation); only then is nothing kept as delayed.
                    self.down[cid] = True
                if want and not self.needs_init[cid]:
                    self.delayed[cid].update(want)
                    if len(self.delayed[cid]) > MAX_DELAYED:
                        self.delayed[cid].clear()
                        self.needs_init[cid] = True
                        self._drop_model(cid)
            else:
                assert got == want

    @rule(c=st.integers(0, N_CLIENTS - 1))
    def give_up(self, c: int) -> None:
        cid = self.clients[c].cid
        n = sum(1 for k in self.m if k[0] == cid)
        assert self.table.give_up(cid) == n
        self._drop_model(cid)

    @rule(dt=st.sampled_from([0.5, 1, 7, 50, 200]))
    def advance(self, dt: float) -> None:
        self.clock.t += dt

    @rule()
    def sweep(self) -> None:
        now = self.now()
        expired = [k for k, e in self.m.items() if e <= now]
        assert self.table.sweep_all() == len(expired)
        for k in expired:
            del self.m[k]

    @rule(c=st.integers(0, N_CLIENTS - 1))
    def disconnect(self, c: int) -> None:
        st_ = self.clients[c]
        self.breaker.mark_down(st_, "test")
        st_.conn = None
        self.down[st_.cid] = True

    @rule(c=st.integers(0, N_CLIENTS - 1))
    def hang(self, c: int) -> None:
        self.conns[self.clients[c].cid].hang = True

    @precondition(lambda self: any(self.down.values()))
    @rule(c=st.integers(0, N_CLIENTS - 1))
    def come_back(self, c: int) -> None:
        st_ = self.clients[c]
        cid = st_.cid
        if not self.down[cid]:
            return
        conn = FakeConn()
        self.conns[cid] = conn
        st_.conn = conn  # type: ignore[assignment]
        trio.run(self.breaker.catch_up, st_, conn)
        st_.down = False
        inits = [m for m, _ in conn.calls if m == "CB.InitCallBackState3"]
        assert len(inits) == (1 if self.needs_init[cid] else 0)
        if self.needs_init[cid]:
            self._drop_model(cid)
            assert conn.calls[0][0] == "CB.InitCallBackState3"  # before anything else
        assert sorted(_broken_fids(conn)) == sorted(self.delayed[cid])
        self.delayed[cid].clear()
        self.needs_init[cid] = False
        self.down[cid] = False

    # -- invariants ----------------------------------------------------------

    @invariant()
    def table_matches_model(self) -> None:
        if not hasattr(self, "table"):
            return
        assert self.table.count == len(self.m)
        now = self.now()
        for st_ in self.clients:
            cid = st_.cid
            want = {f: e - now for (c, f), e in self.m.items() if c == cid and e > now}
            assert self.table.client_fids(cid) == want
            assert st_.delayed == self.delayed[cid]
            assert st_.needs_init == self.needs_init[cid]
            assert st_.down == self.down[cid]
        for f in FIDS:
            want = {c: e - now for (c, ff), e in self.m.items() if ff == f and e > now}
            assert self.table.holders(f) == want


TestTableMachine = TableMachine.TestCase
TestTableMachine.settings = settings(max_examples=300, stateful_step_count=50, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])  # fmt: skip


def test_duration_shrinks_with_holders() -> None:
    t = CallbackTable(clock=FakeClock())
    cids = [t.new_client() for _ in range(70)]
    told = [t.grant(c, Fid(1, 2, 3)) for c in cids]
    assert told[0] == 4 * 3600 and told[-1] == 7 * 60
    assert told == sorted(told, reverse=True)
    capped = CallbackTable(max_duration=5, clock=FakeClock())
    assert capped.grant(capped.new_client(), Fid(1, 2, 3)) == 5


def test_volume_break_and_o1_structures() -> None:
    t = CallbackTable(clock=FakeClock())
    a, b = t.new_client(), t.new_client()
    for n in range(1, 50):
        t.grant(a, Fid(1, n, n))
        t.grant(b, Fid(2, n, n))
    assert sorted(t.break_volume(1)) == [a]
    assert t.count == 49 and t.client_count(a) == 0 and t.client_count(b) == 49


def test_memory_per_promise_is_small() -> None:
    t = CallbackTable(clock=FakeClock())
    cids = [t.new_client() for _ in range(100)]
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(200):
        for c in cids[: 10 + i % 90]:
            t.grant(c, Fid(536870912, i + 2, i + 2))
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert used / t.count < 300, used / t.count


def test_volume_holders_counts_promises_per_client() -> None:
    t = CallbackTable()
    a, b = t.new_client(), t.new_client()
    t.grant(a, (1, 2, 2))
    t.grant(a, (1, 3, 3))
    t.grant(b, (1, 2, 2))
    t.grant(b, (9, 2, 2))
    assert t.volume_holders(1) == {a: 2, b: 1}
    t.break_fid((1, 2, 2), except_cid=b)
    assert t.volume_holders(1) == {a: 1, b: 1}
    t.volume_holders(1).clear()  # a copy: the table is not changed through it
    assert t.volume_holders(1) == {a: 1, b: 1}
    t.give_up(a)
    assert t.volume_holders(1) == {b: 1} and t.volume_holders(5) == {}


def test_others_hold_sees_every_holder_but_the_asker() -> None:
    """What a removal asks before waking the trio thread to break early: a
    wrong False would only fall back to breaking after the commit, but a
    wrong True for the asker alone costs a wake-up per change."""
    t = CallbackTable(clock=FakeClock())
    a, b = t.new_client(), t.new_client()
    f, g = Fid(1, 2, 3), Fid(1, 4, 5)
    assert not t.others_hold(f, a)
    t.grant(a, f)
    assert not t.others_hold(f, a)  # one holder: the asker
    assert t.others_hold(f, b)
    t.grant(b, f)
    assert t.others_hold(f, a) and t.others_hold(f, b)  # two holders
    t.break_fid(f, except_cid=a)
    assert not t.others_hold(f, a)
    assert not t.others_hold(g, a)

"""Changes wait for tellings already on their way (fileserver.breaker).

A client whose promise an earlier change removed from the table still trusts
its cache until that break (or a revocation's InitCallBackState3) lands; a
later change to the same fid must not reply before then.  Breaker and table
on trio's virtual clock, clients on fake connections that answer slowly.
"""

from __future__ import annotations

import trio

from fileserver.breaker import Breaker, ClientState
from fileserver.callback import CallbackTable
from fileserver.metrics import Metrics
from protocol.records import Fid

F = Fid(7, 1, 1)
G = Fid(7, 2, 2)
VOL = Fid(7, 0, 0)


class SlowConn:
    """Answers every CB.* call after ``delay`` seconds, logging when."""

    def __init__(self, log: list[str], name: str, delay: float = 0.0) -> None:
        self.closed = False
        self.log, self.name, self.delay = log, name, delay

    async def call(self, method: str, *params: object, timeout: float | None = None) -> None:
        await trio.sleep(self.delay)
        self.log.append(f"{self.name} told")


def _setup(log: list[str]) -> tuple[CallbackTable, Breaker, dict[str, ClientState]]:
    table = CallbackTable(max_duration=100, max_promises=1000)
    breaker = Breaker(table, Metrics(), "server-uuid", break_timeout=5, max_delayed=100)
    clients = {}
    for name in ("x", "y", "z"):
        st, _ = breaker.client(name)
        st.down = st.needs_init = False
        st.conn = SlowConn(log, name, 1.0 if name == "y" else 0.0)  # type: ignore[assignment]
        clients[name] = st
    return table, breaker, clients


async def _change(breaker: Breaker, fids: list[Fid], who: ClientState, log: list[str]) -> None:
    await breaker.break_fids(fids, who)
    log.append(f"{who.uuid} replied")


async def test_changes_released_together_both_wait(autojump_clock) -> None:
    # Two changes woken by one group commit call break_fids back to back:
    # the second finds Y's promise gone from the table, its break on its way.
    log: list[str] = []
    table, breaker, c = _setup(log)
    table.grant(c["y"].cid, F)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_change, breaker, [F], c["x"], log)
        nursery.start_soon(_change, breaker, [F], c["z"], log)
    assert log[0] == "y told" and sorted(log[1:]) == ["x replied", "z replied"]
    assert breaker.metrics.counts["breaks_awaited"] == 1
    assert not breaker._inflight and not breaker._tracked  # nothing left behind


async def test_a_change_waits_for_a_volume_break_on_its_way(autojump_clock) -> None:
    log: list[str] = []
    table, breaker, c = _setup(log)
    table.grant(c["y"].cid, G)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_change, breaker, [VOL], c["x"], log)  # breaks Y's G
        await trio.sleep(0.1)
        await _change(breaker, [F], c["z"], log)  # a fid of that volume
    assert log.index("y told") < log.index("z replied")
    assert not breaker._inflight and not breaker._tracked


async def test_a_volume_break_waits_for_a_fid_break_on_its_way(autojump_clock) -> None:
    log: list[str] = []
    table, breaker, c = _setup(log)
    table.grant(c["y"].cid, F)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_change, breaker, [F], c["x"], log)
        await trio.sleep(0.1)
        await _change(breaker, [VOL], c["z"], log)
    assert log.index("y told") < log.index("z replied")


async def test_the_told_clients_own_change_does_not_wait_for_itself(autojump_clock) -> None:
    log: list[str] = []
    table, breaker, c = _setup(log)
    table.grant(c["y"].cid, F)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_change, breaker, [F], c["x"], log)
        await trio.sleep(0.1)
        await _change(breaker, [F], c["y"], log)  # Y's own change: nothing to wait for
        assert log == ["y replied"]
    assert log == ["y replied", "y told", "x replied"]


async def test_a_reset_holds_changes_until_the_client_is_told(autojump_clock) -> None:
    # An admin reset (or a revocation) drops Y's promises at once; Y trusts
    # them until its CB.InitCallBackState3 is answered.
    log: list[str] = []
    table, breaker, c = _setup(log)
    table.grant(c["y"].cid, F)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(breaker.reset_client, c["y"], "admin")
        await trio.sleep(0.1)
        await _change(breaker, [F], c["x"], log)
    assert log == ["y told", "x replied"]
    assert not breaker._inflight and not breaker._tracked

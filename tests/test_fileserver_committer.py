"""The group commit's thread (``fileserver.committer.Committer``): functions
run in one thread, in order, their results and exceptions reach the caller, a
cancelled caller still gets its change run to the end, and the thread leaves
when idle and comes back for the next commit."""

from __future__ import annotations

import threading

import pytest
import trio

from fileserver import committer
from fileserver.committer import Committer

HANG = 30  # a hang guard, not a speed assertion


async def test_results_and_errors_come_back_in_order_from_one_thread() -> None:
    c = Committer("commit-test")
    seen: list[tuple[int, int]] = []

    def job(i: int) -> int:
        seen.append((i, threading.get_ident()))
        return i * 10

    with trio.fail_after(HANG):
        assert [await c.run(lambda i=i: job(i)) for i in range(5)] == [0, 10, 20, 30, 40]

        def boom() -> None:
            raise ValueError("disk full")

        with pytest.raises(ValueError, match="disk full"):
            await c.run(boom)
        assert await c.run(lambda: job(5)) == 50
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4, 5]
    assert len({t for _, t in seen}) == 1  # one long-lived thread
    assert threading.get_ident() not in {t for _, t in seen}  # never the trio thread


async def test_a_cancelled_caller_still_has_its_change_run_to_the_end() -> None:
    c = Committer("commit-test")
    started, release = threading.Event(), threading.Event()
    done: list[str] = []

    def slow() -> str:
        started.set()
        release.wait(HANG)
        done.append("committed")
        return "ok"

    result: list[str] = []
    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:

            async def caller() -> None:
                result.append(await c.run(slow))

            nursery.start_soon(caller)
            await trio.to_thread.run_sync(started.wait, HANG)
            # The cancel reaches the parked caller at once; it is not abandoned.
            nursery.cancel_scope.cancel()
            release.set()
    assert done == ["committed"] and result == ["ok"]


async def test_the_thread_leaves_when_idle_and_returns_for_the_next_commit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(committer, "IDLE_S", 0.01)
    c = Committer("commit-test")
    with trio.fail_after(HANG):
        first = await c.run(threading.get_ident)
        t = c._thread
        assert t is not None
        await trio.to_thread.run_sync(t.join, HANG)
        assert not t.is_alive() and c._thread is None
        second = await c.run(threading.get_ident)
    assert first != threading.get_ident() and second != threading.get_ident()
    assert c._thread is not None  # started again for the second commit

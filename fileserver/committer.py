"""A long-lived thread that runs one volume's group commits, fed by a queue.

``trio.to_thread.run_sync`` per commit costs a capacity limiter, a copied
context, a thread-cache hand-off and an OS thread rename on every call (about
a sixth of the server's GIL time at one session).  A commit is already run by
one leader at a time and shielded from cancellation, so none of that is
needed: ``Committer.run`` puts the function on a queue, parks the calling
task, and the thread reschedules it through the trio token when done.

The thread exits after ``IDLE_S`` without work (so closed volumes leave no
thread behind) and is started again by the next ``run``.

Imports: the standard library, trio, outcome.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")

#: Seconds without work after which the thread exits.
IDLE_S = 5.0


class Committer:
    """Runs blocking functions, one at a time and in order, in one thread."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._q: queue.SimpleQueue[tuple[Callable[[], Any], Callable[[Any], None]]] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()  # orders submit against an idle exit
        self._thread: threading.Thread | None = None

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` in the thread; its result or exception.  Not cancellable:
        the caller's change runs to its end (callers hold a shielded scope)."""
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()

        def deliver(result: outcome.Outcome[Any]) -> None:  # in the thread
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)

        with self._lock:
            self._q.put((fn, deliver))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
        # trio unwraps the outcome delivered: fn's value, or its exception raised.
        return await trio.lowlevel.wait_task_rescheduled(  # type: ignore[no-any-return]
            lambda _: trio.lowlevel.Abort.FAILED
        )

    def _loop(self) -> None:
        q = self._q
        while True:
            try:
                fn, deliver = q.get(timeout=IDLE_S)
            except queue.Empty:
                with self._lock:
                    if q.empty():
                        self._thread = None
                        return
                continue
            deliver(outcome.capture(fn))
            del fn, deliver  # drop references (results, frames) while idle

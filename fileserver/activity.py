"""Who is talking to the fileserver right now: requests in progress, and
whether one connection alone has been sending them.

A group commit's COMMIT runs in the volume's commit thread so that the trio
loop keeps serving while the WAL syncs.  Handing it over and being woken
after costs two thread wakes, about 150 us here (an idle vCPU has to wake
up), more than half of what the sync itself costs.  That overlap only pays
when there is someone to serve meanwhile.  When one client alone is
working (a ``git clone``, an ``rm -rf``, a script creating files) each of
its changes waits for its own sync anyway, so the COMMIT is cheaper run
inline on the trio thread.

``quiet(n)`` says when that is safe: the ``n`` requests of the batch are
all the server is handling, no other connection sent a request in the last
``window`` seconds (several clients interleave far faster than that), and
no task is runnable (a break on its way, a read's result to hand over).  A
request arriving during an inline COMMIT waits for it, at most one sync;
with a second client active, commits go back to the thread within one
request.

Imports: trio.
"""

from __future__ import annotations

from typing import Any

import trio

#: Seconds without a request from a second connection before commits run
#: inline; a second active client shows up well within it.
WINDOW_S = 0.05


class Activity:
    def __init__(self, window: float = WINDOW_S) -> None:
        self.window = window
        self.in_progress = 0
        self._last: Any = None  # the connection that sent the latest request
        self._since = -float("inf")  # when another connection last sent one

    def started(self, conn: Any) -> None:
        """A request from ``conn`` starts (pair with ``ended``)."""
        self.in_progress += 1
        if conn is not self._last:
            self._last = conn
            self._since = trio.current_time()

    def ended(self) -> None:
        self.in_progress -= 1

    def quiet(self, n: int) -> bool:
        """The ``n`` requests of a batch are the only work in sight."""
        return (
            self.in_progress <= n
            and trio.current_time() - self._since >= self.window
            and trio.lowlevel.current_statistics().tasks_runnable == 0
        )


__all__ = ["WINDOW_S", "Activity"]

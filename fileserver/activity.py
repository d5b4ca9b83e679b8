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
all the server is handling, the connection heard from last has one of
them in progress (so it is the batch's), no other connection sent a byte
(a request, or a chunk of one still arriving) in the last ``window``
seconds (several clients interleave far faster than that), and no task is
runnable (a break on its way, a read's result to hand over).  A client's
answers to the server's own calls (callback breaks) are not activity: the
client waits for nothing from the server.  A batch whose breaks are still
to go out lets them run first, until they wait for their answers, and
then commits inline: the breaks cross the wire while the WAL syncs, as
they would beside a COMMIT in the thread.  A request arriving during an
inline COMMIT waits for it, once: its first bytes turn commits back to the
thread for ``window``.

Imports: trio.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

#: Seconds without a byte from a second connection before commits run
#: inline; a second active client shows up well within it.
WINDOW_S = 0.05


class Activity:
    def __init__(
        self, window: float = WINDOW_S, now: Callable[[], float] = trio.current_time
    ) -> None:
        self.window = window
        self.now = now
        self.in_progress = 0
        #: id(connection) -> its requests in progress (ids: no reference kept
        #: to a closed connection; a reused id only delays inline commits).
        self._per: dict[int, int] = {}
        self._last = 0  # id of the connection heard from last
        self._since = -float("inf")  # when another connection was last heard

    def heard(self, conn: Any) -> None:
        """Bytes arrived from ``conn`` (a request, or part of one)."""
        key = id(conn)
        if key != self._last:
            self._last = key
            self._since = self.now()

    def started(self, conn: Any) -> None:
        """A request from ``conn`` starts (pair with ``ended``)."""
        self.heard(conn)
        self.in_progress += 1
        key = id(conn)
        self._per[key] = self._per.get(key, 0) + 1

    def ended(self, conn: Any) -> None:
        self.in_progress -= 1
        key = id(conn)
        left = self._per.get(key, 0) - 1
        if left > 0:
            self._per[key] = left
        else:
            self._per.pop(key, None)

    def quiet(self, n: int, *, tasks: bool = True) -> bool:
        """The ``n`` requests of a batch are the only work in sight.  With
        ``tasks=False`` runnable tasks are left out: the caller lets them run
        first (``VolumeHandle._inline_now``)."""
        return (
            self.in_progress <= n
            and self._last in self._per
            and self.now() - self._since >= self.window
            and (not tasks or trio.lowlevel.current_statistics().tasks_runnable == 0)
        )


__all__ = ["WINDOW_S", "Activity"]

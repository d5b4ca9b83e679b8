"""Counters for ``afsfuse fs stats`` and the structured event log.

Event lines go to the ``afsfuse.events`` logger at INFO as
``event=NAME t=SECONDS key=value ...`` (the shared writer of
``protocol/logfmt.py``, as the fileserver's) so the lab's timeline parses them.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from protocol.logfmt import format_event

log = logging.getLogger(__name__)
events_log = logging.getLogger("afsfuse.events")


def log_event(name: str, /, **fields: Any) -> None:
    """Emit one ``event=NAME k=v ...`` line (cheap when INFO is off)."""
    if events_log.isEnabledFor(logging.INFO):
        events_log.info("%s", format_event(name, **fields))


class Stats:
    """Plain counters; the data cache keeps its own hit/miss counts."""

    FIELDS = (
        "validations_fast",
        "validations_slow",
        "breaks",
        "volume_breaks",
        "mass_breaks",
        "breaks_uncached",
        "promises_installed",
        "promises_discarded",
        "statuses_stale_ignored",
        "cache_hits",
        "cache_misses",
        "bytes_fetched",
        "bytes_stored",
        "attrs_deferred",
        "dir_fetches",
        "dir_local_edits",
        "dir_ahead",
        "bulk_speculative",
        "chunk_io_threaded",
        "invalidations_queued",
        "invalidations_coalesced",
        "invalidations_degraded",
        "kernel_notify_skipped",
        "reconnects",
        "kernel_forgets",
        "records_destroyed",
    )

    def __init__(self) -> None:
        self.rpc: Counter[str] = Counter()
        # Seconds spent awaiting each method's reply (its time on the wire and
        # in the server, from this side): where a slow operation's time goes.
        self.rpc_seconds: Counter[str] = Counter()
        for name in self.FIELDS:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name) for name in self.FIELDS}
        out["rpc"] = dict(self.rpc)
        out["rpc_ms"] = as_ms(self.rpc_seconds)
        return out


def as_ms(seconds: Counter[str]) -> dict[str, float]:
    """Accumulated seconds by name, as the milliseconds ``fs stats`` shows."""
    return {k: round(t * 1000, 3) for k, t in seconds.items()}

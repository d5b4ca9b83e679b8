"""Counters for ``afsfuse fs stats`` and the structured event log.

Event lines go to the ``afsfuse.events`` logger at INFO as
``event=NAME key=value ...`` so a scenario tool can grep them.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

log = logging.getLogger(__name__)
events_log = logging.getLogger("afsfuse.events")


def log_event(name: str, **fields: Any) -> None:
    """Emit one ``event=NAME k=v ...`` line (cheap when INFO is off)."""
    if events_log.isEnabledFor(logging.INFO):
        parts = " ".join(f"{k}={v}" for k, v in fields.items())
        events_log.info("event=%s %s", name, parts)


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
        "dir_fetches",
        "dir_local_edits",
        "bulk_speculative",
        "chunk_io_threaded",
        "invalidations_queued",
        "invalidations_coalesced",
        "invalidations_degraded",
        "reconnects",
        "kernel_forgets",
        "records_destroyed",
    )

    def __init__(self) -> None:
        self.rpc: Counter[str] = Counter()
        for name in self.FIELDS:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name) for name in self.FIELDS}
        out["rpc"] = dict(self.rpc)
        return out

"""The garbage collector's schedule in the two long-running processes (the
client daemon and the fileserver), and what it has done, for their stats.

CPython collects its youngest generation after every 700 net allocations of
container objects, and its whole heap whenever the objects that survived
have grown by a quarter since the last full pass.  A process that caches a
lot, as the client daemon does (a vnode, a status and a promise per file:
tens of thousands after one cold listing), therefore walks its whole heap
again and again while the cache fills: a cold ``ls -lR`` of 10,000 files
spent about a fifth of the daemon's CPU in collections.  Almost nothing
these processes allocate is cyclic garbage (reference counting frees it),
so the youngest generation is collected after ``GEN0_THRESHOLD``
allocations instead, and what is alive once start-up is done (modules,
classes, configuration) is moved out of the collector's sight
(``gc.freeze``).  Cyclic garbage is still collected, only later: a few
thousand objects more, at most, wait for it.

May import only the standard library.
"""

from __future__ import annotations

import gc
from typing import Any

#: Net container allocations between collections of the youngest generation.
GEN0_THRESHOLD = 10_000


def tune_gc() -> None:
    """Freeze what start-up made and collect the young generation less often.
    Call once, after start-up, before serving."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)


def gc_stats() -> dict[str, Any]:
    """The schedule in force and the collections so far, per generation."""
    gens = gc.get_stats()
    return {
        "threshold": list(gc.get_threshold()),
        "frozen_objects": gc.get_freeze_count(),
        "collections": [g["collections"] for g in gens],
        "collected": [g["collected"] for g in gens],
    }


__all__ = ["GEN0_THRESHOLD", "gc_stats", "tune_gc"]

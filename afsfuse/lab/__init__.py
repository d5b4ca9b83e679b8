"""The lab: real fileserver and client processes for scenarios, benchmarks
and integration tests, and the API users write their scenarios against.

    from afsfuse.lab import Lab, scenario

``afsfuse.lab.lab`` holds ``Lab``, ``scenario``, ``ScenarioFailed`` and the
runner; ``afsfuse.lab.scenarios`` the built-in scenarios (the examples to
copy); ``afsfuse.lab.timeline`` parses and renders the event logs;
``afsfuse.lab.plot`` draws them; ``afsfuse.lab.server`` starts a fileserver
(a subprocess, or inside a trio loop) and gives a protocol-level client;
``afsfuse.lab.mount`` starts and stops client mounts; ``afsfuse.lab.admin``
reads a running server's counters; ``afsfuse.lab.cpu`` the CPU time a
process used.  May import ``protocol``, ``fileserver``
and ``afsfuse``; nothing in the cache-manager core imports it.
"""

from afsfuse.lab.lab import (
    SCENARIOS,
    Lab,
    Mount,
    Result,
    Scenario,
    ScenarioFailed,
    Server,
    scenario,
)
from afsfuse.lab.timeline import Event

__all__ = ["SCENARIOS", "Event", "Lab", "Mount", "Result", "Scenario", "ScenarioFailed",
           "Server", "scenario"]  # fmt: skip

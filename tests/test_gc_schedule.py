"""The garbage collector's schedule (``protocol.gc_schedule``): what start-up
made is frozen, the young generation is collected less often, cyclic garbage
is still collected, and both long-running processes run with it."""

from __future__ import annotations

import json
import subprocess
import sys

from afsfuse.lab.mount import ClientMount
from afsfuse.lab.server import REPO, ServerProcess
from protocol.gc_schedule import GEN0_THRESHOLD

# Run in a process of its own: freezing and the thresholds are process-wide.
_PROBE = """
import gc, json, weakref
from protocol.gc_schedule import GEN0_THRESHOLD, gc_stats, tune_gc
before = gc.get_threshold()
tune_gc()
after = gc_stats()

class Node:
    pass

# Cyclic garbage, more than a young generation's worth: no gc.collect().
freed = []
for _ in range(3 * GEN0_THRESHOLD):
    a, b = Node(), Node()
    a.other, b.other = b, a
    weakref.finalize(a, freed.append, 1)
    del a, b
print(json.dumps({"before": before, "after": after, "freed": len(freed)}))
"""


def test_tune_gc_freezes_start_up_and_still_collects_cycles() -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=True)  # fmt: skip
    r = json.loads(out.stdout)
    assert r["after"]["threshold"] == [GEN0_THRESHOLD, *r["before"][1:]]
    # The modules and classes imported so far are out of the collector's sight.
    assert r["after"]["frozen_objects"] > 1000
    # Collections still run by themselves and free cycles, only less often.
    assert r["freed"] > GEN0_THRESHOLD


def test_the_daemon_and_the_fileserver_run_with_the_schedule(tmp_path) -> None:
    with ServerProcess(tmp_path / "fs", events=False) as srv, \
            ClientMount(srv, tmp_path / "a", events=False) as a:  # fmt: skip
        (a.mnt / "f").write_text("x")
        out = subprocess.run(
            [sys.executable, "-m", "fileserver.cli", "stats", "--json", "--data-dir",
             str(tmp_path / "fs")], cwd=REPO, capture_output=True, text=True, timeout=60,
            check=True,
        )  # fmt: skip
        for who, stats in (("daemon", a.stats()), ("fileserver", json.loads(out.stdout))):
            g = stats["gc"]
            assert g["threshold"][0] == GEN0_THRESHOLD, who
            assert g["frozen_objects"] > 1000, who
            assert len(g["collections"]) == len(g["collected"]) == 3, who

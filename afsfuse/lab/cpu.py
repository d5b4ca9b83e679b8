"""CPU time a process has used, for benchmarks and profiles that report
what each daemon and the fileserver spent on a step.

May import the standard library only.
"""

from __future__ import annotations

import os
from pathlib import Path


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far, its threads
    included (``/proc/PID/stat``); OSError if there is no such process."""
    # The name in parentheses may hold spaces: the fields follow the last ")".
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


__all__ = ["cpu_seconds"]

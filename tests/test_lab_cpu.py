"""The lab's process CPU reading, which the benchmarks' CPU columns use."""

import os
import subprocess
import sys
import time

import pytest

from afsfuse.lab.cpu import cpu_seconds


def test_counts_this_process_work_and_refuses_a_gone_one():
    before = cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.1
    while time.process_time() < deadline:  # bounded busy work
        pass
    assert cpu_seconds(os.getpid()) - before >= 0.05
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its /proc entry is gone
    with pytest.raises(OSError):
        cpu_seconds(child.pid)

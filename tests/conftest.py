"""Shared test configuration.

Integration tests mount real FUSE filesystems.  When this machine cannot
(no /dev/fuse or no fusermount3), those tests FAIL with a message saying so,
and the summary repeats it: a run must never pass by silently skipping them.
"""

from __future__ import annotations

import os
import shutil

import pytest


def fuse_problem() -> str | None:
    """Why real mounts are impossible here, or None when they are possible."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not readable and writable by this user"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (apt package fuse3)"
    try:
        import pyfuse3  # noqa: F401
    except ImportError as exc:
        return f"pyfuse3 does not import: {exc}"
    return None


@pytest.fixture
def require_fuse() -> None:
    problem = fuse_problem()
    if problem:
        pytest.fail(f"FUSE IS NOT AVAILABLE: {problem}; mount tests cannot run", pytrace=False)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    problem = fuse_problem()
    if problem:
        terminalreporter.write_sep("!", f"FUSE IS NOT AVAILABLE: {problem}", red=True, bold=True)
        terminalreporter.write_line(
            "Integration tests that mount a filesystem FAILED because of it."
        )
    else:
        terminalreporter.write_line("FUSE available: integration tests mounted for real.")

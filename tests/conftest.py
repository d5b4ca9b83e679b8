"""Shared test configuration and fixtures.

Integration tests mount real FUSE filesystems.  When this machine cannot
(no /dev/fuse or no fusermount3), those tests FAIL with a message saying so,
and the summary repeats it: a run must never pass by silently skipping them.

Fixtures for them (defined here, so test modules use them without importing,
which ruff would flag as a redefinition, F811):

- ``pair``: one fileserver and two client mounts ``(a, b)`` of its root
  volume, once per test module;
- ``dirs``: a fresh directory named for the test in ``pair``'s volume, as
  ``(path on a, path on b)``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from afsfuse.lab.mount import ClientMount
from afsfuse.lab.server import ServerProcess


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


@contextmanager
def two_mounts(
    base: Path, extra_args: Sequence[str] = ()
) -> Iterator[tuple[ClientMount, ClientMount]]:
    """A fileserver in ``base`` and two client mounts ``(a, b)`` of its root
    volume; fails (never skips) when FUSE is unavailable.  Test modules that
    need mount options of their own define ``pair`` with it."""
    problem = fuse_problem()
    if problem:
        pytest.fail(f"FUSE IS NOT AVAILABLE: {problem}", pytrace=False)
    with (
        ServerProcess(base / "fs") as srv,
        ClientMount(srv, base / "a", extra_args=tuple(extra_args)) as a,
        ClientMount(srv, base / "b", extra_args=tuple(extra_args)) as b,
    ):
        yield a, b


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ClientMount, ClientMount]]:
    with two_mounts(tmp_path_factory.mktemp("pair")) as ab:
        yield ab


@pytest.fixture
def dirs(pair: tuple[ClientMount, ClientMount], request: pytest.FixtureRequest) -> tuple:
    a, b = pair
    name = request.node.name[:60]
    (a.mnt / name).mkdir()
    return a.mnt / name, b.mnt / name


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    problem = fuse_problem()
    if problem:
        terminalreporter.write_sep("!", f"FUSE IS NOT AVAILABLE: {problem}", red=True, bold=True)
        terminalreporter.write_line(
            "Integration tests that mount a filesystem FAILED because of it."
        )
    else:
        terminalreporter.write_line("FUSE available: integration tests mounted for real.")

"""Helpers shared by the POSIX-completeness tests (``tests/test_posix_*.py``):
the fileserver's admin command, a private tmpfs partition, polling, running
a function as another user."""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from afsfuse.lab.server import REPO

T = TypeVar("T")


def admin_json(data_dir: Path, *args: str) -> Any:
    """``afs-fileserver ARGS --data-dir D --json``, parsed."""
    r = subprocess.run(
        [sys.executable, "-m", "fileserver.cli", *args, "--data-dir", str(data_dir), "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout) if r.stdout.strip() else None


@contextmanager
def tmpfs(path: Path, *, size: str, nr_inodes: int) -> Iterator[Path]:
    """A tmpfs of its own at ``path``, so free space and inodes are the
    test's alone (the machine's disk is shared); unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},nr_inodes={nr_inodes},mode=0755",
         "tmpfs", str(path)], check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True, timeout=30)


def eventually(fn: Callable[[], T], bound: float = 5.0) -> T:
    """``fn()`` once it is truthy, or its last value after ``bound`` seconds
    (a bound on the kernel's asynchronous caches, not a speed assertion)."""
    deadline = time.monotonic() + bound
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


def as_user(cwd: Path, uid: int, fn: Callable[[], Any], groups: tuple[int, ...] = ()) -> str:
    """Run ``fn`` in a forked child as ``uid`` (primary gid = uid) inside
    ``cwd``; returns "ok" or the errno name it failed with."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        out = "exc"
        try:
            os.close(r)
            os.chdir(cwd)
            os.setgroups(list(groups))
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            fn()
            out = "ok"
        except OSError as exc:
            out = errno.errorcode.get(exc.errno or 0, "EIO")
        except BaseException as exc:
            out = f"exc {exc!r}"
        finally:
            os.write(w, json.dumps(out).encode())
            os._exit(0)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 30)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            return "hung"
        data = os.read(r, 4096)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    return json.loads(data)

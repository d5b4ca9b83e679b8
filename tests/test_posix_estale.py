"""No stray ESTALE (issue 14 item 5).

A call by name that meets a vanished fid (the kernel or the daemon still
held the name's old file when another client removed or replaced it)
revalidates and looks the name up again, as the Linux NFS client does: the
kernel retries a path walk once with LOOKUP_REVAL when a request on the
inode it resolved answers ESTALE, and the daemon's lookup then asks the
server instead of answering from the old file.  So applications see the new
file or ENOENT.  ESTALE stays for a file already open whose vnode the server
no longer has.  And the coherence checker counts an ESTALE on a call by
name as a violation.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from scripts import coherence
from scripts.coherence import Op

ROUNDS = 40


def _write(p: Path, data: bytes) -> None:
    with open(p, "wb") as f:
        f.write(data)


@pytest.mark.mount
def test_names_whose_file_was_replaced_elsewhere_reach_the_new_file(pair):
    """B holds every name's old file (kernel entry, daemon cache) when A
    replaces it; B's calls by name right after A's change returned reach
    the new one (close-to-open), never ESTALE."""
    a, b = pair
    for i in range(ROUNDS):
        name = f"f{i % 4}"
        _write(a.mnt / name, b"old %d" % i)
        assert (b.mnt / name).read_bytes() == b"old %d" % i  # B caches it
        os.stat(b.mnt / name)
        if i % 2:
            os.unlink(a.mnt / name)  # a new file under the old name
            _write(a.mnt / name, b"new %d" % i)
        else:
            _write(a.mnt / ".tmp", b"new %d" % i)  # an atomic save
            os.rename(a.mnt / ".tmp", a.mnt / name)
        with open(b.mnt / name, "rb") as f:  # open by name
            assert f.read() == b"new %d" % i
        os.chmod(b.mnt / name, 0o600)  # by name, on the new file
        assert os.stat(a.mnt / name).st_mode & 0o777 == 0o600
        os.setxattr(b.mnt / name, "user.round", b"%d" % i)
        assert os.getxattr(a.mnt / name, "user.round") == b"%d" % i


@pytest.mark.mount
def test_names_in_a_directory_replaced_elsewhere(pair):
    a, b = pair
    for _ in range(ROUNDS // 4):
        (a.mnt / "d").mkdir()
        _write(a.mnt / "d" / "f", b"one")
        assert (b.mnt / "d" / "f").read_bytes() == b"one"
        os.unlink(a.mnt / "d" / "f")
        os.rmdir(a.mnt / "d")
        with pytest.raises(OSError) as ei:
            os.stat(b.mnt / "d" / "f")
        assert ei.value.errno == errno.ENOENT  # not ESTALE
        (a.mnt / "d").mkdir()
        _write(a.mnt / "d" / "f", b"two")
        assert (b.mnt / "d" / "f").read_bytes() == b"two"
        os.unlink(b.mnt / "d" / "f")  # unlink by name in the new directory
        os.rmdir(b.mnt / "d")


@pytest.mark.mount
def test_an_open_file_removed_elsewhere_may_go_stale(pair):
    """What is left of ESTALE: a descriptor whose file the server dropped."""
    a, b = pair
    _write(a.mnt / "gone", b"x" * 10)
    with open(b.mnt / "gone", "rb") as f:
        os.unlink(a.mnt / "gone")
        try:
            data = f.read()  # pages B cached may still answer
        except OSError as exc:
            assert exc.errno == errno.ESTALE
        else:
            assert data in (b"x" * 10, b"")
    assert not (b.mnt / "gone").exists()


# -- the checker --------------------------------------------------------------------


def _op(kind: str, start: float, end: float, error: str = "", in_open: bool = False) -> Op:
    o = Op(0, int(start * 10), kind, "n0", start=start, end=end, error=error)
    o.in_open = in_open
    return o


def test_checker_counts_estale_by_name_as_a_violation() -> None:
    unlink = Op(1, 1, "unlink", "n0", start=1.0, end=1.1)
    racing_read = _op("read", 1.05, 1.2, "ESTALE")  # already open when the unlink ran
    ops = [unlink, racing_read]
    assert coherence.check(ops) == []
    by_name = _op("read", 1.05, 1.2, "ESTALE", in_open=True)
    [v] = coherence.check([unlink, by_name])
    assert v.op is by_name and "by name" in v.what
    [v] = coherence.check([unlink, _op("rename", 1.05, 1.2, "ESTALE")])
    assert "by name" in v.what
    # A restart's window still excuses it (the model's rule for faults).
    tolerated: dict[str, int] = {}
    faults = [coherence.Fault("restart", None, 1.0, 1.5, excused_until=2.0)]
    assert coherence.excuse(coherence.check([unlink, by_name]), faults, tolerated) == []
    assert tolerated

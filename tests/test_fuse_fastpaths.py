"""Fast paths through real mounts: answers the cache gives without the
server must be the server's answers.

- A name B's kernel caches as absent (a negative entry) is found on B once
  A's create returned (the break drops the kernel's entry).
- A cold walk on B over many children costs no RPC per child, and what it
  shows follows A's changes.
- Listings read ahead for a walk, used or never used, follow A's changes.
- Both clients give a file the same inode number, so tools that record them
  (git's index) see nothing changed on the other client.
"""

from __future__ import annotations

import os

import pytest

from tests.posix_support import eventually

pytestmark = pytest.mark.mount

# ``eventually``'s default bound (5 s) is the time a kernel invalidation may
# take here, generously; ``pair`` and ``dirs`` come from tests/conftest.py.


def test_negative_entry_is_cached_and_dropped_when_another_client_creates(pair, dirs):
    _a, b = pair
    da, db = dirs
    os.listdir(db)  # B holds the listing under a promise
    assert not (db / "x").exists()
    lookups, rpcs = b.fuse_requests().get("lookup", 0), b.stats()["rpc"]
    for _ in range(3):
        assert not (db / "x").exists()
    # The kernel answered itself: no lookup reached B's daemon, no RPC left it.
    assert b.fuse_requests().get("lookup", 0) == lookups
    assert b.stats()["rpc"] == rpcs
    (da / "x").write_bytes(b"hello")
    # A's create has returned: B's promise on the directory is broken; the
    # kernel's negative entry goes with it (asynchronously, within the bound).
    assert eventually(lambda: (db / "x").exists())
    assert (db / "x").read_bytes() == b"hello"
    # The same for a name B looked up before it held any listing.
    assert not (db / "y").exists()
    os.mkdir(da / "y")
    assert eventually(lambda: (db / "y").is_dir())


def test_own_changes_replace_negative_entries(dirs):
    da, _db = dirs
    for name in ("f", "d", "l", "h", "r"):
        assert not (da / name).exists()
    (da / "f").write_bytes(b"1")
    os.mkdir(da / "d")
    os.symlink("f", da / "l")
    os.link(da / "f", da / "h")
    (da / "tmp").write_bytes(b"2")
    os.rename(da / "tmp", da / "r")
    assert (da / "f").read_bytes() == b"1" and (da / "d").is_dir()
    assert os.readlink(da / "l") == "f" and (da / "h").stat().st_nlink == 2
    assert (da / "r").read_bytes() == b"2" and not (da / "tmp").exists()
    os.unlink(da / "r")
    assert not (da / "r").exists()
    (da / "r").write_bytes(b"3")  # a name removed here and made again
    assert (da / "r").read_bytes() == b"3"


def test_cold_walk_on_b_reads_directories_not_names(pair, dirs):
    _a, b = pair
    da, db = dirs
    for i in range(100):
        (da / f"f{i:03d}").write_bytes(b"x" * i)
    before = b.stats()["rpc"]
    sizes = [(db / f"f{i:03d}").stat().st_size for i in range(100)]
    after = b.stats()["rpc"]
    assert sizes == list(range(100))
    lookups = after.get("FS.Lookup", 0) - before.get("FS.Lookup", 0)
    fetches = after.get("FS.FetchStatus", 0) - before.get("FS.FetchStatus", 0)
    assert lookups <= 3 and fetches <= 3, (lookups, fetches)  # not one per file
    # What the cached listing answers follows A's changes.
    (da / "f005").write_bytes(b"longer now")
    os.unlink(da / "f006")
    (da / "new").write_bytes(b"n")
    assert eventually(lambda: (db / "f005").stat().st_size == len(b"longer now"))
    assert eventually(lambda: not (db / "f006").exists())
    assert eventually(lambda: (db / "new").exists())


def test_both_clients_show_the_same_inode_numbers(dirs):
    da, db = dirs
    os.mkdir(da / "sub")
    for i in range(5):
        (da / "sub" / f"f{i}").write_bytes(b"x")
    for p in ("sub", *(f"sub/f{i}" for i in range(5))):
        assert (da / p).stat().st_ino == (db / p).stat().st_ino, p


def _walk(top):
    """What ``find`` sees: every path under ``top`` with its file's bytes."""
    seen = {}
    for root, dirs, files in os.walk(top):
        dirs.sort()
        rel = os.path.relpath(root, top)
        seen[rel] = None
        for f in sorted(files):
            with open(os.path.join(root, f), "rb") as fh:
                seen[os.path.join(rel, f)] = fh.read()
    return seen


def test_a_walk_on_b_reads_directories_ahead_and_shows_a_s_changes(pair, dirs):
    _a, b = pair
    da, db = dirs
    for i in range(6):
        for j in range(3):
            os.makedirs(da / f"s{i}" / f"x{j}")
            (da / f"s{i}" / f"x{j}" / "f").write_bytes(b"%d.%d" % (i, j))
    before = b.stats()
    assert _walk(db) == _walk(da)
    after = b.stats()
    # Every directory read once, ahead or not: read-ahead fetches nothing twice.
    assert after["rpc"].get("FS.ReadDir", 0) - before["rpc"].get("FS.ReadDir", 0) == 1 + 6 + 18
    assert after["dir_ahead"] > before["dir_ahead"]
    # B now holds listings of directories it read ahead; A changes some of
    # them, and B's next walk shows exactly what A left.
    (da / "s3" / "x1" / "new").write_bytes(b"n")
    os.unlink(da / "s4" / "x2" / "f")
    os.rmdir(da / "s4" / "x2")
    os.rename(da / "s5" / "x0", da / "s5" / "moved")
    assert eventually(lambda: _walk(db) == _walk(da))


def test_a_listing_read_ahead_and_never_used_shows_a_s_later_change(pair, dirs):
    _a, b = pair
    da, db = dirs
    for i in range(3):
        (da / f"s{i}").mkdir()
        (da / f"s{i}" / "f").write_bytes(b"old")
    before = b.stats()["dir_ahead"]
    # B lists the top only: its subdirectories are read ahead, then left.
    assert sorted(os.listdir(db)) == ["s0", "s1", "s2"]
    assert eventually(lambda: b.stats()["dir_ahead"] > before)
    (da / "s0" / "g").write_bytes(b"new")
    os.unlink(da / "s1" / "f")
    assert eventually(lambda: sorted(os.listdir(db / "s0")) == ["f", "g"])
    assert eventually(lambda: os.listdir(db / "s1") == [])
    assert (db / "s0" / "g").read_bytes() == b"new"

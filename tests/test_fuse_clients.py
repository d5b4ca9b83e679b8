"""Two real client mounts of one volume: what A does, B sees.

Close-to-open: once close() returns on A, an open() on B sees A's data at
once; B's stat() sees it within a bounded time (the kernel's attribute cache
is told asynchronously).  Directory changes likewise.  A warm stat of an
unchanged tree on B sends no RPC at all.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys

import pytest

from tests.posix_support import eventually as _eventually

pytestmark = pytest.mark.mount

STAT_BOUND = 2.0  # seconds: generous; the benchmark measures the real figure


def eventually(fn, bound=STAT_BOUND):
    """Bounded polling (``pair`` and ``dirs`` come from tests/conftest.py)."""
    return _eventually(fn, bound)


def test_write_close_then_open_on_b_sees_it(dirs):
    da, db = dirs
    (da / "f").write_bytes(b"v1")
    assert (db / "f").read_bytes() == b"v1"
    for i in range(2, 30):
        data = f"version {i} ".encode() * i
        with open(da / "f", "wb") as f:
            f.write(data)
        # close() on A has returned: B's open must see exactly this.
        assert (db / "f").read_bytes() == data


def test_b_stat_follows_within_bound(dirs):
    da, db = dirs
    (da / "g").write_bytes(b"x")
    assert (db / "g").stat().st_size == 1
    with open(da / "g", "ab") as f:
        f.write(b"y" * 999)
    assert eventually(lambda: (db / "g").stat().st_size == 1000)
    os.chmod(da / "g", 0o600)
    assert eventually(lambda: stat.S_IMODE((db / "g").stat().st_mode) == 0o600)


def test_directory_changes_seen_by_b(dirs):
    da, db = dirs
    assert os.listdir(db) == []
    (da / "new").write_text("n")
    assert eventually(lambda: os.listdir(db) == ["new"])
    assert (db / "new").read_text() == "n"
    os.rename(da / "new", da / "renamed")
    assert eventually(lambda: os.listdir(db) == ["renamed"])
    assert (db / "renamed").read_text() == "n"
    assert eventually(lambda: not (db / "new").exists())
    (da / "sub").mkdir()
    assert eventually(lambda: (db / "sub").is_dir())
    os.rmdir(da / "sub")
    assert eventually(lambda: not (db / "sub").exists())
    os.unlink(da / "renamed")
    assert eventually(lambda: os.listdir(db) == [])


def test_b_changes_seen_by_a(dirs):
    da, db = dirs
    (da / "shared").write_text("from a")
    assert (db / "shared").read_text() == "from a"
    (db / "shared").write_text("from b")
    assert (da / "shared").read_text() == "from b"


def test_warm_stat_of_unchanged_tree_sends_no_rpc(pair, dirs):
    _a, b = pair
    da, db = dirs
    for i in range(50):
        (da / f"t{i}").write_text(str(i))
    (da / "deep").mkdir()
    for i in range(20):
        (da / "deep" / f"u{i}").write_text(str(i))

    def walk():
        n = 0
        for root, dnames, fnames in os.walk(db):
            for name in dnames + fnames:
                os.stat(os.path.join(root, name))
                n += 1
        return n

    assert walk() == 71  # cold: fetches
    before = sum(b.stats()["rpc"].values())
    assert walk() == 71  # warm
    after = sum(b.stats()["rpc"].values())
    assert after == before, f"warm stat pass sent {after - before} RPCs"


def test_big_file_checksum_and_warm_reread_without_fetch(pair, dirs):
    _a, b = pair
    da, db = dirs
    size = 256 * 1024 * 1024
    block = os.urandom(1 << 20)
    h = hashlib.sha256()
    with open(da / "big", "wb") as f:
        for i in range(size >> 20):
            chunk = block[i:] + block[:i]  # every MiB different
            f.write(chunk)
            h.update(chunk)
    want = h.hexdigest()

    def digest(path):
        h2 = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h2.update(chunk)
        return h2.hexdigest()

    assert digest(db / "big") == want  # B reads it from the server
    fetches = b.rpc_count("FS.FetchData")
    assert fetches > 0
    # Drop the kernel's page cache so the reread really asks the daemon.
    fd = os.open(db / "big", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert digest(db / "big") == want
    assert b.rpc_count("FS.FetchData") == fetches, "warm reread fetched from the server"
    assert digest(da / "big") == want  # the writer's own cache


def test_name_renamed_into_then_away_by_other_client(dirs):
    """A's kernel holds a dentry for a name A renamed a file into; when B
    renames it away, A must stop resolving that name."""
    da, db = dirs
    (da / "x.tmp").write_text("A-data")
    os.rename(da / "x.tmp", da / "x")
    assert (db / "x").read_text() == "A-data"
    os.rename(db / "x", db / "z")
    # No listing on A in between: only the directory break can tell A's
    # kernel that its dentry "x" is gone.
    assert eventually(lambda: not (da / "x").exists())
    with pytest.raises(FileNotFoundError):
        (da / "x").read_text()
    assert (da / "z").read_text() == "A-data"


_GETCWD_CHILD = """
import os, sys
for line in sys.stdin:
    try:
        print(os.getcwd(), flush=True)
    except OSError as exc:
        print("ERR", exc.errno, flush=True)
"""


def test_working_directory_survives_other_clients_change_of_its_parent(pair, dirs):
    """A shell or `git status` on B sits in db/sub while A changes db: B's
    kernel forgets what it learned in db (the break), but the dentry of sub
    must stay usable as a working directory; getcwd() once failed with
    ENOENT there (the names were dropped, which unhashes them).  A name A
    really renamed away is still gone on B."""
    _, b = pair
    da, db = dirs
    (da / "sub").mkdir()
    assert eventually(lambda: (db / "sub").is_dir())
    child = subprocess.Popen([sys.executable, "-c", _GETCWD_CHILD], cwd=db / "sub",
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:

        def getcwd() -> str:
            assert child.stdin is not None and child.stdout is not None
            child.stdin.write("?\n")
            child.stdin.flush()
            return child.stdout.readline().strip()

        assert getcwd() == str(db / "sub")

        def entries() -> int:
            return b.stats()["kernel_notify"]["entry"]

        told = 0  # changes of db after which B's kernel was told about names
        for i in range(10):
            # B holds a promise on db and its kernel has learned "sub" from
            # it (again, if an earlier break expired it), so A's change
            # breaks the promise and B tells its kernel about "sub".
            assert f"other{i}" not in os.listdir(db)
            os.stat(db / "sub")
            before = entries()
            (da / f"other{i}").write_text("x")
            if eventually(lambda n=before: entries() > n):
                told += 1
            assert getcwd() == str(db / "sub")
            assert (db / f"other{i}").read_text() == "x"
            if told == 3:
                break
        assert told == 3
        assert b.stats()["kernel_notify"]["entries_expire"] is True
        (da / "gone").write_text("g")
        assert (db / "gone").read_text() == "g"  # B's kernel has a dentry for it
        os.rename(da / "gone", da / "moved")
        assert eventually(lambda: not (db / "gone").exists())
        assert (db / "moved").read_text() == "g"
        assert getcwd() == str(db / "sub")
    finally:
        child.kill()
        child.wait(timeout=10)


def test_truncating_rewrite_is_seen_whole_by_other_client(dirs):
    """Write-on-close: while A rewrites a file with O_TRUNC, B sees the old
    contents, then the new ones; never an empty (or zero-filled) file."""
    da, db = dirs
    (da / "doc").write_bytes(b"version-1")
    assert (db / "doc").read_bytes() == b"version-1"
    with open(da / "doc", "wb") as f:  # O_TRUNC
        f.write(b"version-2")
        f.flush()
        assert (db / "doc").read_bytes() == b"version-1"
        assert (db / "doc").stat().st_size == 9
    assert (db / "doc").read_bytes() == b"version-2"


def test_mtime_set_before_close_survives_the_store(dirs):
    """tar x writes, sets the times on the open fd, then closes: the store at
    close must not stamp the server's time over the mtime just set."""
    a, b = dirs
    mtime_ns = 1_000_000_000 * 1_234_567_890
    fd = os.open(a / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"x" * 5000)
        os.utime(fd, ns=(mtime_ns, mtime_ns))
    finally:
        os.close(fd)
    assert os.stat(a / "f").st_mtime_ns == mtime_ns
    with open(b / "f", "rb") as f:
        assert f.read() == b"x" * 5000
    assert os.stat(b / "f").st_mtime_ns == mtime_ns


def test_tar_x_on_a_is_what_tar_d_on_b_expects_with_one_store_per_file(pair, dirs, tmp_path):
    """tar's futimens, fchown and fchmod before each close ride on the
    file's store (no StoreStatus of their own), and a second client finds
    every file's bytes, mode and mtime as the archive has them."""
    import subprocess

    a, b = dirs
    src = tmp_path / "src"
    files = 0
    for d in range(3):
        (src / f"d{d}").mkdir(parents=True)
        for i in range(8):
            p = src / f"d{d}" / f"f{i}"
            p.write_bytes(os.urandom(100 + 700 * i))
            p.chmod((0o644, 0o755, 0o600, 0o664)[i % 4])
            os.utime(p, ns=(10**18 + i, 10**18 + i * 10**9))
            files += 1
    subprocess.run(["tar", "cf", tmp_path / "t.tar", "-C", src, "."], check=True)
    before = pair[0].stats()["rpc"]
    subprocess.run(["tar", "xf", tmp_path / "t.tar", "-C", a], check=True)
    after = pair[0].stats()["rpc"]

    def delta(name: str) -> int:
        return after.get(name, 0) - before.get(name, 0)

    assert delta("FS.StoreData") == files
    assert delta("FS.StoreStatus") <= 2 * 4  # the directories' modes and times only
    res = subprocess.run(["tar", "df", tmp_path / "t.tar", "-C", b], capture_output=True)
    assert res.returncode == 0, res.stdout + res.stderr

"""Durable volume store: one SQLite database per volume plus one data file per file.

Layout of a volume directory ``volumes/<id>/``::

    volume.db        SQLite (WAL; synchronous=FULL under --sync always): header, vnodes,
                     dirents, intents, pending, xattrs (user.* attributes, by vnode),
                     inline_data (the bytes of small files, see below)
    data/<vnode>.<unique>   file contents (named by vnode + uniquifier, never by user names)

Small files.  A store that leaves a file (inline already, or empty with no
data file and no redo record) at most ``inline_max`` long puts its bytes in
``inline_data`` in the transaction of its metadata: one WAL sync, no data
file.  Growing past the limit spills them to a data file, written and
synced before the commit that drops the blob; until that commit the blob
wins (recovery removes a data file beside one).  Everything below is about
files with data files.

Crash consistency.  A store of a file writes its bytes into the data file
only while the file has a committed intent record (table ``intents``: which
file, not the bytes).  Files are *armed*: the CreateFile commit writes the
intent and a store keeps it (it is dropped, riding on a later commit, once
the file was idle for ``ARMED_IDLE_S``), so a store commits an intent of its
own only for a file idle since; then it writes the bytes (in place, or, when
they replace the whole contents, into a new file renamed over the old one, so
a kill -9 leaves old or new bytes, never a mix), fdatasyncs them, and commits
the new metadata (size, DV, mtime), and only then replies.  After a crash,
:meth:`Volume.recover` settles every intent left by bumping the file's DV (its
bytes may have changed, so every cached copy must go) and taking the data
file's length as its size.  A small store (``store_small``) and a truncation
(``FS.StoreStatus`` with a size) are instead committed with a redo record
(table ``pending``: the bytes and the new length) and applied to the data
file after the commit, unsynced; ``sync_redo`` syncs those files off the
reply path and the records are deleted lazily in a later transaction;
replaying a file's records in order at recovery is idempotent, because a
store written into the data file itself deletes that file's records in its
metadata commit (older bytes never replay over it).  A post-commit step
that fails does not fail the committed change: the file is marked
``broken``, not served until ``repair_file`` replayed its records (the next
change of it, or a FetchData, does that).  A new data file's name is made
durable by one directory sync in the first commit that relies on it.
Namespace changes are single transactions; a data file is unlinked only
after the transaction that dropped its vnode committed, so a crash leaves at
worst an orphan data file, which recovery and salvage remove.  Special
files (FIFOs, sockets, devices) are vnodes with an ``rdev`` and no data
file; columns added since a volume was made are added when it is opened
(``MIGRATIONS``).

Every change runs on the writer connection, one at a time: alone (its own
transaction, as tests call it) or as a job of a group commit
(``run_batch``: one transaction, a savepoint per job, one COMMIT).  Reads may
run beside it in other threads (``reading()``).  Nothing in this module knows
about trio.

Imports: ``fileserver.durability``, ``fileserver.space`` (the partition,
for ``volume_status``), ``protocol`` and the standard library (no trio);
salvage's check lives in ``fileserver.salvage`` (``Volume.check`` calls it).
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fileserver.durability import SYNC_MODES, SyncStats
from fileserver.space import partition_space
from protocol.errors import RpcError
from protocol.limits import MAX_IO, MAX_UINT32, MAX_XATTR_TOTAL
from protocol.records import SPECIAL_TYPES, FileStatus, FileType, VolSync

if TYPE_CHECKING:
    from fileserver.salvage import Finding

log = logging.getLogger(__name__)

ROOT_VNODE = 1
ROOT_UNIQUE = 1
#: Largest file length we accept (sparse files make anything below cheap).
#: A new volume's root directory is like /tmp (world-writable, sticky): every
#: user of the cell can make their own entries, nobody removes another's;
#: the administrator tightens it with chmod.
ROOT_DIR_MODE = 0o1777
#: A file stored into keeps its intent record (it stays *armed*) this long
#: after its last store, so the next store needs no intent commit; idle
#: intents are dropped riding on later commits.
ARMED_IDLE_S = 10.0
MAX_FILE_SIZE = 1 << 44  # also the default of ServerConfig.max_file_size
#: A file whose stores leave it at most this long keeps its bytes in the
#: database (table ``inline_data``), committed with its metadata: one WAL
#: sync per store, no data file, no data fsync, no intent.
INLINE_MAX = 64 * 1024
#: At most this many data files, of at most this many bytes in all,
#: unlinked after a commit still leave it cheap (``commit_is_cheap``):
#: about as long as the COMMIT itself here.
CHEAP_UNLINKS = 8
CHEAP_UNLINK_BYTES = 256 << 10
#: Bound on the files remembered to have no data file (``_no_data_file``).
NO_DATA_FILE_MAX = 100_000
#: FS.SetXattr flags (the values of Linux's XATTR_CREATE / XATTR_REPLACE).
XATTR_CREATE = 1
XATTR_REPLACE = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS header (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    volume_id INTEGER NOT NULL,
    name TEXT NOT NULL,
    creation INTEGER NOT NULL,
    update_s INTEGER NOT NULL,
    quota_bytes INTEGER NOT NULL DEFAULT 0,
    online INTEGER NOT NULL DEFAULT 1,
    bytes_used INTEGER NOT NULL DEFAULT 0,
    files INTEGER NOT NULL DEFAULT 0,
    next_vnode INTEGER NOT NULL,
    next_unique INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS vnodes (
    vnode INTEGER PRIMARY KEY,
    uniq INTEGER NOT NULL,
    type INTEGER NOT NULL,
    mode INTEGER NOT NULL,
    nlink INTEGER NOT NULL,
    size INTEGER NOT NULL,
    dv INTEGER NOT NULL,
    owner INTEGER NOT NULL,
    grp INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    parent_vnode INTEGER NOT NULL,
    parent_unique INTEGER NOT NULL,
    target BLOB,
    rdev INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS dirents (
    dir INTEGER NOT NULL,
    name BLOB NOT NULL,
    vnode INTEGER NOT NULL,
    PRIMARY KEY (dir, name)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dirents_by_vnode ON dirents (vnode);
CREATE TABLE IF NOT EXISTS intents (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    vnode INTEGER NOT NULL,
    uniq INTEGER NOT NULL
);
-- Intents and redo records are deleted by vnode.  Without these each such
-- delete scanned the table: every file stored into in the last ARMED_IDLE_S
-- keeps a row (4,200 of them after a few seconds of small files).
CREATE INDEX IF NOT EXISTS intents_by_vnode ON intents (vnode);
CREATE TABLE IF NOT EXISTS xattrs (
    vnode INTEGER NOT NULL,
    name BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (vnode, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS inline_data (
    vnode INTEGER PRIMARY KEY,
    uniq INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS pending (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    vnode INTEGER NOT NULL,
    uniq INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    data BLOB NOT NULL,
    new_size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS pending_by_vnode ON pending (vnode);
"""

VNODE_COLS = (
    "vnode, uniq, type, mode, nlink, size, dv, owner, grp, mtime_ns, ctime_ns, "
    "parent_vnode, parent_unique, target, rdev"
)
#: Columns added since the first volumes were made: (table, column, definition).
MIGRATIONS = (("vnodes", "rdev", "INTEGER NOT NULL DEFAULT 0"),)


@dataclass(slots=True)
class Vnode:
    vnode: int
    unique: int
    type: int
    mode: int
    nlink: int
    size: int
    dv: int
    owner: int
    group: int
    mtime_ns: int
    ctime_ns: int
    parent_vnode: int
    parent_unique: int
    target: bytes | None = None
    rdev: int = 0  # device number of a device node

    @property
    def is_dir(self) -> bool:
        return self.type == FileType.DIRECTORY

    def status(self, access: int = 7) -> FileStatus:
        return FileStatus(
            type=FileType(self.type),
            mode=self.mode,
            nlink=self.nlink,
            size=self.size,
            data_version=self.dv,
            owner=self.owner,
            group=self.group,
            mtime_ns=self.mtime_ns,
            ctime_ns=self.ctime_ns,
            parent_vnode=self.parent_vnode,
            parent_unique=self.parent_unique,
            access=access,
            rdev=self.rdev,
        )

    def row(self) -> tuple[Any, ...]:
        return (self.vnode, self.unique, self.type, self.mode, self.nlink, self.size, self.dv,
                self.owner, self.group, self.mtime_ns, self.ctime_ns, self.parent_vnode,
                self.parent_unique, self.target, self.rdev)  # fmt: skip


@dataclass(slots=True)
class Batch:
    """A group commit's changes, run (``Volume.apply_batch``) but not yet
    COMMITted: each job's op name and its ``(ok, result or exception)``."""

    ops: list[str]
    results: list[tuple[bool, Any]]


@dataclass(slots=True)
class RenameResult:
    moved: Vnode
    old_dir: Vnode
    new_dir: Vnode
    replaced: Vnode | None = None
    changed_nothing: bool = False


def _stale(vnode: int, unique: int) -> RpcError:
    return RpcError("ESTALE", f"no vnode {vnode}.{unique}")


#: A removal's checks: ``(dir, None)`` before the child is read, then ``(dir, child)``.
MayRemove = Callable[["Vnode", "Vnode | None"], None]


class Volume:
    """One volume on disk.

    Changes run on one writer connection, one at a time (the caller
    serializes them: ``VolumeHandle``'s commit thread, or a test calling the
    methods directly).  Reads may run at the same time in other threads, each
    inside ``with vol.reading():`` on a connection of its own, in one SQLite
    snapshot (WAL lets readers run beside the writer).
    """

    def __init__(
        self,
        path: Path,
        *,
        recover: bool = True,
        sync: str = "always",
        stats: SyncStats | None = None,
        inline_max: int = INLINE_MAX,
    ) -> None:
        self.path = Path(path)
        self.inline_max = inline_max
        self.data_dir = self.path / "data"
        self._db_path = self.path / "volume.db"
        if not self._db_path.exists():
            raise FileNotFoundError(f"no volume at {self.path}")
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}")
        self.sync = sync
        self.stats = stats if stats is not None else SyncStats()
        self.db = self._connect(self._db_path, sync)
        # Tables added since a volume was created (every CREATE is IF NOT EXISTS).
        self.db.executescript(SCHEMA)
        self._migrate()
        self._applied: list[int] = []  # pending seqs applied to data files, to delete
        self._applied_lock = threading.Lock()
        # Redo records applied to data files not yet synced: seq -> (vnode, path).
        self._redo_unsynced: dict[int, tuple[int, Path]] = {}
        self._tl = threading.local()  # .db: this thread's read connection while reading
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._depth = 0  # open _txn levels on the writer connection
        self._in_batch = False
        # Post-commit steps (vnode whose data file the step changes, or None).
        self._after: list[tuple[int | None, Callable[[], None]]] = []
        # Files a committed redo record could not be applied to: their data
        # files are not served (``fetch_data``) until ``repair_file`` replays
        # their records; the records stay in ``pending`` meanwhile.
        self.broken: set[int] = set()
        self._doomed: list[Path] = []  # data files to unlink once the batch committed
        # Files whose intent record is committed and known to this process
        # (vnode -> time of its last store, least recent first).
        self._armed: OrderedDict[int, float] = OrderedDict()
        self._storing: set[int] = set()  # stores in progress (their intents are live)
        # Files created by this process that have had no data file since
        # (their bytes inline, or none): no stat of a data file that cannot
        # exist when they are stored into or removed.  Any use of a vnode's
        # data path drops it (``_data_path``); a rollback forgets them all.
        self._no_data_file: set[int] = set()
        self._unsynced: set[int] = set()  # data files created since the last dir sync
        self._dir_sync_needed = False
        self._dirty: set[Path] = set()  # data files written but not synced (sync != always)
        self._wal_dirty = False  # commits not synced yet (sync != always)
        self._load_header()
        if recover:
            self.recover()

    # -- creation / opening ------------------------------------------------

    def _migrate(self) -> None:
        """Add the columns a volume made by an older server lacks (with their defaults)."""
        for table, col, definition in MIGRATIONS:
            have = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
            if col not in have:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {col} {definition}")
                log.info("volume %s: added column %s.%s", self.path, table, col)

    @staticmethod
    def _connect(db_path: Path, sync: str = "always") -> sqlite3.Connection:
        db = sqlite3.connect(str(db_path), isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        level = {"always": "FULL", "batch": "NORMAL", "none": "OFF"}[sync]
        db.execute(f"PRAGMA synchronous={level}")
        db.execute("PRAGMA foreign_keys=OFF")
        return db

    @property
    def _sync_data(self) -> bool:
        return self.sync == "always"

    @classmethod
    def create(
        cls,
        path: Path,
        volume_id: int,
        name: str,
        *,
        quota_bytes: int = 0,
        uid: int = 0,
        gid: int = 0,
        sync: str = "always",
        stats: SyncStats | None = None,
        inline_max: int = INLINE_MAX,
    ) -> Volume:
        """Create an empty volume whose root directory is vnode 1 unique 1."""
        path = Path(path)
        tmp = path.with_name(path.name + ".creating")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "data").mkdir(parents=True)
        db = cls._connect(tmp / "volume.db")
        now_ns = time.time_ns()
        db.executescript(SCHEMA)
        db.execute("BEGIN IMMEDIATE")
        db.execute(
            "INSERT INTO header VALUES (0, ?, ?, ?, ?, ?, 1, 0, 1, ?, ?)",
            (volume_id, name, now_ns // 1_000_000_000, now_ns // 1_000_000_000, quota_bytes,
             ROOT_VNODE + 1, ROOT_UNIQUE + 1),
        )  # fmt: skip
        root = Vnode(ROOT_VNODE, ROOT_UNIQUE, FileType.DIRECTORY, ROOT_DIR_MODE, 2, 0, 1, uid, gid,
                     now_ns, now_ns, ROOT_VNODE, ROOT_UNIQUE)  # fmt: skip
        db.execute(f"INSERT INTO vnodes ({VNODE_COLS}) VALUES ({','.join('?' * 15)})", root.row())
        db.execute("COMMIT")
        db.close()
        _fsync_dir(tmp / "data")
        _fsync_dir(tmp)
        # The rename makes the volume appear whole or not at all.
        os.rename(tmp, path)
        _fsync_dir(path.parent)
        return cls(path, sync=sync, stats=stats, inline_max=inline_max)

    def _load_header(self) -> None:
        row = self.db.execute(
            "SELECT volume_id, name, creation, update_s, quota_bytes, online, bytes_used, "
            "files, next_vnode, next_unique FROM header WHERE id = 0"
        ).fetchone()
        if row is None:
            raise RuntimeError(f"{self.path}: volume header missing")
        (self.id, self.name, self.creation, self.update_s, self.quota_bytes, online,
         self.bytes_used, self.files, self.next_vnode, self.next_unique) = row  # fmt: skip
        self.online = bool(online)

    def close(self) -> None:
        try:
            if self.sync != "always":
                self.flush()
            self.sync_redo()
            # A clean stop leaves no intent behind (nothing to settle at the next start).
            self._armed = OrderedDict((v, 0.0) for v in self._armed)
            try:
                self._disarm_idle(limit=None)
            except sqlite3.Error as exc:  # left for recovery: settled at the next start
                log.warning("volume %s: intents not dropped at close: %s", self.name, exc)
            self._flush_applied_now()
        finally:
            self.db.close()
            with self._readers_lock:
                for r in self._readers:
                    r.close()
                self._readers.clear()

    # -- reads beside the writer -------------------------------------------------

    def _rdb(self) -> sqlite3.Connection:
        """The connection reads use in this thread."""
        return getattr(self._tl, "db", None) or self.db

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Run this thread's reads on its own connection, in one snapshot."""
        db = getattr(self._tl, "conn", None)
        if db is None:
            db = sqlite3.connect(str(self._db_path), isolation_level=None,
                                 check_same_thread=False)  # fmt: skip
            db.execute("PRAGMA query_only=ON")
            self._tl.conn = db
            with self._readers_lock:
                self._readers.append(db)
        self._tl.db = db
        db.execute("BEGIN")
        try:
            yield
        finally:
            self._tl.db = None
            db.execute("COMMIT")

    # -- transactions ----------------------------------------------------------

    @contextmanager
    def _txn(self) -> Iterator[sqlite3.Connection]:
        """One change: its own transaction, or a savepoint inside a group
        commit's transaction (``run_batch``), rolled back alone on error."""
        db = self.db
        outer = self._depth == 0 and not self._in_batch
        name = f"s{self._depth}"
        db.execute("BEGIN IMMEDIATE" if outer else f"SAVEPOINT {name}")
        self._depth += 1
        try:
            if self._depth == 1:
                if self._applied:
                    # Redo records whose bytes are on disk (fsynced) are dropped
                    # here, riding on a commit we pay for anyway.
                    if self._unsynced:
                        self._dir_sync_needed = True  # their files' names first
                    with self._applied_lock:
                        applied, self._applied = self._applied, []
                    try:
                        db.executemany("DELETE FROM pending WHERE seq = ?",
                                       [(s,) for s in applied])  # fmt: skip
                    except BaseException:
                        with self._applied_lock:
                            self._applied += applied
                        raise
                self._disarm_idle()
            yield db
            db.execute(
                "UPDATE header SET update_s = ?, bytes_used = ?, files = ?, next_vnode = ?, "
                "next_unique = ?, quota_bytes = ?, online = ?, name = ? WHERE id = 0",
                (self.update_s, self.bytes_used, self.files, self.next_vnode, self.next_unique,
                 self.quota_bytes, int(self.online), self.name),
            )  # fmt: skip
            if outer:
                self._commit(["volume"])
            else:
                db.execute(f"RELEASE {name}")
        except BaseException:
            if outer:
                db.execute("ROLLBACK")
            else:
                db.execute(f"ROLLBACK TO {name}")
                db.execute(f"RELEASE {name}")
            self._load_header()  # in-memory header must match what is written
            raise
        finally:
            self._depth -= 1
        if outer:
            self._run_after()

    def _commit(self, ops: list[str]) -> None:
        """COMMIT the writer's transaction, after syncing the data directory
        when a change in it needs the name of a new data file to be durable."""
        dir_syncs = 0
        t0 = time.perf_counter()
        if self._dir_sync_needed:
            names = set(self._unsynced)
            if self._sync_data:
                _fsync_dir(self.data_dir)
                dir_syncs = 1
            self._unsynced -= names
            self._dir_sync_needed = False
        self.db.execute("COMMIT")
        if self.sync != "always":
            self._wal_dirty = True
        self.stats.batch(ops, 1 if self.sync == "always" else 0, dir_syncs,
                         time.perf_counter() - t0)  # fmt: skip

    def _run_after(self) -> None:
        self._run_steps()
        doomed, self._doomed = self._doomed, []
        self._unlink_files(doomed)

    def _run_steps(self) -> None:
        """Run the post-commit steps of what just committed.  A step that
        fails does not undo the commit (the change is acknowledged): its file
        is marked ``broken`` and its redo records stay to be replayed."""
        after, self._after = self._after, []
        for vnode, fn in after:
            try:
                fn()
            except Exception:
                log.exception("volume %s: post-commit step for vnode %s failed; its "
                              "redo records stay and replay", self.name, vnode)  # fmt: skip
                if vnode is not None:
                    self.broken.add(vnode)

    def _flush_applied_now(self) -> None:
        """Bring the database to rest: applied redo records and the intents of
        idle armed files go (a copy of it, as ``vol move`` takes, then opens
        with nothing to settle)."""
        self._armed = OrderedDict((v, 0.0) for v in self._armed)
        self._disarm_idle(limit=None)
        if self._applied:
            with self._txn():
                pass

    def run_batch(
        self, jobs: list[tuple[str, Callable[[], Any]]]
    ) -> tuple[list[tuple[bool, Any]], list[Path]]:
        """Group commit: run each job (a function making one change through
        ``_txn``) in one transaction, COMMIT once (one WAL sync), and return
        ``(ok, result or exception)`` per job, plus the data files to unlink
        that a store may still be writing (the caller unlinks them once that
        store is done).  A job that fails is rolled back alone."""
        return self.commit_batch(self.apply_batch(jobs))

    def apply_batch(self, jobs: list[tuple[str, Callable[[], Any]]]) -> Batch:
        """The first half of ``run_batch``: BEGIN and run the jobs; nothing is
        durable until ``commit_batch`` (which may run in another thread: the
        writer connection is used by one of them at a time)."""
        self.db.execute("BEGIN IMMEDIATE")
        self._in_batch = True
        out: list[tuple[bool, Any]] = []
        for _op, fn in jobs:
            try:
                out.append((True, fn()))
            except BaseException as exc:  # handed to that job's caller
                out.append((False, exc))
        return Batch([op for op, _ in jobs], out)

    def commit_batch(self, batch: Batch) -> tuple[list[tuple[bool, Any]], list[Path]]:
        """The second half of ``run_batch``: COMMIT what ``apply_batch`` ran."""
        try:
            self._in_batch = False
            self._commit(batch.ops)
        except BaseException as exc:
            self.abort_batch()
            return [(False, exc)] * len(batch.ops), []
        # Committed: from here on nothing fails the jobs (each is acknowledged).
        self._run_steps()
        doomed, self._doomed = self._doomed, []
        busy = [p for p in doomed if _vnode_of(p) in self._storing]
        try:
            self._unlink_files([p for p in doomed if _vnode_of(p) not in self._storing])
        except OSError:  # an orphan data file: removed by recovery or salvage
            log.exception("volume %s: unlinking dropped data files", self.name)
        return batch.results, busy

    def commit_is_cheap(self) -> bool:
        """Committing what ``apply_batch`` ran costs its COMMIT and little
        else: no data directory to sync, no data file to write after it, and
        at most a few small (or absent: inline files have none) data files
        to unlink (freeing a big file's blocks takes milliseconds)."""
        if self._after or self._dir_sync_needed or len(self._doomed) > CHEAP_UNLINKS:
            return False
        total = 0
        for p in self._doomed:
            try:
                total += p.stat().st_size
            except FileNotFoundError:
                pass
            except OSError:  # the commit thread unlinks it (and logs what fails)
                return False
        return total <= CHEAP_UNLINK_BYTES

    def abort_batch(self) -> None:
        """Roll back what ``apply_batch`` ran (its COMMIT failed, or never
        ran) and forget what it had planned for after the commit."""
        self._in_batch = False
        try:
            self.db.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        self._load_header()
        self._armed.clear()  # unknown now; unknown intents are settled, which is safe
        self._after.clear()
        self._doomed.clear()
        self._no_data_file.clear()

    # -- intents -------------------------------------------------------------------

    def _disarm_idle(self, limit: int | None = 64) -> None:
        """Drop the intent records of files not stored into for a while (in
        the transaction being built)."""
        armed = self._armed
        if not armed:
            return
        cutoff = time.monotonic() - ARMED_IDLE_S
        drop = []
        for vn, t in armed.items():
            if t > cutoff or (limit is not None and len(drop) >= limit):
                break
            if vn not in self._storing:
                drop.append(vn)
        if not drop:
            return
        for vn in drop:
            del armed[vn]
        outer = self._depth == 0 and not self._in_batch
        if outer:
            with self._txn() as db:
                db.executemany("DELETE FROM intents WHERE vnode = ?", [(v,) for v in drop])
        else:
            self.db.executemany("DELETE FROM intents WHERE vnode = ?", [(v,) for v in drop])

    def known_intents(self) -> set[int]:
        """Vnodes whose intent records this process holds on purpose (armed
        files, stores in progress): not leftovers of a crash."""
        return set(self._armed) | self._storing

    def arm(self, vnode: int, unique: int) -> None:
        """Commit an intent record for a file about to be stored into."""
        with self._txn() as db:
            db.execute("INSERT INTO intents (vnode, uniq) VALUES (?,?)", (vnode, unique))
        self._armed[vnode] = time.monotonic()

    @property
    def dirty(self) -> bool:
        """Something written is not yet synced (``sync`` batch/none)."""
        return bool(self._dirty or self._unsynced or self._wal_dirty)

    def flush(self) -> None:
        """Make everything written so far durable (``sync`` batch/none): data
        files, their names, the WAL.  Runs on the writer (a commit job)."""
        dirty, self._dirty = self._dirty, set()
        for path in dirty:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        n = len(dirty)
        if self._unsynced:
            self._unsynced.clear()
            _fsync_dir(self.data_dir)
            n += 1
        # NORMAL syncs the WAL before a checkpoint: a passive one makes every
        # commit so far durable.
        self._wal_dirty = False
        self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        self.stats.fsync("", "flush", n + 1)

    # -- vnode access ----------------------------------------------------------

    def _load(self, vnode: int) -> Vnode | None:
        row = (
            self._rdb()
            .execute(f"SELECT {VNODE_COLS} FROM vnodes WHERE vnode = ?", (vnode,))
            .fetchone()
        )
        return Vnode(*row) if row else None

    def get(self, vnode: int, unique: int) -> Vnode:
        v = self._load(vnode)
        if v is None or v.unique != unique:
            raise _stale(vnode, unique)
        return v

    def get_dir(self, vnode: int, unique: int) -> Vnode:
        v = self.get(vnode, unique)
        if not v.is_dir:
            raise RpcError("ENOTDIR", f"{vnode}.{unique} is not a directory")
        return v

    def _put(self, db: sqlite3.Connection, v: Vnode) -> None:
        db.execute(
            "UPDATE vnodes SET uniq=?, type=?, mode=?, nlink=?, size=?, dv=?, owner=?, grp=?, "
            "mtime_ns=?, ctime_ns=?, parent_vnode=?, parent_unique=?, target=?, rdev=? "
            "WHERE vnode=?",
            (*v.row()[1:], v.vnode),
        )

    def _entry(self, dir_vnode: int, name: bytes) -> int | None:
        row = (
            self._rdb()
            .execute("SELECT vnode FROM dirents WHERE dir = ? AND name = ?", (dir_vnode, name))
            .fetchone()
        )
        return row[0] if row else None

    def _is_empty(self, dir_vnode: int) -> bool:
        return (
            self._rdb()
            .execute("SELECT 1 FROM dirents WHERE dir = ? LIMIT 1", (dir_vnode,))
            .fetchone()
            is None
        )

    def _data_path(self, vnode: int, unique: int) -> Path:
        self._no_data_file.discard(vnode)  # the caller may create it
        return self.data_dir / f"{vnode}.{unique}"

    def volsync(self) -> VolSync:
        return VolSync(self.creation, self.update_s)

    def _check_online(self) -> None:
        if not self.online:
            raise RpcError("EBUSY", f"volume {self.id} is offline")

    def _charge(self, delta: int) -> None:
        """Quota check for a change of ``delta`` bytes; raises before anything changed."""
        if delta > 0 and self.quota_bytes and self.bytes_used + delta > self.quota_bytes:
            raise RpcError(
                "EDQUOT",
                f"volume {self.name}: {self.bytes_used} + {delta} bytes over quota "
                f"{self.quota_bytes}",
            )

    def _touch_dir(self, d: Vnode, now_ns: int, *, entries_delta: int = 0) -> None:
        d.dv += 1
        d.mtime_ns = d.ctime_ns = now_ns
        d.size = max(0, d.size + entries_delta)  # a directory's size is its entry count

    def _bump_update(self, now_ns: int) -> None:
        self.update_s = now_ns // 1_000_000_000

    # -- reads -------------------------------------------------------------------

    def fetch_data(self, vnode: int, unique: int, offset: int, length: int) -> tuple[Vnode, bytes]:
        v = self.get(vnode, unique)
        if v.is_dir:
            raise RpcError("EISDIR", "FetchData on a directory")
        if v.type in SPECIAL_TYPES:
            raise RpcError("EINVAL", "FetchData on a special file (it has no data)")
        length = min(length, MAX_IO)
        if v.type == FileType.SYMLINK:
            return v, (v.target or b"")[offset : offset + length]
        if offset >= v.size or length == 0:
            return v, b""
        n = min(length, v.size - offset)
        blob = self.inline_bytes(v.vnode, v.unique)
        if blob is not None:  # in this read's snapshot, with its status
            data = blob[offset : offset + n]
            return v, data + bytes(n - len(data)) if len(data) < n else data
        if v.vnode in self.broken:
            # Committed redo records are not all on the data file yet.
            raise RpcError("EIO", f"vnode {v.vnode}: data file awaits repair")
        try:
            with open(self._data_path(v.vnode, v.unique), "rb") as f:
                data = os.pread(f.fileno(), n, offset)
        except FileNotFoundError:
            # A file with bytes always has a data file: this one was removed
            # since this read's snapshot (zeros would pass for its bytes).
            raise _stale(v.vnode, v.unique) from None
        # A sparse tail (length extended past the written bytes) reads as zeros.
        return v, data + bytes(n - len(data)) if len(data) < n else data

    def lookup(self, dir_vnode: int, dir_unique: int, name: bytes) -> tuple[Vnode, Vnode]:
        d = self.get_dir(dir_vnode, dir_unique)
        return self._child(d, name), d

    def _child(self, d: Vnode, name: bytes) -> Vnode:
        vn = self._entry(d.vnode, name)
        if vn is None:
            raise RpcError("ENOENT", f"no entry {name!r:.300}")
        v = self._load(vn)
        if v is None:  # cannot happen with a consistent volume; salvage fixes it
            raise RpcError("EIO", f"entry {name!r:.300} names missing vnode {vn}")
        return v

    def readdir(
        self, dir_vnode: int, dir_unique: int, cookie: bytes | None, max_entries: int
    ) -> tuple[list[tuple[bytes, Vnode]], bytes | None, Vnode]:
        d = self.get_dir(dir_vnode, dir_unique)
        cols = ", ".join("v." + c.strip() for c in VNODE_COLS.split(","))
        rows = (
            self._rdb()
            .execute(
                f"SELECT d.name, {cols} FROM dirents d JOIN vnodes v ON v.vnode = d.vnode "
                "WHERE d.dir = ? AND d.name > ? ORDER BY d.name LIMIT ?",
                (d.vnode, cookie if cookie is not None else b"", max_entries + 1),
            )
            .fetchall()
        )
        more = len(rows) > max_entries
        entries = [(r[0], Vnode(*r[1:])) for r in rows[:max_entries]]
        return entries, (entries[-1][0] if more and entries else None), d

    def volume_status(self) -> dict[str, Any]:
        return {
            "volume_id": self.id,
            "name": self.name,
            "online": self.online,
            "bytes_used": self.bytes_used,
            "quota_bytes": self.quota_bytes,
            "files": self.files,
            "block_size": 4096,
            **partition_space(self.path, self.next_vnode),  # truthful statfs
        }

    # -- data changes ----------------------------------------------------------

    def store_begin(
        self, vnode: int, unique: int, offset: int, length: int, new_length: int | None,
        v: Vnode | None = None,
    ) -> tuple[Vnode, int]:  # fmt: skip
        """A store's checks, before any byte is written: (file, its new size).
        ``v``: the file as the caller just read it in this transaction."""
        self._check_online()
        if v is None:
            v = self.get(vnode, unique)
        if v.is_dir:
            raise RpcError("EISDIR", "StoreData on a directory")
        if v.type == FileType.SYMLINK:
            raise RpcError("EINVAL", "StoreData on a symlink")
        if v.type in SPECIAL_TYPES:
            raise RpcError("EINVAL", "StoreData on a special file (it has no data)")
        end = offset + length
        new_size = max(v.size, end) if new_length is None else new_length
        if end > MAX_FILE_SIZE or new_size > MAX_FILE_SIZE:
            raise RpcError("EFBIG", f"file would be larger than {MAX_FILE_SIZE} bytes")
        # Quota is checked here, before the bytes land; stores racing on other
        # files may each pass and overshoot it by one store's growth.
        self._charge(new_size - v.size)
        return v, new_size

    def store_write(
        self, vnode: int, unique: int, offset: int, data: bytes, new_size: int, op: str = ""
    ) -> None:
        """Write a store's bytes into the data file (and, under ``sync=always``,
        fdatasync it).  The file must be armed.

        A store that replaces the whole contents goes to a new file renamed
        over the old one, so a crash mid-write leaves the old bytes or the new
        ones, never a mix (a kill -9 can cut a large write short).  Any other
        store writes in place; a crash then may leave a mix, which the DV bump
        at recovery covers."""
        if vnode in self.broken:  # its redo records first (``repair_file``)
            raise RpcError("EIO", f"vnode {vnode}: data file awaits repair")
        if offset == 0 and len(data) == new_size and data:
            self._replace(vnode, unique, data)
        else:
            self._apply(vnode, unique, offset, data, new_size)
        if self._sync_data:
            self.stats.fsync(op, "data")

    def _replace(self, vnode: int, unique: int, data: bytes) -> None:
        path = self._data_path(vnode, unique)
        tmp = path.with_name(f".{path.name}.new")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, data, 0)
            if self._sync_data:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        if not self._sync_data:
            self._dirty.add(path)
        # A new name: durable with the directory sync of the commit that needs it.
        self._unsynced.add(vnode)

    def store_finish(self, vnode: int, unique: int, new_size: int, mtime_ns: int | None) -> Vnode:
        """Commit a store's metadata (size, DV, times); the file stays armed."""
        v = self.get(vnode, unique)
        now_ns = time.time_ns()
        with self._txn() as db:
            if vnode in self._unsynced:
                self._dir_sync_needed = True  # its data file's name, with this commit
            # The data file now holds (synced, or renamed over) every redo
            # record of this file: replaying them at recovery would write
            # older bytes over this store's.
            db.execute("DELETE FROM pending WHERE vnode = ?", (vnode,))
            # The data file holds every byte now (``uninline`` ran first).
            db.execute("DELETE FROM inline_data WHERE vnode = ?", (vnode,))
            self._data_changed(db, v, new_size, now_ns, mtime_ns)
        for seq in [s for s, (vn, _p) in list(self._redo_unsynced.items()) if vn == vnode]:
            self._redo_unsynced.pop(seq, None)  # gone with that commit: nothing to sync
        if vnode in self._armed:
            self._armed.move_to_end(vnode)
        self._armed[vnode] = time.monotonic()
        return v

    def store_failed(self, vnode: int) -> None:
        """A store stopped after its intent: settle it (new DV) now."""
        self._storing.discard(vnode)
        self._armed.pop(vnode, None)
        try:
            self._settle_intents()
        except Exception:  # left for recovery at the next start
            log.exception("volume %s: could not settle a failed store", self.name)

    def store_data(
        self,
        vnode: int,
        unique: int,
        offset: int,
        data: bytes,
        new_length: int | None,
        mtime_ns: int | None,
    ) -> Vnode:
        """A whole store in the calling thread (the server runs the same steps
        with the metadata in a group commit, see ``fileserver.fsops``)."""
        if vnode in self.broken:
            self.repair_file(vnode)
        v, new_size = self.store_begin(vnode, unique, offset, len(data), new_length)
        self._storing.add(vnode)
        try:
            if self.is_inline(vnode):
                self.uninline(vnode, unique)
            if vnode not in self._armed:
                self.arm(vnode, unique)
            # The intent is durable: from here on a crash ends in a DV bump at
            # recovery, whatever part of the bytes reached the data file.
            self.store_write(vnode, unique, offset, data, new_size)
            v = self.store_finish(vnode, unique, new_size, mtime_ns)
        except BaseException:
            # The bytes may be half written (or written, with the metadata
            # commit failed): a new DV now, so nobody serves the old one's
            # cached copy as current.
            self.store_failed(vnode)
            raise
        finally:
            self._storing.discard(vnode)
        return v

    def _settle_intents(self) -> int:
        """Stores interrupted after their intent: each file's bytes may have
        changed, so its DV goes up by one and its size is the data file's.
        Intents this process holds on purpose (armed files, stores in
        progress) are left alone."""
        keep = self.known_intents()
        rows = [
            r
            for r in self.db.execute(
                "SELECT DISTINCT i.vnode, i.uniq FROM intents i "
                "JOIN vnodes v ON v.vnode = i.vnode AND v.uniq = i.uniq"
            ).fetchall()
            if r[0] not in keep
        ]
        stale = [
            r[0] for r in self.db.execute("SELECT DISTINCT vnode FROM intents") if r[0] not in keep
        ]
        if not stale:
            return 0
        now_ns = time.time_ns()
        with self._txn() as db:
            for vn, uq in rows:
                v = self.get(vn, uq)
                path = self._data_path(vn, uq)
                blob = self.inline_bytes(vn, uq)
                if blob is not None:  # the blob wins over a spill that did not commit
                    size = len(blob)
                else:
                    size = path.stat().st_size if path.exists() else 0
                self.bytes_used += size - v.size
                v.size = size
                v.dv += 1
                v.mtime_ns = v.ctime_ns = now_ns
                self._put(db, v)
            db.executemany("DELETE FROM intents WHERE vnode = ?", [(vn,) for vn in stale])
            self._bump_update(now_ns)
        return len(rows)

    def _apply(self, vnode: int, unique: int, offset: int, data: bytes, new_size: int) -> None:
        self._write(vnode, unique, offset, data, new_size, self._sync_data)

    def _write(
        self, vnode: int, unique: int, offset: int, data: bytes, new_size: int, sync: bool
    ) -> None:
        path = self._data_path(vnode, unique)
        existed = path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            if data:
                _write_all(fd, data, offset)
            if os.fstat(fd).st_size != new_size:
                os.ftruncate(fd, new_size)
            if sync:
                os.fdatasync(fd)
            elif not self._sync_data:
                self._dirty.add(path)
        finally:
            os.close(fd)
        if not existed:
            # A new name: made durable by a directory sync before any commit
            # that relies on it (``_commit``), shared by every file created since.
            self._unsynced.add(vnode)

    def _data_changed(
        self, db: sqlite3.Connection, v: Vnode, new_size: int, now_ns: int, mtime_ns: int | None
    ) -> None:
        """A store's new length, DV and times, in the caller's transaction."""
        self.bytes_used += new_size - v.size
        v.size = new_size
        v.dv += 1
        v.mtime_ns = now_ns if mtime_ns is None else mtime_ns
        v.ctime_ns = now_ns
        self._put(db, v)
        self._bump_update(now_ns)

    def _set_size(self, v: Vnode, new_size: int, now_ns: int, db: sqlite3.Connection) -> None:
        """Truncate/extend inside the caller's transaction, via a redo record
        (an inline file: its blob, or its bytes moved to a data file first)."""
        cur = self.inline_bytes(v.vnode, v.unique)
        seq = None
        if cur is not None and new_size <= self.inline_max:
            db.execute("UPDATE inline_data SET data = ? WHERE vnode = ?",
                       (_spliced(cur, 0, b"", new_size), v.vnode))  # fmt: skip
        else:
            if cur is not None:
                self._spill(db, v.vnode, v.unique, cur)
            seq = db.execute(
                "INSERT INTO pending (vnode, uniq, offset, data, new_size) VALUES (?,?,0,?,?)",
                (v.vnode, v.unique, b"", new_size),
            ).lastrowid
        self.bytes_used += new_size - v.size
        v.size = new_size
        v.dv += 1
        v.mtime_ns = now_ns
        if seq is not None:
            self._after_commit.append((seq, v.vnode, v.unique, new_size))

    _after_commit: list[tuple[int | None, int, int, int]]

    def store_status(self, vnode: int, unique: int, attrs: dict[str, int]) -> Vnode:
        self._check_online()
        v = self.get(vnode, unique)
        size = attrs.get("size")
        if size is not None:
            if v.is_dir:
                raise RpcError("EISDIR", "cannot set the size of a directory")
            if v.type == FileType.SYMLINK or v.type in SPECIAL_TYPES:
                raise RpcError("EINVAL", "cannot set the size of a symlink or special file")
            if size > MAX_FILE_SIZE:
                raise RpcError("EFBIG", "size too large")
            self._charge(size - v.size)
        now_ns = time.time_ns()
        self._after_commit = []
        with self._txn() as db:
            if "mode" in attrs:
                v.mode = attrs["mode"]
            if "owner" in attrs:
                v.owner = attrs["owner"]
            if "group" in attrs:
                v.group = attrs["group"]
            if size is not None and size != v.size:
                self._set_size(v, size, now_ns, db)
            if "mtime_ns" in attrs:
                v.mtime_ns = attrs["mtime_ns"]
            v.ctime_ns = now_ns
            self._put(db, v)
            self._bump_update(now_ns)
        for seq, vn, uq, new_size in self._after_commit:
            self._later(lambda vn=vn, uq=uq, n=new_size, seq=seq: self._truncate(vn, uq, n, seq),
                        vn)  # fmt: skip
        return v

    def _truncate(self, vnode: int, unique: int, new_size: int, seq: int | None) -> None:
        self._redo_applied(seq, vnode, unique, 0, b"", new_size)

    def _redo_applied(
        self, seq: int | None, vnode: int, unique: int, offset: int, data: bytes, new_size: int
    ) -> None:
        """Apply a committed redo record to the data file, unsynced: the
        record stays until ``sync_redo`` (off every reply's path) synced the
        file, and replays at recovery if a crash comes first.  On a ``broken``
        file every committed record of it is replayed instead (this one too)."""
        if vnode in self.broken:
            self.repair_file(vnode)
            return
        self._write(vnode, unique, offset, data, new_size, False)
        if seq is not None:
            self._redo_unsynced[seq] = (vnode, self._data_path(vnode, unique))

    def repair_file(self, vnode: int) -> None:
        """Replay a ``broken`` file's committed redo records onto its data
        file, in order, on the writer (a commit job, or a post-commit step):
        they hold every change since its last store written in place, so
        replaying them over whatever part of them landed is idempotent.
        Raises (the file stays broken) when the data file still fails."""
        row = self.db.execute("SELECT uniq FROM vnodes WHERE vnode = ?", (vnode,)).fetchone()
        if row is None:
            self.broken.discard(vnode)
            return
        unique = row[0]
        rows = self.db.execute(
            "SELECT seq, offset, data, new_size FROM pending WHERE vnode = ? AND uniq = ? "
            "ORDER BY seq",
            (vnode, unique),
        ).fetchall()
        for _seq, off, data, new_size in rows:
            self._write(vnode, unique, off, data, new_size, False)
        path = self._data_path(vnode, unique)
        for seq, *_ in rows:
            self._redo_unsynced[seq] = (vnode, path)
        self.broken.discard(vnode)
        log.info("volume %s: vnode %d repaired: %d redo records replayed",
                 self.name, vnode, len(rows))  # fmt: skip

    def store_small(
        self,
        vnode: int,
        unique: int,
        offset: int,
        data: bytes,
        new_length: int | None,
        mtime_ns: int | None,
        v: Vnode | None = None,
    ) -> Vnode:
        """A store small enough to go into the commit itself: its bytes are a
        redo record committed with the new metadata (one WAL sync makes both
        durable, no intent, no data fsync on the reply's path); the data file
        gets them right after the commit.

        A file that is inline (or empty, with no data file yet) and stays at
        most ``inline_max`` long gets its bytes in ``inline_data`` instead, in
        the same transaction: nothing to apply or sync afterwards.  One that
        grows past it moves its bytes to a data file, written (and synced)
        before the commit that drops the blob.  ``v``: as for ``store_begin``."""
        v, new_size = self.store_begin(vnode, unique, offset, len(data), new_length, v)
        now_ns = time.time_ns()
        cur = self._inline_current(v)
        if cur is not None and (new_size <= self.inline_max or self.is_inline(vnode)):
            with self._txn() as db:
                if new_size <= self.inline_max:
                    db.execute("INSERT OR REPLACE INTO inline_data VALUES (?,?,?)",
                               (vnode, unique, _spliced(cur, offset, data, new_size)))  # fmt: skip
                    # Records a truncation left (no data file yet) must not replay.
                    db.execute("DELETE FROM pending WHERE vnode = ?", (vnode,))
                else:
                    self._spill(db, vnode, unique, cur, offset, data, new_size)
                self._data_changed(db, v, new_size, now_ns, mtime_ns)
            return v
        with self._txn() as db:
            seq = db.execute(
                "INSERT INTO pending (vnode, uniq, offset, data, new_size) VALUES (?,?,?,?,?)",
                (vnode, unique, offset, data, new_size),
            ).lastrowid
            self._data_changed(db, v, new_size, now_ns, mtime_ns)
        self._later(lambda: self._redo_applied(seq, vnode, unique, offset, data, new_size), vnode)
        return v

    # -- inline data (small files' bytes in the database) ------------------------

    def inline_bytes(self, vnode: int, unique: int) -> bytes | None:
        """The file's bytes when they are inline (in this thread's snapshot)."""
        row = (
            self._rdb()
            .execute("SELECT data FROM inline_data WHERE vnode = ? AND uniq = ?", (vnode, unique))
            .fetchone()
        )
        return bytes(row[0]) if row is not None else None

    def is_inline(self, vnode: int) -> bool:
        row = self._rdb().execute("SELECT 1 FROM inline_data WHERE vnode = ?", (vnode,)).fetchone()
        return row is not None

    def _inline_current(self, v: Vnode) -> bytes | None:
        """The bytes of a file that may be stored inline: its blob, or ``b""``
        for an empty file with no data file and no redo record; else None."""
        blob = self.inline_bytes(v.vnode, v.unique)
        if blob is not None:
            return blob
        if v.size or v.vnode in self._storing or v.vnode in self.broken:
            return None
        if self._rdb().execute("SELECT 1 FROM pending WHERE vnode = ? LIMIT 1",
                               (v.vnode,)).fetchone():  # fmt: skip
            return None
        if v.vnode in self._no_data_file:
            return b""  # created here, never given a data file
        return None if self._data_path(v.vnode, v.unique).exists() else b""

    def _spill(
        self,
        db: sqlite3.Connection,
        vnode: int,
        unique: int,
        cur: bytes,
        offset: int = 0,
        data: bytes = b"",
        new_size: int | None = None,
    ) -> None:
        """Move an inline file's bytes (with ``data`` stored at ``offset``) to
        its data file, inside the caller's transaction: the file is written
        and synced now, its name synced by this commit (``_commit``), so the
        commit that drops the blob finds the bytes durable.  A crash before
        that commit leaves the blob (it wins; recovery drops the file)."""
        path = self._data_path(vnode, unique)
        path.unlink(missing_ok=True)  # a leftover of a spill that did not commit
        size = len(cur) if new_size is None else new_size
        self._write(vnode, unique, 0, cur[:size], size, False)
        if data:
            self._write(vnode, unique, offset, data, size, False)
        if self._sync_data:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
            self.stats.fsync("", "data")
        self._dir_sync_needed = True
        db.execute("DELETE FROM inline_data WHERE vnode = ?", (vnode,))
        db.execute("DELETE FROM pending WHERE vnode = ?", (vnode,))

    def uninline(self, vnode: int, unique: int) -> None:
        """Move an inline file's bytes to a data file (one commit), before a
        store that writes the data file itself."""
        with self._txn() as db:
            cur = self.inline_bytes(vnode, unique)
            if cur is not None:
                self._spill(db, vnode, unique, cur)

    @property
    def redo_unsynced(self) -> int:
        """Applied redo records whose data files are not synced yet."""
        return len(self._redo_unsynced)

    def sync_redo(self) -> int:
        """Sync the data files that applied redo records were written to (and
        new names), then let the records go with the next commit.  Runs in any
        thread beside the writer.  Returns the fsyncs made."""
        batch = dict(self._redo_unsynced)
        if not batch:
            return 0
        n = 0
        for path in {p for _vn, p in batch.values()}:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # removed since: its records went with its vnode
            try:
                os.fdatasync(fd)
                n += 1
            finally:
                os.close(fd)
        if self._unsynced:
            names = set(self._unsynced)
            _fsync_dir(self.data_dir)
            self._unsynced -= names
            n += 1
        with self._applied_lock:
            for seq in batch:
                self._redo_unsynced.pop(seq, None)
                self._applied.append(seq)
        self.stats.fsync("", "redo", n)
        return n

    def _later(self, fn: Callable[[], None], vnode: int | None = None) -> None:
        """Run ``fn`` (a step on ``vnode``'s data file) once the change being
        made is committed."""
        self._after.append((vnode, fn))
        if vnode is not None:
            self._no_data_file.discard(vnode)  # the step may write its data file
        if not (self._in_batch or self._depth):
            self._run_steps()

    # -- namespace changes -----------------------------------------------------

    def create_vnode(
        self,
        dir_vnode: int,
        dir_unique: int,
        name: bytes,
        ftype: FileType,
        mode: int,
        owner: int,
        group: int,
        target: bytes | None = None,
        rdev: int = 0,
        d: Vnode | None = None,
    ) -> tuple[Vnode, Vnode]:
        """CreateFile / MakeDir / Symlink / MakeNode: returns (new vnode, directory).
        ``d``: the directory as the caller just read it in this transaction."""
        self._check_online()
        if d is None:
            d = self.get_dir(dir_vnode, dir_unique)
        if self._entry(d.vnode, name) is not None:
            raise RpcError("EEXIST", f"{name!r:.300} exists")
        size = len(target) if target is not None else 0
        if size:
            self._charge(size)
        elif self.quota_bytes and self.bytes_used >= self.quota_bytes:
            raise RpcError("EDQUOT", f"volume {self.name} is at its quota")
        if self.next_vnode > MAX_UINT32 or self.next_unique > MAX_UINT32:
            raise RpcError("ENOSPC", "vnode numbers exhausted")
        now_ns = time.time_ns()
        is_dir = ftype == FileType.DIRECTORY
        v = Vnode(self.next_vnode, self.next_unique, int(ftype), mode, 2 if is_dir else 1, size,
                  1, owner, group, now_ns, now_ns, d.vnode, d.unique, target, rdev)  # fmt: skip
        with self._txn() as db:
            self.next_vnode += 1
            self.next_unique += 1
            db.execute(f"INSERT INTO vnodes ({VNODE_COLS}) VALUES ({','.join('?' * 15)})", v.row())
            db.execute("INSERT INTO dirents (dir, name, vnode) VALUES (?,?,?)",
                       (d.vnode, name, v.vnode))  # fmt: skip
            self._touch_dir(d, now_ns, entries_delta=1)
            if is_dir:
                d.nlink += 1
            self._put(db, d)
            if ftype == FileType.FILE:
                # Armed from birth: its first store needs no intent commit.
                db.execute("INSERT INTO intents (vnode, uniq) VALUES (?,?)", (v.vnode, v.unique))
            self.files += 1
            self.bytes_used += size
            self._bump_update(now_ns)
        if ftype == FileType.FILE:
            self._armed[v.vnode] = time.monotonic()
            if len(self._no_data_file) >= NO_DATA_FILE_MAX:
                self._no_data_file.clear()  # bounded: the others are stat'ed again
            self._no_data_file.add(v.vnode)
        return v, d

    def link(
        self, dir_vnode: int, dir_unique: int, name: bytes, vnode: int, unique: int
    ) -> tuple[Vnode, Vnode]:
        self._check_online()
        d = self.get_dir(dir_vnode, dir_unique)
        v = self.get(vnode, unique)
        if v.is_dir:
            raise RpcError("EPERM", "hard links to directories are not allowed")
        if self._entry(d.vnode, name) is not None:
            raise RpcError("EEXIST", f"{name!r:.300} exists")
        if v.nlink >= 65000:
            raise RpcError("EMLINK", "too many links")
        now_ns = time.time_ns()
        with self._txn() as db:
            db.execute("INSERT INTO dirents (dir, name, vnode) VALUES (?,?,?)",
                       (d.vnode, name, v.vnode))  # fmt: skip
            v.nlink += 1
            v.ctime_ns = now_ns
            self._put(db, v)
            self._touch_dir(d, now_ns, entries_delta=1)
            self._put(db, d)
            self._bump_update(now_ns)
        return v, d

    def _drop_link(self, db: sqlite3.Connection, v: Vnode, now_ns: int) -> list[Path]:
        """One directory entry for file ``v`` is gone; returns data files to unlink."""
        v.nlink -= 1
        v.ctime_ns = now_ns
        if v.nlink > 0:
            row = db.execute("SELECT dir FROM dirents WHERE vnode = ? LIMIT 1",
                             (v.vnode,)).fetchone()  # fmt: skip
            if row is not None and row[0] != v.parent_vnode:
                p = self._load(row[0])
                if p is not None:
                    v.parent_vnode, v.parent_unique = p.vnode, p.unique
            self._put(db, v)
            return []
        return self._delete_vnode(db, v)

    def _delete_vnode(self, db: sqlite3.Connection, v: Vnode) -> list[Path]:
        v.nlink = 0
        db.execute("DELETE FROM vnodes WHERE vnode = ?", (v.vnode,))
        db.execute("DELETE FROM pending WHERE vnode = ?", (v.vnode,))
        db.execute("DELETE FROM intents WHERE vnode = ?", (v.vnode,))
        db.execute("DELETE FROM xattrs WHERE vnode = ?", (v.vnode,))
        inline = db.execute("DELETE FROM inline_data WHERE vnode = ?", (v.vnode,)).rowcount
        self._armed.pop(v.vnode, None)
        self._unsynced.discard(v.vnode)  # its name needs no sync any more
        for seq in [s for s, (vn, _p) in list(self._redo_unsynced.items()) if vn == v.vnode]:
            self._redo_unsynced.pop(seq, None)
        self.files -= 1
        self.bytes_used -= v.size
        if v.type != FileType.FILE:
            return []
        if v.vnode not in self._storing and (inline or v.vnode in self._no_data_file):
            # Its bytes were in the database, and no store under way may be
            # writing a data file now: nothing to unlink (one a spill left
            # when its commit failed is an orphan, which recovery and salvage
            # remove).
            self._no_data_file.discard(v.vnode)
            return []
        return [self._data_path(v.vnode, v.unique)]

    def _unlink_files(self, paths: list[Path]) -> None:
        if self._in_batch or self._depth:
            self._doomed += paths  # once the transaction that dropped them committed
            return
        for p in paths:
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def remove_file(
        self, dir_vnode: int, dir_unique: int, name: bytes, may: MayRemove | None = None
    ) -> tuple[Vnode, Vnode]:
        """unlink.  ``may(dir, None)`` then ``may(dir, child)``: the caller's
        checks, run on the rows read here (each read once per removal)."""
        self._check_online()
        d = self.get_dir(dir_vnode, dir_unique)
        if may is not None:
            may(d, None)
        v = self._child(d, name)
        if may is not None:
            may(d, v)
        if v.is_dir:
            raise RpcError("EISDIR", f"{name!r:.300} is a directory")
        now_ns = time.time_ns()
        with self._txn() as db:
            db.execute("DELETE FROM dirents WHERE dir = ? AND name = ?", (d.vnode, name))
            doomed = self._drop_link(db, v, now_ns)
            self._touch_dir(d, now_ns, entries_delta=-1)
            self._put(db, d)
            self._bump_update(now_ns)
        self._unlink_files(doomed)
        return v, d

    def remove_dir(
        self, dir_vnode: int, dir_unique: int, name: bytes, may: MayRemove | None = None
    ) -> tuple[Vnode, Vnode]:
        """rmdir; ``may`` as for ``remove_file``."""
        self._check_online()
        d = self.get_dir(dir_vnode, dir_unique)
        if may is not None:
            may(d, None)
        v = self._child(d, name)
        if may is not None:
            may(d, v)
        if not v.is_dir:
            raise RpcError("ENOTDIR", f"{name!r:.300} is not a directory")
        if not self._is_empty(v.vnode):
            raise RpcError("ENOTEMPTY", f"{name!r:.300} is not empty")
        now_ns = time.time_ns()
        with self._txn() as db:
            db.execute("DELETE FROM dirents WHERE dir = ? AND name = ?", (d.vnode, name))
            self._delete_vnode(db, v)
            self._touch_dir(d, now_ns, entries_delta=-1)
            d.nlink -= 1
            self._put(db, d)
            self._bump_update(now_ns)
        return v, d

    def _is_ancestor(self, maybe_ancestor: int, vnode: int) -> bool:
        """Whether directory ``maybe_ancestor`` is ``vnode`` or one of its ancestors."""
        seen = 0
        while True:
            if vnode == maybe_ancestor:
                return True
            if vnode == ROOT_VNODE:
                return False
            row = self._rdb().execute("SELECT parent_vnode FROM vnodes WHERE vnode = ?",
                                  (vnode,)).fetchone()  # fmt: skip
            seen += 1
            if row is None or row[0] == vnode or seen > 1_000_000:
                return False
            vnode = row[0]

    def rename(
        self,
        od_vnode: int,
        od_unique: int,
        old_name: bytes,
        nd_vnode: int,
        nd_unique: int,
        new_name: bytes,
        flags: int,
    ) -> RenameResult:
        self._check_online()
        if flags not in (0, 1):
            raise RpcError("EINVAL", f"unknown rename flags {flags}")
        od = self.get_dir(od_vnode, od_unique)
        nd = od if nd_vnode == od_vnode else self.get_dir(nd_vnode, nd_unique)
        if nd.unique != nd_unique:
            raise _stale(nd_vnode, nd_unique)
        v, _ = self.lookup(od_vnode, od_unique, old_name)
        tgt_vn = self._entry(nd.vnode, new_name)
        if tgt_vn is not None and flags == 1:
            raise RpcError("EEXIST", f"{new_name!r:.300} exists (RENAME_NOREPLACE)")
        if tgt_vn == v.vnode:
            # Same file under both names (or the same entry): POSIX says do nothing.
            return RenameResult(v, od, nd, changed_nothing=True)
        if v.is_dir and self._is_ancestor(v.vnode, nd.vnode):
            raise RpcError("EINVAL", "cannot move a directory under itself")
        tgt: Vnode | None = None
        if tgt_vn is not None:
            tgt = self._load(tgt_vn)
            if tgt is None:
                raise RpcError("EIO", f"entry {new_name!r:.300} names missing vnode {tgt_vn}")
            if v.is_dir and not tgt.is_dir:
                raise RpcError("ENOTDIR", f"{new_name!r:.300} is not a directory")
            if not v.is_dir and tgt.is_dir:
                raise RpcError("EISDIR", f"{new_name!r:.300} is a directory")
            if tgt.is_dir and not self._is_empty(tgt.vnode):
                raise RpcError("ENOTEMPTY", f"{new_name!r:.300} is not empty")
        now_ns = time.time_ns()
        doomed: list[Path] = []
        with self._txn() as db:
            db.execute("DELETE FROM dirents WHERE dir = ? AND name = ?", (od.vnode, old_name))
            if tgt is not None:
                db.execute("DELETE FROM dirents WHERE dir = ? AND name = ?", (nd.vnode, new_name))
                if tgt.is_dir:
                    self._delete_vnode(db, tgt)
                    nd.nlink -= 1
                else:
                    doomed = self._drop_link(db, tgt, now_ns)
            db.execute("INSERT INTO dirents (dir, name, vnode) VALUES (?,?,?)",
                       (nd.vnode, new_name, v.vnode))  # fmt: skip
            v.parent_vnode, v.parent_unique = nd.vnode, nd.unique
            v.ctime_ns = now_ns
            self._put(db, v)
            if od is nd:
                self._touch_dir(od, now_ns, entries_delta=-1 if tgt is not None else 0)
            else:
                self._touch_dir(od, now_ns, entries_delta=-1)
                self._touch_dir(nd, now_ns, entries_delta=0 if tgt is not None else 1)
                if v.is_dir:
                    od.nlink -= 1
                    nd.nlink += 1
                self._put(db, nd)
            self._put(db, od)
            self._bump_update(now_ns)
        self._unlink_files(doomed)
        return RenameResult(v, od, nd, tgt)

    # -- admin -------------------------------------------------------------------

    # -- user extended attributes (one row per name, dropped with the vnode) ----

    def xattrs(self, vnode: int, unique: int) -> tuple[Vnode, dict[bytes, bytes]]:
        v = self.get(vnode, unique)
        rows = self._rdb().execute(
            "SELECT name, value FROM xattrs WHERE vnode = ? ORDER BY name", (vnode,)
        )
        return v, {bytes(n): bytes(val) for n, val in rows}

    def set_xattr(
        self, vnode: int, unique: int, name: bytes, value: bytes, flags: int = 0
    ) -> Vnode:
        """Set ``name`` (``XATTR_CREATE``: EEXIST if it exists; ``XATTR_REPLACE``:
        ENODATA if not); the per-file total is bounded (ENOSPC).  Bumps ctime."""
        self._check_online()
        v, have = self.xattrs(vnode, unique)
        if flags & XATTR_CREATE and name in have:
            raise RpcError("EEXIST", f"attribute {name!r:.300} exists")
        if flags & XATTR_REPLACE and name not in have:
            raise RpcError("ENODATA", f"no attribute {name!r:.300}")
        have[name] = value
        if sum(len(n) + len(val) for n, val in have.items()) > MAX_XATTR_TOTAL:
            raise RpcError("ENOSPC", f"over {MAX_XATTR_TOTAL} bytes of attributes on one file")
        return self._xattr_change(v, "INSERT OR REPLACE INTO xattrs VALUES (?,?,?)",
                                  (vnode, name, value))  # fmt: skip

    def remove_xattr(self, vnode: int, unique: int, name: bytes) -> Vnode:
        self._check_online()
        v, have = self.xattrs(vnode, unique)
        if name not in have:
            raise RpcError("ENODATA", f"no attribute {name!r:.300}")
        return self._xattr_change(v, "DELETE FROM xattrs WHERE vnode = ? AND name = ?",
                                  (vnode, name))  # fmt: skip

    def _xattr_change(self, v: Vnode, sql: str, args: tuple[Any, ...]) -> Vnode:
        now_ns = time.time_ns()
        with self._txn() as db:
            db.execute(sql, args)
            v.ctime_ns = now_ns
            self._put(db, v)
            self._bump_update(now_ns)
        return v

    def set_quota(self, quota_bytes: int) -> None:
        with self._txn():
            self.quota_bytes = quota_bytes

    def set_online(self, online: bool) -> None:
        with self._txn():
            self.online = online

    # -- recovery and consistency --------------------------------------------

    def recover(self) -> dict[str, int]:
        """Replay redo records, settle interrupted stores, and drop leftovers
        of an interrupted run."""
        n = self._replay_pending()
        settled = self._settle_intents()
        orphans = self._remove_orphan_files()
        if n or settled or orphans:
            log.info("volume %s: recovered: %d truncations replayed, %d interrupted "
                     "stores settled, %d orphan data files removed",
                     self.name, n, settled, orphans)  # fmt: skip
        return {"replayed": n, "settled": settled, "orphans": orphans}

    def _replay_pending(self) -> int:
        rows = self.db.execute(
            "SELECT p.seq, p.vnode, p.uniq, p.offset, p.data, p.new_size FROM pending p "
            "JOIN vnodes v ON v.vnode = p.vnode AND v.uniq = p.uniq ORDER BY p.seq"
        ).fetchall()
        for _seq, vn, uq, off, data, new_size in rows:
            self._apply(vn, uq, off, data, new_size)
        if self._unsynced:
            _fsync_dir(self.data_dir)  # new names before their redo records go
            self._unsynced.clear()
        n = self.db.execute("SELECT COUNT(*) FROM pending").fetchone()[0]
        if n:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("DELETE FROM pending")
            self.db.execute("COMMIT")
        return len(rows)

    def _live_files(self) -> set[str]:
        rows = self.db.execute(
            "SELECT vnode, uniq FROM vnodes WHERE type = ?", (int(FileType.FILE),)
        ).fetchall()
        return {f"{vn}.{uq}" for vn, uq in rows}

    def _remove_orphan_files(self) -> int:
        # A data file beside a blob is a spill that did not commit: the blob wins.
        live = self._live_files() - {
            f"{vn}.{uq}" for vn, uq in self.db.execute("SELECT vnode, uniq FROM inline_data")
        }
        n = 0
        for entry in os.scandir(self.data_dir):
            if entry.name not in live:
                os.unlink(entry.path)
                n += 1
        return n

    def check(self, repair: bool = False) -> list[Finding]:
        """Salvage's consistency check of this volume (``fileserver.salvage``)."""
        from fileserver.salvage import check_volume  # salvage builds on this module

        return check_volume(self, repair=repair)


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _spliced(cur: bytes, offset: int, data: bytes, new_size: int) -> bytes:
    """``cur`` with ``data`` written at ``offset``, cut or zero-filled to ``new_size``."""
    buf = bytearray(cur)
    end = offset + len(data)
    if len(buf) < end:
        buf.extend(bytes(end - len(buf)))
    buf[offset:end] = data
    del buf[new_size:]
    buf.extend(bytes(new_size - len(buf)))
    return bytes(buf)


def _vnode_of(path: Path) -> int:
    return int(path.name.partition(".")[0])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    _fsync_dir(path)

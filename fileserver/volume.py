"""Durable volume store: one SQLite database per volume plus one data file per file.

Layout of a volume directory ``volumes/<id>/``::

    volume.db        SQLite (WAL, synchronous=FULL): header, vnodes, dirents, intents, pending
    data/<vnode>.<unique>   file contents (named by vnode + uniquifier, never by user names)

Crash consistency.  A store (``FS.StoreData``) first commits a small intent
record (table ``intents``: which file, not the bytes), then writes the bytes
into the data file in place and fsyncs it, then commits the new metadata
(size, DV, mtime) and drops the intent in one transaction, and only then
replies.  So the bytes are written once, and an acknowledged store is on
stable storage.  After a crash between the intent and the metadata commit the
data file may hold some of the new bytes: :meth:`Volume.recover` settles each
intent left by bumping the file's DV (its bytes may have changed, so every
cached copy must go) and taking the data file's length as its size.  A
truncation (``FS.StoreStatus`` with a size) is instead committed with a redo
record (table ``pending``) and applied after; replaying one is idempotent.
Applied records are deleted lazily in the next transaction.  Namespace
changes are single transactions; a data file is unlinked only after the
transaction that dropped its vnode committed, so a crash leaves at worst an
orphan data file, which recovery and salvage remove.

Every method here blocks (SQLite, fsync): callers run them in a worker thread
and serialize calls per volume (see ``VolumeHandle``).  Nothing in this module
knows about trio.

Imports: ``protocol`` and the standard library (no trio); salvage's check
lives in ``fileserver.salvage`` (``Volume.check`` calls it); ``fileserver.space``
measures the partition for ``volume_status``.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fileserver.space import partition_space
from protocol.errors import RpcError
from protocol.limits import MAX_IO, MAX_UINT32
from protocol.records import FileStatus, FileType, VolSync

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
MAX_FILE_SIZE = 1 << 44  # also the default of ServerConfig.max_file_size

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
    target BLOB
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
CREATE TABLE IF NOT EXISTS pending (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    vnode INTEGER NOT NULL,
    uniq INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    data BLOB NOT NULL,
    new_size INTEGER NOT NULL
);
"""

VNODE_COLS = (
    "vnode, uniq, type, mode, nlink, size, dv, owner, grp, mtime_ns, ctime_ns, "
    "parent_vnode, parent_unique, target"
)


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
        )

    def row(self) -> tuple[Any, ...]:
        return (self.vnode, self.unique, self.type, self.mode, self.nlink, self.size, self.dv,
                self.owner, self.group, self.mtime_ns, self.ctime_ns, self.parent_vnode,
                self.parent_unique, self.target)  # fmt: skip


@dataclass(slots=True)
class RenameResult:
    moved: Vnode
    old_dir: Vnode
    new_dir: Vnode
    replaced: Vnode | None = None
    changed_nothing: bool = False


def _stale(vnode: int, unique: int) -> RpcError:
    return RpcError("ESTALE", f"no vnode {vnode}.{unique}")


class Volume:
    """One volume on disk.  Not thread-safe: callers serialize (one worker at a time)."""

    def __init__(self, path: Path, *, recover: bool = True) -> None:
        self.path = Path(path)
        self.data_dir = self.path / "data"
        db_path = self.path / "volume.db"
        if not db_path.exists():
            raise FileNotFoundError(f"no volume at {self.path}")
        self.db = self._connect(db_path)
        # Tables added since a volume was created (every CREATE is IF NOT EXISTS).
        self.db.executescript(SCHEMA)
        self._applied: list[int] = []  # pending seqs applied to data files, to delete
        self._load_header()
        if recover:
            self.recover()

    # -- creation / opening ------------------------------------------------

    @staticmethod
    def _connect(db_path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(str(db_path), isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=OFF")
        return db

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
        db.execute(f"INSERT INTO vnodes ({VNODE_COLS}) VALUES ({','.join('?' * 14)})", root.row())
        db.execute("COMMIT")
        db.close()
        _fsync_dir(tmp / "data")
        _fsync_dir(tmp)
        # The rename makes the volume appear whole or not at all.
        os.rename(tmp, path)
        _fsync_dir(path.parent)
        return cls(path)

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
            self._flush_applied_now()
        finally:
            self.db.close()

    # -- transactions ----------------------------------------------------------

    @contextmanager
    def _txn(self) -> Iterator[sqlite3.Connection]:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            if self._applied:
                # Redo records whose bytes are on disk (fsynced) are dropped here,
                # riding on a commit we pay for anyway.
                db.executemany("DELETE FROM pending WHERE seq = ?", [(s,) for s in self._applied])
            yield db
            db.execute(
                "UPDATE header SET update_s = ?, bytes_used = ?, files = ?, next_vnode = ?, "
                "next_unique = ?, quota_bytes = ?, online = ?, name = ? WHERE id = 0",
                (self.update_s, self.bytes_used, self.files, self.next_vnode, self.next_unique,
                 self.quota_bytes, int(self.online), self.name),
            )  # fmt: skip
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self._load_header()  # in-memory header must match what is committed
            raise
        self._applied.clear()

    def _flush_applied_now(self) -> None:
        if self._applied:
            with self._txn():
                pass

    # -- vnode access ----------------------------------------------------------

    def _load(self, vnode: int) -> Vnode | None:
        row = self.db.execute(
            f"SELECT {VNODE_COLS} FROM vnodes WHERE vnode = ?", (vnode,)
        ).fetchone()
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
            "mtime_ns=?, ctime_ns=?, parent_vnode=?, parent_unique=?, target=? WHERE vnode=?",
            (*v.row()[1:], v.vnode),
        )

    def _entry(self, dir_vnode: int, name: bytes) -> int | None:
        row = self.db.execute(
            "SELECT vnode FROM dirents WHERE dir = ? AND name = ?", (dir_vnode, name)
        ).fetchone()
        return row[0] if row else None

    def _is_empty(self, dir_vnode: int) -> bool:
        return (
            self.db.execute("SELECT 1 FROM dirents WHERE dir = ? LIMIT 1", (dir_vnode,)).fetchone()
            is None
        )

    def _data_path(self, vnode: int, unique: int) -> Path:
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
        length = min(length, MAX_IO)
        if v.type == FileType.SYMLINK:
            return v, (v.target or b"")[offset : offset + length]
        if offset >= v.size or length == 0:
            return v, b""
        n = min(length, v.size - offset)
        try:
            with open(self._data_path(v.vnode, v.unique), "rb") as f:
                data = os.pread(f.fileno(), n, offset)
        except FileNotFoundError:
            data = b""
        # A sparse tail (length extended past the written bytes) reads as zeros.
        return v, data + bytes(n - len(data)) if len(data) < n else data

    def lookup(self, dir_vnode: int, dir_unique: int, name: bytes) -> tuple[Vnode, Vnode]:
        d = self.get_dir(dir_vnode, dir_unique)
        vn = self._entry(d.vnode, name)
        if vn is None:
            raise RpcError("ENOENT", f"no entry {name!r:.300}")
        v = self._load(vn)
        if v is None:  # cannot happen with a consistent volume; salvage fixes it
            raise RpcError("EIO", f"entry {name!r:.300} names missing vnode {vn}")
        return v, d

    def readdir(
        self, dir_vnode: int, dir_unique: int, cookie: bytes | None, max_entries: int
    ) -> tuple[list[tuple[bytes, Vnode]], bytes | None, Vnode]:
        d = self.get_dir(dir_vnode, dir_unique)
        cols = ", ".join("v." + c.strip() for c in VNODE_COLS.split(","))
        rows = self.db.execute(
            f"SELECT d.name, {cols} FROM dirents d JOIN vnodes v ON v.vnode = d.vnode "
            "WHERE d.dir = ? AND d.name > ? ORDER BY d.name LIMIT ?",
            (d.vnode, cookie if cookie is not None else b"", max_entries + 1),
        ).fetchall()
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

    def store_data(
        self,
        vnode: int,
        unique: int,
        offset: int,
        data: bytes,
        new_length: int | None,
        mtime_ns: int | None,
    ) -> Vnode:
        self._check_online()
        v = self.get(vnode, unique)
        if v.is_dir:
            raise RpcError("EISDIR", "StoreData on a directory")
        if v.type == FileType.SYMLINK:
            raise RpcError("EINVAL", "StoreData on a symlink")
        end = offset + len(data)
        new_size = max(v.size, end) if new_length is None else new_length
        if end > MAX_FILE_SIZE or new_size > MAX_FILE_SIZE:
            raise RpcError("EFBIG", f"file would be larger than {MAX_FILE_SIZE} bytes")
        delta = new_size - v.size
        self._charge(delta)
        with self._txn() as db:
            seq = db.execute(
                "INSERT INTO intents (vnode, uniq) VALUES (?,?)", (v.vnode, v.unique)
            ).lastrowid
        # The intent is durable: from here on a crash ends in a DV bump at
        # recovery, whatever part of the bytes reached the data file.
        try:
            self._apply(v.vnode, v.unique, offset, data, new_size)
            now_ns = time.time_ns()
            with self._txn() as db:
                db.execute("DELETE FROM intents WHERE seq = ?", (seq,))
                v.size = new_size
                v.dv += 1
                v.mtime_ns = now_ns if mtime_ns is None else mtime_ns
                v.ctime_ns = now_ns
                self._put(db, v)
                self.bytes_used += delta
                self._bump_update(now_ns)
        except BaseException:
            # The bytes may be half written (or written, with the metadata
            # commit failed): a new DV now, so nobody serves the old one's
            # cached copy as current.
            try:
                self._settle_intents()
            except Exception:  # left for recovery at the next start
                log.exception("volume %s: could not settle a failed store", self.name)
            raise
        return v

    def _settle_intents(self) -> int:
        """Stores interrupted after their intent: each file's bytes may have
        changed, so its DV goes up by one and its size is the data file's."""
        rows = self.db.execute(
            "SELECT DISTINCT i.vnode, i.uniq FROM intents i "
            "JOIN vnodes v ON v.vnode = i.vnode AND v.uniq = i.uniq"
        ).fetchall()
        n = self.db.execute("SELECT COUNT(*) FROM intents").fetchone()[0]
        if not n:
            return 0
        now_ns = time.time_ns()
        with self._txn() as db:
            for vn, uq in rows:
                v = self.get(vn, uq)
                path = self._data_path(vn, uq)
                size = path.stat().st_size if path.exists() else 0
                self.bytes_used += size - v.size
                v.size = size
                v.dv += 1
                v.mtime_ns = v.ctime_ns = now_ns
                self._put(db, v)
            db.execute("DELETE FROM intents")
            self._bump_update(now_ns)
        return len(rows)

    def _apply(self, vnode: int, unique: int, offset: int, data: bytes, new_size: int) -> None:
        path = self._data_path(vnode, unique)
        existed = path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            if data:
                os.pwrite(fd, data, offset)
            os.ftruncate(fd, new_size)
            os.fsync(fd)
        finally:
            os.close(fd)
        if not existed:
            # The new name must be durable before the redo record may go.
            _fsync_dir(self.data_dir)

    def _set_size(self, v: Vnode, new_size: int, now_ns: int, db: sqlite3.Connection) -> None:
        """Truncate/extend inside the caller's transaction, via a redo record."""
        seq = db.execute(
            "INSERT INTO pending (vnode, uniq, offset, data, new_size) VALUES (?,?,0,?,?)",
            (v.vnode, v.unique, b"", new_size),
        ).lastrowid
        self.bytes_used += new_size - v.size
        v.size = new_size
        v.dv += 1
        v.mtime_ns = now_ns
        self._after_commit.append((seq, v.vnode, v.unique, new_size))

    _after_commit: list[tuple[int | None, int, int, int]]

    def store_status(self, vnode: int, unique: int, attrs: dict[str, int]) -> Vnode:
        self._check_online()
        v = self.get(vnode, unique)
        size = attrs.get("size")
        if size is not None:
            if v.is_dir:
                raise RpcError("EISDIR", "cannot set the size of a directory")
            if v.type == FileType.SYMLINK:
                raise RpcError("EINVAL", "cannot set the size of a symlink")
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
            self._apply(vn, uq, 0, b"", new_size)
            if seq is not None:
                self._applied.append(seq)
        return v

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
    ) -> tuple[Vnode, Vnode]:
        """CreateFile / MakeDir / Symlink: returns (new vnode, directory)."""
        self._check_online()
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
                  1, owner, group, now_ns, now_ns, d.vnode, d.unique, target)  # fmt: skip
        with self._txn() as db:
            self.next_vnode += 1
            self.next_unique += 1
            db.execute(f"INSERT INTO vnodes ({VNODE_COLS}) VALUES ({','.join('?' * 14)})", v.row())
            db.execute("INSERT INTO dirents (dir, name, vnode) VALUES (?,?,?)",
                       (d.vnode, name, v.vnode))  # fmt: skip
            self._touch_dir(d, now_ns, entries_delta=1)
            if is_dir:
                d.nlink += 1
            self._put(db, d)
            self.files += 1
            self.bytes_used += size
            self._bump_update(now_ns)
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
        self.files -= 1
        self.bytes_used -= v.size
        return [self._data_path(v.vnode, v.unique)] if v.type == FileType.FILE else []

    def _unlink_files(self, paths: list[Path]) -> None:
        for p in paths:
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def remove_file(self, dir_vnode: int, dir_unique: int, name: bytes) -> tuple[Vnode, Vnode]:
        self._check_online()
        d = self.get_dir(dir_vnode, dir_unique)
        v, _ = self.lookup(dir_vnode, dir_unique, name)
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

    def remove_dir(self, dir_vnode: int, dir_unique: int, name: bytes) -> tuple[Vnode, Vnode]:
        self._check_online()
        d = self.get_dir(dir_vnode, dir_unique)
        v, _ = self.lookup(dir_vnode, dir_unique, name)
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
            row = self.db.execute("SELECT parent_vnode FROM vnodes WHERE vnode = ?",
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
        live = self._live_files()
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    _fsync_dir(path)

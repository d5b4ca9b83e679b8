"""On-disk data cache: file contents in chunks, for the afsfuse cache manager.

A chunk is the bytes ``[index * chunk_size, (index + 1) * chunk_size)`` of one
file (``Fid``) at one data version (DV).  Chunks are keyed ``(fid, dv, index)``,
so a DV change (DESIGN.md C1/C2) never serves stale bytes: the cache manager
asks for the DV it has just validated and calls ``drop(fid, keep_dv=dv)`` to
free the old ones.  This module never does RPC and never imports pyfuse3; the
cache manager fetches from the server and calls ``put``.

Layout (names never derive from user file names)::

    cache_dir/FORMAT                         {"format": 1, "chunk_size": N}
    cache_dir/.lock                          flock: one DataCache per directory
    cache_dir/v<volume>/<vnode>.<unique>/<dv>.<index>      one chunk
    cache_dir/v<volume>/<vnode>.<unique>/.tmp-<dv>.<index> write in progress
    cache_dir/spare/<n>                      emptied chunk files, for reuse

A chunk file is a 16-byte header (magic, dirty flag, payload length, CRC32 of
the payload) followed by the payload.  Chunks are written to a temporary file
and renamed into place, so a reader sees the old or the new file, never a mix.
A file that is short, long or fails its CRC (a torn write after a power loss,
or outside damage) is discarded and reported as a miss: it is never served.

Spare files: a chunk file that goes (dropped, evicted, outdated, a write
that lost its race) is truncated and moved to ``spare/`` instead of being
unlinked, up to ``SPARE_MAX`` of them, and the next chunk written takes one
from there: files come and go with every file written and removed, and a
new inode is dear on some file systems (ext4 without a journal scans past
every inode freed in the last minutes for each one it hands out; during a
128 MiB write that was about 40 % of the daemon's CPU).  OpenAFS keeps a
fixed pool of cache files for the same reason.  Spare files hold no data and
are not in ``bytes_used``; a restart reuses them.  Only the rename out of
the chunk's name happens in the caller: emptying the file (freeing its
blocks), unlinking it when the pool is full and removing a fid directory
left empty are done by a second worker thread, the *reaper*, since on this
project's machines they cost 20-350 us each and a removal (``rm -rf``)
waited for all three in the trio thread.  A spare is handed out only once
emptied.

Restart: the index is rebuilt by scanning the directory (header + size check
per file, CRC checked lazily at first read; LRU order approximated by mtime).
Leftover temporary files are removed.  Dirty chunks found at restart are kept
and reported by ``dirty_chunks``; the cache manager decides whether to store or
drop them.  ``max_bytes`` is not persisted: the new limit applies at once.

Accounting: ``bytes_used`` counts payload bytes (not headers or filesystem
blocks).  Clean chunks are evicted least recently used first to stay within
``max_bytes``; dirty chunks (written locally, not yet on the server) are never
evicted, so the cache may exceed the limit rather than lose data.

Memory (``mem_bytes`` > 0): the most recently used chunks are also held in
memory, and a put (a fetched run, a local write) goes to memory first: the
chunk file is written behind by a worker thread of this object, so the
caller (the daemon's trio thread) never waits for the disk.  A chunk whose
file is not yet written (*pending*) has no file at all: a file that existed
under its key is unlinked when the key becomes pending, so a crash never
leaves an outdated file behind.  Memory holds at most ``mem_bytes`` of
chunk data; when pending chunks alone exceed it, the put that went over
writes the oldest ones itself (back-pressure) instead of growing.
``close()`` writes every pending chunk.

Threads: methods do blocking file I/O.  The caller may run them in
``trio.to_thread.run_sync``; the object is safe for one worker thread at a time
and an internal lock serialises calls from several threads anyway.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import logging
import os
import re
import shutil
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable
from types import TracebackType
from typing import Any

from protocol.records import Fid

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 256 * 1024
FORMAT_VERSION = 1

# magic, flags, 3 pad bytes, payload length, crc32(payload).  The flag byte sits
# at a fixed offset so mark_clean() can flip it with one pwrite; the CRC does
# not cover it for that reason (a one-byte write cannot be torn).
_HEADER = struct.Struct("<4sB3xII")
_MAGIC = b"AFC1"
_FLAG_OFFSET = 4
_CLEAN = 0
_DIRTY = 1

_FORMAT_FILE = "FORMAT"
_LOCK_FILE = ".lock"
_TMP_PREFIX = ".tmp-"
#: Emptied chunk files kept for reuse (inodes, no data; see the docstring).
SPARE_MAX = 4096
_SPARE_DIR = "spare"

# Canonical decimal only, so a scanned name maps back to exactly one path.
_NUM = r"(0|[1-9][0-9]*)"
_VOL_RE = re.compile(rf"v{_NUM}")
_PAIR_RE = re.compile(rf"{_NUM}\.{_NUM}")

Key = tuple[Fid, int, int]  # (fid, dv, index)


class CacheDirBusy(RuntimeError):
    """Another DataCache (this process or another) holds the cache directory."""


class _Entry:
    __slots__ = ("dirty", "length", "verified")
    # A chunk's bytes may also sit in DataCache._mem; DataCache._pending
    # holds the keys whose file is not written yet.

    def __init__(self, length: int, dirty: bool, verified: bool) -> None:
        self.length = length
        self.dirty = dirty
        # True once the CRC was checked (or we wrote the file): later reads
        # pread only the requested range instead of checksumming the chunk.
        self.verified = verified


class DataCache:
    """Chunked, size-bounded, restart-persistent cache of file data."""

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        max_bytes: int,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        mem_bytes: int = 0,
    ) -> None:
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, not {chunk_size}")
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, not {max_bytes}")
        self._root = os.path.abspath(os.fspath(cache_dir))
        self.max_bytes = max_bytes
        self.chunk_size = chunk_size
        self.hits = 0
        self.misses = 0
        self.bytes_used = 0
        self.dirty_bytes = 0
        self.evictions = 0
        self.corrupt = 0
        self._dirty_count = 0
        self._entries: dict[Key, _Entry] = {}
        self._lru: OrderedDict[Key, None] = OrderedDict()  # clean chunks only, LRU first
        self._by_fid: dict[Fid, set[tuple[int, int]]] = {}
        self._lock = threading.RLock()
        self._over_warned = False
        self.mem_bytes = max(0, mem_bytes)
        self._mem: OrderedDict[Key, bytes] = OrderedDict()  # resident copies, LRU first
        self._mem_used = 0
        self._pending: OrderedDict[Key, int] = OrderedDict()  # key -> generation, oldest first
        self._pending_bytes = 0
        self._gen = 0
        self._wake = threading.Condition(self._lock)
        # The chunk the writer thread is writing with the lock released, and
        # the signal that it is done: nobody else may write that chunk's file
        # meanwhile (one temporary name: see _flush_one_locked).
        self._inflight: Key | None = None
        self._written = threading.Condition(self._lock)
        self._flusher: threading.Thread | None = None
        self._closing = False
        self.writes_behind = 0
        self.spares_reused = 0
        os.makedirs(self._root, exist_ok=True)
        self._spare_dir = os.path.join(self._root, _SPARE_DIR)
        self._spare: list[str] = []  # list.pop/append: safe from the writer thread too
        self._spare_seq = itertools.count()  # next() is atomic: both threads retire
        # Jobs for the reaper thread: (kind, path), kind "spare" (empty it and
        # pool it, or unlink it when the pool is full) or "rmdir".  Its own
        # condition, not self._lock: the slow syscalls run without either.
        self._reap_jobs: list[tuple[str, str]] = []
        self._reap_cv = threading.Condition(threading.Lock())
        self._reaper: threading.Thread | None = None
        self._reaper_stop = False
        self._reaping = 0  # jobs the reaper took and has not finished
        self._lockfile: Any = None
        self._acquire_dir_lock()
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ setup

    def _acquire_dir_lock(self) -> None:
        # Two daemons on one directory would delete each other's temp files and
        # disagree about the byte count; refuse instead.
        f = open(os.path.join(self._root, _LOCK_FILE), "a+b")  # noqa: SIM115 (held open)
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise CacheDirBusy(
                f"cache directory {self._root} is in use by another DataCache (close() it first)"
            ) from None
        self._lockfile = f

    def close(self) -> None:
        """Write what is pending, stop the writer thread and release the
        directory lock.  The cache contents stay on disk."""
        with self._lock:
            self._closing = True
            self._wake.notify_all()
            flusher = self._flusher
        if flusher is not None:
            flusher.join()
        with self._lock:
            self._flusher = None
            while self._pending:
                self._flush_one_locked()
        self._stop_reaper()
        with self._lock:
            if self._lockfile is not None:
                self._lockfile.close()  # closing the fd releases the flock
                self._lockfile = None

    def __enter__(self) -> DataCache:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _read_format(self) -> int | None:
        try:
            with open(os.path.join(self._root, _FORMAT_FILE), "rb") as f:
                meta = json.loads(f.read(4096))
            cs = meta["chunk_size"]
            if meta["format"] == FORMAT_VERSION and type(cs) is int and cs > 0:
                return cs
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def _write_format(self) -> None:
        path = os.path.join(self._root, _FORMAT_FILE)
        tmp = os.path.join(self._root, _TMP_PREFIX + _FORMAT_FILE)
        with open(tmp, "wb") as f:
            f.write(json.dumps({"format": FORMAT_VERSION, "chunk_size": self.chunk_size}).encode())
        os.replace(tmp, path)

    def _chunk_dirs(self) -> list[str]:
        return [
            e.path
            for e in os.scandir(self._root)
            if _VOL_RE.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
        ]

    def _wipe_disk(self) -> None:
        for path in self._chunk_dirs():
            shutil.rmtree(path, ignore_errors=True)

    def _load_spares(self) -> None:
        os.makedirs(self._spare_dir, exist_ok=True)
        top = 0
        for e in os.scandir(self._spare_dir):
            if e.name.isdigit() and e.is_file(follow_symlinks=False):
                if e.stat(follow_symlinks=False).st_size:
                    os.truncate(e.path, 0)  # the reaper had not emptied it yet
                self._spare.append(e.path)
                top = max(top, int(e.name) + 1)
            else:
                _unlink(e.path)
        self._spare_seq = itertools.count(top)

    def _retire(self, path: str) -> None:
        """A chunk (or temporary) file goes: out of its name now (a new chunk
        may take the name at once), emptied and kept as a spare by the reaper."""
        spare = f"{self._spare_dir}/{next(self._spare_seq)}"  # never reused
        try:
            os.rename(path, spare)
        except OSError:
            # No file (a pending chunk never had one, or it is gone already),
            # or spare/ is gone or unusable: never leave the file in place.
            _unlink(path)
            return
        self._reap("spare", spare)

    def _reap(self, kind: str, path: str) -> None:
        with self._reap_cv:
            if self._reaper_stop:  # closed: nobody would run it later
                self._reap_one(kind, path)
                return
            self._reap_jobs.append((kind, path))
            self._reap_cv.notify()
            if self._reaper is None:
                self._reaper = threading.Thread(
                    target=self._reap_loop, name="datacache-reaper", daemon=True
                )
                self._reaper.start()

    def _reap_loop(self) -> None:
        while True:
            with self._reap_cv:
                while not self._reap_jobs and not self._reaper_stop:
                    self._reap_cv.wait()
                if not self._reap_jobs:
                    return
                jobs, self._reap_jobs = self._reap_jobs, []
                self._reaping = len(jobs)
            for kind, path in jobs:
                self._reap_one(kind, path)
            with self._reap_cv:
                self._reaping = 0
                self._reap_cv.notify_all()

    def settle(self) -> None:
        """Wait until the reaper has emptied, unlinked and removed everything
        queued so far (tests look at the disk; nobody else needs to)."""
        with self._reap_cv:
            while self._reap_jobs or self._reaping:
                self._reap_cv.wait()

    def _reap_one(self, kind: str, path: str) -> None:
        if kind == "rmdir":
            # Only an empty directory goes; whoever writes a chunk next
            # makes it again (see _create).
            _rmdir(path)
            return
        if len(self._spare) >= SPARE_MAX:
            _unlink(path)
            return
        try:
            os.truncate(path, 0)
        except OSError:
            _unlink(path)
            return
        self._spare.append(path)

    def _stop_reaper(self) -> None:
        """Finish every queued job (close: the spares are emptied for the next run)."""
        with self._reap_cv:
            self._reaper_stop = True
            self._reap_cv.notify_all()
            reaper = self._reaper
        if reaper is not None:
            reaper.join()
        with self._reap_cv:
            self._reaper = None
            jobs, self._reap_jobs = self._reap_jobs, []
        for kind, path in jobs:
            self._reap_one(kind, path)

    def _create(self, tmp: str) -> Any:
        """Open ``tmp`` for a new chunk, on a spare inode when there is one."""
        while self._spare:
            try:
                spare = self._spare.pop()
            except IndexError:
                break
            try:
                os.rename(spare, tmp)
            except FileNotFoundError:
                # The fid's directory (its first chunk) or the spare is missing.
                os.makedirs(os.path.dirname(tmp), exist_ok=True)
                try:
                    os.rename(spare, tmp)
                except OSError:
                    continue  # the spare itself is gone
            except OSError:
                _unlink(spare)
                continue
            self.spares_reused += 1
            return open(tmp, "wb")
        for _ in range(3):
            try:
                return open(tmp, "wb")
            except FileNotFoundError:
                # The reaper may remove the (empty) directory again between
                # the makedirs and the open: try again.
                os.makedirs(os.path.dirname(tmp), exist_ok=True)
        return open(tmp, "wb")

    def _load(self) -> None:
        self._load_spares()
        disk_cs = self._read_format()
        if disk_cs is None:
            if self._chunk_dirs():
                # Chunks without a readable FORMAT: their chunk size is unknown,
                # so their offsets are meaningless.
                log.warning("data cache %s: no valid FORMAT file; discarding chunks", self._root)
                self._wipe_disk()
            self._write_format()
            return
        self._scan(disk_cs)
        if disk_cs != self.chunk_size:
            if self._dirty_count:
                # Re-chunking dirty data is not worth the risk: keep the old size.
                log.warning(
                    "data cache %s: holds %d dirty chunks of size %d; keeping chunk size %d "
                    "instead of the requested %d",
                    self._root,
                    self._dirty_count,
                    disk_cs,
                    disk_cs,
                    self.chunk_size,
                )
                self.chunk_size = disk_cs
            else:
                log.info(
                    "data cache %s: chunk size changed %d -> %d; discarding cached chunks",
                    self._root,
                    disk_cs,
                    self.chunk_size,
                )
                self._reset_index()
                self._wipe_disk()
                self._write_format()
        log.info(
            "data cache %s: %d chunks, %d bytes (%d dirty chunks) found at start",
            self._root,
            len(self._entries),
            self.bytes_used,
            self._dirty_count,
        )
        self._evict()

    def _scan(self, chunk_size: int) -> None:
        found: list[tuple[int, Key, int, bool]] = []
        for vol_dir in os.scandir(self._root):
            m = _VOL_RE.fullmatch(vol_dir.name)
            if not m or not vol_dir.is_dir(follow_symlinks=False):
                continue
            volume = int(m[1])
            for fid_dir in os.scandir(vol_dir.path):
                mf = _PAIR_RE.fullmatch(fid_dir.name)
                if not mf or not fid_dir.is_dir(follow_symlinks=False):
                    continue
                fid = Fid(volume, int(mf[1]), int(mf[2]))
                kept = 0
                for f in os.scandir(fid_dir.path):
                    if f.name.startswith(_TMP_PREFIX):
                        log.debug("removing leftover temporary file %s", f.path)
                        _unlink(f.path)
                        continue
                    mc = _PAIR_RE.fullmatch(f.name)
                    if not mc:
                        continue
                    rec = _scan_chunk(f.path, chunk_size)
                    if rec is None:
                        log.warning("data cache: discarding damaged chunk file %s", f.path)
                        self.corrupt += 1
                        _unlink(f.path)
                        continue
                    mtime, length, dirty = rec
                    found.append((mtime, (fid, int(mc[1]), int(mc[2])), length, dirty))
                    kept += 1
                if not kept:
                    _rmdir(fid_dir.path)
        found.sort(key=lambda r: r[0])  # oldest first = LRU end
        for _mtime, key, length, dirty in found:
            self._add(key, length, dirty, verified=False)

    # ------------------------------------------------------------ index core

    def _path(self, key: Key) -> str:
        fid, dv, index = key
        return f"{self._root}/v{fid[0]}/{fid[1]}.{fid[2]}/{dv}.{index}"

    def _fid_dir(self, fid: Fid) -> str:
        return f"{self._root}/v{fid[0]}/{fid[1]}.{fid[2]}"

    def _reset_index(self) -> None:
        self._mem.clear()
        self._pending.clear()
        self._pending_bytes = 0
        self._mem_used = 0
        self._entries.clear()
        self._lru.clear()
        self._by_fid.clear()
        self.bytes_used = self.dirty_bytes = self._dirty_count = 0

    def _add(self, key: Key, length: int, dirty: bool, verified: bool) -> None:
        self._entries[key] = _Entry(length, dirty, verified)
        self._by_fid.setdefault(key[0], set()).add((key[1], key[2]))
        self.bytes_used += length
        if dirty:
            self.dirty_bytes += length
            self._dirty_count += 1
        else:
            self._lru[key] = None

    def _forget(self, key: Key) -> _Entry | None:
        if self._pending.pop(key, None) is not None:
            self._pending_bytes -= len(self._mem[key])
        self._mem_drop(key)
        e = self._entries.pop(key, None)
        if e is None:
            return None
        fid = key[0]
        keys = self._by_fid[fid]
        keys.discard((key[1], key[2]))
        if not keys:
            del self._by_fid[fid]
        self.bytes_used -= e.length
        if e.dirty:
            self.dirty_bytes -= e.length
            self._dirty_count -= 1
        else:
            del self._lru[key]
        return e

    def _remove(self, key: Key) -> _Entry | None:
        """Forget a chunk and delete its file; tidy the fid directory when empty."""
        e = self._forget(key)
        self._retire(self._path(key))
        if key[0] not in self._by_fid:
            self._reap("rmdir", self._fid_dir(key[0]))
        return e

    def _set_clean(self, key: Key, e: _Entry) -> None:
        e.dirty = False
        self.dirty_bytes -= e.length
        self._dirty_count -= 1
        self._lru[key] = None

    def _evict(self, protect: Key | None = None) -> None:
        # `protect` is the chunk just put: evicting it would make put-then-read
        # miss forever, so the bound may be exceeded by that one chunk.
        while self.bytes_used > self.max_bytes and self._lru:
            key = next(iter(self._lru))
            if key == protect:
                if len(self._lru) == 1:
                    break
                self._lru.move_to_end(key)
                continue
            self._remove(key)
            self.evictions += 1
        if self.bytes_used > self.max_bytes:
            if not self._over_warned:
                log.warning(
                    "data cache %s: %d bytes used > max %d; %d bytes are dirty and cannot be "
                    "evicted until stored",
                    self._root,
                    self.bytes_used,
                    self.max_bytes,
                    self.dirty_bytes,
                )
                self._over_warned = True
        else:
            self._over_warned = False

    def _shed(self, nbytes: int, protect: Key) -> int:
        """Evict clean chunks, LRU first, until ``nbytes`` are freed; returns bytes freed."""
        freed = 0
        for key in list(self._lru):
            if freed >= nbytes:
                break
            if key != protect:
                e = self._remove(key)
                assert e is not None
                freed += e.length
                self.evictions += 1
        return freed

    def _corrupt(self, key: Key, why: str) -> None:
        e = self._remove(key)
        self.corrupt += 1
        level = logging.ERROR if e is not None and e.dirty else logging.WARNING
        log.log(level, "data cache: chunk %s discarded (%s)", self._path(key), why)

    def _read_chunk(self, key: Key, e: _Entry, start: int, end: int) -> bytes | None:
        """Payload bytes [start, end) of a cached chunk (end <= e.length), or None if damaged."""
        data = self._mem.get(key)
        if data is not None:
            self._mem.move_to_end(key)
            return data if start == 0 and end == len(data) else data[start:end]
        try:
            with open(self._path(key), "rb", buffering=0) as f:
                fd = f.fileno()
                if os.fstat(fd).st_size != _HEADER.size + e.length:
                    self._corrupt(key, "wrong file size")
                    return None
                if e.verified:
                    data = os.pread(fd, end - start, _HEADER.size + start)
                    if len(data) != end - start:
                        self._corrupt(key, "short read")
                        return None
                    return data
                raw = f.readall()
        except FileNotFoundError:
            self._corrupt(key, "file vanished")
            return None
        except OSError as exc:
            self._corrupt(key, f"read error: {exc}")
            return None
        hdr = _parse(raw)
        if hdr is None or hdr[1] != e.length:
            self._corrupt(key, "bad header or checksum")
            return None
        e.verified = True
        if self.mem_bytes and e.length <= self.mem_bytes // 4:
            # Read back from disk: worth keeping resident (a clean chunk).
            whole = bytes(memoryview(raw)[_HEADER.size :])
            self._mem_add(key, whole)
            self._mem_shrink(protect=key)
            return whole[start:end]
        return bytes(memoryview(raw)[_HEADER.size + start : _HEADER.size + end])

    def _load_chunk(self, key: Key) -> bytes | None:
        """Whole chunk without touching statistics or LRU order."""
        e = self._entries.get(key)
        if e is None:
            return None
        return self._read_chunk(key, e, 0, e.length)

    def _store(self, key: Key, data: bytes, dirty: bool) -> None:
        path = self._path(key)
        tmp = f"{self._fid_dir(key[0])}/{_TMP_PREFIX}{key[1]}.{key[2]}"
        header = _HEADER.pack(_MAGIC, _DIRTY if dirty else _CLEAN, len(data), zlib.crc32(data))
        try:
            with self._create(tmp) as f:
                f.write(header)
                f.write(data)
            # No fsync: the CRC catches a torn file after a power loss, and an
            # fsync per FUSE write would dominate latency.
            os.replace(tmp, path)
        except BaseException:
            self._retire(tmp)
            raise

    # ------------------------------------------------------------ public API

    def get(self, fid: Fid, dv: int, index: int) -> bytes | None:
        """The whole chunk, or None (miss).  A hit makes the chunk most recently used."""
        key = (fid, dv, index)
        with self._lock:
            e = self._entries.get(key)
            if e is not None:
                data = self._read_chunk(key, e, 0, e.length)
                if data is not None:
                    self.hits += 1
                    if not e.dirty:
                        self._lru.move_to_end(key)
                    return data
            self.misses += 1
            return None

    def put(self, fid: Fid, dv: int, index: int, data: bytes, *, dirty: bool = False) -> None:
        """Store (replace) a chunk; ``len(data) <= chunk_size``.

        ``dirty=True`` pins the chunk until ``mark_clean``/``drop``.  Putting a
        clean chunk over a dirty one discards the local modification: only do
        that on purpose.  A failed write of a clean chunk is logged and the chunk
        is simply not cached; a failed dirty write raises (the data would be lost).
        """
        _check(dv=dv, index=index)
        if len(data) > self.chunk_size:
            raise ValueError(f"chunk of {len(data)} bytes > chunk_size {self.chunk_size}")
        key = (fid, dv, index)
        with self._lock:
            self._put(key, bytes(data), dirty)

    def _put(self, key: Key, data: bytes, dirty: bool) -> None:
        if self.mem_bytes:
            self._put_mem(key, data, dirty)
            return
        try:
            try:
                self._store(key, data, dirty)
            except OSError as exc:
                # The filesystem is fuller than max_bytes assumed: clean chunks
                # are worth less than this one (maybe dirty), so make room once.
                if exc.errno != errno.ENOSPC or not self._shed(4 * self.chunk_size, key):
                    raise
                log.warning("data cache %s: disk full; evicted clean chunks", self._root)
                self._store(key, data, dirty)
        except OSError:
            if dirty:
                raise
            log.warning("data cache: could not store chunk %s", self._path(key), exc_info=True)
            self._remove(key)  # the old content is not what the caller wants served
            return
        self._forget(key)
        self._add(key, len(data), dirty, verified=True)
        self._evict(protect=key)

    # ------------------------------------------------------- memory layer

    def _mem_add(self, key: Key, data: bytes) -> None:
        old = self._mem.pop(key, None)
        if old is not None:
            self._mem_used -= len(old)
        self._mem[key] = data
        self._mem_used += len(data)

    def _mem_drop(self, key: Key) -> None:
        old = self._mem.pop(key, None)
        if old is not None:
            self._mem_used -= len(old)

    def _put_mem(self, key: Key, data: bytes, dirty: bool) -> None:
        """Put into memory; the file follows from the writer thread."""
        if key not in self._pending and key in self._entries:
            # The file under this key is about to be outdated: it goes now,
            # so a crash before the write-behind finds nothing, not old bytes.
            self._retire(self._path(key))
        self._forget(key)
        self._add(key, len(data), dirty, verified=True)
        self._mem_add(key, data)
        self._gen += 1
        self._pending[key] = self._gen
        self._pending_bytes += len(data)
        if self._behind():
            self._start_flusher()
            self._wake.notify()
        self._mem_shrink(protect=key)
        self._evict(protect=key)

    def _mem_shrink(self, protect: Key | None = None) -> None:
        """Hold memory to ``mem_bytes``: drop resident copies that are on disk,
        least recently used first; write pending ones here if need be."""
        while self._mem_used > self.mem_bytes and self._mem:
            victim = next((k for k in self._mem if k not in self._pending and k != protect), None)
            if victim is not None:
                self._mem_drop(victim)
                continue
            if not any(k != protect for k in self._pending):
                break
            self._flush_one_locked(skip=protect)  # back-pressure: the disk is behind

    def _behind(self) -> bool:
        """Whether the writer thread should write now: only once pending
        chunks fill half the memory, so short-lived chunks (a small file's,
        a store's before its re-label) are not written twice, and the
        thread does not compete with the trio thread for every put."""
        return self._pending_bytes > self.mem_bytes // 2

    def _start_flusher(self) -> None:
        if self._flusher is None and not self._closing:
            self._flusher = threading.Thread(
                target=self._flush_loop, name="datacache-writer", daemon=True
            )
            self._flusher.start()

    def _flush_loop(self) -> None:
        with self._lock:
            while True:
                while not self._behind() and not self._closing:
                    self._wake.wait()
                if self._closing:
                    return
                key, gen = next(iter(self._pending.items()))
                data = self._mem[key]
                e = self._entries[key]
                dirty = e.dirty
                tmp = f"{self._fid_dir(key[0])}/{_TMP_PREFIX}{key[1]}.{key[2]}.{gen}"
                # The write itself runs without the lock: the trio thread
                # goes on putting and reading meanwhile.
                self._inflight = key
                self._lock.release()
                try:
                    ok = self._write_tmp(tmp, data, dirty)
                finally:
                    self._lock.acquire()
                    self._inflight = None
                    # Waiters wake once the lock is free again, so after the
                    # finish below (or after this thread died of the error).
                    self._written.notify_all()
                try:
                    self._finish_flush(key, gen, tmp, ok)
                except Exception:  # the thread must live on: puts rely on it
                    log.exception("data cache: writing %s behind failed", self._path(key))

    def _write_tmp(self, tmp: str, data: bytes, dirty: bool) -> bool:
        header = _HEADER.pack(_MAGIC, _DIRTY if dirty else _CLEAN, len(data), zlib.crc32(data))
        try:
            with self._create(tmp) as f:
                f.write(header)
                f.write(data)
            return True
        except OSError:
            log.warning("data cache: could not write %s", tmp, exc_info=True)
            self._retire(tmp)
            return False

    def _finish_flush(self, key: Key, gen: int, tmp: str, ok: bool) -> None:
        """Under the lock: the file goes in place only if the chunk is still
        the one written (no newer put, mark_clean, rekey or drop since)."""
        if self._pending.get(key) != gen:
            if ok:
                self._retire(tmp)
            return
        if ok:
            try:
                os.replace(tmp, self._path(key))
            except OSError:
                self._retire(tmp)
                ok = False
        if ok:
            del self._pending[key]
            self._pending_bytes -= len(self._mem[key])
            self.writes_behind += 1
            self._mem_shrink()
            return
        e = self._entries.get(key)
        if e is not None and not e.dirty:
            self._remove(key)  # a clean chunk is only a copy: forget it
        else:
            # A dirty chunk must not be lost: it stays in memory, pending;
            # retried after the others.
            self._pending.move_to_end(key)

    def _flush_one_locked(self, skip: Key | None = None) -> None:
        """Write the oldest pending chunk (not ``skip``) in the calling thread.

        Never the one the writer thread is writing: both would use one
        temporary name, and the writer thread creating it (a spare renamed
        onto it, or an open that truncates) could replace or empty the file
        written here just before it went in place and the chunk left memory,
        so the chunk read back short (discarded: unstored writes lost) or as
        zeros.  When that one is all there is, wait for the writer thread."""
        busy = self._inflight
        key = next((k for k in self._pending if k != skip and k != busy), None)
        if key is None:
            if busy is not None and busy != skip and busy in self._pending:
                while self._inflight == busy:
                    self._written.wait()
            return
        gen = self._pending[key]
        tmp = f"{self._fid_dir(key[0])}/{_TMP_PREFIX}{key[1]}.{key[2]}.{gen}"
        ok = self._write_tmp(tmp, self._mem[key], self._entries[key].dirty)
        if not ok and self._entries[key].dirty:
            raise OSError(errno.EIO, f"data cache: cannot write dirty chunk {self._path(key)}")
        self._finish_flush(key, gen, tmp, ok)

    def flush(self) -> None:
        """Write every pending chunk now (tests, ``fs flush``)."""
        with self._lock:
            while self._pending:
                self._flush_one_locked()

    def write(
        self,
        fid: Fid,
        dv: int,
        offset: int,
        data: bytes,
        base: Callable[[int], bytes | None],
    ) -> None:
        """Apply a local write at byte ``offset``; every touched chunk becomes dirty.

        A chunk only partly overwritten starts from the cached chunk, else from
        ``base(index)`` (its current clean content; None means zeros/new).  A
        chunk overwritten completely never calls ``base``.  ``base`` runs in the
        calling thread with the cache lock held: it may call back into this
        object but must not wait for another thread that does.
        """
        _check(dv=dv, offset=offset)
        if not data:
            return
        cs = self.chunk_size
        end = offset + len(data)
        src = memoryview(data)
        with self._lock:
            for index in range(offset // cs, (end - 1) // cs + 1):
                cstart = index * cs
                s = max(offset, cstart) - cstart
                t = min(end, cstart + cs) - cstart
                piece = src[cstart + s - offset : cstart + t - offset]
                key = (fid, dv, index)
                if s == 0 and t == cs:
                    chunk = bytes(piece)
                else:
                    cur = self._load_chunk(key)
                    if cur is None:
                        cur = base(index) or b""
                        if len(cur) > cs:
                            raise ValueError(f"base({index}) returned {len(cur)} bytes > {cs}")
                    buf = bytearray(cur)
                    if len(buf) < t:
                        buf.extend(bytes(t - len(buf)))  # a gap before s reads as zeros
                    buf[s:t] = piece
                    chunk = bytes(buf)
                self._put(key, chunk, True)

    def read(self, fid: Fid, dv: int, offset: int, length: int, size: int) -> bytes | None:
        """Bytes ``[offset, min(offset + length, size))`` if all needed chunks are cached.

        Bytes below ``size`` beyond the end of a cached short chunk read as zeros.
        Returns None if any chunk is missing or damaged (``missing`` says which).
        """
        _check(offset=offset, length=length, size=size)
        end = min(offset + length, size)
        if end <= offset:
            return b""
        cs = self.chunk_size
        with self._lock:
            wanted = []
            absent = 0
            for index in range(offset // cs, (end - 1) // cs + 1):
                key = (fid, dv, index)
                e = self._entries.get(key)
                if e is None:
                    absent += 1
                wanted.append((index, key, e))
            if absent:
                # Do not read anything: the caller must fetch first anyway.
                self.misses += absent
                return None
            parts: list[bytes] = []
            for index, key, e in wanted:
                cstart = index * cs
                s = max(offset, cstart) - cstart
                t = min(end, cstart + cs) - cstart
                if s < e.length:
                    got = self._read_chunk(key, e, s, min(t, e.length))
                    if got is None:
                        self.misses += 1
                        return None
                    parts.append(got)
                    if t > e.length:
                        parts.append(bytes(t - e.length))
                else:
                    parts.append(bytes(t - s))
                if not e.dirty:
                    self._lru.move_to_end(key)
            self.hits += len(wanted)
            return parts[0] if len(parts) == 1 else b"".join(parts)

    def resident(self, fid: Fid, dv: int, offset: int, length: int) -> bool:
        """Whether every chunk of ``[offset, offset + length)`` is in memory
        (reading it costs no disk I/O: no worker thread needed)."""
        if not self.mem_bytes or length <= 0:
            return False
        cs = self.chunk_size
        mem = self._mem
        return all(
            (fid, dv, i) in mem for i in range(offset // cs, (offset + length - 1) // cs + 1)
        )

    def full_and_dirty(self, fid: Fid, dv: int, indexes: list[int]) -> bool:
        """Whether each chunk ``indexes`` of ``dv`` is cached, dirty and full."""
        with self._lock:
            for i in indexes:
                e = self._entries.get((fid, dv, i))
                if e is None or not e.dirty or e.length != self.chunk_size:
                    return False
            return True

    def missing(self, fid: Fid, dv: int, offset: int, length: int, size: int) -> list[int]:
        """Indexes of the chunks ``read`` with the same arguments needs and does not have."""
        _check(offset=offset, length=length, size=size)
        end = min(offset + length, size)
        if end <= offset:
            return []
        cs = self.chunk_size
        with self._lock:
            return [
                i
                for i in range(offset // cs, (end - 1) // cs + 1)
                if (fid, dv, i) not in self._entries
            ]

    def has_chunks(self, fid: Fid) -> bool:
        """Whether any chunk of ``fid`` is cached.  One dict lookup, atomic
        under the GIL, so no lock: every new vnode asks (a cold listing of
        10,000 files spent 8 % of the daemon's CPU taking the lock instead)."""
        return fid in self._by_fid

    def dirty_chunks(self, fid: Fid) -> list[tuple[int, int]]:
        """(dv, index) of every dirty chunk of ``fid``, sorted."""
        with self._lock:
            return sorted(
                (dv, i) for dv, i in self._by_fid.get(fid, ()) if self._entries[(fid, dv, i)].dirty
            )

    def mark_clean(self, fid: Fid, dv: int, index: int) -> None:
        """The chunk is now stored on the server: it may be evicted from now on."""
        key = (fid, dv, index)
        with self._lock:
            e = self._entries.get(key)
            if e is None or not e.dirty:
                return
            if key in self._pending:
                # Not on disk yet: the file is written with the new flag.
                self._gen += 1
                self._pending[key] = self._gen
                self._set_clean(key, e)
                self._evict()
                return
            try:
                fd = os.open(self._path(key), os.O_WRONLY)
            except FileNotFoundError:
                self._corrupt(key, "file vanished")
                return
            try:
                os.pwrite(fd, bytes([_CLEAN]), _FLAG_OFFSET)
            finally:
                os.close(fd)
            self._set_clean(key, e)
            self._evict()

    def rekey(self, fid: Fid, old_dv: int, new_dv: int) -> None:
        """Move every chunk of ``old_dv`` to ``new_dv`` (rename, no copy).

        For the client's own store, which moved the DV by exactly one: the data
        is unchanged, only its version label.  Dirty flags are kept.  A crash
        part way leaves chunks under both DVs; the cache manager's
        ``drop(keep_dv=...)`` after revalidation sorts that out.
        """
        _check(dv=new_dv)
        if old_dv == new_dv:
            return
        with self._lock:
            moving = sorted(i for dv, i in self._by_fid.get(fid, ()) if dv == old_dv)
            for index in moving:
                old_key, new_key = (fid, old_dv, index), (fid, new_dv, index)
                if new_key in self._entries:
                    self._remove(new_key)  # replaced by the rename
                if old_key in self._pending:
                    # Only in memory: move it, and write it under its new name.
                    data = self._mem[old_key]
                    e = self._forget(old_key)
                    assert e is not None
                    self._add(new_key, e.length, e.dirty, e.verified)
                    self._mem_add(new_key, data)
                    self._gen += 1
                    self._pending[new_key] = self._gen
                    self._pending_bytes += len(data)
                    continue
                resident = self._mem.get(old_key)
                try:
                    os.replace(self._path(old_key), self._path(new_key))
                except FileNotFoundError:
                    self._corrupt(old_key, "file vanished")
                    continue
                e = self._forget(old_key)
                assert e is not None
                self._add(new_key, e.length, e.dirty, e.verified)
                if resident is not None:
                    self._mem_add(new_key, resident)

    def drop(self, fid: Fid, *, keep_dv: int | None = None, keep_dirty: bool = True) -> int:
        """Drop the chunks of ``fid`` whose DV is not ``keep_dv`` (all if None).

        DESIGN.md C1: called when validation finds a new DV.  Dirty chunks are
        kept unless ``keep_dirty=False``.  Returns the payload bytes freed.
        """
        freed = 0
        with self._lock:
            for dv, index in list(self._by_fid.get(fid, ())):
                if dv == keep_dv:
                    continue
                key = (fid, dv, index)
                if keep_dirty and self._entries[key].dirty:
                    continue
                e = self._remove(key)
                assert e is not None
                freed += e.length
        return freed

    def truncate(self, fid: Fid, dv: int, size: int) -> None:
        """Apply a local truncate: drop chunks of ``dv`` past ``size``, cut the last one.

        Dropped chunks go even if dirty (their bytes no longer exist); a cut chunk
        keeps its dirty flag.  Growing ``size`` needs nothing (short chunks read
        as zeros below the size given to ``read``).
        """
        _check(dv=dv, size=size)
        cs = self.chunk_size
        with self._lock:
            for kdv, index in list(self._by_fid.get(fid, ())):
                if kdv != dv:
                    continue
                key = (fid, dv, index)
                e = self._entries.get(key)
                if e is None:  # evicted by the put of an earlier cut
                    continue
                cstart = index * cs
                if cstart >= size:
                    self._remove(key)
                elif cstart + e.length > size:
                    data = self._read_chunk(key, e, 0, size - cstart)
                    if data is not None:
                        self._put(key, data, e.dirty)

    def drop_all(self, *, keep_dirty: bool = True) -> None:
        """``fs flush`` of everything.  Dirty chunks are kept unless ``keep_dirty=False``."""
        with self._lock:
            for fid in list(self._by_fid):
                self.drop(fid, keep_dirty=keep_dirty)
            if not self._entries:
                self._wipe_disk()  # also clears empty directories and strays

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "hits": self.hits,
                "misses": self.misses,
                "bytes_used": self.bytes_used,
                "max_bytes": self.max_bytes,
                "chunks": len(self._entries),
                "dirty_chunks": self._dirty_count,
                "dirty_bytes": self.dirty_bytes,
                "evictions": self.evictions,
                "corrupt": self.corrupt,
                "chunk_size": self.chunk_size,
                "mem_bytes": self._mem_used,
                "mem_max_bytes": self.mem_bytes,
                "mem_chunks": len(self._mem),
                "pending_writes": len(self._pending),
                "pending_bytes": self._pending_bytes,
                "writes_behind": self.writes_behind,
                "spare_files": len(self._spare),
                "spares_reused": self.spares_reused,
            }


# ---------------------------------------------------------------- helpers


def _check(**values: int) -> None:
    for name, v in values.items():
        if v < 0:
            raise ValueError(f"{name} must be >= 0, not {v}")


def _parse(raw: bytes) -> tuple[bool, int] | None:
    """(dirty, length) of a complete chunk file image, or None if damaged."""
    if len(raw) < _HEADER.size:
        return None
    magic, flags, length, crc = _HEADER.unpack_from(raw)
    if magic != _MAGIC or flags not in (_CLEAN, _DIRTY) or len(raw) != _HEADER.size + length:
        return None
    if zlib.crc32(memoryview(raw)[_HEADER.size :]) != crc:
        return None
    return flags == _DIRTY, length


def _scan_chunk(path: str, chunk_size: int) -> tuple[int, int, bool] | None:
    """(mtime_ns, length, dirty) from header and size only; the CRC waits for the first read."""
    try:
        with open(path, "rb", buffering=0) as f:
            st = os.fstat(f.fileno())
            head = f.read(_HEADER.size)
    except OSError:
        return None
    if len(head) != _HEADER.size:
        return None
    magic, flags, length, _crc = _HEADER.unpack(head)
    if (
        magic != _MAGIC
        or flags not in (_CLEAN, _DIRTY)
        or length > chunk_size
        or st.st_size != _HEADER.size + length
    ):
        return None
    return st.st_mtime_ns, length, flags == _DIRTY


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _rmdir(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass  # not empty or already gone: fine

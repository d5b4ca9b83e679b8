"""The data directory: server identity, admin secret, address file and volumes.

``DataDir`` owns the files at the top of the data directory (persistent
server UUID and cell, admin secret, the address file admin tools and tests
read, the flock that keeps two servers off one directory).  ``VolumeStore``
holds the open volumes, each behind a ``VolumeHandle``: the group commit
that syncs every change of the volume in a commit thread (changes that are
SQL only run in the trio thread before it; their COMMIT too while one
client alone is working, ``fileserver.activity``), reads beside it in
worker threads, and the per-file locks of stores, so the trio loop never
waits for a sync while someone else could be served and a read never waits
behind a commit.

Imports: ``fileserver.volume``, ``.activity``, ``.committer``,
``.durability``, ``.config``, ``protocol``, trio.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import random
import re
import secrets
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import trio
import trio.testing

from fileserver.activity import Activity
from fileserver.committer import Committer
from fileserver.config import (
    ADDRESS_FILE,
    IDENTITY_FILE,
    LOCK_FILE,
    PID_FILE,
    ROOT_VOLUME_ID,
    ROOT_VOLUME_NAME,
    SECRET_FILE,
    VOLUMES_DIR,
)
from fileserver.durability import SyncStats
from fileserver.volume import INLINE_MAX, Volume, fsync_dir
from protocol.errors import RpcError
from protocol.limits import MAX_UINT32

log = logging.getLogger(__name__)

T = TypeVar("T")
_VOLUME_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Seconds a light batch gives the breaks it started to reach the wire
#: before it commits inline (tens of microseconds); past them the COMMIT
#: goes to the thread as before.
SETTLE_S = 0.002


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a small file so readers see the old or the new content, never half."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.rename(tmp, path)
    fsync_dir(path.parent)


class DataDir:
    """Files at the top of a fileserver data directory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.uuid = ""
        self.cell = ""
        self._lock_fd: int | None = None

    @property
    def volumes_dir(self) -> Path:
        return self.path / VOLUMES_DIR

    @property
    def address_file(self) -> Path:
        return self.path / ADDRESS_FILE

    @property
    def secret_file(self) -> Path:
        return self.path / SECRET_FILE

    def initialize(self, cell: str) -> bool:
        """Create (first start) or read the identity; returns True on first start."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.volumes_dir.mkdir(exist_ok=True)
        ident = self.path / IDENTITY_FILE
        first = not ident.exists()
        if first:
            self.uuid, self.cell = str(uuid.uuid4()), cell
            write_atomic(ident, json.dumps({"uuid": self.uuid, "cell": cell}).encode() + b"\n")
            log.info("initialized data dir %s: server uuid %s, cell %s", self.path, self.uuid, cell)
        else:
            info = json.loads(ident.read_text())
            self.uuid, self.cell = info["uuid"], info["cell"]
            if cell and cell != self.cell:
                log.warning("data dir belongs to cell %r; ignoring --cell %r", self.cell, cell)
        if not self.secret_file.exists():
            write_atomic(self.secret_file, secrets.token_hex(32).encode() + b"\n", 0o600)
        return first

    def read_secret(self) -> str:
        return self.secret_file.read_text().strip()

    def lock(self) -> None:
        """Take the data dir lock, or raise RuntimeError when a server holds it."""
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"{self.path} is in use by another fileserver") from None
        self._lock_fd = fd

    def in_use(self) -> bool:
        """Whether a server (or a repairing salvage) holds the lock right now."""
        try:
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops our lock if we got it
        return False

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def write_address(self, host: str, port: int) -> None:
        write_atomic(self.path / PID_FILE, f"{os.getpid()}\n".encode())
        write_atomic(self.address_file, f"{host}:{port}\n".encode())

    def clear_address(self) -> None:
        for name in (ADDRESS_FILE, PID_FILE):
            try:
                (self.path / name).unlink()
            except FileNotFoundError:
                pass

    def read_address(self) -> tuple[str, int]:
        text = self.address_file.read_text().strip()
        host, _, port = text.rpartition(":")
        return host.strip("[]"), int(port)

    def volume_paths(self, *, cleanup: bool = False) -> list[Path]:
        """Volume directories; with ``cleanup`` (only while holding the lock)
        leftovers of an interrupted create/remove are deleted."""
        if not self.volumes_dir.exists():
            return []
        out = []
        for p in sorted(self.volumes_dir.iterdir()):
            if p.name.isdigit() and (p / "volume.db").exists():
                out.append(p)
            elif cleanup and (p.name.endswith(".creating") or p.name.startswith(".trash-")):
                shutil.rmtree(p, ignore_errors=True)
        return out


class _Job:
    """One change waiting for (or in) a group commit."""

    __slots__ = ("decided", "decided_if", "error", "finished", "fn", "light", "op", "result",
                 "then", "wake")  # fmt: skip

    def __init__(
        self, fn: Callable[[], Any], then: Callable[[Any], None] | None, op: str,
        decided: Callable[[Any], None] | None = None,
        decided_if: Callable[[Any], bool] | None = None, light: bool = False,
    ) -> None:  # fmt: skip
        self.fn = fn
        self.light = light
        self.then = then
        self.op = op
        self.decided = decided
        self.decided_if = decided_if
        self.result: Any = None
        self.error: BaseException | None = None
        self.finished = False
        self.wake = trio.Event()


def _announcing(job: _Job, token: trio.lowlevel.TrioToken) -> Callable[[], Any]:
    """``job.fn`` for the commit thread, handing its result to ``job.decided``
    in the trio thread once it ran (before the COMMIT: the trio side may
    start what needs no durability meanwhile, such as telling other clients).
    Queued on the trio token ahead of the commit's own completion, so it
    always runs first.  Nothing here may fail the job once ``fn`` ran (its
    SQL is in the batch): ``decided`` is then just not called."""
    if job.decided is None:
        return job.fn
    decided, decided_if = job.decided, job.decided_if

    def run() -> Any:
        result = job.fn()
        try:
            if decided_if is None or decided_if(result):
                token.run_sync_soon(decided, result)
        except Exception:  # the change stands: its caller hears of it after the commit
            log.exception("%s: announcing a decided change failed", job.op)
        return result

    return run


def _announce_now(job: _Job, result: Any) -> None:
    """``job.decided(result)`` in the trio thread, before the COMMIT, as
    ``_announcing`` hands it over from the commit thread."""
    assert job.decided is not None
    try:
        if job.decided_if is None or job.decided_if(result):
            job.decided(result)
    except Exception:  # the change stands: its caller hears of it after the commit
        log.exception("%s: announcing a decided change failed", job.op)


class VolumeHandle:
    """A volume, its group commit, and what keeps reads beside it coherent.

    - ``commit(fn)``: a change.  Changes queue; one caller at a time leads a
      *batch*: it runs every queued change in one SQLite transaction (in the
      commit thread, or in the trio thread when every change is ``light``),
      COMMITs once in the commit thread, then completes each change in order (its
      ``then``, e.g. its grants, runs in the trio thread right after the
      commit, before any later batch's breaks), and hands the lead on.  Under
      one client a batch holds one change and costs nothing extra.
    - ``read(fn, keys)``: a read in a worker thread on a read connection of its
      own (never behind a commit).  Its promises are granted only if none of
      the vnodes it returns changed while it ran (``changed()`` is called
      before a change's breaks); otherwise it reads again.
    - ``file_lock(vnode)``: held by a store (and a truncation) from its checks
      to its commit, so stores of one file do not interleave; ``storing``
      marks a store whose bytes are being written, which a FetchData of that
      file waits out (it never sees half-written bytes).
    - ``repair(vnode)``: a file whose committed redo record could not be
      applied (``Volume.broken``) gets its records replayed before it is read
      or stored into again; the change itself was acknowledged.
    """

    def __init__(self, vol: Volume, activity: Activity | None = None) -> None:
        self.vol = vol
        self._activity = activity  # None: every COMMIT in the commit thread
        self.id: int = vol.id
        self.name: str = vol.name
        self.removed = False
        self._queue: list[_Job] = []
        self._leading = False
        self._committer = Committer(f"commit-{vol.name}")
        self._file_locks: dict[int, list[Any]] = {}  # vnode -> [lock, users]
        self.storing: dict[int, trio.Event] = {}
        self._changes: dict[int, int] = {}  # vnode -> seq of its last change
        self._seq = 0
        self._floor = 0  # every vnode not in _changes changed at most at this seq
        self._active: dict[Any, int] = {}  # task -> depth of its operations in progress
        #: Held by ``hold()`` (the volume kept still); operations that find it
        #: held queue on it, so its statistics count them.
        self.lock = trio.Lock()
        self._idle = trio.Event()

    def _check(self) -> None:
        if self.removed:
            raise RpcError("ESTALE", f"volume {self.id} was removed")

    @asynccontextmanager
    async def active(self) -> AsyncIterator[None]:
        """One operation on the volume (reentrant per task): waits while the
        volume is held, and is waited for by ``hold()``."""
        task = trio.lowlevel.current_task()
        depth = self._active.get(task, 0)
        if not depth:
            while self.lock.locked():
                async with self.lock:
                    pass
            self._check()
        self._active[task] = depth + 1
        try:
            yield
        finally:
            if depth:
                self._active[task] = depth
            else:
                del self._active[task]
                if not self._active:
                    self._idle.set()

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """Keep the volume still: wait for every operation in progress (stores
        included) to finish, and make new ones wait until the end of the
        block (``vol move``'s final round).  Those that waited then see
        ``removed`` if it was set meanwhile."""
        async with self.lock:
            while self._active:
                self._idle = trio.Event()
                await self._idle.wait()
            yield

    # -- changes -----------------------------------------------------------------

    async def run(
        self, fn: Callable[..., T], *args: Any, then: Callable[[T], None] | None = None
    ) -> T:
        """Run ``fn(*args)`` (a blocking Volume method: admin changes, a move's
        snapshot) in a worker thread with the volume held still (``hold()``),
        outside any group commit; ``then(result)`` runs in the trio thread
        before anything else touches the volume.  Not abandoned on
        cancellation: a change that started finishes (and is durable) even
        when the server is shutting down."""
        async with self.hold():
            self._check()
            with trio.CancelScope(shield=True):
                result = await trio.to_thread.run_sync(partial(fn, *args))
            if then is not None:
                then(result)
            return result

    async def commit(
        self, fn: Callable[[], T], *, then: Callable[[T], None] | None = None, op: str = "",
        decided: Callable[[T], None] | None = None,
        decided_if: Callable[[T], bool] | None = None, light: bool = False,
    ) -> T:  # fmt: skip
        """Run change ``fn`` in the next group commit; its result once durable.
        ``decided(result)`` runs in the trio thread as soon as ``fn`` has run
        in the commit thread, while the COMMIT (its sync) is still under way:
        the change is then certain unless the whole commit fails.  With
        ``decided_if`` (called in the commit thread) only when it is true
        of the result: waking the trio thread costs a few tens of µs.

        ``light``: ``fn`` only runs SQL on the writer (no file of its own to
        write or sync).  A batch of light changes runs them in the trio
        thread and only its COMMIT in the commit thread: the thread's Python
        work no longer competes with the trio loop for the GIL (16 sessions:
        +18% cycles/s).  Reads still never wait for the sync.  When the
        server has nobody else to serve meanwhile (``_inline_now``) the
        COMMIT runs in the trio thread as well."""
        job = _Job(fn, then, op, decided, decided_if, light)
        async with self.active():
            with trio.CancelScope(shield=True):
                self._check()
                self._queue.append(job)
                while not job.finished:
                    if not self._leading:
                        await self._lead()
                    else:
                        await job.wake.wait()
                        job.wake = trio.Event()
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[no-any-return]

    async def _lead(self) -> None:
        self._leading = True
        batch, self._queue = self._queue, []
        busy: list[Path] = []
        try:
            if all(j.light for j in batch):
                applied = self.vol.apply_batch([(j.op, j.fn) for j in batch])
                for j, (ok, value) in zip(batch, applied.results, strict=True):
                    if ok and j.decided is not None:
                        _announce_now(j, value)
                try:
                    if await self._inline_now(len(batch)):
                        stats = self.vol.stats
                        done = stats.group_commits
                        results, busy = self.vol.commit_batch(applied)
                        if stats.group_commits > done:  # its COMMIT did not fail
                            stats.inline_commits += 1
                    else:
                        results, busy = await self._committer.run(
                            partial(self.vol.commit_batch, applied)
                        )
                except BaseException:
                    # Committer.run fails only before the thread took the
                    # COMMIT (it could not start): BEGIN is still open here.
                    if self.vol.db.in_transaction:
                        self.vol.abort_batch()
                    raise
            else:
                token = trio.lowlevel.current_trio_token()
                results, busy = await self._committer.run(
                    partial(self.vol.run_batch, [(j.op, _announcing(j, token)) for j in batch])
                )
            for j, (ok, value) in zip(batch, results, strict=True):
                if ok:
                    j.result = value
                    if j.then is not None:
                        try:
                            j.then(value)
                        except BaseException as exc:
                            j.error = exc
                else:
                    j.error = value
        except BaseException as exc:
            for j in batch:
                if j.error is None and not j.finished:
                    j.error = exc
            raise
        finally:
            for j in batch:
                j.finished = True
                j.wake.set()
            self._leading = False
            if self._queue:
                self._queue[0].wake.set()  # it leads the next batch
        for path in busy:
            # A store of this file is still writing: unlink once it is done.
            async with self.file_lock(int(path.name.partition(".")[0])):
                await trio.to_thread.run_sync(partial(path.unlink, missing_ok=True))

    async def _inline_now(self, n: int) -> bool:
        """Whether this light batch of ``n`` changes commits on the trio
        thread (``fileserver.activity``): one client alone is working, the
        COMMIT is most of what it costs, and nothing else waits to run.

        Tasks that are runnable (the breaks its changes started to other
        clients' promises) first run until every task waits, at most
        ``SETTLE_S``, so those calls are on the wire before the COMMIT holds
        the thread; then it looks again.  ``wait_all_tasks_blocked`` is
        trio's own test of "nothing runnable, no I/O ready";
        ``current_statistics`` does not count the tasks still to run in the
        scheduler's current pass.  The batch's BEGIN is open and the caller
        is shielded, as the thread's COMMIT is.  (A request that arrived
        meanwhile counts among those in progress: not quiet then.)"""
        a = self._activity
        if a is None or not a.quiet(n, tasks=False) or not self.vol.commit_is_cheap():
            return False
        if a.quiet(n):
            return True
        with trio.move_on_after(SETTLE_S) as scope:
            await trio.testing.wait_all_tasks_blocked()
        if scope.cancelled_caught:
            self.vol.stats.settle_timeouts += 1
            return False
        return a.quiet(n)

    def changed(self, vnodes: Iterable[int]) -> None:
        """These vnodes changed (committed): reads that ran meanwhile retry."""
        self._seq += 1
        seq = self._seq
        ch = self._changes
        for vn in vnodes:
            ch[vn] = seq
        if len(ch) > 100_000:  # bounded: forget, and make every older read retry once
            ch.clear()
            self._floor = seq

    def _changed_since(self, seq: int, vnodes: Iterable[int]) -> bool:
        if seq < self._floor:
            return True
        ch = self._changes
        return any(ch.get(vn, 0) > seq for vn in vnodes)

    # -- reads -------------------------------------------------------------------

    def _read_sync(self, fn: Callable[[], T]) -> T:
        with self.vol.reading():
            return fn()

    async def read(
        self,
        fn: Callable[[], T],
        keys: Callable[[T], Iterable[int]],
        *,
        then: Callable[[T], None] | None = None,
        file: int | None = None,
        inline: bool = False,
    ) -> T:
        """Run read-only ``fn`` beside any commit; ``then(result)`` (the
        grants) runs only when none of ``keys(result)`` changed meanwhile.
        With ``file``, a store of that file in progress is waited out first.

        ``inline`` runs a small read (a few indexed rows) in the trio thread on
        its own read connection: no thread hop to wait for, and nothing can
        change between it and its grants."""
        if inline and not self.lock.locked():
            self._check()
            result = self._read_sync(fn)
            if then is not None:
                then(result)
            return result
        async with self.active():
            return await self._read(fn, keys, then, file)

    async def _read(
        self,
        fn: Callable[[], T],
        keys: Callable[[T], Iterable[int]],
        then: Callable[[T], None] | None,
        file: int | None,
    ) -> T:
        for _ in range(8):
            self._check()
            if file is not None:
                while (ev := self.storing.get(file)) is not None:
                    await ev.wait()
                if file in self.vol.broken:
                    await self.repair(file)
                    continue
            seq = self._seq
            try:
                result = await trio.to_thread.run_sync(self._read_sync, fn)
            except RpcError:
                if file is not None and file in self.vol.broken:
                    continue  # a post-commit step failed meanwhile: repair, read again
                raise
            if not self._changed_since(seq, keys(result)):
                if then is not None:
                    then(result)
                return result
        # Changing all the time: read in order with the changes instead.  A
        # file's reader holds its lock, so no change of its data file is in
        # that batch (the writer sees the batch's changes before they are
        # applied to data files) or being written beside it.
        if file is None:
            return await self.commit(fn, then=then, op="read")
        async with self.file_lock(file):
            return await self.commit(fn, then=then, op="read")

    # -- stores ------------------------------------------------------------------

    @asynccontextmanager
    async def file_lock(self, vnode: int) -> AsyncIterator[None]:
        ent = self._file_locks.get(vnode)
        if ent is None:
            ent = self._file_locks[vnode] = [trio.Lock(), 0]
        ent[1] += 1
        try:
            async with ent[0]:
                yield
        finally:
            ent[1] -= 1
            if not ent[1]:
                del self._file_locks[vnode]

    async def repair(self, vnode: int, *, locked: bool = False) -> None:
        """Replay the committed redo records of a ``broken`` file onto its
        data file (``Volume.repair_file``); EIO if it still fails.  ``locked``:
        the caller holds the file's lock."""
        if not locked:
            async with self.file_lock(vnode):
                return await self.repair(vnode, locked=True)
        if vnode not in self.vol.broken:
            return
        try:
            with self.writing(vnode):
                await self.commit(partial(self.vol.repair_file, vnode), op="repair")
        except OSError as exc:
            raise RpcError("EIO", f"vnode {vnode}: data file cannot be repaired: {exc}") from exc

    @contextmanager
    def writing(self, vnode: int) -> Iterator[None]:
        """A store's bytes are going into this file's data file."""
        ev = self.storing[vnode] = trio.Event()
        self.changed((vnode,))  # a FetchData that overlapped the start reads again
        try:
            yield
        finally:
            del self.storing[vnode]
            ev.set()


class VolumeStore:
    """All volumes of this server, by id and by name."""

    def __init__(
        self, datadir: DataDir, *, sync: str = "always", inline_max: int = INLINE_MAX
    ) -> None:
        self.datadir = datadir
        self.sync = sync
        self.inline_max = inline_max
        self.sync_stats = SyncStats()  # shared by every volume
        #: The server's requests in progress (its handlers report them).
        self.activity = Activity()
        self.by_id: dict[int, VolumeHandle] = {}
        self.by_name: dict[str, VolumeHandle] = {}
        self.changed = trio.Event()  # set when volumes come or go (VL re-registers)

    def open_all(self) -> None:
        """Open (and recover) every volume; blocking, call from a thread or at start."""
        for p in self.datadir.volume_paths(cleanup=True):
            vol = Volume(p, sync=self.sync, stats=self.sync_stats, inline_max=self.inline_max)
            self._add(VolumeHandle(vol, self.activity))

    def _add(self, h: VolumeHandle) -> None:
        self.by_id[h.id] = h
        self.by_name[h.name] = h

    def close_all(self) -> None:
        for h in self.by_id.values():
            try:
                h.vol.close()
            except Exception:
                log.exception("closing volume %s", h.name)
        self.by_id.clear()
        self.by_name.clear()

    def get(self, volume_id: int) -> VolumeHandle:
        h = self.by_id.get(volume_id)
        if h is None:
            raise RpcError("ESTALE", f"no volume {volume_id} on this server")
        return h

    def find(self, name_or_id: str | int) -> VolumeHandle:
        if isinstance(name_or_id, int) or str(name_or_id).isdigit():
            h = self.by_id.get(int(name_or_id))
        else:
            h = self.by_name.get(str(name_or_id))
        if h is None:
            raise RpcError("ENOENT", f"no volume {name_or_id!r}")
        return h

    def _pick_id(self, random_ids: bool) -> int:
        if not random_ids:
            return max([ROOT_VOLUME_ID, *self.by_id]) + 1
        # Several servers share one VL: random ids avoid collisions without
        # a round trip (ids need only be unique within the cell).
        while True:
            vid = random.randint(ROOT_VOLUME_ID + 1_000_000, MAX_UINT32 - 1)
            if vid not in self.by_id:
                return vid

    def create_sync(
        self,
        name: str,
        *,
        quota_bytes: int = 0,
        volume_id: int | None = None,
        random_ids: bool = False,
    ) -> VolumeHandle:
        if not isinstance(name, str) or not _VOLUME_NAME.match(name):
            raise RpcError("EINVAL", f"bad volume name {name!r:.100}")
        if name in self.by_name:
            raise RpcError("EEXIST", f"volume {name} exists")
        if volume_id is None:
            volume_id = ROOT_VOLUME_ID if name == ROOT_VOLUME_NAME and not self.by_id else (
                self._pick_id(random_ids))  # fmt: skip
        if not 0 < volume_id <= MAX_UINT32 or volume_id in self.by_id:
            raise RpcError("EEXIST", f"volume id {volume_id} in use or invalid")
        if type(quota_bytes) is not int or quota_bytes < 0:
            raise RpcError("EINVAL", "quota must be a non-negative int")
        vol = Volume.create(self.datadir.volumes_dir / str(volume_id), volume_id, name,
                            quota_bytes=quota_bytes, sync=self.sync,
                            stats=self.sync_stats, inline_max=self.inline_max)  # fmt: skip
        h = VolumeHandle(vol, self.activity)
        self._add(h)
        log.info("created volume %s (%d)", name, volume_id)
        return h

    async def create(self, name: str, **kw: Any) -> VolumeHandle:
        h = await trio.to_thread.run_sync(lambda: self.create_sync(name, **kw))
        self._signal_change()  # trio objects are touched only from the trio thread
        return h

    async def remove(self, h: VolumeHandle) -> None:
        async with h.hold():  # what is in progress finishes first
            h.removed = True
            self.by_id.pop(h.id, None)
            self.by_name.pop(h.name, None)

        def _rm() -> None:
            h.vol.close()
            trash = self.datadir.volumes_dir / f".trash-{h.id}"
            os.rename(h.vol.path, trash)
            fsync_dir(self.datadir.volumes_dir)
            shutil.rmtree(trash, ignore_errors=True)

        await trio.to_thread.run_sync(_rm)
        log.info("removed volume %s (%d)", h.name, h.id)
        self._signal_change()

    def _signal_change(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def list(self) -> list[VolumeHandle]:
        return sorted(self.by_id.values(), key=lambda h: h.id)

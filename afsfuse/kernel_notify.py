"""Tell the kernel about breaks: the worker that drains the core's
invalidation queue into ``invalidate_inode`` / ``invalidate_entry``.

These kernel calls can block until requests on the same inode or directory
finish, and those requests may be waiting on the very break being handled,
so they never run inline in a request handler or the CB handler: the core
queues events (and replies to the server at once), and this worker makes the
calls from one thread, in order, off the trio loop (PYFUSE3-NOTES,
"Invalidation").  ENOENT from the kernel (it already forgot the inode) is
expected and ignored.

The thread is the notifier's own, fed by a queue, and reports nothing back
to trio for a call that went as expected: a ``trio.to_thread`` hop per call
(a thread handoff there, a wakeup and a task reschedule back) was about a
third of the Python CPU a client spends per break it receives while
another client removes files it holds.  Waits on it are rare and explicit
(``settled``, a full queue).

A directory break also expires every name the kernel learned in that
directory through us, because the kernel would otherwise keep resolving a
removed or renamed entry from its dentry cache for the whole entry timeout.
Expires, not drops (``ExpiringEntries``): a dropped dentry is unhashed, and
a process on this client whose working directory it is (a shell, `git
status` run in a subdirectory another client just changed the parent of)
then gets ENOENT from ``getcwd``; an expired one is looked up again at its
next use and stays if it still names the same inode.
Volume, server and "all" events sweep the kernel-known inodes of that scope
here, in the background, after the core has already bumped its counter in
O(1); the sweep drops attributes, expires names, and leaves pages to the
data-version check at the next open.
"""

from __future__ import annotations

import errno
import logging
import queue
import threading
from collections.abc import AsyncIterable, Callable
from typing import Any

import trio

from afsfuse.inode_table import ROOT_INODE, InodeEntry, InodeTable, fid_inode
from afsfuse.stats import log_event

log = logging.getLogger(__name__)
events_log = logging.getLogger("afsfuse.events")

#: Milliseconds an inode invalidation waits at most for reads in flight.
READ_WAIT_STEPS = 200
#: Kernel calls queued for the thread at most; past it the worker waits.
MAX_QUEUED = 1024
#: Sweeps yield to the trio loop after this many inodes.
SWEEP_STEP = 256
#: Seconds ``close`` waits for a kernel call in progress.
CLOSE_WAIT = 1.0

InvalidateInode = Callable[[int, bool], None]
InvalidateEntry = Callable[[int, bytes], None]


class ExpiringEntries:
    """The entry invalidation the notifier calls: ``expire`` (the kernel keeps
    the dentry and revalidates it at its next use, Linux 6.2+), falling back
    for good to ``drop`` (unhash it) on a kernel that answers EINVAL, which
    is how one without ``FUSE_EXPIRE_ONLY`` refuses the flag."""

    def __init__(self, expire: InvalidateEntry | None, drop: InvalidateEntry) -> None:
        self._expire = expire
        self._drop = drop

    @property
    def expiring(self) -> bool:
        return self._expire is not None

    def __call__(self, parent_ino: int, name: bytes) -> None:
        if self._expire is not None:
            try:
                self._expire(parent_ino, name)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._expire = None
                log.warning(
                    "the kernel refused FUSE_EXPIRE_ONLY (%s): directory breaks now drop "
                    "names, and a process whose working directory is one sees getcwd fail",
                    exc,
                )  # fmt: skip
        self._drop(parent_ino, name)


def inode_key(vnode: Any) -> tuple[Any, int, int]:
    """The inode-table key of a cache-manager vnode."""
    return (vnode.volume.key, vnode.fid.vnode, vnode.fid.unique)


def preferred_inode(vnode: Any) -> int | None:
    """The inode number every client gives ``vnode`` (see ``fid_inode``)."""
    return fid_inode(vnode.fid.volume, vnode.fid.vnode)


class KernelNotifier:
    def __init__(
        self,
        inodes: InodeTable,
        invalidate_inode: InvalidateInode,
        invalidate_entry: InvalidateEntry,
        *,
        is_open: Callable[[int], bool] = lambda ino: False,
        reading: Callable[[int], bool] = lambda ino: False,
    ) -> None:
        self.inodes = inodes
        self._inval_inode = invalidate_inode
        self._inval_entry = invalidate_entry
        self._is_open = is_open
        self._reading = reading
        # Inodes waiting for their reads, and whether attributes alone go
        # (False once any deferred event wanted the pages dropped too).
        self._deferred: dict[int, bool] = {}
        self._nursery: trio.Nursery | None = None
        # Names the kernel resolved through us, per directory inode.
        self._names: dict[int, set[bytes]] = {}
        # The thread's queue of jobs (None ends it).  ``_queued`` is written
        # only by trio, ``_done`` (jobs taken) only by the thread: their
        # difference is what is waiting, without a lock.
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._queued = 0
        self._done = 0
        self._room: trio.Event | None = None
        self._closed = False
        self.stats = {"inode": 0, "entry": 0, "sweeps": 0, "gone": 0, "failed": 0,
                      "read_wait_timeouts": 0}  # fmt: skip

    # -- bookkeeping called by the FUSE adapter --------------------------------

    def learned(self, parent_ino: int, name: bytes) -> None:
        """The kernel now has a dentry ``name`` in ``parent_ino``."""
        self._names.setdefault(parent_ino, set()).add(name)

    def unlearned(self, parent_ino: int, name: bytes) -> None:
        names = self._names.get(parent_ino)
        if names is not None:
            names.discard(name)

    def forgot(self, ino: int) -> None:
        self._names.pop(ino, None)

    # -- the worker ------------------------------------------------------------

    async def run(self, events: AsyncIterable[Any]) -> None:
        """Handle ``events`` until they end (then return once every kernel
        call was made) or until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    async for ev in events:
                        try:
                            await self.handle(ev)
                        except Exception:  # one bad event must not end kernel notification
                            log.exception("kernel invalidation for %r failed", ev)
                except BaseException:
                    nursery.cancel_scope.cancel()
                    raise
                # The nursery now waits for invalidations deferred for reads.
            self._nursery = None
            # A call the thread handed back (reads in flight) is queued again
            # by trio before the marker's wakeup runs: settle until none is.
            while self._queued != self._done and self._thread is not None:
                await self.settled()
        finally:
            self._nursery = None
            self.close()

    def close(self) -> None:
        """End the thread; calls still queued are not made (the mount is
        going: pyfuse3 is about to destroy the session they would write
        to).  Waits a moment for a call in progress.  One blocked in the
        kernel does not keep the process from exiting (the thread is a
        daemon), as an abandoned ``to_thread`` call did not."""
        self._closed = True
        thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)
            thread.join(CLOSE_WAIT)

    async def settled(self) -> None:
        """Return once every kernel call queued before this one was made."""
        if self._thread is None:
            return
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def mark() -> None:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        self._submit(mark)
        await done.wait()

    async def handle(self, ev: Any) -> None:
        kind = ev.kind
        if kind == "inode":
            entry = self.inodes.find(inode_key(ev.vnode))
            if entry is not None:
                await self._inode(entry, ev.attr_only)
        elif kind == "entry":
            parent = self.inodes.find(inode_key(ev.parent))
            if parent is not None and ev.name is not None:
                await self._entry(parent.ino, ev.name)
        elif kind == "volume":
            await self._sweep(lambda e: e.key[0] == ev.volume.key)
        elif kind == "server":
            keys = {v.key for v in ev.volumes}
            await self._sweep(lambda e: e.key[0] in keys)
        elif kind == "all":
            await self._sweep(lambda e: True)
        else:
            log.warning("unknown invalidation kind %r", kind)

    async def _inode(self, entry: InodeEntry, attr_only: bool, force: bool = False) -> None:
        if not force and self._defer_for_reads(entry, attr_only):
            return
        await self._submit_when_room(lambda: self._inode_now(entry, attr_only, force))
        if getattr(entry.node, "is_dir", False):
            for name in self._names.pop(entry.ino, ()):
                await self._entry(entry.ino, name, forget_name=False)

    def _defer_for_reads(self, entry: InodeEntry, attr_only: bool) -> bool:
        """With reads in flight on ``entry``, have ``_after_reads`` invalidate
        it once they replied, and say so; the rest of the queue goes on."""
        if not self._reading(entry.ino) or self._nursery is None:
            return False
        if entry.ino in self._deferred:
            self._deferred[entry.ino] = self._deferred[entry.ino] and attr_only
        else:
            self._nursery.start_soon(self._after_reads, entry)
            self._deferred[entry.ino] = attr_only
        return True

    def _recheck(self, entry: InodeEntry, attr_only: bool) -> None:
        """In trio (``run_sync_soon``: it must not raise), for the thread that
        found reads in flight: defer, or (they replied meanwhile, or the
        worker is ending) queue the call again."""
        try:
            if self._defer_for_reads(entry, attr_only):
                return
        except RuntimeError:  # the nursery is closing
            self._nursery = None
        self._submit(lambda: self._inode_now(entry, attr_only))

    def _inode_now(self, entry: InodeEntry, attr_only: bool, force: bool = False) -> None:
        """In the thread.  Open and reading are judged now, when the kernel is
        told, not when the event was queued (``force``: reads were waited
        for long enough)."""
        if (not force and self._reading(entry.ino) and self._nursery is not None
                and self._token is not None):  # fmt: skip
            try:
                self._token.run_sync_soon(self._recheck, entry, attr_only)
            except trio.RunFinishedError:
                pass  # trio is gone: so is the mount
            return
        # Dropping pages of an open file can hang with I/O in flight; such
        # files get attributes dropped now and keep_cache off at next open.
        attr_only = attr_only or self._is_open(entry.ino)
        if self._call(self._inval_inode, entry.ino, attr_only):
            self.stats["inode"] += 1
            log_event(
                "kernel_invalidate", ino=entry.ino, fid=getattr(entry.node, "fid", "?"),
                attr_only=attr_only,
            )  # fmt: skip

    async def _after_reads(self, entry: InodeEntry) -> None:
        """Invalidate ``entry`` once the reads in flight on it replied (bounded).
        A read that comes back short because the file shrank makes the kernel
        lower its size, but only if the inode's attributes did not change
        while the read was in flight; an invalidation landing then leaves the
        old size, and the kernel fills the gap with zeros the file never had."""
        waited_out = False
        try:
            for _ in range(READ_WAIT_STEPS):
                if not self._reading(entry.ino):
                    break
                await trio.sleep(0.001)
            else:
                self.stats["read_wait_timeouts"] += 1
                waited_out = True  # steady reads must not put it off for ever
        finally:
            attr_only = self._deferred.pop(entry.ino, True)
        await self._inode(entry, attr_only, force=waited_out)

    async def _entry(self, parent_ino: int, name: bytes, *, forget_name: bool = True) -> None:
        if forget_name:
            self.unlearned(parent_ino, name)
        await self._submit_when_room(lambda: self._entry_now(parent_ino, name))

    def _entry_now(self, parent_ino: int, name: bytes) -> None:
        if self._call(self._inval_entry, parent_ino, name):
            self.stats["entry"] += 1

    async def _sweep(self, match: Callable[[InodeEntry], bool]) -> None:
        self.stats["sweeps"] += 1
        n = 0
        for i, entry in enumerate(self.inodes.entries()):
            if i % SWEEP_STEP == SWEEP_STEP - 1:
                await trio.lowlevel.checkpoint()
            if entry.ino == ROOT_INODE or match(entry):
                # Attributes only: pages of a file whose DV moved are dropped
                # at its next open (keep_cache off), so a mass break does not
                # throw away every page the kernel holds.
                await self._inode(entry, attr_only=True)
                n += 1
        log_event("kernel_sweep", inodes=n)

    # -- the thread ------------------------------------------------------------

    def _submit(self, job: Callable[[], None]) -> None:
        if self._closed:
            return  # unmounting: nothing left to tell
        if self._thread is None:
            self._token = trio.lowlevel.current_trio_token()
            self._thread = threading.Thread(target=self._work, name="kernel-notify", daemon=True)
            self._thread.start()
        self._queued += 1
        self._jobs.put(job)

    async def _submit_when_room(self, job: Callable[[], None]) -> None:
        # Bounded: a kernel that stalls leaves events waiting, coalesced, in
        # the core's invalidation queue rather than here.
        while self._queued - self._done >= MAX_QUEUED:
            self._room = trio.Event()
            if self._queued - self._done >= MAX_QUEUED:
                # Timed: a wakeup the thread sent before the event existed
                # costs a moment, not a hang.
                with trio.move_on_after(0.05):
                    await self._room.wait()
        self._submit(job)

    def _work(self) -> None:
        jobs, token = self._jobs, self._token
        while (job := jobs.get()) is not None:
            # Counted as taken, before it runs: a job's own wakeups of trio
            # (``settled``'s marker, a hand-back) then find it counted.
            self._done += 1
            if self._closed:
                continue  # dropped: see close()
            try:
                job()
            except Exception:
                log.exception("kernel invalidation failed")
            room = self._room
            if room is not None and self._queued - self._done < MAX_QUEUED // 2:
                self._room = None
                try:
                    assert token is not None
                    token.run_sync_soon(room.set)
                except trio.RunFinishedError:
                    pass

    def _call(self, fn: Callable[..., None], *args: Any) -> bool:
        """Make one kernel call (in the thread); whether it was made."""
        try:
            fn(*args)
            return True
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTCONN):
                self.stats["gone"] += 1  # the kernel already forgot, or unmounted
            else:
                self.stats["failed"] += 1
                log.warning("kernel invalidation %s%r failed: %s", fn.__name__, args, exc)
            return False

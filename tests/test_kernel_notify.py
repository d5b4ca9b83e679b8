"""The kernel-invalidation worker: right calls for each event, ENOENT from a
kernel that already forgot is harmless, directory breaks drop learned names,
open files get attribute-only invalidation, sweeps cover exactly their scope.
The calls are made by the notifier's own thread: ``told`` handles an event
and waits for them."""

import errno
import threading
from dataclasses import dataclass, field

import pytest
import trio

from afsfuse import kernel_notify
from afsfuse.inode_table import InodeTable
from afsfuse.kernel_notify import ExpiringEntries, KernelNotifier, inode_key
from protocol.records import Fid


@dataclass(eq=False)
class FakeVolume:
    key: tuple


@dataclass(eq=False)
class FakeVnode:
    volume: FakeVolume
    fid: Fid
    is_dir: bool = False


@dataclass
class Ev:
    kind: str
    vnode: object = None
    parent: object = None
    name: bytes | None = None
    volume: object = None
    volumes: tuple = field(default=())
    attr_only: bool = False


def setup(open_inos=()):
    calls = []

    def inval_inode(ino, attr_only):
        calls.append(("inode", ino, attr_only))
        if ino == 999:
            raise OSError(errno.ENOENT, "gone")

    def inval_entry(parent, name):
        calls.append(("entry", parent, name))

    table = InodeTable()
    kn = KernelNotifier(table, inval_inode, inval_entry, is_open=lambda ino: ino in open_inos)
    _made.append(kn)
    return table, kn, calls


_made: list[KernelNotifier] = []


@pytest.fixture(autouse=True)
def _end_threads():
    yield
    while _made:
        _made.pop().close()


async def told(kn, ev):
    """Handle ``ev`` and wait until the thread made its kernel calls."""
    await kn.handle(ev)
    await kn.settled()


def add(table, vnode):
    return table.remember(inode_key(vnode), vnode, vnode.fid.unique).ino


async def test_inode_event_and_open_file_is_attr_only():
    table, kn, calls = setup()
    vol = FakeVolume(("cell", 5))
    f = FakeVnode(vol, Fid(5, 3, 1))
    ino = add(table, f)
    await told(kn, Ev("inode", vnode=f))
    assert calls == [("inode", ino, False)]
    kn._is_open = lambda i: i == ino
    await told(kn, Ev("inode", vnode=f))
    assert calls[-1] == ("inode", ino, True)


async def test_unknown_vnode_costs_nothing():
    _, kn, calls = setup()
    await told(kn, Ev("inode", vnode=FakeVnode(FakeVolume(("c", 1)), Fid(1, 2, 3))))
    assert calls == []


async def test_directory_break_drops_learned_names():
    table, kn, calls = setup()
    vol = FakeVolume(("cell", 5))
    d = FakeVnode(vol, Fid(5, 2, 2), is_dir=True)
    dino = add(table, d)
    kn.learned(dino, b"a")
    kn.learned(dino, b"b")
    await told(kn, Ev("inode", vnode=d))
    assert calls[0] == ("inode", dino, False)
    assert sorted(calls[1:]) == [("entry", dino, b"a"), ("entry", dino, b"b")]
    calls.clear()
    await told(kn, Ev("inode", vnode=d))  # names were dropped once; not again
    assert calls == [("inode", dino, False)]


async def test_kernel_enoent_is_counted_not_raised():
    table, kn, calls = setup()
    table._next = 999
    v = FakeVnode(FakeVolume(("c", 1)), Fid(1, 4, 4))
    add(table, v)

    async def events():
        yield Ev("inode", vnode=v)
        yield Ev("bogus")
        yield Ev("inode", vnode=v)

    with trio.fail_after(5):
        await kn.run(events())
    assert kn.stats["gone"] == 2 and len(calls) == 2


async def test_volume_sweep_touches_only_that_volume():
    table, kn, calls = setup()
    va, vb = FakeVolume(("cellA", 7)), FakeVolume(("cellB", 7))
    a_inos = {add(table, FakeVnode(va, Fid(7, n, 1))) for n in range(3, 8)}
    b_inos = {add(table, FakeVnode(vb, Fid(7, n, 1))) for n in range(3, 8)}
    await told(kn, Ev("volume", volume=va))
    touched = {c[1] for c in calls if c[0] == "inode"}
    assert touched == a_inos
    assert all(c[2] is True for c in calls)  # attributes only; pages wait for open
    calls.clear()
    await told(kn, Ev("server", volumes=(va, vb)))
    assert {c[1] for c in calls} == a_inos | b_inos


def test_entries_expire_and_fall_back_to_drop_on_einval():
    """Names are expired while the kernel takes FUSE_EXPIRE_ONLY; the first
    EINVAL (a kernel without it) drops that name instead and every later one;
    any other error (ENOENT: the kernel forgot the name) is the caller's."""
    expired, dropped = [], []
    refuse = {"on": False}

    def expire(parent, name):
        if refuse["on"]:
            raise OSError(errno.EINVAL, "bad flags")
        if name == b"gone":
            raise OSError(errno.ENOENT, "no such entry")
        expired.append((parent, name))

    ents = ExpiringEntries(expire, lambda p, n: dropped.append((p, n)))
    ents(5, b"a")
    assert expired == [(5, b"a")] and dropped == [] and ents.expiring
    try:
        ents(5, b"gone")
    except OSError as exc:
        assert exc.errno == errno.ENOENT
    else:
        raise AssertionError("ENOENT was swallowed")
    assert dropped == [] and ents.expiring
    refuse["on"] = True
    ents(5, b"b")
    assert dropped == [(5, b"b")] and not ents.expiring
    refuse["on"] = False
    ents(6, b"c")  # no second try of a flag the kernel refused
    assert dropped == [(5, b"b"), (6, b"c")] and expired == [(5, b"a")]
    only_drop = ExpiringEntries(None, lambda p, n: dropped.append((p, n)))
    only_drop(7, b"d")
    assert dropped[-1] == (7, b"d") and not only_drop.expiring


# A hang guard, not a speed assertion.
HANG = 10


def stall_the_first_of_four(table, kn):
    """Four files known to the kernel; the kernel call for the first blocks
    (``stalled`` is set) until ``release`` is."""
    vol = FakeVolume(("cell", 5))
    files = [FakeVnode(vol, Fid(5, n, 1)) for n in range(3, 7)]
    inos = [add(table, f) for f in files]
    stalled, release = threading.Event(), threading.Event()
    inner = kn._inval_inode

    def stalling(ino, attr_only):
        if ino == inos[0]:
            stalled.set()
            release.wait(HANG)
        inner(ino, attr_only)

    kn._inval_inode = stalling
    return files, inos, stalled, release


async def test_a_stalled_kernel_call_holds_up_neither_trio_nor_the_queue():
    """A kernel call blocked on a directory lock (the kernel waits for a
    request that waits for us) must leave the trio loop and the worker free;
    the calls queued behind it are made in order once it returns."""
    table, kn, calls = setup()
    files, inos, stalled, release = stall_the_first_of_four(table, kn)
    with trio.fail_after(HANG):
        for f in files:
            await kn.handle(Ev("inode", vnode=f))  # returns at once, stalled or not
        assert await trio.to_thread.run_sync(stalled.wait, HANG)
        await trio.sleep(0.01)  # the loop runs meanwhile
        assert calls == []
        release.set()
        await kn.settled()
    assert [c[1] for c in calls] == inos


async def test_reads_in_flight_when_the_kernel_is_told_are_waited_for():
    """Reads are judged when the thread is about to tell the kernel, not when
    the event was queued: a read that started in between still replies
    first (an invalidation landing under a short read leaves the old size)."""
    table, kn, calls = setup()
    f = FakeVnode(FakeVolume(("cell", 5)), Fid(5, 3, 1))
    ino = add(table, f)
    reading = {"n": 0}
    kn._reading = lambda i: i == ino and reading["n"] > 0
    gate = threading.Event()
    inner = kn._inval_inode
    first = FakeVnode(f.volume, Fid(5, 4, 1))
    first_ino = add(table, first)

    def slow(i, attr_only):
        if i == first_ino:
            gate.wait(HANG)
        inner(i, attr_only)

    kn._inval_inode = slow
    send, recv = trio.open_memory_channel(10)
    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kn.run, recv)
            await send.send(Ev("inode", vnode=first))  # the thread is busy with it
            await send.send(Ev("inode", vnode=f))  # queued: no read in flight yet
            await trio.sleep(0.05)
            reading["n"] = 1  # a read starts before the thread gets to f
            gate.set()
            await trio.sleep(0.05)
            assert [c[1] for c in calls] == [first_ino]  # f waits for the read
            reading["n"] = 0
            await send.aclose()  # run() returns once every call was made
    assert [c[1] for c in calls] == [first_ino, ino]
    assert kn.stats["inode"] == 2


async def test_the_thread_queue_is_bounded(monkeypatch):
    """With the kernel stalled, the worker stops taking events once
    MAX_QUEUED calls wait, so they wait coalesced in the core's queue."""
    monkeypatch.setattr(kernel_notify, "MAX_QUEUED", 4)
    table, kn, calls = setup()
    vol = FakeVolume(("cell", 5))
    files = [FakeVnode(vol, Fid(5, n, 1)) for n in range(3, 13)]
    for f in files:
        add(table, f)
    release = threading.Event()
    inner = kn._inval_inode
    kn._inval_inode = lambda i, a: (release.wait(HANG), inner(i, a))
    handled = 0
    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:

            async def feed():
                nonlocal handled
                for f in files:
                    await kn.handle(Ev("inode", vnode=f))
                    handled += 1

            nursery.start_soon(feed)
            await trio.sleep(0.1)
            assert handled == 5  # one taken by the thread, four wait; the sixth waits for room
            release.set()
        await kn.settled()
    assert handled == 10 and len(calls) == 10


async def test_close_drops_the_calls_still_queued():
    """At unmount pyfuse3 destroys the session right after the worker ends:
    calls still queued then must not be made (they would write to a freed
    session); the one in progress is waited for."""
    table, kn, calls = setup()
    files, inos, stalled, release = stall_the_first_of_four(table, kn)
    with trio.fail_after(HANG):
        for f in files:
            await kn.handle(Ev("inode", vnode=f))
        assert await trio.to_thread.run_sync(stalled.wait, HANG)
    threading.Timer(0.1, release.set).start()
    kn.close()  # returns once the call in progress did
    assert [c[1] for c in calls] == [inos[0]]


async def test_steady_reads_put_an_invalidation_off_only_for_a_while(monkeypatch):
    monkeypatch.setattr(kernel_notify, "READ_WAIT_STEPS", 3)
    table, kn, calls = setup()
    f = FakeVnode(FakeVolume(("cell", 5)), Fid(5, 3, 1))
    ino = add(table, f)
    kn._reading = lambda i: True  # a reader that never stops

    async def events():
        yield Ev("inode", vnode=f)

    with trio.fail_after(HANG):
        await kn.run(events())
    assert calls == [("inode", ino, False)]
    assert kn.stats["read_wait_timeouts"] == 1


async def test_a_deferred_invalidation_keeps_the_strongest_of_its_events():
    """An attributes-only event and then a full one for a file with reads in
    flight: one call once the reads replied, and it drops the pages too."""
    table, kn, calls = setup()
    f = FakeVnode(FakeVolume(("cell", 5)), Fid(5, 3, 1))
    ino = add(table, f)
    reading = {"on": True}
    kn._reading = lambda i: reading["on"]
    send, recv = trio.open_memory_channel(10)
    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kn.run, recv)
            await send.send(Ev("inode", vnode=f, attr_only=True))
            await send.send(Ev("inode", vnode=f, attr_only=False))
            await trio.sleep(0.02)
            assert calls == []
            reading["on"] = False
            await send.aclose()
    assert calls == [("inode", ino, False)]

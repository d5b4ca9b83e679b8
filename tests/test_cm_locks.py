"""The client's lock core (afsfuse/locks.py) against a fake server context:
local POSIX range semantics, the server lock each state needs, the
lock-to-unlock order (store before release, revalidate on acquire),
F_SETLKW back-off and cancellation, extension and lost locks, and
unreachable servers."""

from __future__ import annotations

import errno
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from afsfuse.locks import (
    F_RDLCK,
    F_UNLCK,
    F_WRLCK,
    LOCK_EX,
    LOCK_NB,
    LOCK_SH,
    LOCK_UN,
    LockManager,
    fallocate,
    flock_type,
)
from protocol.connection import ConnectionLost
from protocol.errors import RpcError

P1, P2 = 101, 202  # two local lock owners


class FakeServer:
    """LockContext: records calls; ``others`` is what other clients hold."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.others: int | None = None  # None, 0 shared or 1 exclusive elsewhere
        self.down = False
        self.lost = False
        self.dv = 5

    async def call(self, vnode: Any, method: str, *params: Any) -> Any:
        await trio.lowlevel.checkpoint()
        if self.down:
            raise ConnectionLost("no server")
        self.calls.append((method, *params[-3:]))
        if method == "FS.SetLock":
            want = params[2]
            if self.others is not None and (want == 1 or self.others == 1):
                raise RpcError("EAGAIN", "locked")
            return {"expires_in": 3}
        if method == "FS.ExtendLock":
            if self.lost:
                raise RpcError("ENOLCK", "gone")
            return {"expires_in": 3}
        return None

    async def revalidate(self, vnode: Any, cred: Any) -> int:
        self.calls.append(("revalidate",))
        return self.dv

    async def store_dirty(self, vnode: Any, cred: Any) -> None:
        self.calls.append(("store",))

    def methods(self) -> list[Any]:
        return [c[0] if c[0] != "FS.SetLock" else ("set", c[2]) for c in self.calls]


def vnode() -> Any:
    return SimpleNamespace(volume=SimpleNamespace(key=("cell", 1)), fid=(1, 2, 3), kernel_dv=5)


@pytest.fixture
def env() -> tuple[LockManager, FakeServer, Any, list[Any]]:
    srv = FakeServer()
    dropped: list[Any] = []

    async def drop(v: Any, attr_only: bool) -> None:
        dropped.append((v, attr_only))

    return LockManager(srv, drop), srv, vnode(), dropped


async def test_local_ranges_conflict_by_owner_and_split_on_unlock(env) -> None:
    lm, srv, v, _ = env
    await lm.setlk(v, P1, flock=False, type_=F_WRLCK, start=0, length=10)
    await lm.setlk(v, P2, flock=False, type_=F_WRLCK, start=10, length=10)  # disjoint: fine
    with pytest.raises(OSError) as ei:
        await lm.setlk(v, P2, flock=False, type_=F_RDLCK, start=5, length=1)
    assert ei.value.errno == errno.EAGAIN
    assert await lm.getlk(v, P2, flock=False, type_=F_RDLCK, start=5, length=1) == (
        F_WRLCK, 0, 10, 0,
    )  # fmt: skip
    # Unlocking the middle of P1's range leaves both ends locked.
    await lm.setlk(v, P1, flock=False, type_=F_UNLCK, start=4, length=2)
    await lm.setlk(v, P2, flock=False, type_=F_WRLCK, start=4, length=2)
    with pytest.raises(OSError):
        await lm.setlk(v, P2, flock=False, type_=F_WRLCK, start=3, length=1)
    # A flock lock is whole-file and conflicts with the POSIX locks of others.
    with pytest.raises(OSError):
        await lm.setlk(v, 999, flock=True, type_=F_RDLCK)
    assert srv.methods() == [("set", 1), "revalidate"]  # one server lock covers it all


async def test_server_lock_follows_what_local_locks_need(env) -> None:
    lm, srv, v, _ = env
    await lm.setlk(v, P1, flock=False, type_=F_RDLCK, start=0, length=0)
    await lm.setlk(v, P2, flock=False, type_=F_RDLCK, start=0, length=10)
    await lm.setlk(v, P1, flock=False, type_=F_WRLCK, start=100, length=1)  # P1 converts part
    assert srv.methods() == [("set", 0), "revalidate", ("set", 1)]  # upgrade: no revalidation
    srv.calls.clear()
    await lm.setlk(v, P1, flock=False, type_=F_UNLCK, start=0, length=0)
    # Only read locks remain: store first, then downgrade.
    assert srv.methods() == ["store", ("set", 0)]
    srv.calls.clear()
    await lm.release_owner(v, P2, flock=False)  # P2 closes a descriptor of the file
    assert srv.methods() == ["store", "FS.ReleaseLock"]
    assert lm.files == {}


async def test_acquiring_drops_stale_kernel_pages(env) -> None:
    lm, srv, v, dropped = env
    await lm.setlk(v, P1, flock=True, type_=F_WRLCK)
    assert dropped == []  # the kernel's pages are of the current DV
    await lm.setlk(v, P1, flock=True, type_=F_UNLCK)
    srv.dv = 6  # another client stored meanwhile
    await lm.setlk(v, P1, flock=True, type_=F_RDLCK)
    assert dropped == [(v, False)] and v.kernel_dv == 6
    await lm.setlk(v, P1, flock=True, type_=F_UNLCK)
    v.kernel_attr_dv = 5  # the kernel's attributes are older than its pages
    await lm.setlk(v, P1, flock=True, type_=F_RDLCK)
    assert dropped[1:] == [(v, True)]


async def test_setlkw_backs_off_until_the_other_client_lets_go(env, autojump_clock) -> None:
    lm, srv, v, _ = env
    srv.others = 1
    with pytest.raises(OSError) as ei:
        await lm.setlk(v, P1, flock=True, type_=F_RDLCK)  # not sleeping: EAGAIN at once
    assert ei.value.errno == errno.EAGAIN

    async def free_later() -> None:
        await trio.sleep(5)
        srv.others = None

    async with trio.open_nursery() as n:
        n.start_soon(free_later)
        await lm.setlk(v, P1, flock=True, type_=F_WRLCK, sleep=True)
    tries = srv.methods().count(("set", 1))
    assert 5 < tries < 60  # backed off (0.01 s doubling to 0.5 s), not spinning
    assert trio.current_time() >= 5


async def test_flock_conversion_drops_the_old_lock_first(env, autojump_clock) -> None:
    lm, srv, v, _ = env
    await lm.setlk(v, P1, flock=True, type_=F_RDLCK)
    srv.others = 0  # another client holds it shared too: our upgrade must wait
    srv.calls.clear()

    async def free_later() -> None:
        await trio.sleep(2)
        # While waiting we hold nothing, so the other client could upgrade.
        assert lm.files[lm._key(v)].locks == [] and lm.files[lm._key(v)].server is None
        srv.others = None

    async with trio.open_nursery() as n:
        n.start_soon(free_later)
        await lm.setlk(v, P1, flock=True, type_=F_WRLCK, sleep=True)
    assert srv.methods()[:2] == ["store", "FS.ReleaseLock"]
    assert lm.files[lm._key(v)].server == 1


async def test_a_cancelled_wait_leaves_nothing_held(env, autojump_clock) -> None:
    lm, srv, v, _ = env
    srv.others = 1
    with trio.move_on_after(3):  # pyfuse3 cancels on FUSE_INTERRUPT the same way
        await lm.setlk(v, P1, flock=False, type_=F_WRLCK, start=0, length=0, sleep=True)
    assert lm._key(v) not in lm.files  # no local lock, no server lock: forgotten


async def test_a_local_waiter_is_woken_by_the_local_unlock(env, autojump_clock) -> None:
    lm, _, v, _ = env
    await lm.setlk(v, P1, flock=True, type_=F_WRLCK)
    got: list[float] = []

    async def waiter() -> None:
        await lm.setlk(v, P2, flock=True, type_=F_WRLCK, sleep=True)
        got.append(trio.current_time())

    async with trio.open_nursery() as n:
        n.start_soon(waiter)
        await trio.sleep(10)
        assert got == []
        await lm.setlk(v, P1, flock=True, type_=F_UNLCK)
    assert got == [10.0]  # at the unlock itself, not at the next back-off poll


async def test_unreachable_server_is_enolck_never_success(env) -> None:
    lm, srv, v, _ = env
    srv.down = True
    for sleep in (False, True):
        with pytest.raises(OSError) as ei:
            await lm.setlk(v, P1, flock=True, type_=F_WRLCK, sleep=sleep)
        assert ei.value.errno == errno.ENOLCK
    assert lm._key(v) not in lm.files
    assert lm.stats["unreachable"] == 2


async def test_a_failed_revalidation_gives_the_server_lock_back(env) -> None:
    lm, srv, v, _ = env

    async def stale(vnode: Any, cred: Any) -> int:
        raise RpcError("ESTALE", "removed on the server")

    srv.revalidate = stale  # type: ignore[method-assign]
    with pytest.raises(OSError) as ei:
        await lm.setlk(v, P1, flock=True, type_=F_WRLCK)
    assert ei.value.errno == errno.ESTALE
    assert srv.methods() == [("set", 1), "FS.ReleaseLock"]
    assert lm.files == {}


async def test_locks_are_extended_and_a_lost_one_is_retaken(env, autojump_clock) -> None:
    lm, srv, v, _ = env
    async with trio.open_nursery() as n:
        n.start_soon(lm.run)
        await lm.setlk(v, P1, flock=True, type_=F_WRLCK)
        assert lm.interval == 1  # a third of the 3 s the server granted
        await trio.sleep(3.5)
        assert srv.methods().count("FS.ExtendLock") == 3
        srv.lost = True
        await trio.sleep(1)
        assert lm.files[lm._key(v)].lost and lm.stats["lost"] == 1
        srv.calls.clear()
        # The next request on the file takes the lock again, revalidating.
        await lm.setlk(v, P1, flock=True, type_=F_WRLCK)  # P1 asks again
        assert srv.methods() == [("set", 1), "revalidate"]
        n.cancel_scope.cancel()


def test_flock_ops_map_to_lock_types() -> None:
    assert flock_type(LOCK_SH) == (F_RDLCK, True)
    assert flock_type(LOCK_EX | LOCK_NB) == (F_WRLCK, False)
    assert flock_type(LOCK_UN) == (F_UNLCK, False)
    with pytest.raises(OSError):
        flock_type(0)


async def test_fallocate_modes() -> None:
    class CM:
        def __init__(self) -> None:
            self.ops: list[tuple[Any, ...]] = []

        async def setattr(self, v: Any, cred: Any, *, size: int) -> None:
            self.ops.append(("size", size))

        async def write(self, h: Any, off: int, data: bytes, cred: Any) -> int:
            assert data == bytes(len(data))
            self.ops.append(("zeros", off, len(data)))
            return len(data)

    cm = CM()
    h = SimpleNamespace(vnode=SimpleNamespace(size=lambda: 5000))
    await fallocate(cm, h, 0, 0, 1 << 20, None)
    await fallocate(cm, h, 0, 0, 100, None)  # inside the file: nothing to do
    await fallocate(cm, h, 0x01, 0, 1 << 30, None)  # KEEP_SIZE alone: nothing
    await fallocate(cm, h, 0x03, 4096, 8192, None)  # punched only up to EOF
    assert cm.ops == [("size", 1 << 20), ("zeros", 4096, 5000 - 4096)]
    for mode in (0x02, 0x08, 0x10):
        with pytest.raises(OSError) as ei:
            await fallocate(cm, h, mode, 0, 10, None)
        assert ei.value.errno == errno.EOPNOTSUPP

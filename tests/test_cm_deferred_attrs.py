"""Attributes set on a file with unstored writes go with those writes.

tar x does create, write, futimens, fchown, fchmod, close on every file.
The client keeps a widening chmod and the times of a file it is writing
until the store at close (or fsync), shows them locally meanwhile, and
sends them in that store's StoreData (servers with ``store-attrs``) or in
one StoreStatus right after it; a chown to the owner the file already
has costs no call.  What takes access away or hands the file over goes at
once.  Two cache managers against a real fileserver: B sees what A set
once A's close returned.
"""

from __future__ import annotations

import errno

import pytest
from test_cm_integration import two_clients

from protocol.errors import RpcError

MTIME = 1_000_000_000 * 10**9  # 2001: never the server's clock


def _calls(cm, *names: str) -> dict[str, int]:
    return {n: cm.stats.rpc[n] for n in names}


async def _tar_one(a, ra, name: bytes, data: bytes):
    """What GNU tar does for one file it extracts as root."""
    f = await a.create(ra, name, 0o600)
    h = await a.open(f, flags=2)
    await a.write(h, 0, data)
    await a.setattr(f, mtime_ns=MTIME)
    st = await a.getattr(f)
    await a.setattr(f, uid=st.owner, gid=st.group)
    await a.setattr(f, mode=0o644)
    return f, h


async def test_tar_pattern_costs_create_and_one_store_and_b_sees_it_after_close(tmp_path):
    async with two_clients(tmp_path) as (a, ra, b, rb):
        before = _calls(a, "FS.StoreData", "FS.StoreStatus")
        f, h = await _tar_one(a, ra, b"t.c", b"int main;")
        # Nothing went to the server yet, and A shows what it set.
        assert _calls(a, "FS.StoreData", "FS.StoreStatus") == before
        st = await a.getattr(f)
        assert (st.mode, st.mtime_ns, st.size) == (0o644, MTIME, 9)
        assert a.stats.attrs_deferred == 2
        await a.flush(h)
        await a.release(h)
        assert a.stats.rpc["FS.StoreData"] == before["FS.StoreData"] + 1
        assert a.stats.rpc["FS.StoreStatus"] == before["FS.StoreStatus"]
        assert f.pending_attrs is None
        # B, after A's close, sees the bytes and every attribute.
        fb = await b.lookup(rb, b"t.c")
        stb = await b.getattr(fb)
        assert (stb.mode, stb.mtime_ns, stb.size) == (0o644, MTIME, 9)
        hb = await b.open(fb)
        assert await b.read(hb, 0, 100) == b"int main;"
        await b.release(hb)


async def test_a_server_without_store_attrs_gets_one_store_status_after_the_data(tmp_path):
    async with two_clients(tmp_path) as (a, ra, b, rb):
        ra.volume.server.capabilities = frozenset()  # as an older fileserver says
        before = _calls(a, "FS.StoreData", "FS.StoreStatus")
        _f, h = await _tar_one(a, ra, b"old.c", b"x" * 100)
        await a.release(h)
        # The mtime rides on StoreData (every server takes it), the
        # mode follows in one StoreStatus.
        assert a.stats.rpc["FS.StoreData"] == before["FS.StoreData"] + 1
        assert a.stats.rpc["FS.StoreStatus"] == before["FS.StoreStatus"] + 1
        stb = await b.getattr(await b.lookup(rb, b"old.c"))
        assert (stb.mode, stb.mtime_ns, stb.size) == (0o644, MTIME, 100)


async def test_a_write_after_futimens_moves_the_mtime_again(tmp_path):
    async with two_clients(tmp_path) as (a, ra, b, rb):
        f = await a.create(ra, b"w", 0o644)
        h = await a.open(f, flags=2)
        await a.write(h, 0, b"one")
        await a.setattr(f, mtime_ns=MTIME)
        await a.write(h, 3, b"two")
        assert (await a.getattr(f)).mtime_ns != MTIME
        await a.release(h)
        stb = await b.getattr(await b.lookup(rb, b"w"))
        assert stb.mtime_ns > MTIME and stb.size == 6


async def test_what_takes_access_away_goes_at_once(tmp_path):
    async with two_clients(tmp_path) as (a, ra, b, rb):
        f = await a.create(ra, b"secret", 0o644)
        h = await a.open(f, flags=2)
        await a.write(h, 0, b"data")
        await a.setattr(f, mode=0o664)  # widens: waits for the store
        await a.setattr(f, mtime_ns=MTIME)
        n = a.stats.rpc["FS.StoreStatus"]
        await a.setattr(f, mode=0o600)  # narrows: at once
        assert a.stats.rpc["FS.StoreStatus"] == n + 1
        fb = await b.lookup(rb, b"secret")
        assert (await b.getattr(fb)).mode == 0o600  # before A's close
        # Setuid and a real chown are never held back either.
        await a.setattr(f, mode=0o4600)
        assert a.stats.rpc["FS.StoreStatus"] == n + 2
        await a.setattr(f, uid=1234)
        assert a.stats.rpc["FS.StoreStatus"] == n + 3
        assert (await b.getattr(fb)).owner == 1234
        # The held mtime still goes with the store at close.
        await a.release(h)
        st = await b.getattr(fb)
        assert st.mtime_ns == MTIME and st.size == 4 and st.mode & 0o777 == 0o600


async def test_non_owner_is_answered_by_the_server_at_once(tmp_path):
    """A caller who is neither root nor the owner is not predicted: the
    server's answer (EPERM here) comes back from the setattr itself."""
    async with two_clients(tmp_path) as (a, ra, _b, _rb):
        f = await a.create(ra, b"shared", 0o666)  # owned by root
        h = await a.open(f, flags=2)
        user = (1000, 100, [100])
        await a.write(h, 0, b"mine", user)
        n = a.stats.rpc["FS.StoreStatus"]
        with pytest.raises(RpcError) as e:
            await a.setattr(f, user, mode=0o777)
        assert e.value.errno == errno.EPERM
        assert a.stats.rpc["FS.StoreStatus"] == n + 1
        assert f.pending_attrs is None
        await a.release(h)

"""Two cache managers doing random operations on one fake fileserver: every
open sees what the last close stored (close-to-open), listings and sizes
match the server, whatever breaks, expiries and mass breaks come between."""

from __future__ import annotations

import os
import random
from contextlib import AsyncExitStack

import pytest
import trio
from test_cm_fakeserver import ROOT, VOL, FakeServer, Network, make_cm

from afsfuse.cache_manager import CacheManager
from protocol.errors import RpcError
from protocol.records import Fid

NAMES = [b"a", b"b", b"c", b"d"]


async def run_ops(tmp_path, seed: int, n_ops: int = int(os.environ.get("CM_OPS", "80"))) -> None:
    rnd = random.Random(seed)
    model: dict[bytes, bytes] = {}
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        net = Network(nursery)
        fake = net.add(FakeServer())
        cms = [
            await stack.enter_async_context(make_cm(net, tmp_path / str(seed), name))
            for name in ("a", "b")
        ]
        roots = [await cm.mount_volume("test", "root.cell") for cm in cms]
        for _ in range(n_ops):
            i = rnd.randrange(2)
            cm: CacheManager = cms[i]
            root = roots[i]
            name = rnd.choice(NAMES)
            op = rnd.choice(["write", "read", "read", "create", "unlink", "ls", "stat",
                             "expire", "init", "vbreak", "trunc"])  # fmt: skip
            if op == "create" and name not in model:
                await cm.create(root, name, 0o644)
                model[name] = b""
            elif op == "unlink" and name in model:
                await cm.unlink(root, name)
                del model[name]
            elif op == "write" and name in model:
                v = await cm.lookup(root, name)
                h = await cm.open(v, flags=2)
                off = rnd.randrange(0, 9000)
                data = bytes([rnd.randrange(256)]) * rnd.randrange(1, 6000)
                await cm.write(h, off, data)
                old = model[name]
                new = bytearray(old.ljust(off, b"\0"))
                new[off : off + len(data)] = data
                if rnd.random() < 0.3:  # a second write before the close
                    await cm.write(h, 0, b"Z")
                    new[0:1] = b"Z"
                await cm.flush(h)
                await cm.release(h)
                model[name] = bytes(new)
            elif op == "trunc" and name in model:
                v = await cm.lookup(root, name)
                size = rnd.randrange(0, 12000)
                await cm.setattr(v, size=size)
                model[name] = model[name][:size].ljust(size, b"\0")
            elif op == "read":
                if name in model:
                    v = await cm.lookup(root, name)
                    h = await cm.open(v)
                    got = await cm.read(h, 0, 1 << 20)
                    await cm.release(h)
                    assert got == model[name], (seed, name)
                else:
                    with pytest.raises(RpcError):
                        await cm.lookup(root, name)
            elif op == "stat" and name in model:
                v = await cm.lookup(root, name)
                assert (await cm.getattr(v)).size == len(model[name])
            elif op == "ls":
                assert [e.name for e in await cm.readdir(root)] == sorted(model)
            elif op == "expire":
                await trio.sleep(fake.cb_expires + 1)
            elif op == "init":
                await fake.init_state(fake.clients[cm.uuid])
            elif op == "vbreak":
                await fake.break_fids([Fid(VOL, 0, 0)])
        for name, data in model.items():
            node = fake.nodes[fake.nodes[ROOT].entries[name]]
            assert bytes(node.data) == data
        await stack.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("seed", range(int(os.environ.get("CM_SEEDS", "12"))))
async def test_random_two_client_coherence(tmp_path, autojump_clock, seed):
    await run_ops(tmp_path, seed)


async def run_concurrent(tmp_path, seed: int, n_ops: int = 40) -> None:
    """Three tasks per client race; once all are done (long before any
    promise expires), both clients must agree with the server exactly."""
    rnd = random.Random(seed)
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        net = Network(nursery)
        fake = net.add(FakeServer())
        fake.cb_expires = 100_000  # staleness must not hide behind expiry
        cms = [
            await stack.enter_async_context(make_cm(net, tmp_path / str(seed), name))
            for name in ("a", "b")
        ]
        roots = [await cm.mount_volume("test", "root.cell") for cm in cms]

        async def worker(i: int, wseed: int) -> None:
            r = random.Random(wseed)
            cm, root = cms[i], roots[i]
            for _ in range(n_ops):
                await trio.sleep(r.random() * 0.05)
                name = r.choice(NAMES)
                op = r.choice(["create", "unlink", "write", "read", "ls", "stat", "trunc"])
                try:
                    if op == "create":
                        await cm.create(root, name, 0o644)
                    elif op == "unlink":
                        await cm.unlink(root, name)
                    elif op == "ls":
                        await cm.readdir(root)
                    else:
                        v = await cm.lookup(root, name)
                        if op == "stat":
                            await cm.getattr(v)
                        elif op == "trunc":
                            await cm.setattr(v, size=r.randrange(0, 9000))
                        else:
                            h = await cm.open(v, flags=2 if op == "write" else 0)
                            try:
                                if op == "write":
                                    data = bytes([r.randrange(256)]) * r.randrange(1, 5000)
                                    await cm.write(h, r.randrange(0, 9000), data)
                                    await cm.flush(h)
                                else:
                                    await cm.read(h, 0, 1 << 20)
                            finally:
                                await cm.release(h)
                except RpcError as exc:
                    assert exc.code in ("ENOENT", "EEXIST", "ESTALE"), exc

        async with trio.open_nursery() as workers:
            for i in range(2):
                for _ in range(3):
                    workers.start_soon(worker, i, rnd.randrange(1 << 30))
        names = sorted(fake.nodes[ROOT].entries)
        for cm, root in zip(cms, roots, strict=True):
            assert [e.name for e in await cm.readdir(root)] == names, seed
            for name in names:
                node = fake.nodes[fake.nodes[ROOT].entries[name]]
                v = await cm.lookup(root, name)
                assert (await cm.getattr(v)).size == len(node.data), (seed, name)
                h = await cm.open(v)
                assert await cm.read(h, 0, 1 << 20) == bytes(node.data), (seed, name)
                await cm.release(h)
        await stack.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("seed", range(int(os.environ.get("CM_SEEDS", "12"))))
async def test_random_concurrent_clients_converge(tmp_path, autojump_clock, seed):
    await run_concurrent(tmp_path, seed)

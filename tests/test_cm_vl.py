"""The VL client keeps one connection per VL server and reuses it."""

from __future__ import annotations

import errno

import pytest
import trio
from test_cm_fakeserver import VOL, FakeServer, Network, make_cm

from afsfuse.cells import Cell, CellDB
from protocol.errors import RpcError


def _vl_cell() -> CellDB:
    # VL answered at "vl1", the fileserver itself at "fs1": connections to
    # each can be counted apart.
    return CellDB({"test": Cell("test", (("vl1", 7000),))}, "test")


class _Counting:
    """Wraps a network's connector and records each host it connects to."""

    def __init__(self, net: Network) -> None:
        self.connect = net.connector
        self.opened: list[str] = []
        net.connector = self  # type: ignore[method-assign]

    async def __call__(self, host: str, port: int) -> trio.abc.Stream:
        self.opened.append(host)
        return await self.connect(host, port)


async def test_two_vl_queries_share_one_connection_and_a_lost_one_is_replaced(
    tmp_path, autojump_clock
):
    async with trio.open_nursery() as nursery:
        net = Network(nursery)
        fake = net.add(FakeServer(volumes={VOL: "root.cell", VOL + 1: "other"}))
        net.servers["vl1"] = fake
        counting = _Counting(net)
        async with make_cm(net, tmp_path, cells=_vl_cell()) as cm:
            await cm.mount_volume("test", "root.cell")
            await cm.mount_volume("test", "other")
            with pytest.raises(RpcError) as e:
                await cm.mount_volume("test", "novolume")  # an error reply keeps it too
            assert e.value.errno == errno.ENOENT
            assert fake.calls["VL.GetEntryByName"] == 3
            assert counting.opened.count("vl1") == 1
            # The server side goes away (idle bound, restart): the next query
            # notices, reconnects once and still gets its answer.
            await net.drop_all()
            await trio.sleep(0.1)
            await cm.mount_volume("test", str(VOL + 1))
            assert fake.calls["VL.GetEntryById"] == 1
            assert counting.opened.count("vl1") == 2
        nursery.cancel_scope.cancel()


async def test_vl_falls_over_to_the_next_server(tmp_path, autojump_clock):
    async with trio.open_nursery() as nursery:
        net = Network(nursery)
        fake = net.add(FakeServer())
        net.servers["vl2"] = fake
        net.down.add("vl1")
        cells = CellDB({"test": Cell("test", (("vl1", 7000), ("vl2", 7000)))}, "test")
        async with make_cm(net, tmp_path, cells=cells) as cm:
            root = await cm.mount_volume("test", "root.cell")
            assert root.fid.volume == VOL
        nursery.cancel_scope.cancel()

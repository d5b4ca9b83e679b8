"""The server probes a client it has not heard from before trusting its
promises (issue 14 item 8): CB.ProbeUuid gets a caller.

In-process server on 127.0.0.1 with protocol clients: one answers probes,
one hangs in them (alive on TCP, stuck), one answers with the wrong UUID.
"""

from __future__ import annotations

from typing import Any

import trio

from afsfuse.lab.server import FsTestClient, fs_client, running_server, wait_until
from protocol.connection import Connection


class Counting(FsTestClient):
    def __init__(self, *, answer: str = "right") -> None:
        super().__init__()
        self.answer = answer
        self.probes = 0

    async def _cb_probe_uuid(self, conn: Connection, uuid: str) -> bool:
        self.probes += 1
        if self.answer == "hang":
            await trio.sleep_forever()
        return uuid == self.uuid if self.answer == "right" else False


async def test_silent_clients_are_probed_and_the_dead_marked_down(tmp_path):
    async with running_server(tmp_path / "fs", probe_after=1.0, break_timeout=0.5) as srv:
        good, stuck, liar = Counting(), Counting(answer="hang"), Counting(answer="wrong")
        async with (
            fs_client(srv.host, srv.port, client=good) as g,
            fs_client(srv.host, srv.port, client=stuck) as s,
            fs_client(srv.host, srv.port, client=liar) as w,
        ):
            root = await g.root_fid()
            f = (await g.call("FS.CreateFile", None, root, b"f", 0o644))["fid"]
            for c in (s, w):
                await c.call("FS.FetchStatus", None, f)  # each holds a promise
            states = srv.breaker.clients
            await wait_until(lambda: good.probes >= 1 and stuck.probes >= 1 and liar.probes >= 1)
            # The stuck and the lying client are down; their connections closed.
            await wait_until(lambda: states[stuck.uuid].down and states[liar.uuid].down)
            assert states[stuck.uuid].conn is None and states[liar.uuid].conn is None
            assert not states[good.uuid].down
            # A change now does not wait on them: their breaks are delayed.
            await g.call("FS.StoreData", None, f, 0, b"x", None, None)
            assert f_in(states[stuck.uuid].delayed, f) and f_in(states[liar.uuid].delayed, f)
            # The good one keeps answering and stays up.
            n = good.probes
            await wait_until(lambda: good.probes > n)
            assert not states[good.uuid].down


async def test_probing_off_and_busy_clients_are_not_probed(tmp_path):
    async with running_server(tmp_path / "fs", probe_after=0.0) as srv:
        quiet = Counting()
        async with fs_client(srv.host, srv.port, client=quiet):
            await trio.sleep(1.5)
        assert quiet.probes == 0
    async with running_server(tmp_path / "fs2", probe_after=1.0) as srv:
        busy = Counting()
        async with fs_client(srv.host, srv.port, client=busy) as b:
            root = await b.root_fid()
            with trio.move_on_after(2.5):
                while True:  # heard from every 0.1 s: nothing to probe
                    await b.call("FS.FetchStatus", None, root)
                    await trio.sleep(0.1)
        assert busy.probes == 0


def f_in(fids: Any, f: list[int]) -> bool:
    return any(list(x.to_wire()) == list(f) for x in fids)

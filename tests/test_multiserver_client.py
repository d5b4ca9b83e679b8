"""The client with several fileservers (fake servers on memory streams, mock
clock): a volume reached through mount points on another server is one use,
released when the kernel forgot its root and nothing crossed into it for the
idle lifetime, so that server's record becomes idle, is destroyed after the
idle lifetime and sends GiveUpAllCallBacks once (P2); and a server answering
"moved" (EREMCHG) sends the client to VL and the call to the new server,
writes included."""

from __future__ import annotations

import trio
from test_cm_fakeserver import ROOT, VOL, FakeServer, Network, make_cm

from protocol.errors import MOVED, RpcError
from protocol.records import Fid

VOL2 = VOL + 1


async def test_crossed_volume_released_when_root_forgotten(tmp_path, autojump_clock):
    async with trio.open_nursery() as nursery:
        net = Network(nursery)
        fs1 = net.add(FakeServer(volumes={VOL: "root.cell", VOL2: "other"}))
        fs2 = net.add(FakeServer(uuid="22222222-2222-2222-2222-222222222222",
                                 volumes={VOL2: "other"}, addr=("fs2", 7000)))  # fmt: skip
        fs1.vl_moved[VOL2] = (fs2.uuid, fs2.addr)  # the cell's VL: "other" lives on fs2
        f_node = fs2.add(Fid(VOL2, 1, 1), b"f", data=b"on fs2")
        async with make_cm(net, tmp_path, idle_record_lifetime=60) as cm:
            root = await cm.mount_volume("test", "root.cell")
            rec1 = root.volume.server
            roots = [await cm.mount_volume("test", "other", crossing=True) for _ in range(5)]
            o = roots[0]
            assert all(r is o for r in roots)  # one instance, looked up once
            rec2 = o.volume.server
            assert rec2.uuid == fs2.uuid and rec2 is not rec1
            f = await cm.lookup(o, b"f")
            assert f.fid == f_node.fid
            h = await cm.open(f)
            assert await cm.read(h, 0, 100) == b"on fs2"
            # While a file is open the root cannot have been forgotten, but
            # even if it were, the instance stays.
            cm.forget(o)
            await trio.sleep(120)
            assert cm.volumes.get(o.volume.key) is o.volume and rec2.interests
            await cm.release(h)
            # The kernel forgets the file, then the root it hangs under; a
            # crossing soon after finds the same instance (its cache kept).
            cm.forget(f)
            cm.forget(o)
            await trio.sleep(30)
            o = await cm.mount_volume("test", "other", crossing=True)
            assert o.volume is roots[0].volume
            cm.forget(o)
            await trio.sleep(30)  # unused, not yet for long enough
            assert cm.volumes.get(o.volume.key) is o.volume and rec2.interests
            await trio.sleep(60)  # released: the record is idle from now on
            assert o.volume.key not in cm.volumes and not rec2.interests
            assert not rec2.destroyed and not fs2.give_ups
            await trio.sleep(90)
            assert rec2.destroyed and fs2.give_ups[cm.uuid] == 1
            assert not rec1.destroyed and not fs1.give_ups  # root.cell stays mounted
            # Crossing again finds it anew, on a new record for fs2.
            again = await cm.mount_volume("test", "other", crossing=True)
            assert again.volume.server is not rec2 and again.volume.server.uuid == fs2.uuid
            assert (await cm.lookup(again, b"f")).fid == f_node.fid
        assert fs2.give_ups[cm.uuid] == 2  # the new record, destroyed at close
        nursery.cancel_scope.cancel()


async def test_moved_answer_sends_calls_to_the_new_server(tmp_path, autojump_clock):
    async with trio.open_nursery() as nursery:
        net = Network(nursery)
        old = net.add(FakeServer())
        new = net.add(FakeServer(uuid="33333333-3333-3333-3333-333333333333", addr=("fs2", 7000)))
        n = old.add(ROOT, b"f", data=b"old bytes")
        async with make_cm(net, tmp_path) as cm:
            root = await cm.mount_volume("test", "root.cell")
            f = await cm.lookup(root, b"f")
            rec_old = root.volume.server
            h = await cm.open(f, flags=2)
            await cm.write(h, 0, b"new bytes, written across the move")
            v_break = root.volume.cb_v_break
            # The volume moves; this client missed the whole-volume break, so
            # its next call goes to the old server, which answers "moved".
            new.nodes = dict(old.nodes)
            new.next_vnode = old.next_vnode

            def moved(fid_wire):
                raise RpcError(MOVED, "volume moved")

            old.node = moved
            old.vl_moved[VOL] = (new.uuid, new.addr)
            await cm.release(h)  # the store lands on the new server
            assert bytes(n.data) == b"new bytes, written across the move"
            assert new.calls["FS.StoreData"] == 1 and old.calls["FS.StoreData"] == 1
            assert root.volume.server.uuid == new.uuid and not rec_old.interests
            assert root.volume.cb_v_break == v_break + 1  # a whole-volume break
            assert new.uuid in {r.uuid for r in cm.servers.values()}
            # Breaks from the new server reach the instance (P3 across servers).
            await new.break_fids([f.fid])
            assert f.promise is None
            st = await cm.getattr(f)
            assert st.size == len(n.data) and new.calls["FS.FetchStatus"] >= 1
        nursery.cancel_scope.cancel()

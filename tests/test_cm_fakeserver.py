"""A small in-memory fileserver for cache-manager tests, plus its own checks.

``Network`` routes the cache manager's connector to ``FakeServer`` objects
over ``trio.testing.memory_stream_pair`` (no sockets, so ``autojump_clock``
works).  The fake keeps vnodes in dicts, grants promises, breaks other
clients' promises on changes (before replying), and can hold a method's reply
at a gate so a test can interleave breaks with calls in flight.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.testing

from afsfuse.cache_manager import CacheConfig, CacheManager
from afsfuse.cells import Cell, CellDB
from protocol.connection import Connection
from protocol.errors import RpcError
from protocol.records import CallBack, Fid, FileStatus, FileType

VOL = 536870912
ROOT = Fid(VOL, 1, 1)


@dataclass
class Node:
    fid: Fid
    type: FileType
    mode: int = 0o644
    dv: int = 1
    data: bytearray = field(default_factory=bytearray)
    entries: dict[bytes, Fid] = field(default_factory=dict)
    parent: Fid = ROOT
    nlink: int = 1

    def status(self) -> list[int]:
        size = len(self.data) if self.type != FileType.DIRECTORY else 2048
        return FileStatus(self.type, self.mode, self.nlink, size, self.dv, 0, 0, 0, 0,
                          self.parent.vnode, self.parent.unique, 7).to_wire()  # fmt: skip


class Gate:
    """Hold replies of one method: ``entered`` is set when a call waits."""

    def __init__(self) -> None:
        self.entered = trio.Event()
        self.release = trio.Event()


class FakeServer:
    def __init__(self, uuid: str = "11111111-1111-1111-1111-111111111111",
                 cell: str = "test", volumes: dict[int, str] | None = None,
                 addr: tuple[str, int] = ("fs1", 7000)) -> None:  # fmt: skip
        self.uuid = uuid
        self.epoch = 1
        self.cell = cell
        self.addr = addr
        self.volumes = volumes or {VOL: "root.cell"}
        self.nodes: dict[Fid, Node] = {}
        for vid in self.volumes:
            root = Fid(vid, 1, 1)
            self.nodes[root] = Node(root, FileType.DIRECTORY, 0o755, parent=root)
        self.next_vnode = itertools.count(2)
        self.calls: Counter[str] = Counter()
        self.clients: dict[str, Connection] = {}
        self.gates: dict[str, Gate] = {}
        self.cb_expires = 60
        self.init_on_hello = True
        self.give_ups: Counter[str] = Counter()
        self.vl_moved: dict[int, tuple[str, tuple[str, int]]] = {}  # VL: vid -> elsewhere
        self.page_size = 1000  # ReadDir entries per page at most
        # method -> async hook(conn, *params) run after the reply is computed
        self.hooks: dict[str, Any] = {}

    def handlers(self) -> dict[str, Any]:
        h: dict[str, Any] = {}
        for name in dir(self):
            if name.startswith(("FS_", "VL_")):
                method = name.replace("_", ".", 1)
                h[method] = self._wrap(method, getattr(self, name))
        return h

    def _wrap(self, method: str, fn: Any) -> Any:
        async def handler(conn: Connection, *params: Any) -> Any:
            self.calls[method] += 1
            result = await fn(conn, *params)
            hook = self.hooks.get(method)
            if hook is not None:
                await hook(conn, *params)
            gate = self.gates.get(method)
            if gate is not None:
                gate.entered.set()
                await gate.release.wait()
            return result

        return handler

    def gate(self, method: str) -> Gate:
        g = self.gates[method] = Gate()
        return g

    # -- helpers ------------------------------------------------------------

    def cb(self) -> list[int]:
        return CallBack(1, self.cb_expires).to_wire()

    def node(self, fid_wire: Any) -> Node:
        n = self.nodes.get(Fid.from_wire(fid_wire))
        if n is None:
            raise RpcError("ENOENT", "no such vnode")
        return n

    def add(self, parent: Fid, name: bytes, ftype: FileType = FileType.FILE,
            data: bytes = b"") -> Node:  # fmt: skip
        fid = Fid(parent.volume, next(self.next_vnode), 1)
        n = Node(fid, ftype, 0o755 if ftype == FileType.DIRECTORY else 0o644,
                 data=bytearray(data), parent=parent)  # fmt: skip
        self.nodes[fid] = n
        p = self.nodes[parent]
        p.entries[name] = fid
        p.dv += 1
        return n

    async def break_fids(self, fids: list[Fid], *, except_conn: Connection | None = None) -> None:
        for conn in list(self.clients.values()):
            if conn is except_conn or conn.closed:
                continue
            try:
                await conn.call("CB.CallBack", [f.to_wire() for f in fids], timeout=2)
            except RpcError:
                pass

    async def init_state(self, conn: Connection) -> None:
        await conn.call("CB.InitCallBackState3", self.uuid, timeout=2)

    def vsync(self) -> list[int]:
        return [1, 0]

    # -- FS ---------------------------------------------------------------------

    async def FS_Hello(self, conn: Connection, hello: dict[str, Any]) -> dict[str, Any]:
        old = self.clients.get(hello["uuid"])
        self.clients[hello["uuid"]] = conn
        conn.context["client"] = hello["uuid"]
        if self.init_on_hello:
            await self.init_state(conn)
        if old is not None and old is not conn:
            await old.aclose()
        return {"uuid": self.uuid, "epoch": self.epoch, "cell": self.cell, "version": 1,
                "capabilities": []}  # fmt: skip

    async def FS_FetchStatus(self, conn: Connection, cred: Any, fid: Any) -> dict[str, Any]:
        n = self.node(fid)
        return {"status": n.status(), "callback": self.cb(), "volsync": self.vsync()}

    async def FS_FetchData(self, conn, cred, fid, offset, length) -> dict[str, Any]:
        n = self.node(fid)
        return {"status": n.status(), "callback": self.cb(), "volsync": self.vsync(),
                "data": bytes(n.data[offset : offset + length])}  # fmt: skip

    async def FS_StoreData(self, conn, cred, fid, offset, data, new_length, mtime) -> Any:
        n = self.node(fid)
        if len(n.data) < offset:
            n.data.extend(bytes(offset - len(n.data)))
        n.data[offset : offset + len(data)] = data
        if new_length is not None:
            del n.data[new_length:]
            n.data.extend(bytes(new_length - len(n.data)))
        n.dv += 1
        await self.break_fids([n.fid], except_conn=conn)
        return {"status": n.status(), "volsync": self.vsync()}

    async def FS_StoreStatus(self, conn, cred, fid, attrs) -> Any:
        n = self.node(fid)
        if "mode" in attrs:
            n.mode = attrs["mode"]
        if "size" in attrs:
            size = attrs["size"]
            del n.data[size:]
            n.data.extend(bytes(size - len(n.data)))
            n.dv += 1
        await self.break_fids([n.fid], except_conn=conn)
        return {"status": n.status(), "volsync": self.vsync()}

    async def _create(self, conn, dir_fid, name, ftype, data=b"") -> Any:
        d = self.node(dir_fid)
        if name in d.entries:
            raise RpcError("EEXIST")
        n = self.add(d.fid, name, ftype, data)
        await self.break_fids([d.fid], except_conn=conn)
        return {"fid": n.fid.to_wire(), "status": n.status(), "callback": self.cb(),
                "dir_status": d.status(), "dir_callback": self.cb(),
                "volsync": self.vsync()}  # fmt: skip

    async def FS_CreateFile(self, conn, cred, dir_fid, name, mode) -> Any:
        return await self._create(conn, dir_fid, name, FileType.FILE)

    async def FS_MakeDir(self, conn, cred, dir_fid, name, mode) -> Any:
        return await self._create(conn, dir_fid, name, FileType.DIRECTORY)

    async def FS_Symlink(self, conn, cred, dir_fid, name, target, mode) -> Any:
        return await self._create(conn, dir_fid, name, FileType.SYMLINK, target)

    async def FS_Link(self, conn, cred, dir_fid, name, fid) -> Any:
        d, n = self.node(dir_fid), self.node(fid)
        if name in d.entries:
            raise RpcError("EEXIST")
        d.entries[name] = n.fid
        d.dv += 1
        n.nlink += 1
        await self.break_fids([d.fid, n.fid], except_conn=conn)
        return {"status": n.status(), "dir_status": d.status(), "dir_callback": self.cb(),
                "volsync": self.vsync()}  # fmt: skip

    async def FS_RemoveFile(self, conn, cred, dir_fid, name) -> Any:
        d = self.node(dir_fid)
        fid = d.entries.pop(name, None)
        if fid is None:
            raise RpcError("ENOENT")
        n = self.nodes.pop(fid)
        n.nlink = 0
        d.dv += 1
        await self.break_fids([d.fid, fid], except_conn=conn)
        return {"fid": fid.to_wire(), "status": n.status(), "dir_status": d.status(),
                "dir_callback": self.cb(), "volsync": self.vsync()}  # fmt: skip

    async def FS_Rename(self, conn, cred, old_dir, old_name, new_dir, new_name, flags) -> Any:
        od, nd = self.node(old_dir), self.node(new_dir)
        fid = od.entries.pop(old_name)
        replaced = nd.entries.get(new_name)
        nd.entries[new_name] = fid
        od.dv += 1
        if nd is not od:
            nd.dv += 1
        rn = self.nodes.pop(replaced) if replaced is not None else None
        if rn is not None:
            rn.nlink = 0
        await self.break_fids([od.fid, nd.fid], except_conn=conn)
        return {"fid": fid.to_wire(), "status": self.nodes[fid].status(),
                "old_dir_status": od.status(), "new_dir_status": nd.status(),
                "replaced_fid": replaced.to_wire() if replaced else None,
                "replaced_status": rn.status() if rn else None,
                "volsync": self.vsync()}  # fmt: skip

    async def FS_Lookup(self, conn, cred, dir_fid, name) -> Any:
        d = self.node(dir_fid)
        fid = d.entries.get(name)
        if fid is None:
            raise RpcError("ENOENT")
        n = self.nodes[fid]
        return {"fid": fid.to_wire(), "status": n.status(), "callback": self.cb(),
                "dir_status": d.status(), "dir_callback": self.cb(),
                "volsync": self.vsync()}  # fmt: skip

    async def FS_ReadDir(self, conn, cred, dir_fid, cookie, max_entries, with_status) -> Any:
        d = self.node(dir_fid)
        names = sorted(n for n in d.entries if cookie is None or n > cookie)
        max_entries = min(max_entries, self.page_size)
        page = names[:max_entries]
        entries = []
        for name in page:
            n = self.nodes[d.entries[name]]
            e = [name, n.fid.to_wire(), int(n.type)]
            if with_status:
                e += [n.status(), self.cb()]
            entries.append(e)
        nxt = page[-1] if len(names) > max_entries else None
        return {"entries": entries, "next": nxt, "dir_status": d.status(),
                "dir_callback": self.cb(), "volsync": self.vsync()}  # fmt: skip

    async def FS_InlineBulkStatus(self, conn, cred, fids) -> Any:
        results = []
        for f in fids:
            n = self.nodes.get(Fid.from_wire(f))
            if n is None:
                results.append([["ENOENT", "gone"], None, None])
            else:
                results.append([None, n.status(), self.cb()])
        return {"results": results, "volsync": self.vsync()}

    async def FS_GetVolumeStatus(self, conn, cred, volume_id) -> Any:
        return {"volume_id": volume_id, "name": self.volumes[volume_id], "online": True,
                "bytes_used": 0, "quota_bytes": 0, "files": len(self.nodes),
                "block_size": 4096}  # fmt: skip

    async def FS_GiveUpAllCallBacks(self, conn) -> None:
        self.give_ups[conn.context.get("client", "?")] += 1

    # -- VL ---------------------------------------------------------------------

    def _entry(self, vid: int) -> dict[str, Any]:
        uuid, addr = self.vl_moved.get(vid, (self.uuid, self.addr))
        return {"volume_id": vid, "name": self.volumes[vid], "type": "rw", "cell": self.cell,
                "servers": [{"uuid": uuid, "addrs": [list(addr)]}]}  # fmt: skip

    async def VL_GetEntryByName(self, conn, name) -> Any:
        for vid, vname in self.volumes.items():
            if vname == name:
                return self._entry(vid)
        raise RpcError("ENOENT")

    async def VL_GetEntryById(self, conn, vid) -> Any:
        if vid not in self.volumes:
            raise RpcError("ENOENT")
        return self._entry(vid)


class Network:
    """Routes (host, port) to fake servers over memory streams."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.servers: dict[str, FakeServer] = {}
        self.down: set[str] = set()
        self.server_conns: list[Connection] = []

    def add(self, fake: FakeServer) -> FakeServer:
        self.servers[fake.addr[0]] = fake
        return fake

    async def connector(self, host: str, port: int) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        fake = self.servers.get(host)
        if fake is None or host in self.down:
            raise OSError(111, f"connection refused by {host}")
        client, server = trio.testing.memory_stream_pair()
        conn = Connection(server, fake.handlers(), name=f"srv-{host}")
        self.server_conns.append(conn)
        self.nursery.start_soon(conn.run)
        return client

    async def drop_all(self) -> None:
        """Cut every connection (the client reconnects)."""
        for conn in self.server_conns:
            await conn.aclose()
        self.server_conns = []


def make_cm(net: Network, tmp_path: Any, name: str = "a", cells: CellDB | None = None,
            **kw: Any) -> CacheManager:  # fmt: skip
    cells = cells or CellDB({"test": Cell("test", (("fs1", 7000),))}, "test")
    kw.setdefault("rpc_timeout", 5.0)
    kw.setdefault("connect_timeout", 2.0)
    kw.setdefault("chunk_size", 4096)
    # trio's virtual clock jumps ahead while every task waits for a thread:
    # chunk I/O stays inline here (the real-server tests run it on threads).
    kw.setdefault("chunk_threads", False)
    cfg = CacheConfig(cells=cells, cache_dir=tmp_path / name, connector=net.connector, **kw)
    return CacheManager(cfg)


@asynccontextmanager
async def running(tmp_path: Any, fake: FakeServer | None = None, **kw: Any) -> AsyncIterator[Any]:
    """A network with one fake server and a started cache manager on it."""
    async with trio.open_nursery() as nursery:
        net = Network(nursery)
        fake = net.add(fake or FakeServer())
        cm = make_cm(net, tmp_path, **kw)
        async with cm:
            yield net, fake, cm
        nursery.cancel_scope.cancel()


async def until(pred: Any, timeout: float = 30.0) -> None:
    """Poll ``pred`` (state owned by other tasks, no event to wait on)."""
    with trio.fail_after(timeout):
        while not pred():  # noqa: ASYNC110
            await trio.sleep(0.05)


# -- checks of the fake itself ------------------------------------------------------


async def test_fake_server_mount_and_getattr(tmp_path):
    async with trio.open_nursery() as nursery:
        net = Network(nursery)
        fake = net.add(FakeServer())
        async with make_cm(net, tmp_path) as cm:
            root = await cm.mount_volume("test", "root.cell")
            st = await cm.getattr(root)
            assert st.type == FileType.DIRECTORY
            assert fake.calls["FS.Hello"] == 1
            assert fake.calls["FS.FetchStatus"] == 1
        nursery.cancel_scope.cancel()

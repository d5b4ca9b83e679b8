"""A change that fails after it changed something still breaks promises
before the error reply (issue 14 item 7, the store part).

In-process server with protocol clients: ``holder`` holds a promise on the
file; ``writer``'s store fails (its bytes landed, then the metadata commit
failed, so the DV moved; or it was over quota after setuid was cleared).
"""

from __future__ import annotations

from typing import Any

import pytest

from afsfuse.lab.server import server_and_two_clients
from fileserver.fsops import SMALL_STORE
from fileserver.volume import Volume
from protocol.errors import RpcError
from protocol.records import Fid


def cred(uid: int) -> list[Any]:
    return [uid, uid, []]


async def test_store_failing_after_its_bytes_landed_breaks_first(tmp_path, monkeypatch):
    async with server_and_two_clients(tmp_path / "fs") as (_srv, writer, holder):
        root = await writer.root_fid()
        f = (await writer.call("FS.CreateFile", None, root, b"f", 0o644))["fid"]
        await writer.call("FS.StoreData", None, f, 0, b"old", None, None)
        dv = (await holder.call("FS.FetchStatus", None, f))["status"][4]
        real_finish = Volume.store_finish

        def landed_then_failed(self: Volume, *args: Any) -> Any:
            # The bytes are in the data file (store_write ran); the metadata
            # commit never happens.
            raise OSError(5, "injected: the metadata commit fails")

        monkeypatch.setattr(Volume, "store_finish", landed_then_failed)
        with pytest.raises(RpcError):
            # Larger than a redo-record store: bytes first, then the commit.
            await writer.call("FS.StoreData", None, f, 0, b"n" * (SMALL_STORE + 1), None, None)
        monkeypatch.setattr(Volume, "store_finish", real_finish)
        # The error reply came after the holder heard: its promise is gone.
        assert Fid.from_wire(f) in holder.breaks
        assert (await holder.call("FS.FetchStatus", None, f))["status"][4] > dv


async def test_store_over_quota_after_setuid_cleared_breaks(tmp_path):
    async with server_and_two_clients(tmp_path / "fs") as (srv, writer, holder):
        root = await writer.root_fid()
        f = (await writer.call("FS.CreateFile", cred(1001), root, b"f", 0o644))["fid"]
        await writer.call("FS.StoreStatus", cred(1001), f, {"mode": 0o4777})
        await holder.call("FS.FetchStatus", None, f)
        h = next(iter(srv.store.by_id.values()))
        await h.run(h.vol.set_quota, 10)
        with pytest.raises(RpcError) as ei:
            await writer.call("FS.StoreData", cred(1002), f, 0, b"x" * 100, None, None)
        assert ei.value.code == "EDQUOT"
        assert Fid.from_wire(f) in holder.breaks
        assert (await holder.call("FS.FetchStatus", None, f))["status"][1] == 0o777


async def test_store_refused_before_any_change_breaks_nobody(tmp_path):
    async with server_and_two_clients(tmp_path / "fs") as (srv, writer, holder):
        root = await writer.root_fid()
        f = (await writer.call("FS.CreateFile", None, root, b"f", 0o644))["fid"]
        await holder.call("FS.FetchStatus", None, f)
        h = next(iter(srv.store.by_id.values()))
        await h.run(h.vol.set_quota, 10)
        with pytest.raises(RpcError):
            await writer.call("FS.StoreData", None, f, 0, b"x" * 100, None, None)
        assert Fid.from_wire(f) not in holder.breaks


async def test_truncate_failing_after_its_commit_is_acknowledged(tmp_path, monkeypatch):
    async with server_and_two_clients(tmp_path / "fs") as (_srv, writer, holder):
        root = await writer.root_fid()
        f = (await writer.call("FS.CreateFile", None, root, b"f", 0o644))["fid"]
        await writer.call("FS.StoreData", None, f, 0, b"0123456789", None, None)
        await holder.call("FS.FetchStatus", None, f)

        def data_file_fails(self: Volume, *args: Any) -> None:
            raise OSError(5, "injected: the data file cannot be cut")

        # The truncation's data-file step runs after its commit: the change
        # is committed, so it is acknowledged and broken to the holder; its
        # redo record replays before the file is read again.
        monkeypatch.setattr(Volume, "_truncate", data_file_fails)
        r = await writer.call("FS.StoreStatus", None, f, {"size": 3})
        monkeypatch.undo()
        assert r["status"][3] == 3
        assert Fid.from_wire(f) in holder.breaks
        assert (await holder.call("FS.FetchStatus", None, f))["status"][3] == 3
        assert (await holder.call("FS.FetchData", None, f, 0, 100))["data"] == b"012"

"""Moving a volume to another fileserver of the cell (``vol move``).

The source server (``Admin.VolMove``) drives it over a cell-key
authenticated connection to the target, which runs ``Vol.Move*``:

1. ``Vol.MoveBegin``: the target prepares ``volumes/<id>.creating`` (a
   name an interrupted move leaves for the next start to clean up).
2. A consistent snapshot, taken under the volume lock in a moment (the
   SQLite database through the backup API, and the list of data files
   with their DV and size), is sent while the volume keeps serving; data
   files are read live, so a file changed meanwhile is sent again: in
   further rounds while serving, as long as fewer files changed each
   round (at most ``CATCH_UP_ROUNDS``), then
3. under the volume lock, held to the end (calls wait, none fails): a new
   snapshot; the files whose DV or size changed since they were sent, the
   files gone, and the database are sent; ``Vol.MoveCommit`` makes the
   target open the volume; the VLDB entry is switched to the target; the
   volume leaves the source's store and is recorded as moved.  If the
   switch fails, ``Vol.MoveAbort`` drops the target's copy and the source
   goes on serving.
4. The lock is released: every call for the volume, including those that
   waited, gets ``EREMCHG`` ("moved"; SPEC section 7) and the client asks
   VL again.  A whole-volume break tells clients holding promises from the
   source.  Every byte acknowledged before step 3 is in the copy.

``MovedVolumes`` remembers moved volume ids (``moved.json`` in the data
dir, so a restarted source still answers "moved").

May import: fileserver.store, fileserver.volume, fileserver.vldb, protocol, trio.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from fileserver.store import VolumeHandle, write_atomic
from fileserver.volume import Volume, fsync_dir
from protocol.auth import client_handshake
from protocol.connection import Connection, open_connection
from protocol.errors import MOVED, RpcError
from protocol.limits import MAX_IO, MAX_UINT32
from protocol.records import FileType

if TYPE_CHECKING:
    from fileserver.server import FileServer

log = logging.getLogger(__name__)

MOVED_FILE = "moved.json"
VOL_MOVE_BEGIN = "Vol.MoveBegin"
VOL_MOVE_PUT = "Vol.MovePut"
VOL_MOVE_DELETE = "Vol.MoveDelete"
VOL_MOVE_COMMIT = "Vol.MoveCommit"
VOL_MOVE_ABORT = "Vol.MoveAbort"
_PATH = re.compile(r"^(volume\.db|data/[0-9]{1,10}\.[0-9]{1,10})$")

Files = dict[str, tuple[int, int]]  # "data/V.U" -> (dv, size)
#: Rounds sent while the volume keeps serving, and the number of changed
#: files at which the final (volume-holding) round starts at once.
CATCH_UP_ROUNDS = 4
FINAL_ROUND_FILES = 16


def _vid(v: Any) -> int:
    if type(v) is not int or not 0 < v <= MAX_UINT32:
        raise RpcError("EINVAL", "volume_id must be a uint32")
    return v


def volumes_named(params: tuple[Any, ...]) -> list[int]:
    """Volume ids an ``FS.*`` call names (its second param: a fid, a list of
    fids or a volume id)."""
    if len(params) < 2:
        return []
    p = params[1]
    if type(p) is int:
        return [p]
    if isinstance(p, list) and len(p) == 3 and all(type(x) is int for x in p):
        return [p[0]]
    if isinstance(p, list):
        return [f[0] for f in p if isinstance(f, list) and f and type(f[0]) is int]
    return []


class MovedVolumes:
    """Volume ids this server moved away, with where they went."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / MOVED_FILE
        self.moved: dict[int, dict[str, Any]] = {}
        try:
            self.moved = {int(k): v for k, v in json.loads(self.path.read_text()).items()}
        except FileNotFoundError:
            pass
        except ValueError:
            log.warning("%s unreadable; no volume is known as moved", self.path)

    def add(self, vid: int, uuid: str, addrs: list[Any]) -> None:
        self.moved[vid] = {"uuid": uuid, "addrs": addrs}
        write_atomic(self.path, json.dumps({str(k): v for k, v in self.moved.items()}).encode())

    def discard(self, vid: int) -> None:
        if self.moved.pop(vid, None) is not None:
            write_atomic(self.path, json.dumps({str(k): v for k, v in self.moved.items()}).encode())

    def check(self, params: tuple[Any, ...], held: Callable[[int], bool]) -> None:
        """EREMCHG when the call names a volume moved away (and not back)."""
        if not self.moved:
            return
        for vid in volumes_named(params):
            to = self.moved.get(vid)
            if to is not None and not held(vid):
                raise RpcError(MOVED, f"volume {vid} moved to server {to['uuid']}")


# -- blocking helpers (worker threads) ------------------------------------------


def snapshot(vol: Volume, dest: Path) -> Files:
    """The database copied to ``dest/volume.db`` and the data files it names.

    The caller holds the volume lock, so no change is half done."""
    vol._flush_applied_now()  # applied redo records go before the copy
    dest.mkdir(parents=True, exist_ok=True)
    db_copy = dest / "volume.db"
    db_copy.unlink(missing_ok=True)
    out = sqlite3.connect(str(db_copy))
    try:
        vol.db.backup(out)
    finally:
        out.close()
    rows = vol.db.execute(
        # Inline files' bytes travel in the database copy.
        "SELECT vnode, uniq, dv, size FROM vnodes WHERE type = ? "
        "AND vnode NOT IN (SELECT vnode FROM inline_data)",
        (int(FileType.FILE),),
    ).fetchall()
    return {f"data/{vn}.{uq}": (dv, size) for vn, uq, dv, size in rows}


def _read_chunk(path: Path, offset: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(MAX_IO)
    except FileNotFoundError:
        return b""


class Receiver:
    """The target side: ``Vol.Move*`` handlers."""

    def __init__(self, server: FileServer) -> None:
        self.server = server
        self.incoming: dict[int, Path] = {}
        #: Committed here, the source not yet switched over: an abort drops it.
        self.committed: dict[int, VolumeHandle] = {}

    def _staging(self, vid: int) -> Path:
        d = self.incoming.get(vid)
        if d is None:
            raise RpcError("EPROTO", f"no move of volume {vid} in progress")
        return d

    async def begin(
        self, conn: Connection, volume_id: Any, name: Any, source_uuid: Any
    ) -> dict[str, Any]:
        vid = _vid(volume_id)
        store = self.server.store
        if source_uuid == self.server.uuid:
            raise RpcError("EINVAL", "a volume cannot move to the server that holds it")
        if vid in store.by_id or (type(name) is str and name in store.by_name):
            raise RpcError("EEXIST", f"this server has volume {name} ({vid}) already")
        d = self.server.datadir.volumes_dir / f"{vid}.creating"

        def prep() -> None:
            shutil.rmtree(d, ignore_errors=True)
            (d / "data").mkdir(parents=True)

        await trio.to_thread.run_sync(prep)
        self.incoming[vid] = d
        self.committed.pop(vid, None)
        log.info("receiving volume %s (%d) from %s", name, vid, conn.name)
        return {"uuid": self.server.uuid, "addrs": self.server.advertised_addrs()}

    async def put(
        self, conn: Connection, volume_id: Any, path: Any, offset: Any, data: Any, size: Any
    ) -> None:
        d = self._staging(_vid(volume_id))
        if type(path) is not str or not _PATH.match(path):
            raise RpcError("EINVAL", f"bad path {path!r:.100}")
        if type(offset) is not int or type(size) is not int or not 0 <= offset <= size:
            raise RpcError("EINVAL", "offset and size must be ints, offset <= size")
        if size > self.server.config.max_file_size:
            raise RpcError("EFBIG", f"{size} bytes is over this server's file size limit")
        if not isinstance(data, bytes):
            raise RpcError("EINVAL", "data must be bin")

        def write() -> None:
            fd = os.open(d / path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.pwrite(fd, data, offset)
                os.ftruncate(fd, size)
            finally:
                os.close(fd)

        await trio.to_thread.run_sync(write)

    async def delete(self, conn: Connection, volume_id: Any, path: Any) -> None:
        d = self._staging(_vid(volume_id))
        if type(path) is not str or not _PATH.match(path):
            raise RpcError("EINVAL", f"bad path {path!r:.100}")
        (d / path).unlink(missing_ok=True)

    async def commit(self, conn: Connection, volume_id: Any) -> dict[str, Any]:
        vid = _vid(volume_id)
        d = self._staging(vid)
        final = self.server.datadir.volumes_dir / str(vid)

        def install() -> Volume:
            for p in (d / "data").iterdir():
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            fd = os.open(d / "volume.db", os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(d / "data")
            fsync_dir(d)
            os.rename(d, final)  # the volume appears whole or not at all
            fsync_dir(final.parent)
            store = self.server.store
            # recovery settles what the copy carried
            return Volume(final, sync=store.sync, stats=store.sync_stats,
                          inline_max=store.inline_max)  # fmt: skip

        vol = await trio.to_thread.run_sync(install)
        del self.incoming[vid]
        h = VolumeHandle(vol, self.server.store.activity)
        self.committed[vid] = h
        self.server.moved.discard(vid)  # moved back here
        self.server.vldb.volume_arrived(vid)
        self.server.store._add(h)
        self.server.store._signal_change()  # the VLDB registrar sees it
        log.info("received volume %s (%d)", vol.name, vid)
        return await h.run(vol.volume_status)

    async def abort(self, conn: Connection, volume_id: Any) -> None:
        """Forget a move: the staging copy, or the volume committed here if the
        source could not switch the VLDB (nobody was sent here for it)."""
        vid = _vid(volume_id)
        d = self.incoming.pop(vid, None)
        if d is not None:
            await trio.to_thread.run_sync(lambda: shutil.rmtree(d, ignore_errors=True))
        h = self.committed.pop(vid, None)
        if h is not None and self.server.store.by_id.get(vid) is h:
            log.warning("move of volume %s (%d) aborted after commit: copy dropped", h.name, vid)
            await self.server.store.remove(h)

    def handlers(self) -> dict[str, Callable[..., Any]]:
        return {
            VOL_MOVE_BEGIN: self.begin,
            VOL_MOVE_PUT: self.put,
            VOL_MOVE_DELETE: self.delete,
            VOL_MOVE_COMMIT: self.commit,
            VOL_MOVE_ABORT: self.abort,
        }


async def _send(conn: Connection, vid: int, src: Path, path: str) -> int:
    """Send one file; returns its bytes.  A file that vanished is sent empty
    (the next round sends its deletion)."""
    offset = 0
    size = await trio.to_thread.run_sync(lambda: src.stat().st_size if src.exists() else 0)
    while True:
        chunk = await trio.to_thread.run_sync(_read_chunk, src, offset)
        end = offset + len(chunk)
        await conn.call(VOL_MOVE_PUT, vid, path, offset, chunk, max(size, end))
        offset = end
        if not chunk or offset >= size:
            return offset


async def move_volume(server: FileServer, h: VolumeHandle, host: str, port: int) -> dict[str, Any]:
    """Move ``h`` to the fileserver at ``host:port`` (see the module doc)."""
    failure: BaseException | None = None
    try:
        async with open_connection(
            host, port, connect_timeout=10, default_timeout=60, tls=server.client_tls
        ) as conn:
            # Nothing is raised inside the connection's nursery (it would come
            # out wrapped in an ExceptionGroup): a failure is carried out.
            try:
                await client_handshake(conn, server.auth.key)
                result = await _copy(server, h, conn)
            except (RpcError, OSError, trio.TooSlowError) as exc:
                failure = exc
    except (OSError, trio.TooSlowError) as exc:
        failure = exc
    if isinstance(failure, RpcError):
        raise failure
    if failure is not None:
        raise RpcError("EHOSTUNREACH", f"target {host}:{port}: {failure!r}")
    vid = h.id
    server.store._signal_change()
    # Clients holding promises from us learn the volume is gone from here.
    await server.breaker.break_volume_all(vid)

    def drop() -> None:
        h.vol.close()
        trash = server.datadir.volumes_dir / f".trash-{vid}"
        os.rename(h.vol.path, trash)
        fsync_dir(server.datadir.volumes_dir)
        shutil.rmtree(trash, ignore_errors=True)

    await trio.to_thread.run_sync(drop)
    log.info("moved volume %s (%d) to server %s: %d bytes sent in %d rounds, the last "
             "(%d files) holding the volume %.1f ms", h.name, vid, result["to"],
             result["bytes_sent"], result["rounds"], result["changed_meanwhile"],
             result["held_ms"])  # fmt: skip
    return result


async def _copy(server: FileServer, h: VolumeHandle, conn: Connection) -> dict[str, Any]:
    """Steps 1-3 of the module doc on an authenticated connection to the target."""
    vid, name = h.id, h.name
    work = server.datadir.volumes_dir / f".trash-move-{vid}"  # cleaned at start if left
    sent = 0
    target = await conn.call(VOL_MOVE_BEGIN, vid, name, server.uuid)
    try:
        # A snapshot taken in a moment, sent while serving; then, while
        # serving still, what changed during the previous round, as long as
        # that shrinks (so the final round, which holds the volume, is short).
        have: Files = {}  # what the target holds: (dv, size) when it was read
        todo = await h.run(snapshot, h.vol, work)
        changed = sorted(todo)
        for _round in range(CATCH_UP_ROUNDS):
            for path in changed:
                sent += await _send(conn, vid, h.vol.path / path, path)
                have[path] = todo[path]
            todo = await h.run(snapshot, h.vol, work)
            was, changed = len(changed), sorted(p for p, v in todo.items() if have.get(p) != v)
            if len(changed) <= FINAL_ROUND_FILES or len(changed) >= was:
                break
        # The final round, with the volume held still.
        async with h.hold():
            held_from = time.monotonic()
            if h.removed:
                raise RpcError("ESTALE", f"volume {vid} was removed")
            final = await trio.to_thread.run_sync(snapshot, h.vol, work)
            changed = sorted(p for p, v in final.items() if have.get(p) != v)
            for path in changed:
                sent += await _send(conn, vid, h.vol.path / path, path)
            for path in sorted(set(have) - set(final)):
                await conn.call(VOL_MOVE_DELETE, vid, path)
            sent += await _send(conn, vid, work / "volume.db", "volume.db")
            status = await conn.call(VOL_MOVE_COMMIT, vid)
            await server.vldb.set_location(vid, name, target["uuid"], target["addrs"])
            await trio.to_thread.run_sync(server.moved.add, vid, target["uuid"],
                                          target["addrs"])  # fmt: skip
            h.removed = True  # calls waiting on the lock get ESTALE -> EREMCHG
            server.store.by_id.pop(vid, None)
            server.store.by_name.pop(name, None)
            held = time.monotonic() - held_from
    except BaseException:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            try:
                await conn.call(VOL_MOVE_ABORT, vid)
            except (RpcError, OSError):
                pass
        raise
    finally:
        await trio.to_thread.run_sync(lambda: shutil.rmtree(work, ignore_errors=True))
    return {"volume_id": vid, "name": name, "to": target["uuid"], "addrs": target["addrs"],
            "bytes_sent": sent, "changed_meanwhile": len(changed), "rounds": _round + 2,
            "held_ms": round(held * 1000, 1), "status": status}  # fmt: skip

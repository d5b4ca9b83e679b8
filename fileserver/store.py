"""The data directory: server identity, admin secret, address file and volumes.

``DataDir`` owns the files at the top of the data directory (persistent
server UUID and cell, admin secret, the address file admin tools and tests
read, the flock that keeps two servers off one directory).  ``VolumeStore``
holds the open volumes, each behind a ``VolumeHandle`` whose trio lock
serializes the blocking SQLite/file work it runs in worker threads, so the
trio loop never stalls on disk.

Imports: ``fileserver.volume``, ``.config``, ``protocol``, trio.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import random
import re
import secrets
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from fileserver.config import (
    ADDRESS_FILE,
    IDENTITY_FILE,
    LOCK_FILE,
    PID_FILE,
    ROOT_VOLUME_ID,
    ROOT_VOLUME_NAME,
    SECRET_FILE,
    VOLUMES_DIR,
)
from fileserver.volume import Volume, fsync_dir
from protocol.errors import RpcError
from protocol.limits import MAX_UINT32

log = logging.getLogger(__name__)

T = TypeVar("T")
_VOLUME_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a small file so readers see the old or the new content, never half."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.rename(tmp, path)
    fsync_dir(path.parent)


class DataDir:
    """Files at the top of a fileserver data directory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.uuid = ""
        self.cell = ""
        self._lock_fd: int | None = None

    @property
    def volumes_dir(self) -> Path:
        return self.path / VOLUMES_DIR

    @property
    def address_file(self) -> Path:
        return self.path / ADDRESS_FILE

    @property
    def secret_file(self) -> Path:
        return self.path / SECRET_FILE

    def initialize(self, cell: str) -> bool:
        """Create (first start) or read the identity; returns True on first start."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.volumes_dir.mkdir(exist_ok=True)
        ident = self.path / IDENTITY_FILE
        first = not ident.exists()
        if first:
            self.uuid, self.cell = str(uuid.uuid4()), cell
            write_atomic(ident, json.dumps({"uuid": self.uuid, "cell": cell}).encode() + b"\n")
            log.info("initialized data dir %s: server uuid %s, cell %s", self.path, self.uuid, cell)
        else:
            info = json.loads(ident.read_text())
            self.uuid, self.cell = info["uuid"], info["cell"]
            if cell and cell != self.cell:
                log.warning("data dir belongs to cell %r; ignoring --cell %r", self.cell, cell)
        if not self.secret_file.exists():
            write_atomic(self.secret_file, secrets.token_hex(32).encode() + b"\n", 0o600)
        return first

    def read_secret(self) -> str:
        return self.secret_file.read_text().strip()

    def lock(self) -> None:
        """Take the data dir lock, or raise RuntimeError when a server holds it."""
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"{self.path} is in use by another fileserver") from None
        self._lock_fd = fd

    def in_use(self) -> bool:
        """Whether a server (or a repairing salvage) holds the lock right now."""
        try:
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops our lock if we got it
        return False

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def write_address(self, host: str, port: int) -> None:
        write_atomic(self.path / PID_FILE, f"{os.getpid()}\n".encode())
        write_atomic(self.address_file, f"{host}:{port}\n".encode())

    def clear_address(self) -> None:
        for name in (ADDRESS_FILE, PID_FILE):
            try:
                (self.path / name).unlink()
            except FileNotFoundError:
                pass

    def read_address(self) -> tuple[str, int]:
        text = self.address_file.read_text().strip()
        host, _, port = text.rpartition(":")
        return host.strip("[]"), int(port)

    def volume_paths(self, *, cleanup: bool = False) -> list[Path]:
        """Volume directories; with ``cleanup`` (only while holding the lock)
        leftovers of an interrupted create/remove are deleted."""
        if not self.volumes_dir.exists():
            return []
        out = []
        for p in sorted(self.volumes_dir.iterdir()):
            if p.name.isdigit() and (p / "volume.db").exists():
                out.append(p)
            elif cleanup and (p.name.endswith(".creating") or p.name.startswith(".trash-")):
                shutil.rmtree(p, ignore_errors=True)
        return out


class VolumeHandle:
    """A volume and the lock serializing its worker-thread calls."""

    def __init__(self, vol: Volume) -> None:
        self.vol = vol
        self.id: int = vol.id
        self.name: str = vol.name
        self.lock = trio.Lock()
        self.removed = False

    async def run(
        self, fn: Callable[..., T], *args: Any, then: Callable[[T], None] | None = None
    ) -> T:
        """Run ``fn(*args)`` (a blocking Volume method) in a worker thread.

        ``then(result)`` runs in the trio thread while the volume lock is still
        held: grants go there, so a change (which commits under this lock and
        breaks after it) can never slip between a read and its grant.

        Not abandoned on cancellation: a store that started finishes (and is
        durable) even when the server is shutting down.
        """
        async with self.lock:
            if self.removed:
                raise RpcError("ESTALE", f"volume {self.id} was removed")
            result = await trio.to_thread.run_sync(fn, *args)
            if then is not None:
                then(result)
            return result


class VolumeStore:
    """All volumes of this server, by id and by name."""

    def __init__(self, datadir: DataDir) -> None:
        self.datadir = datadir
        self.by_id: dict[int, VolumeHandle] = {}
        self.by_name: dict[str, VolumeHandle] = {}
        self.changed = trio.Event()  # set when volumes come or go (VL re-registers)

    def open_all(self) -> None:
        """Open (and recover) every volume; blocking, call from a thread or at start."""
        for p in self.datadir.volume_paths(cleanup=True):
            vol = Volume(p)
            self._add(VolumeHandle(vol))

    def _add(self, h: VolumeHandle) -> None:
        self.by_id[h.id] = h
        self.by_name[h.name] = h

    def close_all(self) -> None:
        for h in self.by_id.values():
            try:
                h.vol.close()
            except Exception:
                log.exception("closing volume %s", h.name)
        self.by_id.clear()
        self.by_name.clear()

    def get(self, volume_id: int) -> VolumeHandle:
        h = self.by_id.get(volume_id)
        if h is None:
            raise RpcError("ESTALE", f"no volume {volume_id} on this server")
        return h

    def find(self, name_or_id: str | int) -> VolumeHandle:
        if isinstance(name_or_id, int) or str(name_or_id).isdigit():
            h = self.by_id.get(int(name_or_id))
        else:
            h = self.by_name.get(str(name_or_id))
        if h is None:
            raise RpcError("ENOENT", f"no volume {name_or_id!r}")
        return h

    def _pick_id(self, random_ids: bool) -> int:
        if not random_ids:
            return max([ROOT_VOLUME_ID, *self.by_id]) + 1
        # Several servers share one VL: random ids avoid collisions without
        # a round trip (ids need only be unique within the cell).
        while True:
            vid = random.randint(ROOT_VOLUME_ID + 1_000_000, MAX_UINT32 - 1)
            if vid not in self.by_id:
                return vid

    def create_sync(
        self,
        name: str,
        *,
        quota_bytes: int = 0,
        volume_id: int | None = None,
        random_ids: bool = False,
    ) -> VolumeHandle:
        if not isinstance(name, str) or not _VOLUME_NAME.match(name):
            raise RpcError("EINVAL", f"bad volume name {name!r:.100}")
        if name in self.by_name:
            raise RpcError("EEXIST", f"volume {name} exists")
        if volume_id is None:
            volume_id = ROOT_VOLUME_ID if name == ROOT_VOLUME_NAME and not self.by_id else (
                self._pick_id(random_ids))  # fmt: skip
        if not 0 < volume_id <= MAX_UINT32 or volume_id in self.by_id:
            raise RpcError("EEXIST", f"volume id {volume_id} in use or invalid")
        if type(quota_bytes) is not int or quota_bytes < 0:
            raise RpcError("EINVAL", "quota must be a non-negative int")
        vol = Volume.create(self.datadir.volumes_dir / str(volume_id), volume_id, name,
                            quota_bytes=quota_bytes)  # fmt: skip
        h = VolumeHandle(vol)
        self._add(h)
        log.info("created volume %s (%d)", name, volume_id)
        return h

    async def create(self, name: str, **kw: Any) -> VolumeHandle:
        h = await trio.to_thread.run_sync(lambda: self.create_sync(name, **kw))
        self._signal_change()  # trio objects are touched only from the trio thread
        return h

    async def remove(self, h: VolumeHandle) -> None:
        async with h.lock:
            h.removed = True
            self.by_id.pop(h.id, None)
            self.by_name.pop(h.name, None)

            def _rm() -> None:
                h.vol.close()
                trash = self.datadir.volumes_dir / f".trash-{h.id}"
                os.rename(h.vol.path, trash)
                fsync_dir(self.datadir.volumes_dir)
                shutil.rmtree(trash, ignore_errors=True)

            await trio.to_thread.run_sync(_rm)
        log.info("removed volume %s (%d)", h.name, h.id)
        self._signal_change()

    def _signal_change(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def list(self) -> list[VolumeHandle]:
        return sorted(self.by_id.values(), key=lambda h: h.id)

"""Cache-manager configuration and the client's persistent UUID.

Holds ``CacheConfig`` (every knob of a cache manager, with the cell key
lookup) and ``load_client_uuid`` (the ``client-uuid`` file in the cache
directory, what ``CB.ProbeUuid`` answers with).

May import: ``afsfuse.cells``, ``afsfuse.server_record`` (the connector
type), ``protocol.auth``.  Nothing here does I/O but the UUID file.
"""

from __future__ import annotations

import os
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from afsfuse.cells import Address, CellDB
from afsfuse.server_record import Connector, tcp_connector
from protocol.auth import load_key


@dataclass
class CacheConfig:
    cells: CellDB
    cache_dir: str | Path
    cache_bytes: int = 1 << 30
    chunk_size: int = 256 * 1024
    #: Chunk data held in memory (fetched and freshly written chunks are
    #: served from it; chunk files are written behind).  0: disk only.
    cache_mem_bytes: int = 32 << 20
    idle_record_lifetime: float = 600.0  # a record with no interests lives this long
    rpc_timeout: float = 30.0
    connect_timeout: float = 10.0
    readahead_chunks: int = 4
    #: Subdirectory listings read ahead of a tree walk, per readdir (0: off;
    #: see afsfuse.dirahead).
    dir_ahead: int = 2
    invalidation_queue_size: int = 4096
    reconnect_backoff_max: float = 10.0
    connector: Connector = field(default=tcp_connector)
    #: Connectors by cell name (TLS with each cell's client bundle, set by the
    #: daemon); a cell not in it uses ``connector``.
    cell_connectors: dict[str, Connector] = field(default_factory=dict)
    #: The cell key for every cell without its own ``key_file`` (SPEC section 4).
    #: None with no cell key file: no handshake (only fake in-memory servers
    #: accept that; the daemon refuses to start without a key).
    key: bytes | None = None
    #: Seconds between keepalives on an idle server connection (None: a third
    #: of the idle timeout the server announces at Hello).
    keepalive_interval: float | None = None
    #: Large chunk-file reads on worker threads (see ``CacheContext``).
    chunk_threads: bool = True

    def connector_for(self, cell: str) -> Connector:
        return self.cell_connectors.get(cell, self.connector)

    def key_for(self, cell: str) -> bytes | None:
        """The key that authenticates the servers of ``cell``."""
        try:
            c = self.cells.get(cell)
        except KeyError:
            return self.key
        if c.key_file is not None and self.key is None:
            return load_key(c.key_file)
        return self.key

    @classmethod
    def for_server(cls, server: str | Address, cache_dir: str | Path, **kw: Any) -> CacheConfig:
        """The no-cells-file default: one cell served by ``server``."""
        return cls(cells=CellDB.single(server), cache_dir=cache_dir, **kw)


def load_client_uuid(path: Path) -> str:
    """The client's persistent UUID (CB.ProbeUuid answers with it)."""
    try:
        text = path.read_text().strip()
        return str(uuidlib.UUID(text))
    except (OSError, ValueError):
        pass
    value = str(uuidlib.uuid4())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(value + "\n")
    os.replace(tmp, path)
    return value


__all__ = ["CacheConfig", "load_client_uuid"]

"""Fileserver configuration: one dataclass shared by the CLI, tests and benchmarks.

Everything the server needs to start lives here so an in-process test can build
a ``ServerConfig`` directly instead of going through argparse.

Imports: ``protocol`` only.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from protocol.auth import KEY_FILE
from protocol.limits import MAX_FRAME, MAX_NAME
from protocol.tls import ca_file_for

log = logging.getLogger(__name__)

#: Largest file size the store supports (ServerConfig.max_file_size caps below it).
MAX_FILE_SIZE = 1 << 44
DEFAULT_PORT = 7000
DEFAULT_HOST = "127.0.0.1"
DEFAULT_CELL = "localcell"
ROOT_VOLUME_NAME = "root.cell"
# AFS numbers read-write volumes from 536870912 upwards; we follow suit so ids
# look familiar in logs.
ROOT_VOLUME_ID = 536870912

# Files in the data directory.
ADDRESS_FILE = "address"  # "host:port\n" of the running server
SECRET_FILE = "admin.secret"  # admin secret, mode 0600
IDENTITY_FILE = "server.json"  # persistent uuid + cell
LOCK_FILE = "lock"  # flock held while a server (or repairing salvage) runs
PID_FILE = "server.pid"
VOLUMES_DIR = "volumes"


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "afsfuse" / "fileserver"


def parse_hostport(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """Parse ``HOST:PORT``, ``HOST`` or ``:PORT`` (IPv6 as ``[::1]:PORT``)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    host = host or DEFAULT_HOST
    if not port:
        return host, default_port
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"bad port in {text!r}")
    return host, int(port)


@dataclass
class ServerConfig:
    """How one fileserver runs.  Durations are seconds."""

    data_dir: Path
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    cell: str = DEFAULT_CELL
    #: Upper bound on a promise's duration (the OpenAFS schedule is capped by it);
    #: tests set a few seconds.
    callback_duration: float = 4 * 3600
    #: How long a break may wait for a client before the client is marked down.
    break_timeout: float = 2.0
    #: A connected client silent this long is probed (CB.ProbeUuid) before
    #: its promises are trusted further (fileserver/prober.py); 0: never.
    probe_after: float = 120.0
    #: Seconds a lock lives after it was set or last extended (fileserver.locks).
    lock_lifetime: float = 300.0
    #: Bound on promises held in the table; when reached the least recently
    #: active client is revoked with CB.InitCallBackState3.
    max_callbacks: int = 4_000_000
    #: Delayed breaks kept per down client before we give up and send one
    #: InitCallBackState3 instead.
    max_delayed: int = 1000
    #: How often expired promises are swept.
    sweep_interval: float = 60.0
    #: Remote VL service to register our volumes with (None: we serve VL ourselves).
    vl: tuple[str, int] | None = None
    vl_register_interval: float = 60.0
    #: The cell's VLDB in etcd (``etcd://HOST:PORT[,...]``; None: the local VL).
    vldb: str | None = None
    #: Lease TTL of this server's VLDB registration (down this long after dying).
    vldb_ttl: float = 10.0
    #: Address advertised in VL entries (default: the bound address).
    advertise: tuple[str, int] | None = None
    #: Prometheus exporter address (None: off).
    metrics: tuple[str, int] | None = None
    #: Create root.cell at first start (off by default when a remote VL is used,
    #: since the cell's root lives with that VL's server).
    create_root: bool | None = None
    #: Cell key file (None: ``cell.key`` in the data dir, created at first start).
    key_file: Path | None = None
    #: Cell CA (certificate + key, SECURITY.md "TLS"); None: ``cell-ca.pem``
    #: next to the cell key, created at first start.
    ca_file: Path | None = None
    #: Plaintext connections (benchmarks only): no TLS on any connection.
    insecure: bool = False
    #: Map uid 0 of every client to nobody (65534).
    root_squash: bool = False
    # -- limits on what one peer may cost (SECURITY.md, "Limits") --
    #: Largest message accepted, bytes.
    max_frame: int = MAX_FRAME
    #: Requests one connection may have running or queued (more: EAGAIN).
    max_calls_in_flight: int = 256
    #: Connections from one peer address, and in total (more are refused).
    max_connections_per_peer: int = 256
    max_connections: int = 1024
    #: Seconds a new connection has to authenticate.
    handshake_timeout: float = 10.0
    #: Seconds without a byte from an authenticated peer before it is dropped
    #: (clients send a keepalive at a third of this; the Hello reply says it).
    idle_timeout: float = 300.0
    #: Seconds one partial message may take to arrive completely.
    frame_timeout: float = 60.0
    #: Entry names, in bytes (at most the protocol's MAX_NAME).
    max_name: int = MAX_NAME
    #: Entries in one directory.
    max_dir_entries: int = 100_000
    #: Bytes in one file.
    max_file_size: int = MAX_FILE_SIZE
    #: When a reply may go out (``fileserver.durability``): ``always`` (after
    #: the change is on stable storage), ``batch`` (after it is written; synced
    #: within about a second), ``none`` (never synced by the server).
    sync: str = "always"
    #: A file at most this long keeps its bytes in its volume's database
    #: (``fileserver.volume.INLINE_MAX``); 0: every file has a data file.
    inline_max: int = 64 * 1024

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.create_root is None:
            self.create_root = self.vl is None
        self.key_file = Path(self.key_file) if self.key_file else self.data_dir / KEY_FILE
        self.ca_file = Path(self.ca_file) if self.ca_file else ca_file_for(self.key_file)
        self.max_name = min(self.max_name, MAX_NAME)
        self.max_file_size = min(self.max_file_size, MAX_FILE_SIZE)
        if self.sync not in ("always", "batch", "none"):
            raise ValueError(f"sync must be always, batch or none, not {self.sync!r}")
        if not 0 <= self.inline_max <= 1 << 20:
            raise ValueError("inline_max must be 0 .. 1 MiB")

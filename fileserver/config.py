"""Fileserver configuration: one dataclass shared by the CLI, tests and benchmarks.

Everything the server needs to start lives here so an in-process test can build
a ``ServerConfig`` directly instead of going through argparse.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

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
    #: Address advertised in VL entries (default: the bound address).
    advertise: tuple[str, int] | None = None
    #: Prometheus exporter address (None: off).
    metrics: tuple[str, int] | None = None
    #: Create root.cell at first start (off by default when a remote VL is used,
    #: since the cell's root lives with that VL's server).
    create_root: bool | None = None

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.create_root is None:
            self.create_root = self.vl is None

"""Which client bundle each cell of a mount uses, as connectors (TLS).

A cell's bundle is ``afsfuse mount --cert``, else its ``cert_file`` in the
cells file, else ``$AFSFUSE_CERT_FILE`` (the same order as the cell key).
A cell left with none gets a connector that refuses to connect, so nothing
is ever sent in plaintext unless the mount says ``--insecure``; the mount's
own cell without one fails the mount with a message saying what to pass.

May import: ``protocol.tls``, ``afsfuse.cells``; never pyfuse3.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any

from afsfuse.cells import CellDB
from protocol.tls import (
    CERT_ENV,
    Connector,
    TLSRefused,
    client_context,
    refusing_connector,
    tls_connector,
)

_HOW = (
    "pass --cert (a bundle from `afs-fileserver issue-client-cert`), set cert_file for "
    f"the cell in the cells file, or set ${CERT_ENV}; --insecure for plaintext"
)


class MountTLS:
    """The TLS contexts of one mount, one per bundle file."""

    def __init__(self, opts: Any, cells: CellDB | None) -> None:
        self.opts = opts  # afsfuse.daemon.MountOptions
        self.cells = cells
        self._contexts: dict[Path, ssl.SSLContext] = {}

    def path_for(self, cell: str | None) -> Path | None:
        if self.opts.cert_file is not None:
            return Path(self.opts.cert_file)
        if self.cells is not None:
            c = self.cells.cells.get(cell or self.cells.default)
            if c is not None and c.cert_file is not None:
                return c.cert_file
        env = os.environ.get(CERT_ENV)
        return Path(env) if env else None

    def context_for(self, cell: str | None) -> ssl.SSLContext:
        """The context of ``cell`` (None: the mount's); ``TLSRefused`` says why not."""
        path = self.path_for(cell)
        if path is None:
            raise TLSRefused(f"no client certificate for cell {cell or '(default)'}: {_HOW}")
        ctx = self._contexts.get(path)
        if ctx is None:
            try:
                ctx = client_context(path)
            except (OSError, ValueError, ssl.SSLError) as exc:
                raise TLSRefused(f"cannot use the client bundle {path}: {exc}") from None
            self._contexts[path] = ctx
        return ctx

    def connectors(self) -> dict[str, Connector]:
        """A TLS connector for every cell that has a bundle, a refusing one
        for the others; the mount's own cell must have one."""
        assert self.cells is not None
        mine = self.opts.cell or self.cells.default
        out: dict[str, Connector] = {}
        for name in self.cells.cells:
            try:
                out[name] = tls_connector(self.context_for(name))
            except TLSRefused as exc:
                if name == mine:
                    raise
                out[name] = refusing_connector(exc.message)
        return out


def mount_tls(opts: Any, cells: CellDB | None) -> MountTLS:
    return MountTLS(opts, cells)


def fallback_connector() -> Connector:
    """For a cell the cells file does not name: no certificate, no connection."""
    return refusing_connector(f"no client certificate for this cell: {_HOW}")

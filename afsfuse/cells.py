"""The cells file (like CellServDB, in TOML) and the default single cell.

Format::

    default = "example.org"          # optional; else the first cell
    [cells."example.org"]
    vlservers = ["fs1.example.org:7000", "10.0.0.2"]   # port defaults to 7000
    key_file = "example.org.key"     # cell key; relative to this file
    cert_file = "example.org.pem"    # client bundle (TLS); relative to this file
    [cells."ex"]
    alias = "example.org"            # same VL servers, its own volume instances

With no file the client knows one cell whose VL server is the fileserver
named on the command line.  An alias is a distinct cell name (its volume
instances are distinct, as the kernel's superblocks are) that reaches the
same servers, so both share server records (keyed by server UUID), and the
target's cell key and client bundle.  ``afsfuse mount --key-file`` and
``--cert`` override every cell's.
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_PORT = 7000
DEFAULT_CELL = "local"

Address = tuple[str, int]


def parse_address(text: Any, default_port: int = DEFAULT_PORT) -> Address:
    """``"host:port"``, ``"host"``, ``"[v6]:port"`` or ``[host, port]``."""
    if isinstance(text, list | tuple) and len(text) == 2:
        return str(text[0]), int(text[1])
    if not isinstance(text, str) or not text:
        raise ValueError(f"not an address: {text!r}")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, default_port


@dataclass(frozen=True)
class Cell:
    name: str
    vlservers: tuple[Address, ...]
    alias_of: str | None = None
    #: The cell key file (SPEC section 4); None: the mount's --key-file.
    key_file: Path | None = None
    #: The client bundle (SECURITY.md "TLS"); None: the mount's --cert.
    cert_file: Path | None = None


def _path(spec: dict[str, Any], field: str, cell: str, base: Path | None) -> Path | None:
    """A file named in a cell's table; relative to the cells file."""
    value = spec.get(field)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"cell {cell!r}: {field} must be a string")
    if not value:
        return None
    path = Path(value)
    return base / path if not path.is_absolute() and base is not None else path


class CellDB:
    """Cells by name, aliases resolved to their target's VL servers."""

    def __init__(self, cells: dict[str, Cell], default: str | None = None) -> None:
        if not cells:
            raise ValueError("no cells configured")
        self.cells = cells
        self.default = default or next(iter(cells))
        if self.default not in cells:
            raise ValueError(f"default cell {self.default!r} is not configured")

    @classmethod
    def single(cls, server: str | Address, name: str = DEFAULT_CELL) -> CellDB:
        """The no-file default: one cell whose VL server is ``server``."""
        return cls({name: Cell(name, (parse_address(server),))}, name)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Path | None = None) -> CellDB:
        raw = data.get("cells")
        if not isinstance(raw, dict) or not raw:
            raise ValueError("cells file has no [cells.NAME] tables")
        cells: dict[str, Cell] = {}
        aliases: dict[str, str] = {}
        for name, spec in raw.items():
            if not isinstance(spec, dict):
                raise ValueError(f"cell {name!r}: not a table")
            if "alias" in spec:
                aliases[name] = str(spec["alias"])
                continue
            servers = spec.get("vlservers", spec.get("vl", []))
            if isinstance(servers, str):
                servers = [servers]
            if not servers:
                raise ValueError(f"cell {name!r}: no vlservers")
            key_path, cert_path = (
                _path(spec, "key_file", name, base),
                _path(spec, "cert_file", name, base),
            )
            cells[name] = Cell(
                name, tuple(parse_address(s) for s in servers), None, key_path, cert_path
            )
        for name, target in aliases.items():
            seen = {name}
            while target in aliases:  # alias of an alias
                if target in seen:
                    raise ValueError(f"cell alias loop at {name!r}")
                seen.add(target)
                target = aliases[target]
            if target not in cells:
                raise ValueError(f"cell {name!r} is an alias of unknown cell {target!r}")
            t = cells[target]
            cells[name] = Cell(name, t.vlservers, target, t.key_file, t.cert_file)
        return cls(cells, data.get("default"))

    @classmethod
    def load(cls, path: str | Path) -> CellDB:
        with open(path, "rb") as f:
            return cls.from_dict(tomllib.load(f), base=Path(path).resolve().parent)

    def get(self, name: str | None) -> Cell:
        cell = self.cells.get(name or self.default)
        if cell is None:
            raise KeyError(name)
        return cell

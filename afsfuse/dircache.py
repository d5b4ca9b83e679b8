"""Directory listings cached by data version.

A listing is valid for exactly one directory DV.  It is fetched with paged
``FS.ReadDir`` (restarting when the DV moves between pages), and our own
create/remove/rename edits it in place when the reply's directory DV is
exactly the cached DV + 1, instead of refetching (SPEC section 5).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from protocol.records import Fid, FileType

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DirEntry:
    name: bytes
    fid: Fid
    type: FileType


class DirListing:
    """The entries of one directory at data version ``dv``."""

    __slots__ = ("_sorted", "dv", "entries")

    def __init__(self, dv: int, entries: dict[bytes, DirEntry] | None = None) -> None:
        self.dv = dv
        self.entries: dict[bytes, DirEntry] = entries or {}
        self._sorted: list[DirEntry] | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, name: bytes) -> DirEntry | None:
        return self.entries.get(name)

    def add(self, name: bytes, fid: Fid, ftype: FileType) -> None:
        self.entries[name] = DirEntry(name, fid, ftype)
        self._sorted = None

    def remove(self, name: bytes) -> DirEntry | None:
        self._sorted = None
        return self.entries.pop(name, None)

    def sorted(self) -> list[DirEntry]:
        """Entries sorted by name bytes (the server's order; stable cookies)."""
        if self._sorted is None:
            self._sorted = sorted(self.entries.values(), key=lambda e: e.name)
        return self._sorted


def own_change_applies(listing: DirListing | None, old_dv: int | None, new_dv: int) -> bool:
    """Whether our own directory change may be applied to the cached listing:
    the listing is of the DV we started from and the reply is exactly one more."""
    return listing is not None and old_dv is not None and listing.dv == old_dv == new_dv - 1

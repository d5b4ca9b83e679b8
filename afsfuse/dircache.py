"""Directory listings cached by data version.

A listing is valid for exactly one directory DV.  It is fetched with paged
``FS.ReadDir`` (restarting when the DV moves between pages), and our own
create/remove/rename edits it in place when the reply's directory DV is
exactly the cached DV + 1, instead of refetching (SPEC section 5).
"""

from __future__ import annotations

import bisect
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

    __slots__ = ("_names", "_sorted", "dv", "entries")

    def __init__(self, dv: int, entries: dict[bytes, DirEntry] | None = None) -> None:
        self.dv = dv
        self.entries: dict[bytes, DirEntry] = entries or {}
        # Name order, built at first use and then kept up by add/remove (a
        # re-sort per edit cost 3.7 ms at 100,000 entries).  Edits replace
        # the lists rather than change them: a caller may be iterating one
        # across an await.
        self._sorted: list[DirEntry] | None = None
        self._names: list[bytes] | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, name: bytes) -> DirEntry | None:
        return self.entries.get(name)

    def add(self, name: bytes, fid: Fid, ftype: FileType) -> None:
        ent = DirEntry(name, fid, ftype)
        replaced = name in self.entries
        self.entries[name] = ent
        if self._sorted is None or self._names is None:
            return
        i = bisect.bisect_left(self._names, name)
        ents = self._sorted.copy()
        if replaced:
            ents[i] = ent
        else:
            ents.insert(i, ent)
            names = self._names.copy()
            names.insert(i, name)
            self._names = names
        self._sorted = ents

    def remove(self, name: bytes) -> DirEntry | None:
        ent = self.entries.pop(name, None)
        if ent is not None and self._sorted is not None and self._names is not None:
            i = bisect.bisect_left(self._names, name)
            ents, names = self._sorted.copy(), self._names.copy()
            del ents[i], names[i]
            self._sorted, self._names = ents, names
        return ent

    def sorted(self) -> list[DirEntry]:
        """Entries sorted by name bytes (the server's order; stable cookies)."""
        if self._sorted is None or self._names is None:
            self._sorted = sorted(self.entries.values(), key=lambda e: e.name)
            self._names = [e.name for e in self._sorted]
        return self._sorted

    def position(self, name: bytes) -> int:
        """Where ``name`` is, or would go, in ``sorted()``."""
        self.sorted()
        assert self._names is not None
        return bisect.bisect_left(self._names, name)


def own_change_applies(listing: DirListing | None, old_dv: int | None, new_dv: int) -> bool:
    """Whether our own directory change may be applied to the cached listing:
    the listing is of the DV we started from and the reply is exactly one more."""
    return listing is not None and old_dv is not None and listing.dv == old_dv == new_dv - 1

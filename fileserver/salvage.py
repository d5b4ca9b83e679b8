"""``afs-fileserver salvage``: check (and with ``--repair`` fix) a data directory.

Checks per volume: SQLite integrity, unapplied redo records and interrupted
stores (settled by a DV bump on repair), directory entries naming missing
vnodes, vnodes no entry names, link counts, directory sizes, data files whose
length differs from the vnode's, orphan data files, header counters.  Exit
code 0 when clean (or, with ``--repair``, when every finding was repaired), 1
when findings remain, 2 when salvage could not run.

Imports: ``fileserver.volume``, ``.store`` (DataDir), ``.config``, ``protocol``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fileserver.config import IDENTITY_FILE, SECRET_FILE
from fileserver.store import DataDir
from fileserver.volume import ROOT_UNIQUE, ROOT_VNODE, VNODE_COLS, Vnode, Volume
from protocol.records import FileType

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Finding:
    """One consistency problem found by :meth:`Volume.check`."""

    volume: int
    kind: str
    detail: str
    repaired: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"volume": self.volume, "kind": self.kind, "detail": self.detail,
                "repaired": self.repaired}  # fmt: skip


def check_volume(vol: Volume, repair: bool = False) -> list[Finding]:
    """Salvage: report (and with ``repair`` fix) inconsistencies."""
    out: list[Finding] = []
    vid = vol.id

    def found(kind: str, detail: str) -> Finding:
        f = Finding(vid, kind, detail)
        out.append(f)
        return f

    db = vol.db
    res = db.execute("PRAGMA integrity_check").fetchall()
    if res != [("ok",)]:
        found("sqlite", "; ".join(r[0] for r in res[:10]))
        return out  # nothing else can be trusted
    # On disk already (their rows go at the next commit, or once synced).
    applied = set(vol._applied) | set(vol._redo_unsynced)
    npending = sum(1 for (seq,) in db.execute("SELECT seq FROM pending") if seq not in applied)
    # Intents this process holds on purpose (armed files) are not leftovers.
    known = vol.known_intents()
    npending += sum(1 for (vn,) in db.execute("SELECT vnode FROM intents") if vn not in known)
    if npending:
        f = found("pending", f"{npending} stores not yet applied to data files")
        if repair:
            vol._replay_pending()
            vol._settle_intents()
            f.repaired = True
    vnodes = {r[0]: Vnode(*r) for r in db.execute(f"SELECT {VNODE_COLS} FROM vnodes")}
    ents = db.execute("SELECT dir, name, vnode FROM dirents").fetchall()
    fixes: list[tuple[str, tuple[Any, ...]]] = []
    root = vnodes.get(ROOT_VNODE)
    if root is None or root.unique != ROOT_UNIQUE or not root.is_dir:
        found("root", "root directory vnode 1.1 missing or not a directory")
        return out
    links: dict[int, int] = {}
    subdirs: dict[int, int] = {}
    entries: dict[int, int] = {}
    for d, name, vn in ents:
        if d not in vnodes or not vnodes[d].is_dir or vn not in vnodes:
            f = found("dangling-entry", f"entry {d}/{name!r:.100} -> {vn}")
            if repair:
                fixes.append(("DELETE FROM dirents WHERE dir = ? AND name = ?", (d, name)))
                f.repaired = True
            continue
        links[vn] = links.get(vn, 0) + 1
        entries[d] = entries.get(d, 0) + 1
        if vnodes[vn].is_dir:
            subdirs[d] = subdirs.get(d, 0) + 1
    doomed: list[Path] = []
    bytes_used = files = 0
    # vnode -> length of its inline bytes (a data file beside them is stale).
    inline = {vn: n for vn, n in db.execute("SELECT vnode, length(data) FROM inline_data")}
    for v in vnodes.values():
        if v.vnode != ROOT_VNODE and v.vnode not in links:
            f = found("orphan-vnode", f"vnode {v.vnode}.{v.unique} has no directory entry")
            if repair:
                fixes.append(("DELETE FROM vnodes WHERE vnode = ?", (v.vnode,)))
                fixes.append(("DELETE FROM inline_data WHERE vnode = ?", (v.vnode,)))
                doomed.append(vol._data_path(v.vnode, v.unique))
                f.repaired = True
            continue
        files += 1
        bytes_used += v.size if not v.is_dir else 0
        want = 2 + subdirs.get(v.vnode, 0) if v.is_dir else links.get(v.vnode, 0)
        if v.is_dir and v.size != entries.get(v.vnode, 0):
            f = found("dir-size", f"dir {v.vnode} size {v.size} != {entries.get(v.vnode, 0)}")
            if repair:
                fixes.append(("UPDATE vnodes SET size = ? WHERE vnode = ?",
                              (entries.get(v.vnode, 0), v.vnode)))  # fmt: skip
                f.repaired = True
        if v.nlink != want:
            f = found("nlink", f"vnode {v.vnode} nlink {v.nlink}, should be {want}")
            if repair:
                fixes.append(("UPDATE vnodes SET nlink = ? WHERE vnode = ?", (want, v.vnode)))
                f.repaired = True
        if v.type == FileType.FILE and v.vnode in inline:
            if inline[v.vnode] != v.size:
                # The bytes are the truth: the repaired size (and the counters) are theirs.
                bytes_used += inline[v.vnode] - v.size
                f = found("data-size", f"vnode {v.vnode}: {inline[v.vnode]} inline bytes, "
                                       f"status says {v.size}")  # fmt: skip
                if repair:
                    fixes.append(("UPDATE vnodes SET size = ? WHERE vnode = ?",
                                  (inline[v.vnode], v.vnode)))  # fmt: skip
                    f.repaired = True
        elif v.type == FileType.FILE and not npending:
            p = vol._data_path(v.vnode, v.unique)
            actual = p.stat().st_size if p.exists() else 0
            if actual != v.size:
                f = found("data-size", f"vnode {v.vnode}: data file {actual} bytes, "
                                       f"status says {v.size}")  # fmt: skip
                if repair:
                    with open(p, "ab") as fh:
                        fh.truncate(v.size)
                        os.fsync(fh.fileno())
                    f.repaired = True
    for vn in inline.keys() - vnodes.keys():
        f = found("orphan-inline", f"inline bytes of vnode {vn}, which does not exist")
        if repair:
            fixes.append(("DELETE FROM inline_data WHERE vnode = ?", (vn,)))
            f.repaired = True
    live = {f"{v.vnode}.{v.unique}" for v in vnodes.values()
            if v.type == FileType.FILE and v.vnode not in inline}  # fmt: skip
    for entry in os.scandir(vol.data_dir):
        if entry.name not in live and Path(entry.path) not in doomed:
            f = found("orphan-data", f"data file {entry.name} belongs to no vnode")
            if repair:
                doomed.append(Path(entry.path))
                f.repaired = True
    if bytes_used != vol.bytes_used or files != vol.files:
        f = found("counters", f"header says {vol.bytes_used} bytes/{vol.files} files, "
                              f"actual {bytes_used}/{files}")  # fmt: skip
        if repair:
            vol.bytes_used, vol.files = bytes_used, files
            f.repaired = True
    if repair and (fixes or any(f.kind == "counters" for f in out)):
        with vol._txn() as tdb:
            for sql, args in fixes:
                tdb.execute(sql, args)
    if repair:
        vol._unlink_files(doomed)
    return out


def salvage(data_dir: Path, *, repair: bool = False) -> list[Finding]:
    """Run the checks; raises RuntimeError when a running server holds the dir
    and ``repair`` was asked."""
    dd = DataDir(data_dir)
    if not dd.path.is_dir():
        raise RuntimeError(f"{dd.path} is not a fileserver data directory")
    if repair:
        dd.lock()  # never repair under a running server
    findings: list[Finding] = []
    try:
        if not (dd.path / IDENTITY_FILE).exists():
            findings.append(Finding(0, "identity", f"{IDENTITY_FILE} missing"))
        secret = dd.path / SECRET_FILE
        if secret.exists() and secret.stat().st_mode & 0o077:
            f = Finding(0, "secret-mode", f"{SECRET_FILE} is readable by others")
            if repair:
                os.chmod(secret, 0o600)
                f.repaired = True
            findings.append(f)
        for p in dd.volume_paths(cleanup=repair):
            try:
                vol = Volume(p, recover=False)
            except Exception as exc:
                findings.append(Finding(int(p.name), "open", f"cannot open {p}: {exc}"))
                continue
            try:
                findings += vol.check(repair=repair)
            finally:
                vol.close()
    finally:
        if repair:
            dd.unlock()
    return findings


def run_salvage(data_dir: Path, repair: bool, as_json: bool) -> int:
    try:
        findings = salvage(data_dir, repair=repair)
    except RuntimeError as exc:
        print(f"salvage: {exc}")
        return 2
    unrepaired = [f for f in findings if not f.repaired]
    if not repair and DataDir(data_dir).in_use():
        # A live server applies redo records itself and drops them lazily,
        # and a store in progress holds an intent: normal while it runs.
        print(f"salvage: a fileserver is running on {data_dir}; pending stores are not errors")
        unrepaired = [f for f in unrepaired if f.kind != "pending"]
    if as_json:
        out: dict[str, Any] = {"clean": not unrepaired, "findings": [f.to_dict() for f in findings]}
        print(json.dumps(out, indent=2))
    else:
        for f in findings:
            mark = "repaired" if f.repaired else "FOUND"
            print(f"{mark:9} volume {f.volume}: {f.kind}: {f.detail}")
        if not findings:
            print(f"salvage: {data_dir}: clean")
        elif not unrepaired:
            print(f"salvage: {len(findings)} problems found and repaired")
        else:
            print(f"salvage: {len(unrepaired)} problems found" +
                  ("" if repair else " (run with --repair to fix)"))  # fmt: skip
    return 0 if not unrepaired else 1

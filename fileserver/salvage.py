"""``afs-fileserver salvage``: check (and with ``--repair`` fix) a data directory.

Checks per volume: SQLite integrity, unapplied redo records and interrupted
stores (settled by a DV bump on repair), directory entries naming missing
vnodes, vnodes no entry names, link counts, directory sizes, data files whose
length differs from the vnode's, orphan data files, header counters.  Exit
code 0 when clean (or, with ``--repair``, when every finding was repaired), 1
when findings remain, 2 when salvage could not run.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from fileserver.config import IDENTITY_FILE, SECRET_FILE
from fileserver.store import DataDir
from fileserver.volume import Finding, Volume

log = logging.getLogger(__name__)


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

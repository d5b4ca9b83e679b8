"""Event timelines of a lab run, built from the processes' own logs.

The fileserver writes ``event=NAME t=SECONDS k=v ...`` lines on logger
``fileserver.events`` (``fileserver/events.py``); each client daemon writes
the same shape on ``afsfuse.events`` (``afsfuse/stats.py``); both use the one
writer of ``protocol/logfmt.py``, whose parser reads them back here.  A line
without ``t=`` (an older daemon) is stamped by its logging ``asctime``
(milliseconds, local time).  The lab adds its own ``app:NAME`` events (what
the application did and when it returned), stamped with ``time.time()``.
This module parses the log lines, names client UUIDs by their actor label
(A, B, ...), merges everything by time and renders it as text.

Different processes' clocks are the same machine's, but the stamp is taken
when the line is logged, a little after the event: ordering checks across
actors compare with ``CLIENT_SLACK``.

May import ``protocol``; nothing here starts a process.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from protocol import logfmt

log = logging.getLogger(__name__)

#: Slack for ordering checks across processes (stamps are taken at logging
#: time; lines without ``t=`` are floored to the millisecond).
CLIENT_SLACK = 0.001

_ASCTIME = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"
_SERVER_RE = re.compile(_ASCTIME + r" \S+ fileserver\.events: (event=.*)$")
_CLIENT_RE = re.compile(_ASCTIME + r" afsfuse\.events \S+ (event=.*)$")
_EVENT_LOG_RE = re.compile(_ASCTIME + r" (event=.*)$")  # a server's --event-log file


@dataclass
class Event:
    t: float
    actor: str  # "server", a client label ("A"), or "app:A"
    name: str
    fields: dict[str, str] = field(default_factory=dict)
    seq: int = 0  # position in its source: a stable tie-break
    end: float | None = None  # when an app or lab action returned

    def get(self, key: str, default: str = "") -> str:
        return self.fields.get(key, default)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": self.t, "actor": self.actor, "event": self.name}
        if self.end is not None:
            out["end"] = self.end
        out.update(self.fields)
        return out


def _asctime(text: str) -> float:
    # asctime is local time, as time.localtime() made it: .timestamp() undoes that.
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def parse_event_line(asctime: str, text: str, actor: str, seq: int = 0) -> Event | None:
    """One ``event=NAME [t=SECONDS] k=v ...`` text (``asctime`` is its log stamp)."""
    f = logfmt.parse(text)
    name = f.pop("event", "")
    if not name:
        return None
    try:
        t = float(f.pop("t"))
    except (KeyError, ValueError):
        t = _asctime(asctime)
    return Event(t, actor, name, f, seq)


def _parse(path: Path, actor: str, start: int, matchers: tuple[Any, ...]) -> list[Event]:
    events: list[Event] = []
    for n, line in enumerate(_read_lines(path, start)):
        for match in matchers:
            m = match(line)
            if m:
                ev = parse_event_line(m.group(1), m.group(2), actor, n)
                if ev is not None:
                    events.append(ev)
                break
    return events


def parse_server_log(path: Path, actor: str = "server", start: int = 0) -> list[Event]:
    """Event lines of a fileserver log (stderr) or of its ``--event-log`` file."""
    return _parse(path, actor, start, (_SERVER_RE.search, _EVENT_LOG_RE.match))


def parse_client_log(path: Path, actor: str, start: int = 0) -> list[Event]:
    """Event lines of one client daemon's log."""
    return _parse(path, actor, start, (_CLIENT_RE.search,))


def _read_lines(path: Path, start: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return []


class Timeline:
    """App events recorded live plus log events read on demand, merged by time."""

    def __init__(self) -> None:
        self.app: list[Event] = []
        self.sources: list[tuple[str, str, Path, int]] = []  # (kind, actor, path, offset)
        self.names: dict[str, str] = {}  # client UUID -> label
        self.server_uuids: dict[str, str] = {}  # server UUID -> label
        self.fids: dict[str, str] = {}  # "VOL.VNODE.UNIQUE" -> a path, for reading
        self.t0: float | None = None

    def add_server(self, path: Path, actor: str = "server") -> None:
        self.sources.append(("server", actor, Path(path), _size(path)))

    def add_client(self, path: Path, actor: str, uuid: str | None = None) -> None:
        self.sources.append(("client", actor, Path(path), _size(path)))
        if uuid:
            self.names[uuid] = actor

    def add(self, actor: str, name: str, t: float | None = None, **fields: Any) -> Event:
        """Record an event of the lab's own (``app:A``, ``lab``) now."""
        ev = Event(time.time() if t is None else t, actor, name,
                   {k: logfmt.to_text(v) for k, v in fields.items()}, len(self.app))  # fmt: skip
        if self.t0 is None:
            self.t0 = ev.t
        self.app.append(ev)
        return ev

    def note(self, actor: str, name: str, t: float | None = None, **fields: Any) -> Event:
        """``add`` for application actor ``actor`` (recorded as ``app:ACTOR``)."""
        return self.add(f"app:{actor}", name, t, **fields)

    def events(self) -> list[Event]:
        """Every event so far (logs re-read), merged by time; UUIDs named."""
        evs = list(self.app)
        for kind, actor, path, offset in self.sources:
            parse = parse_server_log if kind == "server" else parse_client_log
            evs.extend(parse(path, actor, offset))
        for ev in evs:
            for k in ("client", "origin"):
                if k in ev.fields and ev.fields[k] in self.names:
                    ev.fields[k] = self.names[ev.fields[k]]
            if ev.fields.get("server") in self.server_uuids:
                ev.fields["server"] = self.server_uuids[ev.fields["server"]]
            if "servers" in ev.fields:
                named = (self.server_uuids.get(u, u) for u in ev.fields["servers"].split(","))
                ev.fields["servers"] = ",".join(named)
        order = {a: i for i, a in enumerate(["server", *sorted({e.actor for e in evs})])}
        evs.sort(key=lambda e: (e.t, order.get(e.actor, 0), e.seq))
        return evs


def _size(path: Path) -> int:
    try:
        return Path(path).stat().st_size
    except FileNotFoundError:
        return 0


#: Shown only with --verbose (one per cache hit; they drown the story).
NOISY = frozenset({"validate_fast"})


def _label(value: str, fids: dict[str, str]) -> str:
    return ",".join(f"{f}({fids[f]})" if f in fids else f for f in value.split(","))


def render(
    events: list[Event], t0: float, *, fids: dict[str, str] | None = None, verbose: bool = False
) -> str:
    """One line per event: seconds since ``t0``, actor, event, fields (fids
    followed by the path they name, when known)."""
    fids = fids or {}
    lines = []
    hidden: dict[str, int] = {}
    burst: dict[str, list[float]] = {}  # actor -> [last kernel_invalidate t, shown, folded]
    for ev in events:
        if ev.name in NOISY and not verbose:
            hidden[ev.name] = hidden.get(ev.name, 0) + 1
            continue
        if not verbose:
            # A sweep invalidates every kernel inode: show two lines of a burst.
            b = burst.get(ev.actor)
            if ev.name == "kernel_invalidate":
                if b is not None and ev.t - b[0] < 0.05:
                    b[0] = ev.t
                    if b[1] >= 2:
                        b[2] += 1
                        continue
                    b[1] += 1
                else:
                    burst[ev.actor] = [ev.t, 1, 0]
            elif b is not None:
                if b[2]:
                    lines.append(f"  {b[0] - t0:+9.4f}  {ev.actor:<8} ... {b[2]:.0f} more "
                                 "kernel_invalidate")  # fmt: skip
                del burst[ev.actor]
        detail = " ".join(
            f"{k}={_label(v, fids) if k in ('fid', 'fids') else logfmt.quote(v)}"
            for k, v in ev.fields.items()
        )
        if ev.end is not None:
            detail += f" (returned {ev.end - t0:+.4f})"
        lines.append(f"  {ev.t - t0:+9.4f}  {ev.actor:<8} {ev.name:<22} {detail}".rstrip())
    if hidden:
        what = ", ".join(f"{n} {k}" for k, n in sorted(hidden.items()))
        lines.append(f"  ({what} events not shown; --verbose shows them)")
    return "\n".join(lines)


def write_json(path: Path, scenarios: list[dict[str, Any]]) -> None:
    Path(path).write_text(json.dumps({"scenarios": scenarios}, indent=1) + "\n")

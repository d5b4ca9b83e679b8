"""A randomized close-to-open checker over real client mounts.

    scripts/coherence.py                       # 3 clients, 60 s, random seed
    scripts/coherence.py --clients 4 --duration 20 --seed 7

Starts a fileserver and K client mounts on 127.0.0.1 (a temporary
directory), then runs one worker thread per client, each on its own mount,
doing random operations on a small shared directory for a bounded time:

- ``write``: open(O_TRUNC|O_CREAT), write a unique token (``w<client>.<seq>``),
  close; the token (and the truncation) become visible while close() runs
  (write-on-close), a new file's name while open() runs;
- ``replace``: write a token to a private temporary name, then rename it over
  a shared name (the token becomes visible while rename() runs);
- ``rename`` one shared name over another, ``unlink``, ``read``, ``listdir``.

Every operation is logged with its start and end times (for writes, also
when open() returned and when close() started) and, for every open, the fid
of the file it reached (the ``afs.fid`` extended attribute of the open file).
The checker keeps two histories, built from the intervals alone: what each
name is bound to (a fid, or absent) and what each file holds.  It verifies:

- a read or write reached a file its name was bound to at some point while
  the operation ran, or by a binding current when it began (set by a change
  that completed before it began and not superseded by a change that started
  after that one completed and itself completed before it began);
- a read returned what that file held in the same sense: the contents of a
  close that completed before the open began and were not superseded, or of
  a change concurrent with the read; ENOENT counts as the name being absent.
  A write's close holds its token, or its token over a longer version that
  another write closed between its open and its write(2) (its truncation
  came first: a local disk gives that too);
- a listing shows no name whose removal completed before the listing began
  (and nothing newer created it again meanwhile), and misses no name that was
  certainly there;
- a call by name (``open()``, ``rename()``, ``unlink()``, ``listdir()``)
  never fails with ESTALE: that is left to a file already open whose vnode
  the server no longer has (a read or close after another client removed
  it); the error counts show such ESTALEs, and an ``(open)`` one would be a
  violation.

Reads name-then-file this way because that is what POSIX gives a local
filesystem too: a read that resolved a name just before another client
renamed the file away reads that file, including what is written to it
under its new name meanwhile.

With ``--nemesis pause,partition,restart,delay-breaks,drop-breaks`` a
nemesis thread injects faults of those kinds during the run, one at a time,
seeded and bounded (each 0.4-1.2 s, every 0.5-1.5 s; the server's break
timeout is 1 s): SIGSTOP of a client daemon, the fileserver's own nemeses
(``Admin.Inject``, as ``afs-fileserver inject``: partition a client, delay breaks to it by 0.3 s,
drop breaks to it) and a fileserver restart on the same port.  Each fault is
logged with its times.  The model knows what a fault excuses:

- a client that was paused, partitioned or had its breaks dropped may read
  stale data, and see stale names and listings, from the fault's start
  until the server delivered what it kept for it (its ``client_up`` or
  ``hello`` event after the fault ended, when the fault had it marked down;
  else the fault's end), plus the kernel grace; its operations may fail then;
- a restart excuses errors, and stale data, names and listings, of any
  client until that client's Hello (the restarted server has lost every
  promise and breaks nobody until the client re-registers);
- a call that failed while a partition or restart closed its connection
  may still have landed (the server finishes the handler; only the reply is
  lost): its change is allowed for ``UNCERTAIN`` seconds after it returned
  (an ``open(O_CREAT)`` that failed so may have made a file nobody reached);
- a delay of breaks below the break timeout excuses nothing: the changing
  client's close still waits for the break's answer.

Excused violations are counted by fault kind and reported, not hidden.

Two artifacts of the kernel's caches are allowed, within the bounds the
design gives them (DESIGN.md: kernel caches are told about breaks
asynchronously; a stat on B reflects A's change within a bounded time, the
issue's bound being 100 ms): for ``KERNEL_GRACE`` seconds after another
client changed what a name is bound to, the kernel's entry cache may still
resolve the name to the file it held before (so a read, or a write, reaches
that file wherever it now is), and a read racing a change may return one
allowed version's bytes cut, or zero-padded, to another allowed version's
length (the kernel clamps reads to the size it caches and zero-fills reads
that come back short).  Both are counted and reported as tolerated, as is
a read whose read(2) calls each returned an allowed version's bytes at
their offset but not all the same version's (the file was replaced between
two calls: a local disk gives that too), and an open() that failed with
ESTALE while two or more other clients' changes of the name's binding raced
it (the kernel retries an open that met a vanished fid once, with
LOOKUP_REVAL; a second change between that lookup and its FUSE_OPEN fails
the retry too); anything else is a violation.

The allowed values come from intervals only, so the check never needs the
server's order: it is sound (no false alarms) and exact where operations do
not overlap.  ``--seed`` fixes every worker's choice of operations, names
and tokens, so a failure replays the same operation sequence; thread timing
still varies between runs.  Exit status 1 on any violation, each printed
with the history of the name or file.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from afsfuse.lab.mount import ClientMount, unmount  # noqa: E402
from afsfuse.lab.server import ServerProcess  # noqa: E402
from afsfuse.lab.timeline import parse_server_log  # noqa: E402
from fileserver.admin import admin_call  # noqa: E402

log = logging.getLogger(__name__)

ABSENT = "<absent>"
EMPTY = "<empty>"
#: Seconds a name removed by another client may still resolve through the
#: kernel's entry cache (the issue's staleness bound; measured: a few ms).
KERNEL_GRACE = 0.1
NAMES = [f"n{i}" for i in range(6)]
DIR = "coherence"
INF = float("inf")


@dataclass
class Op:
    """One operation as a worker did it (times from ``time.monotonic()``)."""

    client: int
    seq: int
    kind: str  # write, replace, rename, unlink, read, listdir
    name: str = ""
    name2: str = ""  # rename target
    token: str = ""  # what a write/replace wrote
    start: float = 0.0
    end: float = INF  # INF: never returned (hung)
    mid: float = 0.0  # write: when close() started; replace: when rename() started
    mid_end: float = 0.0  # write: when open() returned
    result: str | list[str] | None = None  # read: value; listdir: names
    error: str = ""
    fid: str = ""  # read, write: the file its open reached; replace: the temporary file
    pieces: tuple[int, ...] = ()  # read: what each read(2) returned, in bytes
    in_open: bool = False  # read, write: the error came from open() (a name-based call)

    def show(self, t0: float) -> str:
        what = f"{self.kind} {self.name}" + (f" -> {self.name2}" if self.name2 else "")
        extra = f" token={self.token}" if self.token else ""
        if self.kind in ("read", "listdir"):
            extra += f" got={self.result}"
            if len(self.pieces) > 1:
                extra += f" in read(2)s of {'+'.join(map(str, self.pieces))} bytes"
        if self.fid:
            extra += f" fid={self.fid}"
        if self.error:
            extra += f" error={self.error}"
        end = "hung" if self.end == INF else f"{self.end - t0:.4f}"
        return f"c{self.client}#{self.seq} [{self.start - t0:.4f} .. {end}] {what}{extra}"


@dataclass
class Change:
    """A change to one name: it took effect somewhere in [start, end]; after it
    the name holds one of ``values``."""

    start: float
    end: float
    values: frozenset[str]
    op: Op | None = None
    weak: bool = False  # may not have happened at all: never supersedes another


@dataclass
class Violation:
    op: Op
    allowed: set[str]
    name: str  # the name, or the fid for what a file held
    history: list[Change] = field(default_factory=list)
    what: str = ""
    #: Whether what the op saw was current at some moment since the given
    #: time (a view that old: a restart lost the promises); None: no
    #: staleness explains this kind.
    stale: Callable[[float], bool] | None = field(default=None, compare=False)

    def kind(self) -> str:
        """A coarse class, for the summary."""
        if self.what.startswith(("read reached", "write reached")):
            return self.what.split(",")[0]
        if self.op.kind == "read" and isinstance(self.op.result, str) and self.op.fid:
            if self.op.result.strip("\0") == "":
                return "read returned NUL bytes nobody wrote"
            return "read returned contents no longer (or never) current in the file"
        if self.op.kind == "read" and self.op.error == "ENOENT":
            return "read found no file where one certainly was"
        if self.what.startswith("misses"):
            return "listing misses a name that certainly existed"
        if self.what.startswith("lists"):
            return "listing shows a name removed before it began"
        return self.what


class History:
    """Changes per key (a name, or a file's fid) built from the op log, and
    the allowed-value query."""

    def __init__(self, initial: str) -> None:
        self.initial = initial  # what a key holds before its first change
        self.changes: dict[str, list[Change]] = {}

    def add(self, key: str, start: float, end: float, values: Iterable[str], op: Op,
            weak: bool = False) -> None:  # fmt: skip
        self.changes.setdefault(key, []).append(Change(start, end, frozenset(values), op, weak))

    def allowed(self, key: str, start: float, end: float) -> set[str]:
        """Values ``key`` may show to an operation running over [start, end]."""
        chs = [Change(-INF, -INF, frozenset({self.initial})), *self.changes.get(key, [])]
        done = [c for c in chs if c.end < start]
        # A completed change is still possibly current unless another change
        # started after it completed and itself completed before ``start``.
        latest = max((d.start for d in done if not d.weak), default=-INF)
        out: set[str] = set()
        for c in done:
            if c.end >= latest:
                out |= c.values
        for c in chs:
            if c.end >= start and c.start <= end:  # concurrent (or never returned)
                out |= c.values
        return out

    def stale(self, key: str, start: float, client: int) -> set[str]:
        """What ``key`` was bound to before changes by other clients that
        completed within KERNEL_GRACE before ``start``: the kernel's entry
        cache may still resolve the name to it."""
        out: set[str] = set()
        for c in self.changes.get(key, []):
            if c.weak or c.op is None or c.op.client == client:
                continue  # a client's own change updates its own entry cache
            if start - KERNEL_GRACE <= c.end < start:
                out |= self.allowed(key, c.start, c.start) - {ABSENT}
        return out


@dataclass
class Histories:
    names: History  # name -> fid bound to it (or ABSENT)
    files: History  # fid -> contents (a token, or EMPTY)
    #: Files ops reached that no op is known to have made (each was made by
    #: an open(O_CREAT) that then reached another file or failed), with when
    #: an op first reached them.
    orphans: dict[str, float] = field(default_factory=dict)
    #: MADE value -> when the open(O_CREAT) that may have made it started.
    made: dict[str, float] = field(default_factory=dict)


#: Prefix of the value a name may be bound to after an open(O_CREAT) made a
#: file of its own that the open did not reach: one of ``orphans``.
MADE = "?made by "


def _opened(o: Op) -> float:
    """When the open of ``o`` certainly returned."""
    return o.mid_end or o.mid or o.end


@dataclass
class Creation:
    """A new file's name appearing: ``fid`` bound to ``name`` within [start, end]."""

    fid: str
    name: str
    start: float
    end: float
    op: Op
    weak: bool  # the creator is uncertain: may not have been this name
    guessed: bool = False  # no op that reached the file can have made it


def _creations(ops: list[Op]) -> list[Creation]:
    """How the files reached by writes and reads came to be.  A write with
    O_CREAT does not say whether it created the file; the creator started
    before any op that reached the file had its open return, and of the
    writes that did, the creator is one (usually the only one)."""
    reached: dict[str, list[Op]] = {}
    writes: dict[str, list[Op]] = {}  # name -> writes that may have made a file
    for o in ops:
        if o.fid:
            reached.setdefault(o.fid, []).append(o)
        if _may_make(o):
            writes.setdefault(o.name, []).append(o)
    out: list[Creation] = []
    for fid, os_ in reached.items():
        if any(o.kind == "replace" for o in os_):
            continue  # created by the replace, under a private name
        first = min(_opened(o) for o in os_)
        creators = [o for o in os_ if o.kind == "write" and o.start <= first]
        if creators:
            # Several candidates: created while [first start, last open];
            # under one name when they agree, else weakly under each.
            names = {o.name for o in creators}
            start, end = min(o.start for o in creators), max(_opened(o) for o in creators)
            out += [Creation(fid, n, start, end, creators[0], len(names) > 1) for n in names]
            continue
        # Created by a write whose open then reached another file or none
        # (another client renamed over or removed the new file between the
        # create and the open): others may have reached it meanwhile, under
        # that write's name.
        for name in {o.name for o in os_}:
            for w in writes.get(name, ()):
                if w.start <= first and w.fid != fid:
                    out.append(Creation(fid, name, w.start, min(_opened(w), first), w, True, True))
    return out


#: Rounds to settle what renames move; a chain of dependent renames longer
#: than this is not settled and every rename then also moves "unknown".
RENAME_ROUNDS = 50


def build_history(ops: list[Op]) -> Histories:
    """The changes the ops made.  What a rename moves is what its source may
    have been bound to meanwhile, which depends on other renames: the least
    fixpoint, from nothing moved, grown until the moved sets stop growing
    (they only grow, so this ends).  Starting from "unknown" instead would
    never settle where renames overlap in a cycle, and would blind the
    check for those names."""
    renames = [o for o in ops if o.kind == "rename" and o.error != "ENOENT" and o.end < INF]
    moved: dict[int, set[str]] = {id(o): set() for o in renames}
    creations = _creations(ops)
    for _round in range(RENAME_ROUNDS):
        names = _names(ops, moved, creations, settled=False)
        new = {id(o): names.allowed(o.name, o.start, o.end) - {ABSENT} for o in renames}
        if new == moved:
            break
        moved = new
    else:
        log.warning("renames did not settle in %d rounds: treated as unknown", RENAME_ROUNDS)
        moved = {k: m | {"?"} for k, m in moved.items()}
    known = {c.fid for c in creations if not c.guessed}
    known |= {o.fid for o in ops if o.kind == "replace"}
    orphans: dict[str, float] = {}
    for o in ops:
        if o.fid and o.fid not in known:
            orphans[o.fid] = min(orphans.get(o.fid, INF), _opened(o))
    made = {_made(o): o.start for o in ops if _may_make(o)}
    return Histories(_names(ops, moved, creations, settled=True), _files(ops), orphans, made)


def _may_make(o: Op) -> bool:
    """An open(O_CREAT) that may have made a file: it opened one, or failed
    with its outcome unknown."""
    return o.kind == "write" and bool(o.fid or o.error not in ("ENOENT", "EEXIST"))


def _made(o: Op) -> str:
    return f"{MADE}c{o.client}#{o.seq}"


def _names(ops: list[Op], moved: dict[int, set[str]], creations: list[Creation],
           settled: bool) -> History:  # fmt: skip
    h = History(ABSENT)
    for c in creations:
        h.add(c.name, c.start, c.end, {c.fid}, c.op, weak=c.weak)
    for o in ops:
        if o.kind == "replace":
            if o.mid and o.fid:  # the temporary file was written: renamed over the name
                h.add(o.name, o.mid, o.end, {o.fid}, o, weak=bool(o.error))
        elif o.kind == "rename" and id(o) in moved:
            m = moved[id(o)]
            if settled and not m:
                m = {"?"}  # it succeeded, so it moved something: we cannot tell what
            if o.error:  # outcome unknown: either state
                h.add(o.name2, o.start, o.end, m | {"?"}, o)
                h.add(o.name, o.start, o.end, m | {ABSENT}, o)
            else:
                h.add(o.name2, o.start, o.end, m, o)
                h.add(o.name, o.start, o.end, {ABSENT}, o)
        elif o.kind == "unlink" and o.error != "ENOENT":
            h.add(o.name, o.start, o.end, {ABSENT} if not o.error else {ABSENT, "?"}, o)
        if _may_make(o):
            # open(O_CREAT) may make a file of its own under the name whatever
            # file it then opens: another client's rename can replace the new
            # file before the open returns (the open reaches that client's
            # file), and an open that failed with the outcome unknown (a
            # restart closed the connection before the reply) may have made
            # one.  Its maker never reaches such a file; listings may show its
            # name, and others may reach it (one of ``orphans``).
            h.add(o.name, o.start, _opened(o), {_made(o)}, o, weak=True)
    return h


def _files(ops: list[Op]) -> History:
    h = History(EMPTY)  # a new file is empty
    writes: dict[str, list[Op]] = {}
    for o in ops:
        if o.kind == "write" and o.fid and o.mid and o.token:
            writes.setdefault(o.fid, []).append(o)
    for o in ops:
        if not o.fid:
            continue
        if o.kind == "write":
            # O_TRUNC.  Write-on-close (DESIGN.md section 5): other clients
            # may see the file emptied before the close, or only the new
            # contents at the close; so the truncation never supersedes the
            # previous contents (weak), while the close's contents do.
            h.add(o.fid, o.start, _opened(o), {EMPTY}, o, weak=True)
            if o.mid:
                # A close that failed (ESTALE: the file was removed
                # meanwhile) may not have stored: it supersedes nothing.
                h.add(o.fid, o.mid, o.end, {o.token} | _merges(o, writes.get(o.fid, [])), o,
                      weak=bool(o.error))  # fmt: skip
        elif o.kind == "replace" and o.mid:
            h.add(o.fid, o.start, o.mid, {o.token}, o)  # private until the rename
    return h


def _merges(o: Op, writes: list[Op]) -> set[str]:
    """What ``o``'s close may store besides its token (``writes``: the
    closing writes of its file, as ``_files`` gathers them): its bytes over a
    longer version another write closed between ``o``'s open and its
    write(2), as on a local disk (the truncation came first, the other
    version landed, then ``o`` wrote at offset 0).  The client does this
    when ``o``'s open(O_CREAT|O_TRUNC) made the file, so had nothing to
    truncate: its write then starts from the version that landed (found by
    the nemesis-free run of 2026-12-03: ``w1.9653``, ``w1.965`` over
    ``w0.1043``)."""
    assert o.mid is not None and o.token
    return {
        o.token + p.token[len(o.token) :]
        for p in writes
        if p is not o and len(p.token) > len(o.token) and p.mid <= o.mid and p.end >= o.start
    }  # fmt: skip


def _spliced(got: str, pieces: tuple[int, ...], values: set[str]) -> bool:
    """A read that took several read(2) calls while the file changed: each
    call returned the bytes of some allowed version at its offset (NUL past
    that version's end), as on a local disk when a writer replaces the
    contents between two of a reader's calls."""
    if len(pieces) < 2 or sum(pieces) != len(got):
        return False
    real = ["" if v == EMPTY else v for v in values if v not in (ABSENT, "?")]
    sizes = {len(v) for v in real}
    if len(got) not in sizes:  # the read that returned 0 saw EOF: some version's size
        return False
    off = 0
    for n in pieces:
        # A call that returned less than it asked for stopped at EOF then.
        if n < READ_SIZE and off + n not in sizes:
            return False
        part = got[off : off + n]
        if not any(v.ljust(off + n, "\0")[off : off + n] == part for v in real):
            return False
        off += n
    return True


def _explains(got: str, o: Op, values: set[str]) -> bool:
    """``got`` is one of ``values``, or one of the tolerated mixes of them."""
    return got in values or got in _size_mixes(values) or _spliced(got, o.pieces, values)


def _size_mixes(values: set[str]) -> set[str]:
    """One version's bytes at another version's length (cut or NUL-padded)."""
    real = {"" if v == EMPTY else v for v in values if v not in (ABSENT, "?")}
    mixed = {x[: len(y)].ljust(len(y), "\0") for x in real for y in real}
    return {m or EMPTY for m in mixed}


def _rebindings(h: Histories, o: Op) -> int:
    """Other clients' completed changes of what ``o.name`` is bound to that
    raced ``o`` (or ended within the kernel grace before it began)."""
    return sum(
        1
        for c in h.names.changes.get(o.name, [])
        if not c.weak and c.op is not None and c.op.client != o.client
        and c.start <= o.end and c.end >= o.start - KERNEL_GRACE
    )  # fmt: skip


def _count(tolerated: dict[str, int], what: str) -> None:
    tolerated[what] = tolerated.get(what, 0) + 1


def _check_binding(h: Histories, o: Op, end: float, tolerated: dict[str, int]) -> Violation | None:
    """``o`` reached ``o.fid`` through ``o.name`` while [o.start, end]."""
    allowed = h.names.allowed(o.name, o.start, end)
    if o.fid in allowed or "?" in allowed:
        return None
    first = h.orphans.get(o.fid)
    if first is not None and any(h.made.get(a, INF) <= first for a in allowed):
        return None
    if o.fid in h.names.stale(o.name, o.start, o.client):
        _count(tolerated, "name resolved within the kernel grace")
        return None
    return Violation(o, allowed, o.name, h.names.changes.get(o.name, []),
                     f"{o.kind} reached a file {o.name} was not bound to, "
                     f"fid {o.fid}, allowed {sorted(allowed)}",
                     lambda t: o.fid in h.names.allowed(o.name, t, end))  # fmt: skip


def check(ops: list[Op], tolerated: dict[str, int] | None = None) -> list[Violation]:
    """Every read, write and listing against the history the ops themselves
    made; kernel-cache artifacts within their bounds are counted in
    ``tolerated``."""
    h = build_history(ops)
    out: list[Violation] = []
    if tolerated is None:
        tolerated = {}
    for o in ops:
        if o.end == INF:
            out.append(Violation(o, set(), o.name, what="operation never returned"))
            continue
        if o.kind == "write" and o.error == "EEXIST":
            # POSIX: open(O_CREAT) without O_EXCL never fails with EEXIST.
            out.append(Violation(o, set(), o.name, h.names.changes.get(o.name, []),
                                 "open(O_CREAT) without O_EXCL failed: EEXIST"))  # fmt: skip
            continue
        if o.error == "ESTALE" and (o.in_open or o.kind in ("rename", "unlink", "replace",
                                                           "listdir")):  # fmt: skip
            # A call by name that met a vanished fid must look the name up
            # again (the kernel retries once with LOOKUP_REVAL, the daemon's
            # lookup asks the server): success or ENOENT, never ESTALE.  Only
            # a file already open may go stale.
            if o.in_open and _rebindings(h, o) >= 2:
                # The one retry is all the kernel gives an open: when a second
                # change of the name's binding lands between it and its
                # FUSE_OPEN, the retry meets a vanished fid too (so does NFS).
                _count(tolerated, "open ESTALE: a second rebinding raced the kernel's one retry")
                continue
            what = f"unexpected error ESTALE on a call by name ({o.kind})"
            out.append(Violation(o, set(), o.name, h.names.changes.get(o.name, []), what))
            continue
        if o.error and o.kind in ("read", "listdir", "write") and o.error != "ENOENT":
            # A file removed or replaced by another client while we had it
            # open (or just before, within the kernel grace) may go stale;
            # with no change to the name meanwhile, no.
            racing = [c for c in h.names.changes.get(o.name, [])
                      if c.op is not o and c.start <= o.end
                      and (c.end >= o.start or (c.end >= o.start - KERNEL_GRACE
                                                and c.op is not None
                                                and c.op.client != o.client))]  # fmt: skip
            if o.error != "ESTALE" or not racing:
                out.append(Violation(o, set(), o.name, h.names.changes.get(o.name, []),
                                     f"unexpected error {o.error}"))  # fmt: skip
            continue
        if o.kind in ("read", "write") and not o.error and not o.fid:
            out.append(Violation(o, set(), o.name, what="no fid recorded for the open file"))
            continue
        if o.kind == "write" and o.fid:
            v = _check_binding(h, o, _opened(o), tolerated)
            if v:
                out.append(v)
        elif o.kind == "read" and o.error == "ENOENT":
            allowed = h.names.allowed(o.name, o.start, o.end)
            if ABSENT not in allowed and "?" not in allowed:
                gone = lambda t, o=o: ABSENT in h.names.allowed(o.name, t, o.end)  # noqa: E731
                what = f"read found no file, allowed {sorted(allowed)}"
                out.append(Violation(o, allowed, o.name, h.names.changes.get(o.name, []),
                                     what, gone))  # fmt: skip
        elif o.kind == "read":
            v = _check_binding(h, o, o.end, tolerated)
            if v:
                out.append(v)
                continue
            got = str(o.result)
            allowed = h.files.allowed(o.fid, o.start, o.end)
            if got in allowed:
                continue
            if got in _size_mixes(allowed):
                _count(tolerated, "size of one allowed version, bytes of another")
            elif _spliced(got, o.pieces, allowed):
                _count(tolerated, "read(2) calls of one read saw different allowed versions")
            else:
                what = f"read {got!r} from {o.fid}, allowed {sorted(allowed)}"
                out.append(Violation(o, allowed, o.fid, h.files.changes.get(o.fid, []), what,
                                     lambda t, o=o, got=got: _explains(got, o, h.files.allowed(
                                         o.fid, t, o.end))))  # fmt: skip
        elif o.kind == "listdir" and isinstance(o.result, list):
            shown = set(o.result)
            for name in NAMES:
                allowed = h.names.allowed(name, o.start, o.end)
                if name in shown and allowed == {ABSENT}:
                    what = f"lists {name}, removed before the listing began"
                    was = lambda t, o=o, name=name: bool(h.names.allowed(name, t, o.end) - {ABSENT})  # noqa: E731
                elif name not in shown and ABSENT not in allowed:
                    what = f"misses {name}, present before the listing began"
                    was = lambda t, o=o, name=name: ABSENT in h.names.allowed(name, t, o.end)  # noqa: E731
                else:
                    continue
                out.append(Violation(o, allowed, name, h.names.changes.get(name, []), what, was))
    return out


# -- workers -----------------------------------------------------------------------


def _errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def _fid(fd: int) -> str:
    """The fid of an open file, as the mount's ``afs.fid`` attribute gives it."""
    return os.getxattr(fd, "afs.fid").decode()


#: What each read(2) of a read asks for.
READ_SIZE = 1 << 16


def _read_all(fd: int) -> tuple[bytes, tuple[int, ...]]:
    """The file's bytes and the length each read(2) returned."""
    chunks = []
    while chunk := os.read(fd, READ_SIZE):
        chunks.append(chunk)
    return b"".join(chunks), tuple(len(c) for c in chunks)


def worker(cid: int, root: Path, seed: int, deadline: float, ops: list[Op]) -> None:
    """Random operations on ``root`` (this client's view of the shared dir)."""
    rng = random.Random(seed * 1000 + cid)
    seq = 0
    while time.monotonic() < deadline:
        seq += 1
        kind = rng.choices(["read", "write", "replace", "rename", "unlink", "listdir"],
                           [35, 25, 10, 6, 8, 16])[0]  # fmt: skip
        name, name2 = rng.sample(NAMES, 2)
        op = Op(cid, seq, kind, name)
        ops.append(op)  # list.append is atomic; the op is filled in as it runs
        path = root / name
        op.start = time.monotonic()
        try:
            if kind == "read":
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as exc:
                    op.error, op.in_open = _errname(exc), True
                else:
                    try:
                        op.fid = _fid(fd)
                        data, op.pieces = _read_all(fd)
                        op.result = data.decode(errors="replace") or EMPTY
                    except OSError as exc:
                        op.error = _errname(exc)
                    finally:
                        os.close(fd)
            elif kind == "write":
                op.token = f"w{cid}.{seq}"
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                except OSError as exc:
                    op.error, op.in_open = _errname(exc), True
                else:
                    op.mid_end = time.monotonic()
                    try:
                        op.fid = _fid(fd)
                        os.write(fd, op.token.encode())
                    finally:
                        op.mid = time.monotonic()
                        try:
                            os.close(fd)
                        except OSError as exc:
                            op.error = _errname(exc)
            elif kind == "replace":
                op.token = f"w{cid}.{seq}"
                tmp = root / f".t{cid}.{seq}"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    op.fid = _fid(fd)
                    os.write(fd, op.token.encode())
                finally:
                    os.close(fd)
                op.mid = time.monotonic()
                try:
                    os.rename(tmp, path)
                except OSError as exc:
                    op.error = _errname(exc)
                    tmp.unlink(missing_ok=True)
            elif kind == "rename":
                op.name2 = name2
                try:
                    os.rename(path, root / name2)
                except OSError as exc:
                    op.error = _errname(exc)
            elif kind == "unlink":
                try:
                    os.unlink(path)
                except OSError as exc:
                    op.error = _errname(exc)
            elif kind == "listdir":
                op.name = "."
                try:
                    op.result = sorted(n for n in os.listdir(root) if not n.startswith("."))
                except OSError as exc:
                    op.error = _errname(exc)
        except OSError as exc:  # the temp file of a replace, say
            op.error = op.error or _errname(exc)
        finally:
            op.end = time.monotonic()


# -- nemesis -----------------------------------------------------------------------

#: Fault kinds ``--nemesis`` injects.
NEMESES = ("pause", "partition", "restart", "delay-breaks", "drop-breaks")
#: The fileserver's break timeout under --nemesis (down clients are retried every 2.5x).
NEMESIS_BREAK_TIMEOUT = 1.0
#: delay-breaks: below the break timeout, so no break is lost (nothing is excused).
BREAK_DELAY = 0.3
#: Faults that make one client stale until the server delivered what it kept.
CLIENT_FAULTS = frozenset({"pause", "partition", "drop-breaks"})
#: Faults that close connections: a call in flight fails (EIO) with its outcome
#: unknown, since the server finishes a handler whose reply it cannot send.
CONNECTION_FAULTS = frozenset({"partition", "restart"})
#: How long after it failed such a call may still land (a break timeout, a commit).
UNCERTAIN = 2 * NEMESIS_BREAK_TIMEOUT


@dataclass
class Fault:
    """One injected fault (times from ``time.monotonic()``)."""

    kind: str
    client: int | None  # None: the fileserver (restart)
    start: float
    end: float = INF  # when it was healed
    excused_until: float = 0.0  # filled by ``excuse_windows``
    #: restart: per client, until its Hello to the restarted server (+ grace)
    client_until: dict[int, float] = field(default_factory=dict)

    def show(self, t0: float) -> str:
        who = "server" if self.client is None else f"c{self.client}"
        until = "never" if self.excused_until == INF else f"{self.excused_until - t0:.3f}"
        return (f"{self.kind} {who} [{self.start - t0:.3f} .. {self.end - t0:.3f}], "
                f"excused until {until}")  # fmt: skip


class Nemesis:
    """Injects seeded, bounded faults, one at a time, until ``deadline``."""

    def __init__(self, kinds: Sequence[str], seed: int, srv: ServerProcess,
                 mounts: list[ClientMount], uuids: list[str]) -> None:  # fmt: skip
        self.kinds = list(kinds)
        self.rng = random.Random(seed * 7919 + 1)
        self.srv = srv
        self.mounts = mounts
        self.uuids = uuids
        self.faults: list[Fault] = []
        self.errors: list[str] = []
        self.stop = threading.Event()

    def _admin(self, method: str, *params: object) -> None:
        """One admin RPC from this thread (its own trio loop): a subprocess per
        call would take seconds on a loaded machine and stretch every fault."""
        try:
            trio.run(partial(admin_call, self.srv.data_dir, method, *params, timeout=30))
        except SystemExit as exc:  # admin_call's way to say it found no server
            raise RuntimeError(f"{method}{params}: {exc}") from None

    def run(self, deadline: float) -> None:
        while not self.stop.wait(self.rng.uniform(0.5, 1.5)):
            if time.monotonic() + 1.5 > deadline:
                return
            kind = self.rng.choice(self.kinds)
            client = None if kind == "restart" else self.rng.randrange(len(self.mounts))
            hold = self.rng.uniform(0.4, 1.2)
            f = Fault(kind, client, time.monotonic())
            self.faults.append(f)
            try:
                self._inject(f, hold)
            except Exception as exc:  # reported; the run goes on
                self.errors.append(f"{kind}: {exc!r}")
            finally:
                f.end = time.monotonic()

    def _inject(self, f: Fault, hold: float) -> None:
        if f.kind == "restart":
            self.srv.stop()
            self.srv.start(self.srv.port)
            return
        assert f.client is not None
        uuid = self.uuids[f.client]
        if f.kind == "pause":
            pid = self.mounts[f.client].pid
            os.kill(pid, signal.SIGSTOP)
            try:
                self.stop.wait(hold)
            finally:
                os.kill(pid, signal.SIGCONT)
            return
        seconds = {"partition": round(hold, 3), "delay-breaks": BREAK_DELAY}.get(f.kind)
        self._admin("Admin.Inject", f.kind, uuid, seconds)
        try:
            self.stop.wait(hold)
        finally:
            self._admin("Admin.Heal", uuid)


def excuse_windows(faults: list[Fault], server_log: Path, uuids: list[str], t0: float,
                   wall0: float) -> None:  # fmt: skip
    """Fill each fault's ``excused_until`` from the server's own events: a
    client the fault had marked down is excused until the server delivered
    what it kept (``client_up`` / ``hello``); a restart until every client's
    Hello; plus the kernel grace."""
    evs = parse_server_log(server_log)
    by_uuid = {u: i for i, u in enumerate(uuids)}

    def mono(t: float) -> float:
        return t - wall0 + t0

    downs: dict[int, list[float]] = {}
    ups: dict[int, list[float]] = {}
    for e in evs:
        i = by_uuid.get(e.get("client"))
        if i is None:
            continue
        if e.name == "client_down":
            downs.setdefault(i, []).append(mono(e.t))
        elif e.name in ("client_up", "hello"):
            ups.setdefault(i, []).append(mono(e.t))
    for f in faults:
        if f.kind not in CLIENT_FAULTS and f.kind != "restart":
            f.excused_until = f.start  # excuses nothing
            continue
        clients = range(len(uuids)) if f.client is None else [f.client]
        until = f.end
        for i in clients:
            back = min((t for t in ups.get(i, []) if t >= f.end), default=INF)
            if f.kind == "restart":
                until = max(until, back)  # every client re-Hellos after a restart
                # No Hello after it: nothing excuses staleness past the fault.
                f.client_until[i] = (back if back < INF else f.end) + KERNEL_GRACE
                continue
            # Down when the fault ended (marked down during it, not back
            # since): excused until the server delivered what it kept.
            last_down = max((t for t in downs.get(i, []) if f.start <= t <= f.end), default=None)
            if last_down is not None and not any(last_down <= t <= f.end for t in ups.get(i, [])):
                until = max(until, back)
        f.excused_until = until + KERNEL_GRACE


def widen_uncertain(ops: list[Op], faults: list[Fault], tolerated: dict[str, int]) -> None:
    """A call that failed while a fault closed its client's connection may
    have landed after it returned: its change is allowed until UNCERTAIN
    later (the op's ``end`` moves; its error is excused by the fault)."""
    for o in ops:
        if not o.error or o.error in ("ENOENT", "EEXIST") or o.end == INF:
            continue
        for f in faults:
            hits = f.kind in CONNECTION_FAULTS and (f.client is None or f.client == o.client)
            if hits and o.start <= f.excused_until and o.end >= f.start:
                o.end += UNCERTAIN
                _count(tolerated, f"outcome unknown after {f.kind}")
                break


def excuse(violations: list[Violation], faults: list[Fault],
           tolerated: dict[str, int]) -> list[Violation]:  # fmt: skip
    """The violations no fault excuses; excused ones are counted by fault kind."""
    out = []
    for v in violations:
        o = v.op
        why = None
        for f in faults:
            overlaps = o.start <= f.excused_until and o.end >= f.start
            if not overlaps:
                continue
            mine = f.kind in CLIENT_FAULTS and o.client == f.client
            # The restarted server lost every promise: it breaks nobody
            # until a client's Hello re-registers it, so until then that
            # client's cache may be stale (as with an OpenAFS fileserver).
            lost = (
                f.kind == "restart"
                and v.stale is not None
                and v.stale(f.start)
                and o.start <= f.client_until.get(o.client, f.excused_until)
            )
            if mine or lost or (f.kind == "restart" and v.what.startswith("unexpected error")):
                why = f.kind
                break
        if why:
            _count(tolerated, f"excused by {why}")
        else:
            out.append(v)
    return out


@dataclass
class Outcome:
    ops: list[Op]
    violations: list[Violation]
    t0: float
    counts: dict[str, int]
    errors: dict[str, int]
    wall0: float = 0.0  # time.time() at t0: op times + this = the logs' clock
    tolerated: dict[str, int] = field(default_factory=dict)  # kernel-cache artifacts
    faults: list[Fault] = field(default_factory=list)
    nemesis_errors: list[str] = field(default_factory=list)


def run_workers(
    roots: list[Path],
    seed: int,
    duration: float,
    nemesis: Nemesis | None = None,
    server_log: Path | None = None,
) -> Outcome:
    ops: list[Op] = []
    wall0, t0 = time.time(), time.monotonic()
    deadline = t0 + duration
    threads = [threading.Thread(target=worker, args=(i, r, seed, deadline, ops), daemon=True)
               for i, r in enumerate(roots)]  # fmt: skip
    if nemesis is not None:
        threads.append(threading.Thread(target=nemesis.run, args=(deadline,), daemon=True))
    for th in threads:
        th.start()
    for th in threads:
        th.join(duration + 60)  # an op stuck past this is reported as hung
    if nemesis is not None:
        nemesis.stop.set()
    ops = list(ops)
    counts: dict[str, int] = {}
    errors: dict[str, int] = {}
    for o in ops:
        counts[o.kind] = counts.get(o.kind, 0) + 1
        if o.error:
            key = f"{o.kind}:{o.error}" + ("(open)" if o.in_open and o.error == "ESTALE" else "")
            errors[key] = errors.get(key, 0) + 1
    tolerated: dict[str, int] = {}
    faults: list[Fault] = []
    if nemesis is not None and server_log is not None:
        faults = nemesis.faults
        excuse_windows(faults, server_log, nemesis.uuids, t0, wall0)
        widen_uncertain(ops, faults, tolerated)
    violations = check(ops, tolerated)
    if faults:
        violations = excuse(violations, faults, tolerated)
    return Outcome(ops, violations, t0, counts, errors, wall0, tolerated, faults,
                   nemesis.errors if nemesis is not None else [])  # fmt: skip


def report(out: Outcome, limit: int = 20) -> str:
    lines = [f"ops: {len(out.ops)} " + " ".join(f"{k}={v}" for k, v in sorted(out.counts.items())),
             "errors (expected under races): " + (" ".join(
                 f"{k}={v}" for k, v in sorted(out.errors.items())) or "none"),
             "tolerated kernel-cache artifacts (bounded, see the module docstring): "
             + (" ".join(f"{k}={v}" for k, v in sorted(out.tolerated.items())) or "none"),
             f"violations: {len(out.violations)}"]  # fmt: skip
    if out.faults or out.nemesis_errors:
        kinds_f: dict[str, int] = {}
        for f in out.faults:
            kinds_f[f.kind] = kinds_f.get(f.kind, 0) + 1
        lines.insert(1, f"faults: {len(out.faults)} "
                     + " ".join(f"{k}={n}" for k, n in sorted(kinds_f.items())))  # fmt: skip
        lines += [f"  fault {f.show(out.t0)}" for f in out.faults]
        lines += [f"  nemesis error: {e}" for e in out.nemesis_errors]
    kinds: dict[str, int] = {}
    for v in out.violations:
        kinds[v.kind()] = kinds.get(v.kind(), 0) + 1
    lines += [f"  {n:5d}  {k}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])]
    for v in out.violations[:limit]:
        lines.append(f"  VIOLATION {v.what}")
        lines.append(f"    op: {v.op.show(out.t0)}")
        before = [c for c in v.history if c.end < v.op.start]
        near = before[-6:] + [c for c in v.history if c.end >= v.op.start and c.start <= v.op.end]
        lines.append(f"    history of {v.name} ({len(before) - len(before[-6:])} older changes "
                     f"not shown):")  # fmt: skip
        for c in near:
            src = c.op.show(out.t0) if c.op else "initial"
            lines.append(f"      -> {sorted(c.values)} via {src}")
    if len(out.violations) > limit:
        lines.append(f"  ... {len(out.violations) - limit} more")
    return "\n".join(lines)


def run(
    clients: int,
    duration: float,
    seed: int,
    tmp: str | None = None,
    logs: Path | None = None,
    nemesis: Sequence[str] = (),
) -> Outcome:
    """Start a fileserver and ``clients`` mounts, run (under ``nemesis``
    faults, if any), check, stop everything."""
    unknown = set(nemesis) - set(NEMESES)
    if unknown:
        raise ValueError(f"unknown nemesis {sorted(unknown)}; known: {', '.join(NEMESES)}")
    base = Path(tempfile.mkdtemp(prefix="afs-coherence-", dir=tmp))
    extra = ["--break-timeout", str(NEMESIS_BREAK_TIMEOUT)] if nemesis else []
    srv = ServerProcess(base / "fs", extra_args=extra)
    mounts: list[ClientMount] = []
    nem: Nemesis | None = None
    try:
        srv.start()
        for i in range(clients):
            mounts.append(ClientMount(srv, base / f"c{i}").start())
        (mounts[0].mnt / DIR).mkdir()
        roots = [m.mnt / DIR for m in mounts]
        for r in roots:  # every client sees the directory before the clock starts
            deadline = time.monotonic() + 10
            while not r.is_dir() and time.monotonic() < deadline:
                time.sleep(0.05)
        if nemesis:
            uuids = [(Path(m.cache_dir) / "client-uuid").read_text().strip() for m in mounts]
            nem = Nemesis(nemesis, seed, srv, mounts, uuids)
        return run_workers(roots, seed, duration, nem, srv.log_path)
    finally:
        if nem is not None:
            nem.stop.set()
            for m in mounts:  # a fault the run was stopped in must not outlive it
                with contextlib.suppress(ProcessLookupError, AssertionError):
                    os.kill(m.pid, signal.SIGCONT)
        for m in mounts:
            try:
                m.stop()
            except Exception as exc:  # every mount must come down
                log.warning("stopping %s: %r", m.mnt, exc)
                unmount(m.mnt)
        srv.stop()
        if logs is not None:  # the processes' own logs, to explain a violation
            logs.mkdir(parents=True, exist_ok=True)
            for i, m in enumerate(mounts):
                shutil.copy(m.log_path, logs / f"c{i}.log")
            shutil.copy(srv.log_path, logs / "server.log")
        shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="coherence.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--clients", type=int, default=3, help="client mounts (default 3)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of operations")
    p.add_argument("--seed", type=int, default=None, help="seed (default: random, printed)")
    p.add_argument("--tmp", default=None, help="where the temporary directory goes")
    p.add_argument("--log", type=Path, default=None, help="write every op here (JSON lines)")
    p.add_argument("--logs", type=Path, default=None, help="copy the server and client logs here")
    p.add_argument("--nemesis", default="", metavar="KIND,...",
                   help=f"inject faults of these kinds ({','.join(NEMESES)})")  # fmt: skip
    args = p.parse_args(argv)
    kinds = [k for k in args.nemesis.split(",") if k]
    if set(kinds) - set(NEMESES):
        p.error(f"--nemesis: unknown {sorted(set(kinds) - set(NEMESES))}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    print(f"coherence: {args.clients} clients, {args.duration:g} s, seed {seed}"
          + (f", nemesis {','.join(kinds)}" if kinds else ""), flush=True)  # fmt: skip
    out = run(args.clients, args.duration, seed, args.tmp, args.logs, kinds)
    print(report(out))
    if args.log:
        with open(args.log, "w") as f:
            for o in out.ops:
                d = dict(
                    vars(o),
                    start=o.start - out.t0,
                    end=o.end - out.t0,
                    wall0=out.wall0,
                    mid=o.mid and o.mid - out.t0,
                    mid_end=o.mid_end and o.mid_end - out.t0,
                )
                f.write(json.dumps(d) + "\n")
    print("PASS" if not out.violations else f"FAIL (replay: --seed {seed})")
    return 1 if out.violations else 0


if __name__ == "__main__":
    sys.exit(main())

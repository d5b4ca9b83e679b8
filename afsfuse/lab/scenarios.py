"""The built-in break scenarios, written on the lab API (the examples to copy).

Each is a function ``fn(lab)`` registered with ``@scenario``; run them with
``scripts/scenario.py NAME`` (``--list`` names them).  Workload sizes come
from ``lab.options`` (``files``, ``race_mib``, ``race_attempts``) with the
defaults below; server options from the decorator (``scripts/scenario.py``
``--break-timeout``/``--duration-cb`` override them).

May import ``afsfuse.lab``.
"""

from __future__ import annotations

import itertools
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from afsfuse.lab.lab import CLIENT_SLACK, ROOT_VOLUME, Lab, Mount, ScenarioFailed, scenario
from afsfuse.lab.timeline import Event


def opt(lab: Lab, name: str, default: int) -> int:
    """A workload parameter from the run's options."""
    value = getattr(lab.options, name, None)
    return default if value is None else int(value)


def revalidated(lab: Lab, actor: str, since: float) -> set[str]:
    """Fids ``actor`` revalidated since ``since``: a FetchStatus (validate_slow)
    or a fresh promise from another reply (a Lookup after the kernel's
    dentries were dropped also revalidates)."""
    evs = lab.events(actor, "validate_slow", since=since)
    evs += lab.events(actor, "promise_installed", since=since)
    return {e.get("fid") for e in evs}


def eventually(fn: Callable[[], object], bound: float) -> object:
    deadline = time.monotonic() + bound
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


@scenario("single-break",
          "B caches a file; A writes and closes; B's promise is broken before A's close "
          "returns; B reads the new data", external_ok=True)  # fmt: skip
def single_break(lab: Lab) -> None:
    a, b = lab.mount("A"), lab.mount("B")
    f = "single-break.txt"
    a.write(f, b"version-1")
    fid = a.fid(f)
    lab.require(b.read(f) == b"version-1", "B reads version-1")
    lab.check(b.examine(f)["promise"] == "ok", "B holds a promise on the file")
    t = lab.phase("A rewrites the file B caches").t
    closed = a.write(f, b"version-2", trunc=False).end or time.time()
    change = next((e for e in lab.events("server", "change", since=t, client="A")
                   if fid in e.get("fids").split(",")), None)  # fmt: skip
    lab.require(change is not None, "server logged A's change to the file")
    assert change is not None
    sent = lab.expect("server", "break", within=2, since=t, fid=fid, client="B", result="sent")
    got = lab.expect("B", "break_received", within=2, since=t, fid=fid)
    stored = lab.events("A", "stored", since=t, fid=fid)
    lab.check(bool(stored), "A logged its store of the file")
    lab.check(
        change.t <= sent.t <= closed,
        f"break acknowledged by B ({sent.t - t:.4f}) after A's change ({change.t - t:.4f}) "
        f"and before A's close returned ({closed - t:.4f})",
    )
    lab.check(
        got.t <= sent.t + CLIENT_SLACK,
        "B processed the break before the server logged it acknowledged",
    )
    lab.check(
        not stored or sent.t <= stored[0].t + CLIENT_SLACK,
        "A's store completed after the break was acknowledged",
    )
    lab.check(b.read(f) == b"version-2", "B reads version-2 after A's close")
    slow = lab.wait_for("B", "validate_slow", within=1, since=closed, fid=fid)
    lab.check(bool(slow), "B revalidated the file (validate_slow) on its next open")


@scenario("dir-break",
          "A creates, renames and removes entries in a directory B listed; B's listing "
          "follows each change", external_ok=True)  # fmt: skip
def dir_break(lab: Lab) -> None:
    a, b = lab.mount("A"), lab.mount("B")
    d = "dir-break"
    if a.p(d).exists():
        shutil.rmtree(a.p(d))
    a.mkdir(d)
    dfid = a.fid(d, "dir-break/")
    lab.require(b.listdir(d) == [], "B lists the empty directory")
    lab.phase("A changes the directory B listed")
    steps: list[tuple[str, Callable[[], object], list[str]]] = [
        ("create x", lambda: a.write(f"{d}/x", b"x"), ["x"]),
        ("rename x -> y", lambda: a.rename(f"{d}/x", f"{d}/y"), ["y"]),
        ("create z", lambda: a.write(f"{d}/z", b"z"), ["y", "z"]),
        ("remove y", lambda: a.unlink(f"{d}/y"), ["z"]),
        ("remove z", lambda: a.unlink(f"{d}/z"), []),
    ]
    for what, act, want in steps:
        act()
        sent = lab.wait_for("server", "break", within=2, fid=dfid, client="B")
        lab.check(
            bool(sent) and sent[0].get("result") == "sent",
            f"{what}: server broke B's promise on the directory",
        )
        got = b.listdir(d)
        lab.check(got == want, f"{what}: B lists {want} (got {got})")
        # Kernel dentries must follow too: a removed name must not resolve.
        for gone in sorted({"x", "y", "z"} - set(want)):
            lab.check(not b.exists(f"{d}/{gone}"), f"{what}: {gone} does not resolve on B")
    got = lab.events("B", "break_received", since=lab.focus_t, fid=dfid)
    lab.check(len(got) >= len(steps), f"B logged {len(got)} directory breaks (>= {len(steps)})")
    # A name B itself gave a file by rename (the kernel moved its dentry there,
    # no lookup) must follow A's later changes too.
    b.write(f"{d}/t", b"B's")
    b.rename(f"{d}/t", f"{d}/mine")
    lab.check(b.read(f"{d}/mine") == b"B's", "B reads the file it renamed to 'mine'")
    a.rename(f"{d}/mine", f"{d}/yours")
    lab.wait_for("B", "break_received", within=2, fid=dfid)
    # Resolve before listing: a fresh listing would drop the stale name anyway.
    ok = eventually(lambda: not b.exists(f"{d}/mine"), 1.0)
    lab.check(ok, "rename mine -> yours: 'mine' no longer resolves on B (a name B renamed "
              "into must be dropped from the kernel at A's directory break)")  # fmt: skip
    names = b.listdir(d)
    lab.check(names == ["yours"], f"rename mine -> yours: B lists ['yours'] (got {names})")


def _touch_files(m: Mount, d: str, n: int) -> list[str]:
    """Read ``n`` files (caching them with promises), as one app event."""
    rels = [f"{d}/f{i:03d}" for i in range(n)]
    with m.action("cache_files", dir=d, files=n):
        for rel in rels:
            m.p(rel).read_bytes()
    return rels


@scenario("mass-break",
          "the fileserver restarts (same port) under two clients holding many promises; "
          "each handles it with one cb_s_break bump and revalidates lazily on use")  # fmt: skip
def mass_break(lab: Lab) -> None:
    n = opt(lab, "files", 50)
    a, b = lab.mount("A"), lab.mount("B")
    a.mkdir("many")
    for i in range(n):
        a.p(f"many/f{i:03d}").write_bytes(b"%d" % i)
    fa = _touch_files(a, "many", n)
    fb = _touch_files(b, "many", n)
    for rel in (fa[0], fa[1], fa[-1]):
        a.fid(rel)
    names = {m.uuid: m.name for m in lab.mounts.values()}
    held = {names.get(c["uuid"], c["uuid"]): c["promises"] for c in lab.server.clients()}
    lab.check(
        all(v >= n for v in held.values()) and len(held) == 2,
        f"both clients hold >= {n} promises before the restart ({held})",
    )
    before = {k: m.stats() for k, m in lab.mounts.items()}
    t_restart = lab.phase("fileserver restart on the same port").t
    port = lab.server.port
    lab.server.restart()
    lab.require(lab.server.port == port, f"restarted on the same port {port}")
    for label in ("A", "B"):
        # Reconnect backoff doubles from 0.1 s; no use of the mount meanwhile.
        lab.expect(label, "server_connected", within=20, since=t_restart)
    time.sleep(0.5)  # let a second bump, if any, be logged
    for label, m in lab.mounts.items():
        bumps = lab.events(label, "mass_break", since=t_restart)
        s0 = next(iter(before[label]["servers"].values()))["cb_s_break"]
        s1 = next(iter(m.stats()["servers"].values()))["cb_s_break"]
        lab.check(
            len(bumps) == 1 and s1 == s0 + 1,
            f"{label}: the reset is one cb_s_break bump ({s0} -> {s1}; "
            f"mass_break events: {[e.get('why') for e in bumps]})",
        )
        # Reading the stats xattr stats the mount root: the root may revalidate.
        root = m.fid(".", "/")
        slow = {e.get("fid") for e in lab.events(label, "validate_slow", since=t_restart)}
        lab.check(slow <= {root}, f"{label}: no file revalidated before use "
                  f"({len(slow - {root})} besides the root)")  # fmt: skip
        fs0 = before[label]["rpc"].get("FS.FetchStatus", 0)
        fs1 = m.stats()["rpc"].get("FS.FetchStatus", 0)
        lab.check(fs1 - fs0 <= 1, f"{label}: at most the root's FS.FetchStatus before use "
                  f"({fs0} -> {fs1}), not one per cached vnode ({n})")  # fmt: skip
    t_use = lab.note("use", what="A reads 2 files, B reads 1").t
    used = {"A": [fa[0], fa[1]], "B": [fb[-1]]}
    for label, rels in used.items():
        m = lab.mounts[label]
        for rel in rels:
            want = b"%d" % int(rel.rpartition("/f")[2])
            lab.check(m.read(rel) == want, f"{label}: {rel} reads back")
    for label, rels in used.items():
        m = lab.mounts[label]
        want_fids = {m.fid(rel) for rel in rels}
        files = revalidated(lab, label, t_use) - {m.fid(".", "/"), m.fid("many")}
        lab.check(files == want_fids, f"{label}: exactly the used files revalidated "
                  f"({len(files)} of {n} cached)")  # fmt: skip
        why = {e.get("why") for e in lab.events(label, "validate_slow", since=t_use)}
        lab.check(
            why <= {"server_break", "no_status"},
            f"{label}: revalidations say why=server_break ({sorted(why)})",
        )


@scenario("volume-break",
          "an admin whole-volume break: every cached vnode of that volume revalidates on "
          "next use; another volume (behind a mount point) is untouched")  # fmt: skip
def volume_break(lab: Lab) -> None:
    vol2 = f"proj{int(time.time()) % 100000}"
    lab.server.admin("vol", "create", vol2)
    a = lab.mount("A")
    a.mkmount(vol2, vol2)
    top = [f"vb-{i}" for i in range(3)]
    inner = [f"{vol2}/p-{i}" for i in range(3)]
    for rel in top + inner:
        a.p(rel).write_bytes(rel.encode())
    for rel in top + inner:
        a.p(rel).read_bytes()
        a.fid(rel)
    lab.check(all(a.examine(r)["promise"] == "ok" for r in top + inner),
              "A holds promises in both volumes")  # fmt: skip
    vid1, vid2 = (a.fid(r).split(".")[0] for r in (top[0], inner[0]))
    t = lab.phase(f"admin: break-volume {ROOT_VOLUME}").t
    lab.server.break_volume(ROOT_VOLUME)
    got = lab.wait_for("A", "volume_break", within=2, since=t)
    lab.check(
        [e.get("volume") for e in got] == [vid1],
        f"A: one volume_break, for {ROOT_VOLUME} ({vid1}) only "
        f"(got {[e.get('volume') for e in got]})",
    )
    stats = a.stats()["volumes"]
    lab.check(
        any(k.endswith(f":{vid1}") and v["cb_v_break"] == 1 for k, v in stats.items())
        and any(k.endswith(f":{vid2}") and v["cb_v_break"] == 0 for k, v in stats.items()),
        f"cb_v_break bumped once for {vid1}, still 0 for {vid2}",
    )
    t_use = lab.note("use", what="A examines every file").t
    for rel in inner + top:
        lab.check(a.examine(rel)["promise"] == "ok", f"{rel}: promise ok after use")
    again = revalidated(lab, "A", t_use)
    slow = lab.events("A", "validate_slow", since=t_use)
    for rel in top:
        lab.check(a.fid(rel) in again, f"{rel} ({ROOT_VOLUME}) revalidated on use")
    why = {e.get("why") for e in slow if e.get("fid").startswith(vid1 + ".")}
    lab.check(why <= {"volume_break"}, f"{ROOT_VOLUME}'s revalidations say why=volume_break "
              f"({sorted(why)})")  # fmt: skip
    broke2 = [e for e in slow if e.get("fid").startswith(vid2 + ".") and e.get("why")
              in ("volume_break", "server_break")]  # fmt: skip
    lab.check(not broke2, f"no {vol2} vnode lost its promise to the break ({len(broke2)})")


@scenario("alias-cells",
          "one volume through two aliased cells in one mount: one server record, two "
          "volume instances, one break reaches both")  # fmt: skip
def alias_cells(lab: Lab) -> None:
    srv = lab.server
    cells = lab.base / "cells.toml"
    cells.write_text(
        'default = "localcell"\n'
        f'[cells."localcell"]\nvlservers = ["{srv.host}:{srv.port}"]\n'
        '[cells."othercell"]\nalias = "localcell"\n'
    )
    a = lab.mount("A", cells=cells)
    b = lab.mount("B")
    a.mkmount("other", ROOT_VOLUME, cell="othercell")
    b.write("shared.txt", b"one")
    p1, p2 = "shared.txt", "other/shared.txt"
    lab.require(a.read(p1) == b"one" and a.read(p2) == b"one",
                "A reads the file through both cells")  # fmt: skip
    fid = a.fid(p1, "shared.txt")
    lab.check(
        os.getxattr(a.p(p1), "afs.cell") == b"localcell"
        and os.getxattr(a.p(p2), "afs.cell") == b"othercell",
        "the two paths are two cells",
    )
    lab.check(a.stat(p1).st_ino != a.stat(p2).st_ino, "two volume instances: two inodes")
    st = a.stats()
    lab.check(len(st["servers"]) == 1, f"A has one server record ({len(st['servers'])})")
    insts = sorted(k for k in st["volumes"] if k.endswith(":" + fid.split(".")[0]))
    lab.check(len(insts) == 2, f"A has two instances of the volume: {insts}")
    t = lab.phase("B rewrites the file A reaches through both cells").t
    b.write("shared.txt", b"two!", trunc=False)
    sent = lab.wait_for("server", "break", within=2, since=t, fid=fid, client="A")
    lab.check(len(sent) == 1, f"the server sent one break to A ({len(sent)})")
    got = lab.wait_for("A", "break_received", within=2, since=t, fid=fid, count=2)
    lab.check(
        sorted(e.get("cell") for e in got) == ["localcell", "othercell"],
        f"that break reached both instances ({[e.get('cell') for e in got]})",
    )
    lab.check(a.read(p1) == b"two!" and a.read(p2) == b"two!",
              "A reads the new data through both cells")  # fmt: skip


@scenario("dead-client",
          "B is SIGSTOPped; A's write completes within the server's break bound; B resumes, "
          "receives the delayed break and reads the new data", break_timeout=1.0)  # fmt: skip
def dead_client(lab: Lab) -> None:
    # Every step waits on an event, never on a duration: how long A's close
    # takes (about the break bound) is shown, not asserted (speed belongs in
    # benchmarks, and a loaded machine stretches it).
    bound = float(lab.server_options["break_timeout"])
    a, b = lab.mount("A"), lab.mount("B")
    f = "dead.txt"
    a.write(f, b"before")
    fid = a.fid(f)
    lab.require(b.read(f) == b"before", "B reads 'before'")
    lab.phase("B's daemon is SIGSTOPped")
    b.pause()
    w = a.write(f, b"after!", trunc=False)
    closed = w.end or time.time()
    gave_up = [e for e in lab.events("server", "break", since=w.t, fid=fid, client="B")
               if e.get("result") in ("failed", "delayed")]  # fmt: skip
    lab.require(bool(gave_up),
                "the server gave up on B and kept the break as delayed")  # fmt: skip
    change = lab.events("server", "change", since=w.t, client="A")
    waited = f"{gave_up[0].t - change[0].t:.2f} s after A's change" if change else "?"
    lab.check(
        gave_up[0].t <= closed + CLIENT_SLACK,
        f"A's close returned ({closed - w.t:.2f} s) after the server gave up on B "
        f"({waited}; break bound {bound} s): it waited for the bound, not for B",
    )
    lab.check(bool(lab.events("server", "client_down", since=w.t, client="B")),
              "the server marked B down")  # fmt: skip
    b.resume()
    t_cont = lab.mark
    lab.expect("B", "break_received", within=30, fid=fid)
    # B's next call to the server (this read's revalidation) is answered only
    # after the delayed break was delivered and B marked up (or a background
    # retry did both first): by the time the read returns both are logged.
    lab.check(b.read(f) == b"after!", "B reads the new data")
    redo = lab.events("server", "break", since=t_cont, fid=fid, client="B", result="sent",
                      delayed="1")  # fmt: skip
    lab.check(bool(redo), "the server delivered the delayed break (delayed=1) once B was back")
    lab.check(bool(lab.events("server", "client_up", since=t_cont, client="B")),
              "the server marked B up again")  # fmt: skip


@scenario("expiry",
          "short promise duration on the server: the promise lapses with no break and the "
          "next use revalidates", callback_duration=2.0)  # fmt: skip
def expiry(lab: Lab) -> None:
    dur = float(lab.server_options["callback_duration"])
    a = lab.mount("A")
    f = "expiry.txt"
    a.write(f, b"lasting")
    fid = a.fid(f)
    a.read(f)
    info = a.examine(f)
    lab.check(
        info["promise"] == "ok" and info["promise_expires_in"] <= dur,
        f"A holds a promise for <= {dur} s ({info['promise_expires_in']:.2f} s left)",
    )
    t = lab.phase(f"nobody touches the file for {dur + 1} s").t
    lab.wait(dur + 1)
    lab.check(a.read(f) == b"lasting", "A reads the file")
    lab.check(not lab.events("server", "break", since=t, fid=fid),
              "no break was sent: the promise lapsed by itself")  # fmt: skip
    lab.check(not lab.events("A", "break_received", since=t, fid=fid), "A received no break")
    lab.check(fid in revalidated(lab, "A", t), "the next use revalidated the file")
    why = {e.get("why") for e in lab.events("A", "validate_slow", since=t)}
    lab.check(why == {"expired"}, f"every revalidation says why=expired ({sorted(why)})")
    grant = lab.events("server", "grant", since=t, fid=fid, client="A")
    lab.check(bool(grant), "the server granted a fresh promise")


def _shown_bytes(data: bytes) -> str:
    return data[:32].decode(errors="replace")


def _diff(got: bytes, want: bytes) -> str:
    """Where two contents first differ, for a failed check's text."""
    if got == want:
        return ""
    at = next((i for i, (x, y) in enumerate(zip(got, want, strict=False)) if x != y),
              min(len(got), len(want)))  # fmt: skip
    return (f" (got {len(got)} bytes, want {len(want)}; first difference at offset {at}: "
            f"got {got[at:at + 12]!r}, want {want[at:at + 12]!r})")  # fmt: skip


def _read_loop(path: Path, stop: threading.Event, reads: list[int], bound: float = 20) -> None:
    """Read ``path`` whole, again and again, until ``stop`` (or ``bound`` s)."""
    deadline = time.monotonic() + bound
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            with open(path, "rb") as f:
                while f.read(1 << 20):
                    pass
        except OSError:
            pass
        reads[0] += 1


@scenario("inflight-race",
          "a break arrives while B's FetchData for the same file is in flight; B does not "
          "install the promise from that reply (promise_discarded)", external_ok=True)  # fmt: skip
def inflight_race(lab: Lab) -> None:
    a, b = lab.mount("A"), lab.mount("B")
    size = opt(lab, "race_mib", 24) << 20
    attempts = opt(lab, "race_attempts", 4)
    f = "race.bin"
    final = b""
    found: list[Event] = []
    attempt = 0
    for attempt in range(1, attempts + 1):
        fill = b"%d" % attempt
        a.write(f, (fill * size)[:size])
        fid = a.fid(f)
        with b.action("read", path=f):
            b.p(f).read_bytes()
        if attempt == 1:
            lab.phase("A stores a large file while B keeps reading it")
        # A's close sends many StoreData calls, each breaking B's promise; B's
        # reads keep a FetchData in flight (queued behind the store on the
        # server's volume), so a break lands between its issue and its reply.
        final = ((b"%d" % (attempt + 100)) * size)[:size]  # as long as the file: no tail left
        stop = threading.Event()
        reads = [0]
        t = lab.note("attempt", n=attempt).t
        th = threading.Thread(target=_read_loop, args=(b.p(f), stop, reads), daemon=True)
        with b.action("read_loop", path=f) as ev:
            th.start()
            time.sleep(0.05)
            a.write(f, final, trunc=False)
            stop.set()
            th.join(25)
            ev.fields["reads"] = str(reads[0])
        found = lab.wait_for("B", "promise_discarded", within=1, since=t, fid=fid)
        if found:
            break
    lab.check(bool(found), f"B discarded a promise from a reply raced by a break "
              f"(attempt {attempt} of {attempts}; why="
              f"{found[0].get('why') if found else None})")  # fmt: skip
    with b.action("read", path=f):
        got = b.p(f).read_bytes()
    lab.check(got == final, "B then reads A's final data" + _diff(got, final))


@scenario("giveup",
          "forgetting vnodes (drop_caches) gives nothing back; unmount sends exactly one "
          "FS.GiveUpAllCallBacks")  # fmt: skip
def giveup(lab: Lab) -> None:
    n = opt(lab, "files", 50)
    a = lab.mount("A")
    a.mkdir("gu")
    for i in range(n):
        a.p(f"gu/f{i:03d}").write_bytes(b"x")
    _touch_files(a, "gu", n)
    held0 = lab.server.admin("callbacks", "--client", a.uuid)["total"]
    # The daemon keeps vnodes the kernel forgot (cached, reached by breaks)
    # until eviction: what grows is its count of the kernel's forgets.
    vn0 = a.stats()["kernel_forgets"]
    t = lab.phase("the kernel forgets inodes (drop_caches)").t
    lab.note("drop_caches")
    try:
        Path("/proc/sys/vm/drop_caches").write_text("2\n")
    except OSError as exc:
        raise ScenarioFailed(f"cannot drop caches (root needed): {exc}") from None

    def more() -> int:
        v = a.stats()["kernel_forgets"]
        return v if v > vn0 else 0

    vn1 = int(eventually(more, 3) or vn0)  # type: ignore[call-overload]
    lab.note("kernel_forgets", mount="A", before=vn0, after=vn1)
    lab.check(vn1 > vn0, f"A's kernel forgot inodes ({vn0} -> {vn1} forgets)")
    held1 = lab.server.admin("callbacks", "--client", a.uuid)["total"]
    lab.check(held1 == held0, f"the server still holds A's promises ({held0} -> {held1})")
    lab.check(not lab.events("server", "giveup", since=t), "no GiveUp reached the server")
    rpcs = lab.server.stats()["rpcs"].get("FS.GiveUpAllCallBacks", 0)
    lab.check(rpcs == 0, f"FS.GiveUpAllCallBacks calls so far: {rpcs}")
    a.unmount()
    gave = lab.wait_for("server", "giveup", within=3, since=t)
    lab.check(len(gave) == 1 and gave[0].get("client") == "A",
              f"one giveup event at the server, from A ({len(gave)})")  # fmt: skip
    rpcs = lab.server.stats()["rpcs"].get("FS.GiveUpAllCallBacks", 0)
    lab.check(rpcs == 1, f"exactly one FS.GiveUpAllCallBacks ({rpcs})")
    lab.check(len(lab.events("A", "gave_up_callbacks", since=t)) == 1,
              "A logged gave_up_callbacks once")  # fmt: skip


@scenario("overflow",
          "a server with a tiny callback table revokes the least recently active client "
          "with InitCallBackState instead of failing requests", max_callbacks=24)  # fmt: skip
def overflow(lab: Lab) -> None:
    n = int(lab.server_options["max_callbacks"]) // 2
    a, b = lab.mount("A"), lab.mount("B")
    for i in range(n):
        a.p(f"a{i:02d}").write_bytes(b"a%d" % i)
        a.p(f"b{i:02d}").write_bytes(b"b%d" % i)
    afids = set()
    for i in range(n):
        a.p(f"a{i:02d}").read_bytes()
        afids.add(a.fid(f"a{i:02d}"))
    errs0 = lab.server.stats().get("rpc_errors", {})
    t = lab.phase(f"B caches {n} more files; the table holds {2 * n} promises").t
    errors = []
    with b.action("cache_files", files=n) as ev:
        for i in range(n):
            try:
                if b.p(f"b{i:02d}").read_bytes() != b"b%d" % i:
                    errors.append(f"b{i:02d}: wrong data")
            except OSError as exc:
                errors.append(f"b{i:02d}: {exc}")
        ev.fields["errors"] = str(len(errors))
    lab.check(not errors, f"B read all {n} files while the table overflowed {errors}")
    rev = lab.wait_for("server", "revoke", within=3, since=t)
    lab.check(
        bool(rev) and all(e.get("client") == "A" for e in rev),
        f"the server revoked A, the least recently active ({[e.get('client') for e in rev]})",
    )
    init = lab.wait_for("server", "init_callback_state", within=3, since=t, client="A")
    lab.check(bool(init) and init[0].get("reason") == "table_full",
              "A got InitCallBackState3 (reason table_full)")  # fmt: skip
    mass = lab.wait_for("A", "mass_break", within=3, since=t)
    lab.check(len(mass) == 1, f"A handled it as one mass break ({len(mass)})")
    stats = lab.server.stats().get("rpc_errors", {})
    errs = {k: v - errs0.get(k, 0) for k, v in stats.items() if v - errs0.get(k, 0)}
    lab.check(not errs, f"no request failed at the server meanwhile ({errs})")
    t_use = lab.note("use", what="A reads its files again").t
    ok = all(a.p(f"a{i:02d}").read_bytes() == b"a%d" % i for i in range(n))
    lab.check(ok, "A reads its files again")
    missed = afids - revalidated(lab, "A", t_use)
    lab.check(not missed, f"A revalidated every one of them ({len(missed)} not)")
    why = {e.get("why") for e in lab.events("A", "validate_slow", since=t_use)}
    lab.check(why <= {"server_break", "no_status"}, f"why=server_break ({sorted(why)})")


@scenario("volume-move",
          "a mounted volume moves to a second fileserver (VLDB on etcd); B's next call gets "
          "'moved', asks VL, registers its interest on the new server, revalidates, and reads "
          "the data written before the move from there")  # fmt: skip
def volume_move(lab: Lab) -> None:
    new = lab.add_server("fs2")  # first: it starts etcd and the first server on it
    old = lab.server
    vol = "proj"
    old.admin("vol", "create", vol)
    a, b = lab.mount("A", volume=vol), lab.mount("B", volume=vol)
    f = "before-move.txt"
    a.write(f, b"written on fs before the move")
    fid = a.fid(f)
    lab.require(b.read(f) == b"written on fs before the move", "B reads the file from fs")
    lab.check(b.examine(f)["server"] == old.uuid and b.examine(f)["promise"] == "ok",
              "B holds a promise on the file from fs")  # fmt: skip
    t = lab.phase(f"admin: vol move {vol} to fs2").t
    moved = lab.move(vol, to="fs2")
    lab.check(moved.get("to") == new.uuid, f"vol move answered: {vol} is on fs2")
    where = old.admin("vol", "examine", vol)["servers"][0]["uuid"]
    lab.check(where == new.uuid, "the VLDB names fs2 for the volume")
    # The source's whole-volume break voids B's promises from fs; B's next
    # call to fs is answered "moved".
    lab.expect("B", "volume_break", within=5, since=t)
    t_use = lab.note("use", what="B reads the file again").t
    got = b.read(f)
    lab.check(got == b"written on fs before the move",
              f"B reads the data written before the move ({_shown_bytes(got)})")  # fmt: skip
    answer = lab.expect("B", "moved_answer", within=5, since=t_use, server="fs")
    query = lab.expect("B", "vl_query", within=5, since=t_use, forced=1)
    interest = lab.expect("B", "interest", within=5, since=t_use, server="fs2")
    relocated = lab.expect("B", "volume_moved", within=5, since=t_use)
    slow = lab.expect("B", "validate_slow", within=5, since=t_use, fid=fid)
    grant = lab.expect("fs2", "grant", within=5, since=t_use, fid=fid, client="B")
    steps = [answer, query, interest, grant]
    lab.check(
        all(x.t <= y.t + CLIENT_SLACK for x, y in itertools.pairwise(steps)),
        f"in order: fs answered moved ({answer.get('method')}), B asked VL, registered its "
        f"interest on fs2, fs2 granted the revalidated file (why={slow.get('why')})",
    )
    lab.check(relocated.get("servers") == "fs2", f"B's volume now names fs2 "
              f"({relocated.get('servers')})")  # fmt: skip
    lab.check(b.examine(f)["server"] == new.uuid and b.examine(f)["promise"] == "ok",
              "B holds a fresh promise on the file from fs2")  # fmt: skip
    lab.check(not lab.events("server", "grant", since=t_use, fid=fid, client="B"),
              "fs granted B nothing after the move")  # fmt: skip
    t2 = lab.phase("A rewrites the file (through fs2)").t
    a.write(f, b"written on fs2 after the move")
    lab.expect("fs2", "break", within=5, since=t2, fid=fid, client="B", result="sent")
    lab.check(b.read(f) == b"written on fs2 after the move",
              "B reads A's change, broken by fs2")  # fmt: skip

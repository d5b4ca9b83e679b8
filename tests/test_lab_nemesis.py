"""Each nemesis of ``fileserver/nemesis.py`` shows its effect at the server
(its own events) and on a real client mount, driven through the lab API
(``afsfuse.lab``) as a user's scenario would be.

Every scenario here is run by ``afsfuse.lab.lab.run``, which stops every
process by pid and unmounts in ``finally``; a failed run prints its checks
and the timeline.
"""

from __future__ import annotations

import pytest

from afsfuse.lab import Lab, Scenario
from afsfuse.lab.lab import report, run


def _run(tmp_path, fn, **server_options) -> None:
    r = run(Scenario(fn.__name__, fn.__doc__ or "", fn, server_options), tmp=str(tmp_path))
    assert r.passed, report(r)


def breaks(m) -> int:
    """Breaks a client handled, cached vnode or not.  Another process's
    ``drop_caches`` (the machine is shared) may make the kernel forget the
    inode, and then the break finds no vnode: it is counted, not logged."""
    st = m.stats()
    return st["breaks"] + st["breaks_uncached"]


def _cached_by_b(lab: Lab, name: str = "f.txt"):
    a, b = lab.mount("A"), lab.mount("B")
    a.write(name, b"old")
    lab.require(b.read(name) == b"old", "B reads the old data")
    return a, b, a.fid(name)


@pytest.mark.mount
def test_delay_breaks(tmp_path, require_fuse) -> None:
    def delayed(lab: Lab) -> None:
        """a break to B arrives no sooner than the injected delay, and is answered"""
        a, b, fid = _cached_by_b(lab)
        lab.server.delay_breaks("B", 1.0)
        lab.expect("server", "nemesis_inject", kind="delay-breaks", client="B")
        lab.phase("A rewrites the file; breaks to B wait 1 s")
        n0 = breaks(b)
        w = a.write("f.txt", b"new", trunc=False)
        eff = lab.expect("server", "nemesis_effect", kind="delay-breaks", client="B")
        sent = lab.expect("server", "break", fid=fid, client="B", result="sent")
        lab.check(sent.t - eff.t >= 1.0, f"B answered the break {sent.t - eff.t:.3f} s after the "
                  "delay began (>= 1 s)")  # fmt: skip
        lab.check(breaks(b) == n0 + 1, "B handled one break")
        lab.check(sent.t <= (w.end or 0), "A's close still waited for B's answer")
        lab.check(not lab.events("server", "client_down", client="B"), "B was not marked down")
        lab.server.heal("B")
        lab.expect("server", "nemesis_heal", kind="delay-breaks", client="B")
        lab.check(b.read("f.txt") == b"new", "B reads the new data")

    _run(tmp_path, delayed, break_timeout=4)


@pytest.mark.mount
def test_drop_breaks(tmp_path, require_fuse) -> None:
    def dropped(lab: Lab) -> None:
        """a dropped break marks B down; the break is kept and delivered later"""
        a, b, fid = _cached_by_b(lab)
        lab.server.drop_breaks("B")
        lab.phase("A rewrites the file; the break to B is lost")
        n0 = breaks(b)
        a.write("f.txt", b"new", trunc=False)
        lab.expect("server", "nemesis_effect", kind="drop-breaks", client="B")
        lab.expect("server", "break", fid=fid, client="B", result="failed")
        lab.expect("server", "client_down", client="B")
        # The server retries down clients in the background (2.5 x the break
        # timeout): the kept break reaches B while the drop is still on.
        lab.expect("server", "break", within=10, fid=fid, client="B", result="sent",
                          delayed="1")  # fmt: skip
        lab.expect("server", "client_up", client="B")
        lab.check(breaks(b) == n0 + 1, "B handled the break (once) after it came back")
        lab.check(b.read("f.txt") == b"new", "B reads the new data after it came back")
        lab.server.heal()
        lab.expect("server", "nemesis_heal", kind="drop-breaks", client="B")

    _run(tmp_path, dropped, break_timeout=1)


@pytest.mark.mount
def test_partition(tmp_path, require_fuse) -> None:
    def partitioned(lab: Lab) -> None:
        """B is cut off for 2 s: its connection closes, its Hello is refused,
        breaks meanwhile are kept; it comes back by itself and catches up"""
        a, b, fid = _cached_by_b(lab)
        n0 = breaks(b)
        t = lab.phase("B is partitioned for 2 s").t
        lab.server.partition("B", 2)
        lab.expect("server", "nemesis_effect", kind="partition", client="B", action="closed")
        lab.expect("server", "client_down", client="B")
        a.write("f.txt", b"new", trunc=False)
        lab.expect("server", "break", fid=fid, client="B", result="delayed")
        lab.expect("server", "nemesis_effect", within=5, since=t, kind="partition", client="B",
                   action="refused")  # fmt: skip
        hello = lab.expect("server", "hello", within=15, since=t, client="B", delayed="1")
        lab.check(hello.t - t >= 2.0, f"B's Hello was accepted {hello.t - t:.2f} s after the "
                  "partition began (>= 2 s)")  # fmt: skip
        lab.expect("B", "server_connected", since=hello.t - 0.01)
        lab.check(breaks(b) == n0 + 1, "B handled the kept break when it came back")
        lab.check(b.read("f.txt") == b"new", "B reads the new data after the partition")

    _run(tmp_path, partitioned, break_timeout=1)


@pytest.mark.mount
def test_shorten_promises(tmp_path, require_fuse) -> None:
    def shortened(lab: Lab) -> None:
        """shortened promises lapse on the client and the next use revalidates"""
        a = lab.mount("A")
        a.write("f.txt", b"data")
        fid = a.fid("f.txt")
        lab.server.shorten_promises(1)
        lab.expect("server", "nemesis_inject", kind="shorten-promises")
        lab.server.break_fid(fid)  # drop the long promise A holds
        t = lab.phase("A reads under 1 s promises").t
        lab.check(a.read("f.txt") == b"data", "A reads the file")
        g = lab.expect("server", "grant", since=t, fid=fid, client="A")
        lab.check(int(g.get("expires_in")) <= 1, f"the server granted {g.get('expires_in')} s")
        info = a.examine("f.txt")
        lab.check(info["promise_expires_in"] <= 1, "A holds a promise of <= 1 s "
                  f"({info['promise_expires_in']:.2f} s left)")  # fmt: skip
        lab.wait(1.5)
        lab.check(a.read("f.txt") == b"data", "A reads the file again")
        t_use = lab.mark  # the read's start
        # The lapsed promise is renewed by the next use (a FetchStatus, or the
        # Lookup of a kernel dentry that lapsed with it).
        lab.expect("server", "grant", fid=fid, client="A")
        lab.expect("A", "promise_installed", fid=fid)
        why = {e.get("why") for e in lab.events("A", "validate_slow", since=t_use, fid=fid)}
        lab.check(why <= {"expired"}, f"A's revalidations say why=expired ({sorted(why)})")
        lab.server.heal()
        t = lab.note("healed").t
        lab.server.break_fid(fid)
        a.read("f.txt")
        g = lab.expect("server", "grant", since=t, fid=fid, client="A")
        lab.check(int(g.get("expires_in")) > 60, f"healed: {g.get('expires_in')} s promises again")

    _run(tmp_path, shortened)

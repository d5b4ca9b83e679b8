"""Every break scenario of ``scripts/scenario.py``, a user's scenario file
run through ``scripts/scenario.py run`` (with its timeline drawn), and a
short run of the close-to-open checker ``scripts/coherence.py``, on real
mounts.

Each scenario starts and stops its own fileserver and client mounts (all
stopped by pid and unmounted in ``finally``, even when a check fails); a
scenario fails with the list of its failed checks and the tail of its
timeline.  The checker's own logic is also tested on made-up histories, so a
checker that accepts everything cannot pass unnoticed.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET

import pytest

from afsfuse.lab import Lab, ScenarioFailed
from afsfuse.lab.plot import plot
from afsfuse.lab.server import REPO
from scripts import coherence
from scripts.coherence import ABSENT, Op
from scripts.scenario import SCENARIOS, build_parser, render, run_one

log = logging.getLogger(__name__)

#: Short settings: the whole file stays well under three minutes.
SHORT = ["--files", "20", "--break-timeout", "1", "--duration-cb", "2", "--race-mib", "16"]


@pytest.mark.mount
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario(name: str, tmp_path, require_fuse) -> None:
    opts = build_parser().parse_args([name, *SHORT, "--tmp", str(tmp_path)])
    r = run_one(SCENARIOS[name], opts)
    failed = [text for ok, text in r.checks if not ok] + ([r.error] if r.error else [])
    timeline = render([e for e in r.events if e.t >= r.focus_t - 0.002], r.focus_t, fids=r.fids)
    assert r.passed, (
        f"{name} FAILED ({r.seconds:.1f} s):\n  "
        + "\n  ".join(failed)
        + ("\ntimeline (tail):\n" + "\n".join(timeline.splitlines()[-40:]))
    )


USER_FILE = textwrap.dedent("""
    from afsfuse.lab import Lab, scenario

    @scenario("user-break", "B caches; A rewrites; B's promise is broken; B reads it",
              break_timeout=2)
    def user_break(lab: Lab) -> None:
        a, b = lab.mount("A"), lab.mount("B")
        a.write("u.txt", b"one")
        lab.check(b.read("u.txt") == b"one", "B reads one")
        lab.phase("A rewrites u.txt")
        a.write("u.txt", b"two")
        lab.expect("server", "break", within=3, client="B", fid=a.fid("u.txt"), result="sent")
        lab.check(b.read("u.txt") == b"two", "B reads two")

    @scenario("user-fails", "a check that cannot hold: the run must exit non-zero")
    def user_fails(lab: Lab) -> None:
        a = lab.mount("A")
        a.write("x", b"x")
        lab.expect("A", "no_such_event", within=0.2)
""")


def _scenario_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "scripts/scenario.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=240)  # fmt: skip


def test_add_server_needs_the_cell_vldb_from_the_start(tmp_path) -> None:
    # A second server must share the first one's VLDB (etcd): once the first
    # server runs without it, add_server refuses instead of making a second
    # cell; the lab still stops what it started.
    lab = Lab(tmp_path / "lab")
    try:
        first = lab.server
        with pytest.raises(ScenarioFailed, match="before the first use of"):
            lab.add_server("fs2")
        assert list(lab.servers) == ["server"] and lab.etcd is None
        with pytest.raises(ScenarioFailed, match="no server 'nope'"):
            lab.move("root.cell", to="nope")
    finally:
        assert lab.close() == []
    assert first.proc.proc is not None and first.proc.proc.poll() is not None


@pytest.mark.mount
def test_user_scenario_file_runs_and_plots(tmp_path, require_fuse) -> None:
    f = tmp_path / "my_scenarios.py"
    f.write_text(USER_FILE)
    listed = _scenario_cli("run", str(f), "--list")
    assert listed.returncode == 0
    assert "user-break" in listed.stdout and "user-fails" in listed.stdout
    out_json, svg = tmp_path / "t.json", tmp_path / "t.svg"
    ok = _scenario_cli("run", str(f), "user-break", "--json", str(out_json), "--plot", str(svg),
                       "--tmp", str(tmp_path))  # fmt: skip
    assert ok.returncode == 0, ok.stdout[-4000:] + ok.stderr[-2000:]
    assert "user-break: PASS" in ok.stdout and "[ok] B reads two" in ok.stdout
    [run] = json.loads(out_json.read_text())["scenarios"]
    assert run["passed"] and any(e["actor"] == "app:A" and "end" in e for e in run["events"])
    svg_root = ET.parse(svg).getroot()
    assert svg_root.tag.endswith("svg")
    texts = {"".join(t.itertext()).strip() for t in svg_root.iter() if t.tag.endswith("text")}
    assert {"lab", "app:A", "A", "server", "B", "app:B"} <= texts, texts
    # The same run drawn as PNG and as one HTML page with every lifeline.
    png = plot(run, tmp_path / "t.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = plot(run, tmp_path / "t.html").read_text()
    lanes = page.split("Lifelines: ", 1)[1].split("</p>", 1)[0].split(", ")
    assert (
        sorted(lanes)
        == sorted({e["actor"] for e in run["events"]})
        == sorted(["lab", "app:A", "app:B", "A", "B", "server"])
    )
    assert "<svg" in page and "PASS" in page and "<script" not in page
    bad = _scenario_cli("run", str(f), "user-fails", "--tmp", str(tmp_path))
    assert bad.returncode == 1, bad.stdout[-3000:]
    assert "user-fails: FAIL" in bad.stdout and "no_such_event" in bad.stdout
    missing = _scenario_cli("run", str(tmp_path / "nope.py"))
    assert missing.returncode == 2


@pytest.mark.mount
def test_shipped_example_file_passes(tmp_path, require_fuse) -> None:
    res = _scenario_cli("run", "scripts/lab_example.py", "--tmp", str(tmp_path))
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "lost-break: PASS" in res.stdout


@pytest.mark.mount
def test_coherence_short_run(tmp_path, require_fuse) -> None:
    out = coherence.run(clients=3, duration=15.0, seed=20261125, tmp=str(tmp_path))
    assert len(out.ops) > 100, f"only {len(out.ops)} operations ran"
    assert not out.violations, coherence.report(out, limit=8)


@pytest.mark.mount
def test_coherence_under_the_nemeses(tmp_path, require_fuse) -> None:
    kinds = ["pause", "partition", "restart", "delay-breaks", "drop-breaks"]
    out = coherence.run(clients=3, duration=20.0, seed=20261201, tmp=str(tmp_path),
                        nemesis=kinds)  # fmt: skip
    assert not out.nemesis_errors, out.nemesis_errors
    assert len(out.ops) > 100, f"only {len(out.ops)} operations ran"
    assert len(out.faults) >= 3 and len({f.kind for f in out.faults}) >= 2, coherence.report(out)
    assert all(f.kind in kinds and f.end < coherence.INF for f in out.faults)
    assert not out.violations, coherence.report(out, limit=8)


# -- the checker itself ---------------------------------------------------------


def test_faults_excuse_only_their_client_within_their_window() -> None:
    ops = [
        _write(0, 1, "n0", 0.0, 1.0),
        _write(0, 2, "n0", 2.0, 3.0),
        _read(1, 1, "n0", 4.0, 4.5, "w0.1"),  # stale: c1 was paused
        _read(2, 1, "n0", 4.0, 4.5, "w0.1"),  # stale: c2 was not
        _read(1, 2, "n0", 6.0, 6.5, "w0.1"),  # stale after the window closed
        _read(0, 3, "n0", 4.0, 4.5, "w0.1"),  # stale under delayed breaks: no excuse
    ]
    faults = [
        coherence.Fault("pause", 1, 1.5, 3.5, excused_until=5.0),
        coherence.Fault("delay-breaks", 0, 1.5, 4.6, excused_until=1.5),
    ]
    tolerated: dict[str, int] = {}
    vs = coherence.excuse(coherence.check(ops), faults, tolerated)
    assert sorted((v.op.client, v.op.seq) for v in vs) == [(0, 3), (1, 2), (2, 1)]
    assert tolerated == {"excused by pause": 1}


def test_restart_excuses_a_client_only_until_its_hello() -> None:
    # The restarted server lost every promise: client 1 may read stale data
    # until its Hello (3.5), never after; errors of any client until the
    # last Hello.
    ops = [
        _write(0, 1, "n0", 0.0, 1.0),
        _op(1, 1, "read", "n0", 2.0, 2.5, error="EIO"),  # the server was down
        _write(0, 2, "n0", 2.7, 3.0),
        _read(1, 2, "n0", 3.1, 3.2, "w0.1"),  # stale, before its Hello
        _read(1, 3, "n0", 4.2, 4.3, "w0.1"),  # stale after its Hello
        # Never excused: a hang, and contents the file never held.
        _op(1, 4, "read", "n0", 2.8, coherence.INF),
        _read(1, 5, "n0", 3.1, 3.2, "garbage"),
    ]
    faults = [coherence.Fault("restart", None, 1.8, 2.6, excused_until=4.5,
                              client_until={0: 2.7, 1: 3.5})]  # fmt: skip
    tolerated: dict[str, int] = {}
    vs = coherence.excuse(coherence.check(ops), faults, tolerated)
    assert sorted((v.op.client, v.op.seq) for v in vs) == [(1, 3), (1, 4), (1, 5)]
    assert tolerated == {"excused by restart": 2}


def _op(client: int, seq: int, kind: str, name: str, start: float, end: float, **kw) -> Op:
    return Op(client, seq, kind, name, start=start, end=end, **kw)


def _write(client: int, seq: int, name: str, start: float, end: float, fid: str = "f1") -> Op:
    # open() returns at start + 0.1, close() starts at end - 0.1
    return _op(client, seq, "write", name, start, end, token=f"w{client}.{seq}",
               mid=end - 0.1, mid_end=start + 0.1, fid=fid)  # fmt: skip


def _read(client: int, seq: int, name: str, start: float, end: float, got: str,
          fid: str = "f1", pieces: tuple[int, ...] = ()) -> Op:  # fmt: skip
    return _op(client, seq, "read", name, start, end, result=got, fid=fid, pieces=pieces)


def test_checker_flags_a_stale_read() -> None:
    ops = [
        _write(0, 1, "n0", 0.0, 1.0),
        _write(0, 2, "n0", 2.0, 3.0),
        _read(1, 1, "n0", 4.0, 4.5, "w0.1"),  # w0.2 closed before the open
    ]
    [v] = coherence.check(ops)
    assert v.op is ops[2] and v.allowed == {"w0.2"} and v.name == "f1"


def test_checker_accepts_concurrent_and_current_values() -> None:
    ops = [
        _write(0, 1, "n0", 0.0, 1.0),
        _write(0, 2, "n0", 2.0, 3.0),
        _read(1, 1, "n0", 2.02, 2.03, "w0.1"),  # open of w0.2 truncating
        _read(1, 2, "n0", 2.5, 2.6, coherence.EMPTY),  # truncated, not stored
        _read(1, 4, "n0", 2.95, 2.97, "w0.2"),  # while w0.2's close runs
        _read(1, 3, "n0", 3.5, 3.6, "w0.2"),
    ]
    assert coherence.check(ops) == []


def test_checker_kernel_grace_for_removed_names_is_bounded() -> None:
    ops = [
        _write(0, 1, "n0", 0.0, 1.0),
        _op(0, 2, "unlink", "n0", 2.0, 2.1),
        # 50 ms after the removal completed: the kernel's entry cache may
        # still resolve the name (within KERNEL_GRACE): tolerated, counted.
        _read(1, 1, "n0", 2.15, 2.16, "w0.1"),
        # 500 ms after: a violation.
        _read(1, 2, "n0", 2.6, 2.61, "w0.1"),
        # The client that removed it: its own entry cache knows at once.
        _read(0, 3, "n0", 2.15, 2.16, "w0.1"),
    ]
    tolerated: dict[str, int] = {}
    vs = coherence.check(ops, tolerated)
    assert [(v.op.client, v.op.seq) for v in vs] == [(1, 2), (0, 3)]
    assert all(v.kind().startswith("read reached a file") for v in vs)
    assert tolerated == {"name resolved within the kernel grace": 1}


def test_checker_write_through_a_stale_name_lands_in_the_renamed_file() -> None:
    # The kernel of client 2 still resolves n2 to f1 for a few ms after
    # client 0 renamed f1 to n1: client 2's write lands in f1, now at n1.
    ops = [
        _write(0, 1, "n2", 0.0, 1.0),
        _op(0, 2, "rename", "n2", 2.0, 2.1, name2="n1"),
        _write(2, 1, "n2", 2.104, 2.15),  # reaches f1 through the stale name
        _read(1, 1, "n1", 2.16, 2.17, "w2.1"),  # f1's contents, at its new name
        _op(1, 2, "read", "n2", 2.18, 2.19, error="ENOENT"),  # n2 never re-created
        _write(2, 2, "n2", 2.6, 2.7),  # 500 ms on: not the kernel grace
    ]
    tolerated: dict[str, int] = {}
    vs = coherence.check(ops, tolerated)
    assert [(v.op.client, v.op.seq) for v in vs] == [(2, 2)]
    assert vs[0].kind().startswith("write reached a file")
    assert tolerated == {"name resolved within the kernel grace": 1}


def test_checker_read_follows_the_file_it_opened() -> None:
    # A read that resolved n1 while client 0 renamed the file to n2 reads
    # that file, including what client 0 then writes to it as n2 (POSIX
    # does the same on a local disk); a read of another file than the one
    # bound to the name, or of contents the file never held, is flagged.
    ops = [
        _write(0, 1, "n1", 0.0, 1.0),
        _op(0, 2, "rename", "n1", 2.0, 2.1, name2="n2"),
        _write(0, 3, "n2", 2.2, 2.3),
        _read(1, 1, "n1", 2.05, 2.4, "w0.3"),
        _write(2, 1, "n3", 3.0, 3.4, fid="f2"),
        _read(1, 2, "n2", 4.0, 4.1, "w0.3"),
        _read(1, 3, "n2", 4.0, 4.1, "w2.1", fid="f2"),  # f2 was never at n2
        _read(1, 4, "n3", 4.0, 4.1, "w0.3", fid="f2"),  # f2 never held w0.3
    ]
    vs = coherence.check(ops)
    assert [v.op.seq for v in vs if v.op.client == 1] == [3, 4]
    assert vs[0].kind().startswith("read reached a file") and vs[0].name == "n2"
    assert vs[1].name == "f2" and vs[1].allowed == {"w2.1"}


def test_checker_size_mix_only_between_allowed_versions() -> None:
    ops = [
        _write(0, 1, "n0", 0.0, 1.0),  # "w0.1"
        _write(2, 7, "n0", 2.0, 3.0),  # "w2.7"
        _write(0, 3, "n0", 4.0, 5.0),  # "w0.3"
        # Racing w0.3's close: bytes of w0.3 at the cached length of w2.7
        # (same length here: exact), and w2.7 zero-padded to a longer size.
        _read(1, 1, "n0", 4.85, 4.95, "w0.3"),
        _read(1, 2, "n0", 4.85, 4.95, "w2."),  # cut to... not a length
        # A superseded version's bytes are never allowed, whatever the size.
        _read(1, 3, "n0", 6.0, 6.1, "w2.7"),
        _read(1, 4, "n0", 6.0, 6.1, "garbage"),
    ]
    ops.append(_read(1, 5, "n0", 4.85, 4.95, "w2.7\0"))  # not an allowed length
    tolerated: dict[str, int] = {}
    vs = coherence.check(ops, tolerated)
    assert sorted(v.op.seq for v in vs) == [2, 3, 4, 5]
    assert tolerated == {}


def test_checker_tolerates_clamped_and_zero_filled_reads_of_racing_versions() -> None:
    ops = [
        _op(0, 1, "write", "n0", 0.0, 1.0, token="w0.1", mid=0.9, mid_end=0.1, fid="f1"),
        _op(2, 9, "write", "n0", 2.0, 3.0, token="w2.10", mid=2.9, mid_end=2.1, fid="f1"),
        # Racing the close of w2.10: its bytes at w0.1's cached length, and
        # w0.1's bytes zero-filled to w2.10's length.
        _read(1, 1, "n0", 2.85, 2.95, "w2.1"),
        _read(1, 2, "n0", 2.85, 2.95, "w0.1\0"),
    ]
    tolerated: dict[str, int] = {}
    assert coherence.check(ops, tolerated) == []
    assert sum(tolerated.values()) == 2


def test_checker_follows_renames_and_removals() -> None:
    ops = [
        _write(0, 1, "n0", 0.0, 1.0),
        _op(0, 2, "rename", "n0", 1.1, 1.2, name2="n1"),
        _read(1, 1, "n1", 2.0, 2.1, "w0.1"),
        _op(1, 2, "read", "n0", 2.0, 2.1, error="ENOENT"),
        _op(1, 3, "listdir", ".", 2.2, 2.3, result=["n0", "n1"]),  # n0 was gone
    ]
    vs = coherence.check(ops)
    assert [(v.op.seq, v.name) for v in vs] == [(3, "n0")]
    assert vs[0].allowed == {ABSENT}


def test_checker_excuses_estale_after_another_clients_change_only() -> None:
    ops = [
        _write(0, 1, "n0", 0.0, 1.0),
        _op(0, 2, "unlink", "n0", 2.0, 2.1),
        # Another client's kernel may still hold the name: ESTALE is fair.
        _op(1, 1, "read", "n0", 2.15, 2.16, error="ESTALE"),
        # The client that removed it knows at once: ESTALE is a bug.
        _op(0, 3, "read", "n0", 2.15, 2.16, error="ESTALE"),
    ]
    vs = coherence.check(ops)
    assert [(v.op.client, v.op.seq) for v in vs] == [(0, 3)]


def test_checker_tolerates_an_open_estale_only_when_two_rebindings_raced_it() -> None:
    """The kernel retries an open that met a vanished fid once; two other
    clients replacing the name during the open can fail the retry too (seen
    in the nemesis run, 2026-12-03: c1 and c2 replaced n0 while c0 opened it).
    One replace, or the opener's own changes, leave ESTALE a violation."""
    base = [_write(0, 1, "n0", 0.0, 1.0)]
    two = [
        _op(1, 2, "replace", "n0", 2.0, 2.2, token="w1.2", mid=2.1, fid="f2"),
        _op(2, 2, "replace", "n0", 2.05, 2.3, token="w2.2", mid=2.15, fid="f3"),
    ]
    failed = _op(3, 1, "write", "n0", 2.1, 2.25, token="w3.1", error="ESTALE", in_open=True)
    tolerated: dict[str, int] = {}
    assert coherence.check([*base, *two, failed], tolerated) == []
    assert tolerated == {"open ESTALE: a second rebinding raced the kernel's one retry": 1}
    [v] = coherence.check([*base, two[0], failed])
    assert v.op is failed and "ESTALE on a call by name" in v.what
    # The same two replaces made by the opener's own client do not count.
    own = [_op(3, 2, "replace", "n0", 2.0, 2.2, token="w3.2", mid=2.1, fid="f2"),
           _op(3, 3, "replace", "n0", 2.05, 2.3, token="w3.3", mid=2.15, fid="f3")]  # fmt: skip
    [v] = coherence.check([*base, *own, failed])
    assert v.op is failed
    # Nor do two that ended long before the open.
    old = [_op(1, 2, "replace", "n0", 1.2, 1.3, token="w1.2", mid=1.25, fid="f2"),
           _op(2, 2, "replace", "n0", 1.4, 1.5, token="w2.2", mid=1.45, fid="f3")]  # fmt: skip
    [v] = coherence.check([*base, *old, failed])
    assert v.op is failed


def test_checker_accepts_a_write_over_a_version_that_landed_during_it() -> None:
    """c1's open(O_CREAT|O_TRUNC) makes the file (nothing to truncate); c0
    opens, writes w0.1043 and closes; c1 then writes w1.965 at offset 0 and
    closes: the file holds w1.9653, as a local disk gives (found by
    test_coherence_short_run, 2026-12-03).  Not when c0's write was over
    before c1's open (c1's O_TRUNC then truncates it)."""
    w1 = _op(1, 965, "write", "n2", 10.4073, 10.4324, token="w1.965",
             mid_end=10.408, mid=10.424, fid="f1")  # fmt: skip
    w0 = _op(0, 1043, "write", "n2", 10.414, 10.423, token="w0.1043",
             mid_end=10.415, mid=10.422, fid="f1")  # fmt: skip
    read = _read(1, 970, "n2", 10.4749, 10.4769, "w1.9653")
    assert coherence.check([w1, w0, read]) == []
    early = _op(0, 1043, "write", "n2", 10.30, 10.35, token="w0.1043",
                mid_end=10.31, mid=10.34, fid="f1")  # fmt: skip
    [v] = coherence.check([early, w1, read])
    assert v.op is read and v.allowed == {"w1.965"}


def test_checker_still_checks_names_after_overlapping_renames() -> None:
    # Two renames in opposite directions overlap: afterwards each name holds
    # f1, f2 or nothing, and nothing else (an "unknown" seed of the rename
    # fixpoint would feed itself here and stop checking both names).
    ops = [
        _write(0, 1, "n0", 0.0, 1.0, fid="f1"),
        _write(1, 1, "n1", 0.0, 1.0, fid="f2"),
        _write(2, 1, "n2", 0.0, 1.0, fid="f3"),
        _op(0, 2, "rename", "n0", 2.0, 2.2, name2="n1"),
        _op(1, 2, "rename", "n1", 2.1, 2.3, name2="n0"),
        _read(2, 2, "n0", 3.0, 3.1, "w2.1", fid="f3"),
        _read(2, 3, "n1", 3.0, 3.1, "w0.1", fid="f1"),
    ]
    vs = coherence.check(ops)
    assert [v.op.seq for v in vs] == [2]
    # (and the files the creating writes may have made, which nobody reached)
    assert {a for a in vs[0].allowed if not a.startswith(coherence.MADE)} <= {"f1", "f2", ABSENT}


def test_checker_binds_a_file_whose_creating_open_failed() -> None:
    # Client 0's open(O_CREAT) created f9 and then failed (the file was
    # removed before the open); client 1 reached f9 by the name meanwhile.
    ops = [
        _op(0, 1, "write", "n0", 0.0, 1.0, token="w0.1", error="ESTALE"),
        _op(2, 1, "unlink", "n0", 0.0, 1.0),
        _read(1, 1, "n0", 0.5, 0.6, coherence.EMPTY, fid="f9"),
    ]
    assert coherence.check(ops) == []
    # With no such write, a file reached by a name nobody bound it to is flagged.
    [v] = coherence.check(ops[1:])
    assert v.kind().startswith("read reached a file")


def test_checker_accepts_a_read_whose_calls_saw_different_versions() -> None:
    # A reader's first read(2) returns w2.7 (6 bytes, the size then); before
    # its second call w1.10 (7 bytes) replaces it, so the second returns
    # w1.10's seventh byte.  Found by the nemesis run (CI, 2026-12-01).
    ops = [
        _write(2, 7, "n0", 2.0, 3.0),  # "w2.7"
        _op(1, 10, "write", "n0", 2.5, 3.2, token="w1.10", mid=3.1, mid_end=2.6, fid="f1"),
        _read(0, 1, "n0", 2.95, 3.3, "w2.70", pieces=(4, 1)),
        # One call cannot return such a splice, nor can calls of versions
        # not allowed, nor calls whose lengths do not add up to the result.
        _read(0, 2, "n0", 2.95, 3.3, "w2.70", pieces=(5,)),
        _read(0, 3, "n0", 2.95, 3.3, "w2.7x", pieces=(4, 1)),
        _read(0, 4, "n0", 2.95, 3.3, "w2.70", pieces=(4, 2)),
        # A short call ends at EOF, at some version's size, and so does the
        # whole: a NUL tail past every version is a lost-tail bug, not this.
        _read(0, 5, "n0", 2.95, 3.3, "w1.10" + "\0" * 3, pieces=(5, 3)),
        _read(0, 6, "n0", 2.95, 3.3, "w2.1" + "0", pieces=(3, 2)),
    ]
    tolerated: dict[str, int] = {}
    vs = coherence.check(ops, tolerated)
    assert sorted(v.op.seq for v in vs if v.op.client == 0) == [2, 3, 4, 5, 6]
    assert tolerated == {"read(2) calls of one read saw different allowed versions": 1}


def test_checker_lists_a_name_whose_create_may_have_landed() -> None:
    # A restart closed client 1's connection while its open(O_CREAT) of n1
    # was in flight: the open failed, but the server may have made the file
    # (nobody reached it), so a later listing may show n1.  n0's removal
    # is still checked.
    ops = [
        _write(0, 1, "n0", 0.0, 1.0),
        _op(0, 2, "unlink", "n0", 2.0, 2.1),
        _op(1, 1, "write", "n1", 3.0, 3.2, token="w1.1", error="EIO"),
        _op(2, 1, "listdir", ".", 5.0, 5.1, result=["n1"]),
        _op(2, 2, "listdir", ".", 5.0, 5.1, result=["n0", "n1"]),
    ]
    faults = [coherence.Fault("restart", None, 3.1, 3.6, excused_until=4.0)]
    tolerated: dict[str, int] = {}
    vs = coherence.excuse(coherence.check(ops), faults, tolerated)
    assert [(v.op.client, v.op.seq, v.name) for v in vs] == [(2, 2, "n0")]
    assert tolerated == {"excused by restart": 1}

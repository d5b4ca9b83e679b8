"""The floor the speed goals are judged against (``scripts/bench_floor.py``
and the floor table of ``make bench``): it counts the changes a workload had
to wait for, takes the local disk's share out, and marks a goal below the
floor only when it is; the ideal server does the cycle's durable work."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import pytest
import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import bench  # noqa: E402
import bench_floor  # noqa: E402
import bench_tools as bt  # noqa: E402


def test_durable_changes_count_namespace_and_status_changes_and_one_store_per_new_file() -> None:
    rpcs = {
        "FS.CreateFile": 10,
        "FS.StoreData": 25,  # a big file's pipelined stores: only 10 count
        "FS.MakeDir": 2,
        "FS.StoreStatus": 3,
        "FS.RemoveFile": 4,
        "FS.Rename": 1,
        "FS.Lookup": 50,  # reads wait for no commit
        "FS.ReadDir": 7,
        "FS.FetchData": 9,
    }
    assert bench_floor.durable_count(rpcs) == 10 + 10 + 2 + 3 + 4 + 1
    # Stores into files created elsewhere count only up to the creates.
    assert bench_floor.durable_count({"FS.StoreData": 5}) == 0
    assert bench_floor.durable_count({"FS.RemoveDir": 3, "FS.Link": 2}) == 5


def test_the_floor_takes_the_local_run_out_and_adds_a_round_trip_and_write_per_change() -> None:
    # 3 s on the passthrough, 0.5 s locally, 1,000 changes at 100 + 150 us.
    assert bench_floor.floor_seconds(3.0, 0.5, 1000, 100.0, 150.0) == pytest.approx(2.75)
    # A passthrough faster than local (noise) never makes the floor negative.
    assert bench_floor.floor_seconds(0.4, 0.5, 0, 100.0, 150.0) == 0.0
    # The durable write is the cheaper of the measured ones.
    assert bench_floor.durable_write_us({"commit_us": 150.0, "sync_us": 120.0}) == 120.0
    assert bench_floor.durable_write_us({"commit_us": 150.0, "sync_us": 300.0}) == 150.0
    assert bench_floor.durable_write_us({"commit_us": 150.0}) == 150.0


def _ok(secs: float, rpcs: dict[str, int] | None = None) -> bt.Step:
    s = bt.Step()
    s.record(secs, True)
    if rpcs is not None:
        s.extra["rpcs"] = [rpcs]
    return s


def test_a_missed_goal_is_marked_below_the_floor_only_when_it_is() -> None:
    floor = {"echo_us": 100.0, "commit_us": 150.0}
    tools = {
        "local": {"clone": _ok(0.2), "rm": _ok(0.1)},
        "ptlong": {"clone": _ok(2.2), "rm": _ok(0.6)},
        # clone: 4,000 changes -> floor 2.0 + 1.0 = 3.0 s; rm: 400 -> 0.5 + 0.1 = 0.6 s
        "afsfuse": {
            "clone": _ok(8.0, {"FS.CreateFile": 2000, "FS.StoreData": 2000, "FS.Lookup": 9}),
            "rm": _ok(2.0, {"FS.RemoveFile": 400}),
            # Two compilers at once may share commits: no floor claimed.
            "make": _ok(9.0, {"FS.CreateFile": 5000}),
        },
        "glusterfs": {"clone": _ok(3.0), "rm": _ok(1.5)},  # goals 2.0 s and 1.0 s
        "sshfs": {"clone": _ok(6.0), "rm": _ok(0.6)},  # goals 4.0 s and 0.4 s
    }
    floors = bench.tool_floors(tools, "afsfuse", floor)
    assert floors["clone"]["durable"] == 4000
    assert floors["clone"]["floor"] == pytest.approx(3.0)
    assert floors["rm"]["floor"] == pytest.approx(0.6)
    assert "make" not in floors
    # The floor's side of every choice: ptlong's fastest repetition, local's
    # slowest, the fewest changes of a repetition.
    tools["ptlong"]["clone"].record(2.0, True)
    tools["local"]["clone"].record(0.3, True)
    tools["afsfuse"]["clone"].record(8.0, True)
    tools["afsfuse"]["clone"].extra["rpcs"].append({"FS.CreateFile": 1000, "FS.StoreData": 1000})
    low = bench.tool_floors(tools, "afsfuse", floor)["clone"]
    assert (low["ptlong"], low["local"], low["durable"]) == (2.0, 0.3, 2000)
    assert low["floor"] == pytest.approx(1.7 + 0.5)
    # A cheaper durable write lowers it.
    cheap = bench.tool_floors(tools, "afsfuse", {**floor, "sync_us": 50.0})["clone"]
    assert cheap["floor"] == pytest.approx(1.7 + 2000 * 150e-6)
    tools["ptlong"]["clone"] = _ok(2.2)
    tools["local"]["clone"] = _ok(0.2)
    tools["afsfuse"]["clone"] = _ok(8.0, {"FS.CreateFile": 2000, "FS.StoreData": 2000})
    by = {}
    for g, m, _v in bench.tool_goals(tools, "afsfuse", bt.Sizes(), floors):
        key = "rm" if g.startswith("`rm") else "clone"
        by[(key, "GlusterFS" if g.endswith("GlusterFS") else "sshfs")] = m
    assert "below the floor" in by[("clone", "GlusterFS")]  # 2.0 s < 3.0 s
    assert "below the floor" not in by[("clone", "sshfs")]  # 4.0 s > 3.0 s: afsfuse's own gap
    assert "below the floor" not in by[("rm", "GlusterFS")]  # 1.0 s > 0.6 s
    assert "below the floor" in by[("rm", "sshfs")]  # 0.4 s < 0.6 s
    args = bench.parse_args(["--tools-reps", "1"])
    md = "\n".join(bench.render_tools(args, tools, {}, [*bench.TOOL_COLS, "afsfuse"], "afsfuse",
                                      bt.Sizes(), {}, floor))  # fmt: skip
    row = next(line for line in md.splitlines() if line.startswith("| `git clone`") and
               "4,000" in line)  # fmt: skip
    assert row.split("|")[4].strip() == "3.00" and "**below**" in row.split("|")[5]
    # Without a measured floor there is no floor table and no mark.
    assert "The floor under the goals" not in "\n".join(
        bench.render_tools(
            args, tools, {}, [*bench.TOOL_COLS, "afsfuse"], "afsfuse", bt.Sizes(), {}
        )
    )
    assert bench.tool_floors(tools, "afsfuse", None) == {}
    # A failed afsfuse step gets no floor, and so no excuse.
    tools["afsfuse"]["clone"].record(None, False, "broke")
    assert "clone" not in bench.tool_floors(tools, "afsfuse", floor)
    failed = [m for g, m, _ in bench.tool_goals(tools, "afsfuse", bt.Sizes(),
                                                 bench.tool_floors(tools, "afsfuse", floor))
              if g.startswith("`git clone`")]  # fmt: skip
    assert failed and all("floor" not in m for m in failed)


def test_the_round_trip_and_commit_are_measured(tmp_path: Path) -> None:
    got = bench_floor.round_trip_and_commit(tmp_path, runs=1, echo_n=50, commit_n=20)
    # Microseconds: a loopback round trip and an fsync take more than 1 us
    # and less than 0.1 s here.
    for key in ("echo_us", "commit_us", "sync_us"):
        assert len(got[key]) == 1 and 1 < got[key][0] < 1e5, (key, got[key])


async def test_the_ideal_server_does_each_cycles_durable_work(tmp_path: Path) -> None:
    """Its cycle is the fileserver benchmark's: the file and its bytes exist
    after create and store, and are gone after unlink, all committed."""
    server = bench_floor.IdealServer(tmp_path / "ideal.db")
    commits: list[str] = []
    server.db.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    v = await server.create(7, b"f")
    assert await server.store(v, b"x" * 4096) == 4096
    # Another connection sees only what is committed.
    other = sqlite3.connect(tmp_path / "ideal.db")
    assert other.execute("SELECT size, dv FROM vnodes WHERE vnode = ?", (v,)).fetchone() == (
        4096,
        1,
    )
    assert other.execute("SELECT length(bytes) FROM data WHERE vnode = ?", (v,)).fetchone() == (
        4096,
    )
    assert len(commits) == 2  # one each: a reply waits for its own COMMIT
    async with trio.open_nursery() as nursery:  # concurrent requests share commits
        for i in range(5):
            nursery.start_soon(server.create, 8, b"g%d" % i)
    assert other.execute("SELECT COUNT(*) FROM dirents WHERE dir = 8").fetchone() == (5,)
    assert len(commits) == 3
    assert await server.unlink(7, b"f") == v
    assert other.execute("SELECT COUNT(*) FROM vnodes WHERE vnode = ?", (v,)).fetchone() == (0,)
    assert other.execute("SELECT COUNT(*) FROM data").fetchone() == (0,)
    assert await server.unlink(7, b"f") == -1


async def test_the_log_ideal_server_syncs_each_change_before_its_reply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its reply comes after the record is written and fdatasynced; changes
    arriving together share one sync."""
    import msgpack

    server = bench_floor.IdealLogServer(tmp_path / "ideal.log", preallocate=1 << 20)
    syncs: list[int] = []
    real = bench_floor.os.fdatasync

    def counting(fd: int) -> None:
        syncs.append(fd)
        real(fd)

    monkeypatch.setattr(bench_floor.os, "fdatasync", counting)
    v = await server.create(7, b"f")
    assert await server.store(v, b"x" * 4096) == 4096
    assert len(syncs) == 2
    written = (tmp_path / "ideal.log").read_bytes()[: server.pos]
    u = msgpack.Unpacker(raw=False)
    u.feed(written)
    records = list(u)
    assert [r[0] for r in records] == ["c", "s"] and records[1][2] == b"x" * 4096
    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(server.create, 8, b"g%d" % i)
    assert len(syncs) == 3
    assert await server.unlink(7, b"f") == v and len(syncs) == 4
    assert await server.unlink(7, b"f") == -1 and len(syncs) == 4


def test_a_small_files_goal_above_the_floor_rate_says_so() -> None:
    def rate(x: float, rpcs: dict[str, int] | None = None) -> bench.Result:
        r = bench.Result(samples=[x], unit="files/s")
        if rpcs is not None:
            r.extra["rpcs"] = [rpcs]
        return r

    floor = {"echo_us": 100.0, "commit_us": 150.0}
    # 1,000 files: ptlong 2,000/s, local 10,000/s -> 0.4 ms a file beyond the
    # local disk, plus 2 durable changes of 0.25 ms: 0.9 ms, 1,111 files/s.
    res = {
        "local": {"small": rate(10_000)},
        "ptlong": {"small": rate(2_000)},
        "afsfuse": {"small": rate(400, {"FS.CreateFile": 1000, "FS.StoreData": 1000})},
        "sshfs": {"small": rate(1_000)},  # goal 1,500/s: above the floor
    }
    assert bench.small_files_floor(res, "afsfuse", floor, 1000) == pytest.approx(1 / 0.0009)
    row = next(m for g, m, _ in bench.goals(res, {}, {}, "afsfuse", floor, 1000)
               if g.startswith("small files"))  # fmt: skip
    assert "above the floor, 1,111" in row
    res["sshfs"]["small"] = rate(600)  # goal 900/s: reachable, no mark
    row = next(m for g, m, _ in bench.goals(res, {}, {}, "afsfuse", floor, 1000)
               if g.startswith("small files"))  # fmt: skip
    assert "floor" not in row
    assert bench.small_files_floor(res, "afsfuse", None, 1000) is None


def test_a_tools_rpcs_are_counted_around_the_tool_alone(tmp_path: Path) -> None:
    counts = {"FS.CreateFile": 0}

    def rpcs() -> dict[str, int]:
        return dict(counts)

    t = bt.Tools(tmp_path, rpcs=rpcs)
    counts["FS.CreateFile"] += 5  # set-up before the tool: not counted

    def tool() -> None:
        counts["FS.CreateFile"] += 3
        counts["FS.RemoveFile"] = 2

    assert t.timed(tool) >= 0
    counts["FS.CreateFile"] += 7  # a check after it: not counted
    assert t.counted == {"FS.CreateFile": 3, "FS.RemoveFile": 2}

    def dead() -> dict[str, int]:
        raise OSError("transport endpoint is not connected")

    t = bt.Tools(tmp_path, rpcs=dead)
    t.timed(lambda: None)  # a dead mount's counters: no count, no crash
    assert t.counted is None
    assert bt.Tools(tmp_path).timed(lambda: None) >= 0  # no counters at all

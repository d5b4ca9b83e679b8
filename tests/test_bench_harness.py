"""The benchmark harness's pieces do what the figures rely on, without running
the benchmark: the generated repository, tarball and C project are what the
real-tools table says they are; a tool that fails on a target is recorded as
a failed step, not a crash; the GlusterFS daemon config binds to loopback.
No GlusterFS, sshd or FUSE mount is started here."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import bench  # noqa: E402
import bench_gluster  # noqa: E402
import bench_tools as bt  # noqa: E402

pytestmark = pytest.mark.skipif(
    subprocess.run(["which", "git", "make", "cc"], capture_output=True).returncode != 0,
    reason="needs git, make and a C compiler",
)
SIZES = bt.Sizes(files=60, commits=7, cfiles=6)


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> bt.Fixtures:
    return bt.make_fixtures(tmp_path_factory.mktemp("fx"), SIZES)


def git(fx: bt.Fixtures, *args: str) -> str:
    env = bt.git_env(fx.repo.parent / "home")
    return subprocess.run(["git", "-C", str(fx.repo), *args], env=env, check=True,
                          capture_output=True, text=True).stdout  # fmt: skip


def test_repository_has_the_files_commits_and_nesting(fx: bt.Fixtures) -> None:
    names = git(fx, "ls-tree", "-r", "--name-only", "HEAD").split()
    assert len(names) == SIZES.files
    assert len(set(names)) == SIZES.files
    assert all(n.count("/") == 4 for n in names), "a nested tree, 4 directories deep"
    assert int(git(fx, "rev-list", "--count", "HEAD")) == SIZES.commits
    assert git(fx, "rev-parse", "HEAD").strip() == fx.head
    # Later commits edit files, so history is more than one snapshot.
    assert git(fx, "diff", "--name-only", "HEAD~1", "HEAD").split()


def test_repository_is_reproducible(tmp_path: Path, fx: bt.Fixtures) -> None:
    bt.write_git_config(tmp_path / "home")
    head = bt.make_repo(tmp_path / "r.git", SIZES.files, SIZES.commits, tmp_path / "home")
    assert head == fx.head


def test_tarball_holds_the_tree(fx: bt.Fixtures) -> None:
    with tarfile.open(fx.tarball) as tf:
        files = [m.name for m in tf.getmembers() if m.isfile()]
    assert sorted(files) == sorted(git(fx, "ls-tree", "-r", "--name-only", "HEAD").split())


def test_c_project_builds_and_prints_the_expected_sum(tmp_path: Path, fx: bt.Fixtures) -> None:
    srcs = list((fx.cproj / "src").glob("f*.c"))
    assert len(srcs) == SIZES.cfiles
    t = bt.Tools(fx.repo.parent / "home")
    assert bt.build(t, fx, tmp_path / "build") > 0
    out = subprocess.run([tmp_path / "build" / "prog"], capture_output=True, text=True).stdout
    assert out == fx.prog_output == f"{bt.c_expected(SIZES.cfiles)}\n"
    assert bt.c_expected(2) == (0 + 0) + (sum(i % 7 for i in range(10)) + 1)


def test_every_step_passes_on_a_local_dir(tmp_path: Path, fx: bt.Fixtures) -> None:
    # The same directory as A and B: a coherent "second mount".
    a = tmp_path / "a"
    a.mkdir()
    steps = bt.run_tools("local", a, a, fx, 2, home=fx.repo.parent / "home")
    assert set(steps) == {key for key, _ in bt.STEPS}
    for key, s in steps.items():
        assert s.ok == [True, True], (key, s.notes)
        assert s.median is not None and s.median > 0
    assert not (a / "clone-0").exists() and (a / "tar-1" / bt.tree_path(0)).is_file()


def test_a_failing_tool_is_recorded_not_raised(tmp_path: Path, fx: bt.Fixtures) -> None:
    # B is not a view of A's volume: git on B fails, the other steps still run.
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    steps = bt.run_tools("split", a, b, fx, 1, home=fx.repo.parent / "home", commit_bound=1)
    for key in bt.TWO_MOUNT_STEPS:
        assert steps[key].ok == [False] and steps[key].notes[0], key
        assert steps[key].median is None
    assert all(steps[k].ok == [True] for k in ("clone", "make", "tar", "rm"))


def test_commit_not_seen_by_b_fails_within_the_bound(tmp_path: Path, fx: bt.Fixtures) -> None:
    # B is a separate clone: it never shows A's commit, so the step fails.
    t = bt.Tools(fx.repo.parent / "home")
    bt.clone(t, fx, tmp_path / "a")
    bt.clone(t, fx, tmp_path / "b")
    with pytest.raises(bt.ToolFailure, match="did not show the commit"):
        bt.commit_b(t, tmp_path / "a", tmp_path / "b", 0, bound=0.5)


def test_glusterd_config_binds_loopback_and_keeps_state_in_workdir(tmp_path: Path) -> None:
    debian = (
        "volume management\n    type mgmt/glusterd\n    option working-directory "
        "/var/lib/glusterd\n    option transport.socket.listen-port 24007\nend-volume\n"
    )
    vol = bench_gluster.loopback_volfile(debian, tmp_path)
    assert f"option working-directory {tmp_path}\n" in vol
    assert "/var/lib/glusterd" not in vol
    assert vol.count("option transport.socket.bind-address 127.0.0.1\n") == 1
    assert vol.rstrip().endswith("end-volume")


def test_budget_stops_new_repetitions_but_runs_the_first(tmp_path: Path, fx: bt.Fixtures) -> None:
    a = tmp_path / "a"
    a.mkdir()
    steps = bt.run_tools("slow", a, None, fx, 5, home=fx.repo.parent / "home", budget=1e-6)
    assert set(steps) == {key for key, _ in bt.STEPS} - bt.TWO_MOUNT_STEPS
    for s in steps.values():
        assert s.ok == [True] and s.extra["reps"] == 1 and s.extra["reps_wanted"] == 5


def test_a_failed_check_keeps_the_tools_time() -> None:
    step = bt.Step()

    def tool() -> float:
        with bt.checking(2.5):
            raise bt.ToolFailure("Mod time differs")
        return 0.0

    assert bt.timed_step(step, tool) is False
    assert step.samples == [2.5] and step.ok == [False] and "Mod time" in step.notes[0]
    assert step.median is None, "a failed repetition is not a sample of the median"


def test_real_tool_goals_compare_seconds_and_judge_failures() -> None:
    import bench

    def step(*runs: tuple[float | None, bool]) -> bt.Step:
        s = bt.Step()
        for secs, ok in runs:
            s.record(secs, ok, "" if ok else "broke")
        return s

    tools = {
        "afsfuse": {"clone": step((1.0, True), (1.2, True)), "rm": step((None, False))},
        "glusterfs": {"clone": step((3.0, True), (None, False)), "rm": step((None, False))},
        "sshfs": {"clone": step((1.4, True)), "rm": step((0.5, True))},
    }
    assert bench.tool_ratio(tools, "clone", "glusterfs", "afsfuse") == (
        "2.73x (glusterfs failed 1/2)",
        "met",
    )
    assert bench.tool_ratio(tools, "clone", "sshfs", "afsfuse") == ("1.27x", "MISSED")
    assert bench.tool_ratio(tools, "rm", "sshfs", "afsfuse") == ("afsfuse failed", "MISSED")
    tools["afsfuse"]["rm"] = step((1.0, True))
    assert bench.tool_ratio(tools, "rm", "glusterfs", "afsfuse") == ("glusterfs failed", "n/a")
    assert bench.tool_ratio(tools, "status_b", "sshfs", "afsfuse") is None
    assert "FAILED 1/2" in bench.tool_cell(tools, "glusterfs", "clone", {})
    assert bench.tool_cell(tools, "local", "clone", {"local": "why"}) == "n/a (why)"


def test_the_passthrough_floor_is_a_column_not_a_goal() -> None:
    """The real-tools table shows ptlong (one passthrough mount: the floor of
    any pyfuse3 + trio daemon) beside the others; the goals stay against
    GlusterFS and sshfs only, and its two-mount steps read as not run."""
    import bench

    def ok(secs: float) -> bt.Step:
        s = bt.Step()
        s.record(secs, True)
        return s

    tools = {
        "ptlong": {"clone": ok(2.0), "rm": ok(1.0)},
        "afsfuse": {"clone": ok(3.0), "rm": ok(2.0), "status_b": ok(1.0)},
        "glusterfs": {"clone": ok(6.0), "rm": ok(3.0), "status_b": ok(2.0)},
    }
    assert "ptlong" in bench.TOOL_COLS
    goals = bench.tool_goals(tools, "afsfuse", SIZES)
    assert goals and all("GlusterFS" in name or "sshfs" in name for name, _, _ in goals)
    args = bench.parse_args(["--tools-reps", "1"])
    md = "\n".join(bench.render_tools(args, tools, {}, [*bench.TOOL_COLS, "afsfuse"], "afsfuse",
                                      SIZES, {}))  # fmt: skip
    header = next(line for line in md.splitlines() if line.startswith("| real tool"))
    assert "| ptlong |" in header
    clone = next(line for line in md.splitlines() if line.startswith("| `git clone`"))
    assert clone.split("|")[3].strip().startswith("2.00"), clone  # local, ptlong, ...
    status = next(line for line in md.splitlines() if line.startswith("| second mount"))
    assert status.split("|")[3].strip() == "n/a (no second mount)", status


def test_warming_the_page_cache_leaves_nothing_behind(tmp_path: Path) -> None:
    # Before each timed write and cold read: it must not leave a file for a
    # later step (or a `du` of the scratch dir) to find, even at an odd size.
    bench.warm_page_cache(tmp_path, 3 * bench.MIB + 5, b"w" * bench.MIB)
    assert list(tmp_path.iterdir()) == []

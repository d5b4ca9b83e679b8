"""The "real tools" benchmark: git, make, tar and rm run in a mount, timed and checked.

Holds the fixture generators (a git repository made with ``git fast-import``:
a nested tree of N files and a few hundred commits; a tarball of its tree;
a C project of N small ``.c`` files and a Makefile) and ``run_tools``, which
runs the workloads of issue 13 on one target given its mount ``a`` and,
where the target has one, a second mount ``b`` of the same volume:

- ``clone``: ``git clone`` of the generated repository into ``a``;
- ``status_b``: on ``b``, ``git status`` + ``git log -1`` of that clone;
- ``commit_b``: a commit on ``a``, then ``git log -1``/``git status`` on ``b``
  until they show it (polled, bounded);
- ``make``: ``make -j2`` of the C project copied into ``a``;
- ``tar``: ``tar x`` of the tarball into ``a``;
- ``rm``: ``rm -rf`` of the clone.

Every step is also checked (``git fsck``, a clean ``git status``, the right
HEAD, the binary's output, ``make -q``, ``tar -d``, the clone gone) and a
step that errs, or whose check fails, is recorded as failed with the reason:
a filesystem that fails a tool is reported, never crashes the run.  Every
command is bounded in time.

May import only the standard library.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CMD_TIMEOUT = 900.0  # seconds: one tool run, far above any sane figure
EPOCH = 1_700_000_000  # commit times are fixed, so the fixtures are reproducible
STEPS = [
    ("clone", "`git clone` of a local {files:,}-file repository ({commits} commits)"),
    ("status_b", "second mount: `git status` + `git log -1`"),
    ("commit_b", "commit on A, then `git log -1`/`git status` on B show it"),
    ("make", "`make -j2` of a {cfiles}-file C project"),
    ("tar", "`tar x` of the {files:,}-file tree"),
    ("rm", "`rm -rf` of the clone"),
]
TWO_MOUNT_STEPS = {"status_b", "commit_b"}


@dataclass(frozen=True)
class Sizes:
    files: int = 5000
    commits: int = 300
    cfiles: int = 200


QUICK = Sizes(files=500, commits=30, cfiles=40)


@dataclass
class Fixtures:
    repo: Path  # a bare repository
    head: str
    files: int
    tarball: Path
    cproj: Path
    prog_output: str
    sizes: Sizes


@dataclass
class Step:
    """Seconds per repetition of one workload on one target (lower is better);
    ``ok``/``notes`` say, per repetition, whether its check passed and why not."""

    samples: list[float | None] = field(default_factory=list)  # None: the tool did not finish
    ok: list[bool] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> list[float]:
        """The seconds of the repetitions whose check passed."""
        return [s for s, k in zip(self.samples, self.ok, strict=True) if k and s is not None]

    @property
    def median(self) -> float | None:
        good = self.passed
        return statistics.median(good) if good else None

    @property
    def all_ok(self) -> bool:
        return bool(self.ok) and all(self.ok)

    def record(self, secs: float | None, ok: bool, note: str = "") -> None:
        self.samples.append(secs)
        self.ok.append(ok)
        self.notes.append(note)


class ToolFailure(Exception):
    """A tool erred or its result was wrong; the message says how, ``secs``
    how long the tool ran if it finished and only its check failed."""

    def __init__(self, msg: str, secs: float | None = None) -> None:
        super().__init__(msg)
        self.secs = secs


@contextlib.contextmanager
def checking(secs: float) -> Iterator[None]:
    """Checks of a tool that ran in ``secs``: a failure keeps the time."""
    try:
        yield
    except ToolFailure as exc:
        exc.secs = secs
        raise
    except OSError as exc:
        raise ToolFailure(f"check: {exc}", secs) from exc


# -- fixtures --------------------------------------------------------------------


def git_env(home: Path) -> dict[str, str]:
    """No user or system config: the same git behaviour on every target."""
    return dict(
        os.environ,
        HOME=str(home),
        GIT_CONFIG_NOSYSTEM="1",
        GIT_CONFIG_GLOBAL=str(home / "gitconfig"),
        GIT_AUTHOR_NAME="bench",
        GIT_AUTHOR_EMAIL="bench@localhost",
        GIT_COMMITTER_NAME="bench",
        GIT_COMMITTER_EMAIL="bench@localhost",
        LC_ALL="C",
    )


def write_git_config(home: Path) -> None:
    home.mkdir(parents=True, exist_ok=True)
    # gc.auto 0: no background repack in the middle of a timed commit.
    (home / "gitconfig").write_text(
        "[safe]\n\tdirectory = *\n[gc]\n\tauto = 0\n[init]\n\tdefaultBranch = main\n"
        "[core]\n\tfsmonitor = false\n"
    )


def tree_path(i: int) -> str:
    """Nested: 10 top dirs x 10 x 5 leaves (500 leaf dirs for 5,000 files)."""
    return f"src/m{i % 10}/p{(i // 10) % 10}/q{(i // 100) % 5}/file{i:05d}.txt"


def _text(rng: random.Random, corpus: bytes, i: int) -> bytes:
    n = rng.randrange(100, 6000)
    off = rng.randrange(0, len(corpus) - n)
    return f"file {i}\n".encode() + corpus[off : off + n]


def _corpus(rng: random.Random) -> bytes:
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randrange(2, 9)))
        for _ in range(500)
    ]
    lines = (" ".join(rng.choice(words) for _ in range(rng.randrange(3, 12))) for _ in range(3000))
    return "\n".join(lines).encode()


def fast_import_stream(files: int, commits: int, seed: int = 13) -> bytes:
    """A ``git fast-import`` stream: the first commit adds ``files`` files,
    each later one edits 1-5 of them."""
    rng = random.Random(seed)
    corpus = _corpus(rng)
    out: list[bytes] = []

    def data(b: bytes) -> None:
        out.append(b"data %d\n" % len(b))
        out.append(b)
        out.append(b"\n")

    contents = {i: _text(rng, corpus, i) for i in range(files)}
    for c in range(commits):
        out.append(b"commit refs/heads/main\n")
        out.append(b"committer bench <bench@localhost> %d +0000\n" % (EPOCH + 60 * c))
        data(f"commit {c}\n".encode())
        changed = range(files) if c == 0 else rng.sample(range(files), rng.randrange(1, 6))
        for i in changed:
            if c:
                contents[i] += f"edit {c}\n".encode()
            out.append(f"M 100644 inline {tree_path(i)}\n".encode())
            data(contents[i])
    return b"".join(out)


def make_repo(dst: Path, files: int, commits: int, home: Path) -> str:
    """A bare repository at ``dst``; returns its HEAD commit."""
    env = git_env(home)
    subprocess.run(["git", "init", "-q", "--bare", str(dst)], check=True, env=env, timeout=60)
    subprocess.run(["git", "-C", str(dst), "fast-import", "--quiet"], check=True, env=env,
                   input=fast_import_stream(files, commits), timeout=600)  # fmt: skip
    subprocess.run(["git", "-C", str(dst), "symbolic-ref", "HEAD", "refs/heads/main"],
                   check=True, env=env, timeout=60)  # fmt: skip
    r = subprocess.run(["git", "-C", str(dst), "rev-parse", "HEAD"], check=True, env=env,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    return r.stdout.strip()


def c_function(n: int) -> str:
    return (
        '#include "common.h"\n'
        f"int f{n:03d}(int x) {{\n  int s = 0;\n"
        f"  for (int i = 0; i < x; i++) s += (i * {n}) % 7;\n  return s + {n};\n}}\n"
    )


def c_expected(n: int, x: int = 10) -> int:
    return sum(sum((i * k) % 7 for i in range(x)) + k for k in range(n))


def make_cproject(dst: Path, n: int) -> str:
    """``n`` small .c files, a shared header, ``main.c`` and a Makefile;
    returns what the built ``prog`` must print."""
    src = dst / "src"
    src.mkdir(parents=True)
    decls = "".join(f"int f{k:03d}(int x);\n" for k in range(n))
    (src / "common.h").write_text(f"#ifndef COMMON_H\n#define COMMON_H\n{decls}#endif\n")
    for k in range(n):
        (src / f"f{k:03d}.c").write_text(c_function(k))
    calls = "".join(f"  s += f{k:03d}(10);\n" for k in range(n))
    (src / "main.c").write_text(
        '#include <stdio.h>\n#include "common.h"\n'
        f'int main(void) {{\n  long s = 0;\n{calls}  printf("%ld\\n", s);\n  return 0;\n}}\n'
    )
    (dst / "Makefile").write_text(
        "CFLAGS ?= -O1\nSRCS := $(wildcard src/*.c)\nOBJS := $(SRCS:.c=.o)\n\n"
        "prog: $(OBJS)\n\t$(CC) -o $@ $(OBJS)\n\n"
        "src/%.o: src/%.c src/common.h\n\t$(CC) $(CFLAGS) -Isrc -c -o $@ $<\n"
    )
    return f"{c_expected(n)}\n"


def make_fixtures(workdir: Path, sizes: Sizes) -> Fixtures:
    t0 = time.perf_counter()
    home = workdir / "home"
    write_git_config(home)
    repo = workdir / "src.git"
    head = make_repo(repo, sizes.files, sizes.commits, home)
    tarball = workdir / "tree.tar"
    subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", "-o", str(tarball),
                    "HEAD"], check=True, env=git_env(home), timeout=300)  # fmt: skip
    cproj = workdir / "cproj"
    out = make_cproject(cproj, sizes.cfiles)
    log.info("tool fixtures made in %.1f s", time.perf_counter() - t0)
    return Fixtures(repo, head, sizes.files, tarball, cproj, out, sizes)


# -- workloads -----------------------------------------------------------------


class Tools:
    """Runs commands for the workloads, bounded, raising ``ToolFailure``."""

    def __init__(
        self,
        home: Path,
        timeout: float = CMD_TIMEOUT,
        rpcs: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        self.env = git_env(home)
        self.timeout = timeout
        #: The target's RPC counters (``timed`` reads them around the tool).
        self.rpcs = rpcs
        #: The RPCs of the last ``timed`` run; None if not counted.
        self.counted: dict[str, int] | None = None

    def _read_rpcs(self) -> dict[str, int] | None:
        if self.rpcs is None:
            return None
        try:
            return self.rpcs()
        except OSError:  # a dead mount: its step fails on its own
            return None

    def timed(self, fn: Callable[[], Any]) -> float:
        """Seconds of ``fn``; with ``rpcs``, its RPCs in ``counted`` (the
        checks and untimed set-up around it are not counted)."""
        before = self._read_rpcs()
        t0 = time.perf_counter()
        fn()
        secs = time.perf_counter() - t0
        after = self._read_rpcs()
        self.counted = None
        if before is not None and after is not None:
            self.counted = {
                k: n - before.get(k, 0) for k, n in after.items() if n - before.get(k, 0)
            }
        return secs

    def run(self, *cmd: str | Path, cwd: Path | None = None) -> str:
        try:
            r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=self.env, capture_output=True,
                               text=True, errors="replace", timeout=self.timeout)  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise ToolFailure(f"`{' '.join(map(str, cmd[:3]))}` timed out") from exc
        if r.returncode != 0:
            lines = (r.stdout + r.stderr).strip().splitlines()
            more = f" (and {len(lines) - 1} more lines)" if len(lines) > 1 else ""
            raise ToolFailure(
                f"`{' '.join(map(str, cmd[:3]))}` exited {r.returncode}: "
                + (lines[0] + more if lines else "")
            )
        return r.stdout

    def git(self, repo: Path, *args: str) -> str:
        return self.run("git", "-C", repo, *args)


def timed_step(step: Step, fn: Callable[[], float | None]) -> bool:
    """Run one repetition: ``fn`` returns its seconds (or raises
    ``ToolFailure`` or ``OSError``, recorded as a failed repetition)."""
    os.sync()  # the previous step's writeback is not this step's time
    try:
        secs = fn()
    except (ToolFailure, OSError) as exc:
        secs = exc.secs if isinstance(exc, ToolFailure) else None
        step.record(secs, False, str(exc)[:300])
        log.warning("  failed: %s", exc)
        return False
    step.record(secs, True)
    return True


def clone(t: Tools, fx: Fixtures, dst: Path) -> float:
    secs = t.timed(lambda: t.run("git", "clone", "-q", fx.repo, dst))
    with checking(secs):
        if t.git(dst, "rev-parse", "HEAD").strip() != fx.head:
            raise ToolFailure("clone's HEAD is not the source's")
        if t.git(dst, "status", "--porcelain").strip():
            raise ToolFailure("clone's `git status` not clean")
        t.git(dst, "fsck", "--no-progress", "--no-dangling")
        n = int(t.git(dst, "ls-files", "-z").count("\0"))
        if n != fx.files:
            raise ToolFailure(f"clone has {n} files, expected {fx.files}")
    return secs


def status_b(t: Tools, fx: Fixtures, b_clone: Path) -> float:
    def both() -> tuple[str, str]:
        return t.git(b_clone, "status", "--porcelain"), t.git(b_clone, "log", "-1", "--format=%H")

    t0 = time.perf_counter()
    st, head = both()
    secs = time.perf_counter() - t0
    with checking(secs):
        if head.strip() != fx.head:
            raise ToolFailure(f"B's `git log -1` shows {head.strip()[:12]}, not {fx.head[:12]}")
        if st.strip():
            raise ToolFailure(f"B's `git status` not clean: {st.strip().splitlines()[0]}")
    return secs


def commit_b(t: Tools, a_clone: Path, b_clone: Path, rep: int, bound: float) -> float:
    """Commit on A, then poll B until ``git log -1`` shows the commit and
    ``git status`` is clean; seconds from the start of the commit."""
    f = a_clone / tree_path(rep)
    t0 = time.perf_counter()
    with open(f, "a") as fh:
        fh.write(f"bench edit {rep}\n")
    t.git(a_clone, "commit", "-q", "-a", "-m", f"bench {rep}")
    want = t.git(a_clone, "rev-parse", "HEAD").strip()
    polls = 0
    while True:
        polls += 1
        head = t.git(b_clone, "log", "-1", "--format=%H").strip()
        if head == want:
            st = t.git(b_clone, "status", "--porcelain").strip()
            if not st:
                secs = time.perf_counter() - t0
                break
            last = f"B's `git status` shows {st.splitlines()[0]!r}"
        else:
            last = f"B's `git log -1` shows {head[:12]}"
        if time.perf_counter() - t0 > bound:
            raise ToolFailure(f"B did not show the commit within {bound:g} s ({last})")
        time.sleep(0.02)
    with checking(secs):
        if f.read_bytes() != (b_clone / tree_path(rep)).read_bytes():
            raise ToolFailure("B reads other contents than A wrote")
    return secs


def build(t: Tools, fx: Fixtures, dst: Path) -> float:
    shutil.copytree(fx.cproj, dst)  # untimed: the copy is not the build
    os.sync()
    secs = t.timed(lambda: t.run("make", "-s", "-j2", "-C", dst))
    with checking(secs):
        out = t.run(dst / "prog")
        if out != fx.prog_output:
            raise ToolFailure(f"the built prog printed {out.strip()!r}, not {fx.prog_output!r}")
        try:
            t.run("make", "-q", "-C", dst, "prog")
        except ToolFailure as exc:
            raise ToolFailure("`make -q` after the build says it is out of date") from exc
    return secs


def untar(t: Tools, fx: Fixtures, dst: Path) -> float:
    dst.mkdir()
    secs = t.timed(lambda: t.run("tar", "xf", fx.tarball, "-C", dst))
    with checking(secs):
        t.run("tar", "df", fx.tarball, "-C", dst)  # every file's contents, size, mode, mtime
    return secs


def remove(t: Tools, dst: Path) -> float:
    secs = t.timed(lambda: t.run("rm", "-rf", dst))
    with checking(secs):
        if dst.exists() or dst.name in os.listdir(dst.parent):
            raise ToolFailure("the clone is still there after `rm -rf`")
    return secs


def run_tools(
    name: str,
    a: Path,
    b: Path | None,
    fx: Fixtures,
    reps: int,
    *,
    home: Path,
    cold: Callable[[], None] = lambda: None,
    commit_bound: float = 60.0,
    budget: float | None = None,
    rpcs: Callable[[], dict[str, int]] | None = None,
) -> dict[str, Step]:
    """Every workload ``reps`` times on one target; ``cold`` runs before each
    repetition (drop the kernel caches).  With a ``budget`` (seconds), no
    repetition starts that would, at the pace so far, end past it (the
    first always runs); ``extra["reps"]`` says how many ran.  With ``rpcs``
    (the target's RPC counters by method, read outside the timing), each
    step's ``extra["rpcs"]`` lists the RPCs of each passed repetition of
    clone, make, tar and rm, counted around the tool alone."""
    t = Tools(home, rpcs=rpcs)
    out = {key: Step() for key, _ in STEPS if b is not None or key not in TWO_MOUNT_STEPS}

    def timed(step: Step, fn: Callable[[], float | None]) -> bool:
        t.counted = None
        ok = timed_step(step, fn)
        if ok and t.counted is not None:
            step.extra.setdefault("rpcs", []).append(t.counted)
        return ok

    t_start = time.monotonic()
    for rep in range(reps):
        spent = time.monotonic() - t_start
        if rep and budget is not None and spent + spent / rep > budget:
            log.info("%s: %d of %d repetitions fit the %g s budget", name, rep, reps, budget)
            break
        cold()
        a_clone = a / f"clone-{rep}"
        log.info("%s: real tools, repetition %d", name, rep + 1)
        cloned = timed(out["clone"], lambda a_clone=a_clone: clone(t, fx, a_clone))
        if b is not None:
            b_clone = b / a_clone.name
            if cloned:
                timed(out["status_b"], lambda b_clone=b_clone: status_b(t, fx, b_clone))
                timed(
                    out["commit_b"],
                    lambda b_clone=b_clone, a_clone=a_clone, rep=rep: commit_b(
                        t, a_clone, b_clone, rep, commit_bound
                    ),
                )
            else:
                for key in TWO_MOUNT_STEPS:
                    out[key].record(None, False, "the clone failed")
        timed(out["make"], lambda rep=rep: build(t, fx, a / f"cproj-{rep}"))
        timed(out["tar"], lambda rep=rep: untar(t, fx, a / f"tar-{rep}"))
        if cloned or a_clone.exists():
            timed(out["rm"], lambda a_clone=a_clone: remove(t, a_clone))
        else:
            out["rm"].record(None, False, "the clone failed")
        log.info(
            "%s: %s",
            name,
            ", ".join(
                f"{k} {s.samples[-1] or 0:.2f}s" + ("" if s.ok[-1] else " FAILED")
                for k, s in out.items()
            ),
        )
    for s in out.values():
        s.extra["reps"] = len(s.ok)
        s.extra["reps_wanted"] = reps
    return out

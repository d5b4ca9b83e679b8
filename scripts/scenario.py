"""Break scenarios: drive a real fileserver and client mounts through one
callback story each, check the outcome, and print the timeline the
processes themselves logged.

    scripts/scenario.py --list
    scripts/scenario.py single-break mass-break      # built-ins, or: all
    scripts/scenario.py run my_scenarios.py          # every scenario in a file
    scripts/scenario.py run my_scenarios.py my-break --plot /tmp/my-break.svg
    scripts/scenario.py all --json timeline.json     # timelines as data
    scripts/scenario.py dead-client --keep           # leave the processes up
    scripts/scenario.py single-break --server 127.0.0.1:7000 --data-dir .run/data \\
        --server-log .run/server.log --mount mnt-a=LOG_A --mount mnt-b=LOG_B

A scenario is a function ``fn(lab)`` registered with ``@scenario`` from
``afsfuse.lab`` (see README, "The lab"; the built-ins are in
``afsfuse/lab/scenarios.py``).  Each starts its own fileserver (127.0.0.1,
random port) and mounts in a temporary directory, unless ``--server`` and
``--mount`` name ones already running (only for scenarios marked
``external_ok``).  The verdict is PASS or FAIL per scenario; the exit status
is 1 on any FAIL, 2 on a usage error.  ``--plot FILE`` (``.svg``, ``.png``,
``.html``) draws each run as a sequence diagram (with several runs, the
scenario's name is added before the suffix).

Every wait is bounded; every process started here is stopped by its pid and
every mount unmounted (after SIGCONT, if it was paused), except with
``--keep``, which prints how to stop them.
"""

from __future__ import annotations

import argparse
import logging
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import afsfuse.lab.scenarios  # noqa: E402, F401 - registers the built-ins
from afsfuse.lab.lab import SCENARIOS, Result, Scenario, report, run  # noqa: E402
from afsfuse.lab.timeline import render, write_json  # noqa: E402

__all__ = ["SCENARIOS", "build_parser", "load_file", "main", "render", "run_one"]

log = logging.getLogger(__name__)


def load_file(path: Path) -> dict[str, Scenario]:
    """Run a user's scenario file; the scenarios it registered, in order."""
    before = dict(SCENARIOS)
    SCENARIOS.clear()
    try:
        runpy.run_path(str(path), run_name=f"scenarios_{Path(path).stem}")
        found = dict(SCENARIOS)
    finally:
        SCENARIOS.clear()
        SCENARIOS.update(before)
    return found


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scenario.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="built-ins to run, or 'all'; or: run FILE.py [NAME...]")  # fmt: skip
    p.add_argument("--list", action="store_true", help="name each scenario and what it shows")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the timelines here")
    p.add_argument("--plot", type=Path, metavar="FILE",
                   help="draw each timeline (.svg, .png or .html)")  # fmt: skip
    p.add_argument("--keep", action="store_true", help="leave the processes running")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="whole timelines, including setup and validate_fast")  # fmt: skip
    p.add_argument("--tmp", default=None, help="where temporary directories go")
    p.add_argument("--server", metavar="HOST:PORT", help="use this running fileserver")
    p.add_argument("--data-dir", metavar="DIR", help="its data directory (admin commands)")
    p.add_argument("--server-log", type=Path, metavar="FILE",
                   help="its log or --event-log file (for the timeline)")  # fmt: skip
    p.add_argument("--mount", action="append", default=[], metavar="DIR[=LOG]",
                   help="use this running mount (repeat: A, B, ...); LOG defaults to "
                        "the daemon's log in its default cache dir")  # fmt: skip
    p.add_argument("--files", type=int, default=None, help="files cached in mass-break/giveup")
    p.add_argument("--race-mib", type=int, default=None, help="inflight-race file size")
    p.add_argument("--race-attempts", type=int, default=None, help="inflight-race retries")
    p.add_argument("--break-timeout", type=float, default=None,
                   help="override a scenario's break_timeout server option")  # fmt: skip
    p.add_argument("--duration-cb", type=float, default=None,
                   help="override a scenario's callback_duration server option")  # fmt: skip
    return p


def _overrides(opts: argparse.Namespace) -> dict[str, float]:
    out = {}
    if opts.break_timeout is not None:
        out["break_timeout"] = opts.break_timeout
    if opts.duration_cb is not None:
        out["callback_duration"] = opts.duration_cb
    return out


def run_one(sc: Scenario, opts: argparse.Namespace) -> Result:
    """Run one scenario with the command line's options."""
    external = opts if (opts.server or opts.mount) else None
    return run(sc, tmp=opts.tmp, keep=opts.keep, options=opts, external=external,
               server_overrides=_overrides(opts))  # fmt: skip


def _plot_path(base: Path, name: str, several: bool) -> Path:
    return base.with_name(f"{base.stem}-{name}{base.suffix}") if several else base


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    pool = dict(SCENARIOS)
    names = opts.names
    if names[:1] == ["run"]:
        if len(names) < 2:
            print("run needs a scenario file: scenario.py run FILE.py [NAME...]",
                  file=sys.stderr)  # fmt: skip
            return 2
        path = Path(names[1])
        if not path.is_file():
            print(f"no scenario file {path}", file=sys.stderr)
            return 2
        pool = load_file(path)
        if not pool:
            print(f"{path} registers no scenario (use @scenario from afsfuse.lab)",
                  file=sys.stderr)  # fmt: skip
            return 2
        names = names[2:]
    if opts.list:
        width = max(len(n) for n in pool)
        for sc in pool.values():
            print(f"{sc.name:<{width}}  {sc.summary}")
        return 0
    names = list(pool) if names in (["all"], []) else names
    unknown = [n for n in names if n not in pool]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)} (see --list)", file=sys.stderr)
        return 2
    if opts.plot is not None and opts.plot.suffix.lower() not in (".svg", ".png", ".html"):
        print("--plot FILE must end in .svg, .png or .html", file=sys.stderr)
        return 2
    external = bool(opts.server or opts.mount)
    if external and not (opts.server and opts.data_dir and opts.mount):
        print("--server needs --data-dir and --mount (and --server-log for server events)",
              file=sys.stderr)  # fmt: skip
        return 2
    results: list[Result] = []
    for name in names:
        sc = pool[name]
        if external and not sc.external_ok:
            print(f"=== {name}: SKIPPED (starts its own processes; not with --server/--mount)\n")
            continue
        r = run_one(sc, opts)
        print(report(r, opts.verbose))
        sys.stdout.flush()
        results.append(r)
        if opts.plot is not None:
            from afsfuse.lab.plot import plot

            out = _plot_path(opts.plot, name, len(names) > 1)
            plot(r, out)
            print(f"    plot: {out}\n")
    if opts.json:
        write_json(opts.json, [r.to_json() for r in results])
    failed = [r.name for r in results if not r.passed]
    total = sum(r.seconds for r in results)
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed ({total:.1f} s)"
          + (f": {' '.join(failed)}" if failed else ""))  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

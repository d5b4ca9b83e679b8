"""Timelines as sequence diagrams: SVG or PNG (matplotlib), or one HTML file.

One lifeline per process: the lab's own actions (``lab``), each mount's
application (``app:A``) beside its client daemon (``A``), and the
fileserver.  Rows go down in time order, one per event (the time since the
scenario's first phase is printed at the left), so a 3 ms break and a 3 s
wait are both readable.  Drawn:

- breaks as arrows: the server's ``change`` to the client's
  ``break_received``, and the acknowledgement (``break result=sent``) back,
  labelled with the latency from the change; a break that failed or was
  kept as delayed is a red cross; a delayed break delivered later an arrow
  labelled ``delayed``;
- grants (``promise_installed``), validations (``validate_slow`` and why),
  kernel invalidations, mass and volume breaks as marks on the client;
- app actions as bars from their start to when they returned;
- injected faults (pause, kill, partition, server restart, ...) and the
  server's ``nemesis_*`` events as red marks, phases as dotted rules;
- the checks as a verdict band under the diagram.

The HTML file embeds the SVG, the checks and the event table: no other file,
no script.  May import ``afsfuse.lab.timeline`` and matplotlib.
"""

from __future__ import annotations

import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from afsfuse.lab.timeline import NOISY, Event

#: Events drawn at most (a long run keeps its first rows).
MAX_ROWS = 400

FAULTS = frozenset({"pause", "resume", "kill", "remount", "unmount", "server_stop",
                    "server_start", "inject", "heal", "break_fid", "break_volume"})  # fmt: skip
CLIENT_MARKS = {
    "promise_installed": ("o", "#2e7d32", "grant"),
    "promise_discarded": ("x", "#c62828", "discarded"),
    "validate_slow": ("s", "#1565c0", "validate"),
    "kernel_invalidate": ("v", "#6a1b9a", "kernel inval"),
    "kernel_sweep": ("v", "#6a1b9a", "kernel sweep"),
    "mass_break": ("*", "#ef6c00", "mass break"),
    "volume_break": ("*", "#ef6c00", "volume break"),
    "data_zapped": ("d", "#5d4037", "data zapped"),
    "stored": ("^", "#00838f", "stored"),
    "server_connected": ("P", "#455a64", "connected"),
    "moved_answer": ("x", "#c62828", "moved answer"),
    "vl_query": ("p", "#455a64", "VL query"),
    "interest": ("P", "#2e7d32", "interest"),
    "volume_moved": ("*", "#ef6c00", "volume moved"),
}


@dataclass
class Run:
    """What a picture needs of one scenario run (from a Result or its JSON)."""

    name: str
    summary: str
    passed: bool
    checks: list[tuple[bool, str]]
    t0: float
    events: list[Event]
    fids: dict[str, str]


def as_run(r: Any) -> Run:
    """A ``Result`` or its ``to_json()`` dict."""
    if isinstance(r, dict):
        evs = []
        for i, e in enumerate(r["events"]):
            fields = {k: str(v) for k, v in e.items() if k not in ("t", "actor", "event", "end")}
            evs.append(Event(e["t"], e["actor"], e["event"], fields, i, e.get("end")))
        checks = [(bool(c["ok"]), c["text"]) for c in r.get("checks", [])]
        return Run(r["name"], r.get("summary", ""), bool(r["passed"]), checks, r["t0"], evs,
                   dict(r.get("fids", {})))  # fmt: skip
    return Run(r.name, r.summary, r.passed, r.checks, r.focus_t, r.events, r.fids)


#: Events only a fileserver logs: an actor that logs one is a server's
#: lifeline (``server``, or one a lab added with ``add_server``).
SERVER_EVENTS = frozenset({"grant", "change", "break", "hello", "break_volume",
                           "init_callback_state", "client_up", "client_down"})  # fmt: skip


def servers(events: list[Event]) -> list[str]:
    """The server lifelines: ``server`` first, then any other actor that
    logged a server's event, by name."""
    extra = {e.actor for e in events if e.name in SERVER_EVENTS and e.actor != "server"}
    return ["server", *sorted(extra - {"lab"})]


def actors(events: list[Event]) -> list[str]:
    """Lifelines, left to right: lab, then app:X beside X around the servers."""
    seen = {e.actor for e in events}
    srv = servers(events)
    mounts = sorted({a for a in seen if a not in (*srv, "lab") and not a.startswith("app:")}
                    | {a[4:] for a in seen if a.startswith("app:")})  # fmt: skip
    left, right = mounts[: (len(mounts) + 1) // 2], mounts[(len(mounts) + 1) // 2 :]
    order = ["lab"]
    for m in left:
        order += [f"app:{m}", m]
    order += srv
    for m in right:
        order += [m, f"app:{m}"]
    return [a for a in order if a in seen or a == "server"]


def shown(run: Run) -> list[Event]:
    """The events drawn: from the first phase on, without the noisy ones."""
    out = [e for e in run.events if e.t >= run.t0 - 0.002 and e.name not in NOISY]
    return out[:MAX_ROWS]


def _short(text: str, n: int = 28) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def figure(run: Run) -> Any:
    """The matplotlib Figure of one run."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text: searchable, smaller
    from matplotlib import pyplot as plt

    evs = shown(run)
    lanes = actors(evs)
    server_lanes = set(servers(evs))
    x = {a: i for i, a in enumerate(lanes)}
    rows = max(len(evs), 1)
    n_checks = max(len(run.checks), 1)
    height = min(2.0 + 0.22 * rows + 0.22 * n_checks, 120)
    fig = plt.figure(figsize=(2.3 * len(lanes) + 2.5, height))
    grid = fig.add_gridspec(2, 1, height_ratios=[rows + 2, n_checks + 1.5], hspace=0.05)
    ax = fig.add_subplot(grid[0])
    band = fig.add_subplot(grid[1])
    ax.set_title(f"{run.name}: {_short(run.summary, 110)}", fontsize=10, loc="left")
    for a, i in x.items():
        ax.axvline(i, color="#bbbbbb", lw=1, zorder=0)
        ax.text(i, -1.2, a, ha="center", va="bottom", fontsize=9, weight="bold")
    row = {id(e): n for n, e in enumerate(evs)}

    def row_at(t: float) -> float:
        """The row of the last event at or before ``t`` (bars end there)."""
        best = 0
        for n, e in enumerate(evs):
            if e.t <= t:
                best = n
        return best + 0.4

    received: dict[tuple[str, str], list[Event]] = {}
    changes: list[Event] = []
    for e in evs:
        if e.name == "break_received":
            received.setdefault((e.actor, e.get("fid")), []).append(e)
        elif e.actor in server_lanes and e.name == "change":
            changes.append(e)
    for e in evs:
        y = row[id(e)]
        xa = x.get(e.actor)
        if xa is None:
            continue
        label = ""
        if e.actor.startswith("app:") or e.actor == "lab":
            if e.name == "phase":
                ax.axhline(y, color="#888888", ls=":", lw=0.8)
                label = e.get("what")
            elif e.name in FAULTS:
                ax.plot(xa, y, marker="X", color="#d32f2f", ms=8, zorder=3)
                target = e.get("mount") or (e.actor[4:] if e.actor.startswith("app:") else "")
                if target in x and e.actor == "lab":
                    red = {"arrowstyle": "->", "color": "#d32f2f", "lw": 1}
                    ax.annotate("", (x[target], y), (xa, y), arrowprops=red)
                label = " ".join([e.name, e.get("kind"), e.get("seconds")]).strip()
            else:
                end = row_at(e.end) if e.end is not None else y + 0.4
                ax.add_patch(plt.Rectangle((xa - 0.08, y - 0.3), 0.16, max(end - y, 0) + 0.3,
                                           color="#90caf9", zorder=2))  # fmt: skip
                label = f"{e.name} {e.get('path')}".strip()
                if e.get("got"):
                    label += f" → {e.get('got')}"
                if e.get("error"):
                    label += f" ✗ {e.get('error')}"
        elif e.actor in server_lanes:
            if e.name == "break":
                client = e.get("client")
                result = e.get("result")
                if result == "sent" and client in x:
                    got = received.get((client, e.get("fid")), [])
                    rec = next((g for g in got if g.t <= e.t + 0.002), None)
                    change = next((c for c in reversed(changes)
                                   if c.t <= e.t and c.actor == e.actor), None)  # fmt: skip
                    start = row[id(change)] if change is not None and not e.get("delayed") else y
                    if rec is not None:
                        ry = row[id(rec)]
                        got.remove(rec)
                        ax.annotate("", (x[client], ry), (xa, min(start, ry)),
                                    arrowprops={"arrowstyle": "->", "color": "#ef6c00",
                                                "lw": 1.4})  # fmt: skip
                        ax.annotate("", (xa, y), (x[client], ry),
                                    arrowprops={"arrowstyle": "->", "color": "#ef6c00",
                                                "lw": 1, "ls": "--"})  # fmt: skip
                    else:
                        ax.annotate("", (x[client], y), (xa, start),
                                    arrowprops={"arrowstyle": "->", "color": "#ef6c00",
                                                "lw": 1.4})  # fmt: skip
                    lat = f"{(e.t - change.t) * 1000:.1f} ms" if change is not None else ""
                    tag = "delayed break" if e.get("delayed") else "break"
                    ax.text((xa + x[client]) / 2, y - 0.15, f"{tag} ack {lat}".strip(),
                            ha="center", fontsize=7, color="#ef6c00")  # fmt: skip
                else:
                    ax.plot(xa, y, marker="x", color="#d32f2f", ms=8, zorder=3)
                    label = f"break {result} → {client}"
            elif e.name.startswith("nemesis"):
                ax.plot(xa, y, marker="X", color="#d32f2f", ms=7, zorder=3)
                label = f"{e.name[8:]} {e.get('kind')} {e.get('action')}".strip()
            elif e.name == "grant":
                ax.plot(xa, y, marker="o", color="#2e7d32", ms=3, zorder=3)
                label = f"grant {e.get('expires_in')} s → {e.get('client')}"
            else:
                ax.plot(xa, y, marker=".", color="#455a64", ms=5, zorder=3)
                label = e.name + (f" {e.get('client')}" if e.get("client") else "")
        else:
            marker, color, what = CLIENT_MARKS.get(e.name, (".", "#455a64", e.name))
            ax.plot(xa, y, marker=marker, color=color, ms=6, zorder=3)
            label = what + (f" ({e.get('why')})" if e.get("why") else "")
            if e.name in ("moved_answer", "interest", "volume_moved"):  # which server
                label += f" {e.get('method')} ← {e.get('server')}" if e.name == "moved_answer" \
                    else f" → {e.get('server') or e.get('servers')}"  # fmt: skip
        if label:
            width = 90 if e.name == "phase" else 40
            ax.text(xa + 0.12, y + 0.25, _short(label, width), fontsize=7, va="bottom")
    ax.set_xlim(-0.7, len(lanes) - 0.3)
    ax.set_ylim(rows + 0.5, -1.5)
    ax.set_yticks(range(len(evs)))
    ax.set_yticklabels([f"{e.t - run.t0:+.4f}" for e in evs], fontsize=6)
    ax.set_xticks([])
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    ax.set_ylabel("seconds since the first phase (one row per event)", fontsize=8)
    # The verdict band: the run's verdict, then one line per check.
    band.axis("off")
    band.set_xlim(0, 1)
    band.set_ylim(n_checks + 1.2, 0)
    verdict = "PASS" if run.passed else "FAIL"
    band.add_patch(plt.Rectangle((0, 0), 1, 1, color="#c8e6c9" if run.passed else "#ffcdd2"))
    held = sum(ok for ok, _ in run.checks)
    band.text(0.01, 0.5, f"verdict: {verdict} ({held} of {len(run.checks)} checks held)",
              va="center", fontsize=9, weight="bold")  # fmt: skip
    for n, (ok, text) in enumerate(run.checks, start=1):
        band.add_patch(plt.Rectangle((0, n + 0.05), 0.012, 0.9,
                                     color="#43a047" if ok else "#e53935"))  # fmt: skip
        band.text(0.02, n + 0.5, f"[{'ok' if ok else 'FAIL'}] {_short(text, 150)}",
                  va="center", fontsize=7)  # fmt: skip
    return fig


def to_svg(run: Run) -> str:
    from matplotlib import pyplot as plt

    fig = figure(run)
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def to_html(run: Run) -> str:
    """One self-contained page: the diagram (inline SVG), checks, events."""
    svg = to_svg(run)
    svg = svg[svg.index("<svg") :]  # drop the XML prolog inside HTML
    rows = "\n".join(
        f"<tr><td>{e.t - run.t0:+.4f}</td><td>{html.escape(e.actor)}</td>"
        f"<td>{html.escape(e.name)}</td><td>{html.escape(_fields(e))}</td></tr>"
        for e in run.events
    )
    checks = "\n".join(
        f'<li class="{"ok" if ok else "fail"}">[{"ok" if ok else "FAIL"}] {html.escape(t)}</li>'
        for ok, t in run.checks
    )
    lanes = ", ".join(html.escape(a) for a in actors(run.events))
    verdict = "PASS" if run.passed else "FAIL"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(run.name)}: {verdict}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
.ok {{ color: #2e7d32; }} .fail {{ color: #c62828; font-weight: bold; }}
table {{ border-collapse: collapse; font: 12px monospace; }}
td {{ padding: 1px 8px; border-bottom: 1px solid #eee; }}
</style></head><body>
<h1>{html.escape(run.name)}: <span class="{verdict.lower()}">{verdict}</span></h1>
<p>{html.escape(run.summary)}</p>
<p>Lifelines: {lanes}</p>
<ul>{checks}</ul>
{svg}
<h2>Events</h2>
<table><tr><th>t</th><th>actor</th><th>event</th><th>fields</th></tr>
{rows}
</table></body></html>
"""


def _fields(e: Event) -> str:
    out = " ".join(f"{k}={v}" for k, v in e.fields.items())
    if e.end is not None:
        out += f" (took {e.end - e.t:.4f} s)"
    return out


def plot(result: Any, path: Path | str, dpi: int = 110) -> Path:
    """Draw ``result`` (a Result or its JSON dict) to ``path`` (.svg, .png, .html);
    ``dpi`` is the PNG's resolution."""
    path = Path(path)
    run = as_run(result)
    suffix = path.suffix.lower()
    if suffix == ".html":
        path.write_text(to_html(run), encoding="utf-8")
    elif suffix == ".svg":
        path.write_text(to_svg(run), encoding="utf-8")
    elif suffix == ".png":
        from matplotlib import pyplot as plt

        fig = figure(run)
        fig.savefig(path, format="png", dpi=dpi, bbox_inches="tight")
        plt.close(fig)
    else:
        raise ValueError(f"cannot plot to {path.name}: use .svg, .png or .html")
    return path

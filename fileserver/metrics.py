"""Counters for admin ``stats`` and the Prometheus exporter.

Commit and fsync counters per operation kind come from the volumes'
``durability.SyncStats``, exported by a collector read at scrape time.

Each server has its own ``CollectorRegistry`` (several servers run in one test
process), and a plain dict mirror of every counter so admin ``stats`` and
tests read exact numbers without parsing the exposition format.

Imports: prometheus_client, ``fileserver.durability`` and the standard library.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily

from fileserver.durability import SyncStats

log = logging.getLogger(__name__)

#: Counter names (admin ``stats`` keys) and their help text.
COUNTERS = {
    "grants": "Callback promises granted (new, not renewals)",
    "renewals": "Callback promises renewed",
    "grants_withheld": "Promises not granted: a fid whose change was committing, breaks sent",
    "breaks_sent": "Fids broken with CB.CallBack and acknowledged",
    "breaks_failed": "CB.CallBack deliveries that failed or timed out",
    "breaks_delayed": "Fid breaks kept as delayed for a down client",
    "breaks_awaited": "Earlier breaks still on their way that a change waited for",
    "delayed_delivered": "Delayed fid breaks delivered on a client's return",
    "volume_breaks": "Whole-volume breaks requested",
    "mass_resets": "CB.InitCallBackState3 calls made",
    "revocations": "Clients revoked because the callback table was full",
    "giveups": "FS.GiveUpAllCallBacks calls received",
    "promises_given_up": "Promises dropped by FS.GiveUpAllCallBacks",
    "expired": "Expired promises swept",
    "clients_marked_down": "Times a client was marked down",
    "bytes_stored": "Bytes written by FS.StoreData",
    "bytes_fetched": "Bytes returned by FS.FetchData",
    "connections": "Connections accepted",
    "connections_refused": "Connections refused (over a connection limit)",
}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.counts: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.rpcs: dict[str, int] = defaultdict(int)
        self.rpc_errors: dict[str, int] = defaultdict(int)
        self._prom = {
            name: Counter(f"afs_fileserver_{name}", text, registry=self.registry)
            for name, text in COUNTERS.items()
        }
        self._rpc_total = Counter("afs_fileserver_rpcs", "RPCs handled", ["method", "result"],
                                  registry=self.registry)  # fmt: skip
        self._rpc_seconds = Histogram(
            "afs_fileserver_rpc_seconds", "RPC handling time", ["method"], registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )  # fmt: skip
        # Labelled children, cached: ``labels()`` validates and locks on every
        # call, a visible share of a small RPC's server time.
        self._totals: dict[tuple[str, str], Any] = {}
        self._seconds: dict[str, Any] = {}
        self._gauges: dict[str, Callable[[], float]] = {}
        self._http: Any = None

    def gauge(self, name: str, text: str, fn: Callable[[], float]) -> None:
        g = Gauge(f"afs_fileserver_{name}", text, registry=self.registry)
        g.set_function(fn)
        self._gauges[name] = fn

    def inc(self, name: str, n: int = 1) -> None:
        if n:
            self.counts[name] += n
            self._prom[name].inc(n)

    def rpc(self, method: str, seconds: float, error: str | None) -> None:
        self.rpcs[method] += 1
        if error is not None:
            self.rpc_errors[method] += 1
        key = (method, error or "ok")
        total = self._totals.get(key)
        if total is None:
            total = self._totals[key] = self._rpc_total.labels(*key)
        total.inc()
        hist = self._seconds.get(method)
        if hist is None:
            hist = self._seconds[method] = self._rpc_seconds.labels(method)
        hist.observe(seconds)

    def snapshot(self) -> dict[str, Any]:
        gauges = {name: fn() for name, fn in self._gauges.items()}
        return {
            "counters": dict(self.counts),
            "gauges": gauges,
            "rpcs": dict(sorted(self.rpcs.items())),
            "rpc_errors": dict(sorted(self.rpc_errors.items())),
        }

    def durability(self, stats: SyncStats) -> None:
        """Export the volumes' commit and fsync counters (read at each scrape)."""
        self.registry.register(_SyncCollector(stats))

    def serve(self, host: str, port: int) -> int:
        """Start the Prometheus HTTP exporter in a thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        bound = server.server_address[1]
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return int(bound)

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _SyncCollector:
    """Prometheus view of ``SyncStats``: per operation kind, how many ran and
    their shares of group commits and fsyncs; fsync calls by what was synced."""

    def __init__(self, stats: SyncStats) -> None:
        self.stats = stats

    def collect(self) -> Any:
        s = self.stats
        ops = CounterMetricFamily("afs_fileserver_mutations", "Changes committed", labels=["op"])
        commits = CounterMetricFamily(
            "afs_fileserver_op_commits", "Group commits, shared among their changes", labels=["op"]
        )
        fsyncs = CounterMetricFamily(
            "afs_fileserver_op_fsyncs", "Fsyncs, shared among the changes they cover", labels=["op"]
        )
        calls = CounterMetricFamily(
            "afs_fileserver_fsync_calls", "Fsync calls by what was synced", labels=["what"]
        )
        snap = s.snapshot()
        for op, row in snap["by_op"].items():
            ops.add_metric([op], row["ops"])
            commits.add_metric([op], row["commits"])
            fsyncs.add_metric([op], row["fsyncs"])
        for what, n in snap["fsync_calls"].items():
            calls.add_metric([what], n)
        group = CounterMetricFamily("afs_fileserver_group_commits", "Group commits")
        group.add_metric([], snap["group_commits"])
        inline = CounterMetricFamily(
            "afs_fileserver_inline_commits", "Group commits run on the trio thread"
        )
        inline.add_metric([], snap["inline_commits"])
        settle = CounterMetricFamily(
            "afs_fileserver_settle_timeouts",
            "Batches whose breaks did not settle in time for an inline commit",
        )
        settle.add_metric([], snap["settle_timeouts"])
        yield from (ops, commits, fsyncs, calls, group, inline, settle)

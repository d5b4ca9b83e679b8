"""How durable a reply is (``--sync``), and the counters of what it cost.

``SYNC_MODES``:

- ``always`` (default): a reply means the change survives power loss.  Each
  group commit syncs the SQLite WAL once (``synchronous=FULL``); a store
  fdatasyncs its data file before its metadata joins a commit; a new data
  file's directory is synced once, in the first commit that needs it.
- ``batch``: a reply means the change survives a crash of the server process
  (kill -9), not of the machine: commits are not synced (``synchronous=
  NORMAL``) and data files not fdatasynced on the reply path; the server
  makes everything durable about once a second (``Volume.flush``).
- ``none``: like ``batch`` without the periodic flush (the kernel writes back
  when it likes).  For scratch volumes and benchmarks of everything else.

``SyncStats`` counts, per operation kind (the RPC method), how many
operations ran, and their share of group commits and of fsyncs: a commit or
sync shared by a batch of N operations counts 1/N for each.  Plain Python,
thread-safe enough for counters written from one thread at a time (the commit
thread) and from store threads (data syncs), read from the trio thread.

Imports: the standard library only.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

SYNC_MODES = ("always", "batch", "none")


class SyncStats:
    """Commits and fsyncs, by operation kind and in total."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ops: dict[str, int] = defaultdict(int)
        self.commits: dict[str, float] = defaultdict(float)
        self.fsyncs: dict[str, float] = defaultdict(float)
        #: fsync calls by what was synced: wal, data, dir, flush
        self.calls: dict[str, int] = defaultdict(int)
        self.group_commits = 0
        self.batched_ops = 0
        self.largest_batch = 0
        #: Wall time spent making group commits durable (COMMIT and any
        #: directory sync): with ``group_commits``, what a commit waits for.
        self.commit_seconds = 0.0
        #: Of ``group_commits``, those run on the trio thread (one client
        #: alone working: ``fileserver.activity``).
        self.inline_commits = 0
        #: Batches that waited ``store.SETTLE_S`` for their breaks to go out
        #: and then committed in the thread (a task never stopped running).
        self.settle_timeouts = 0

    def batch(self, ops: list[str], wal_syncs: int, dir_syncs: int, seconds: float = 0.0) -> None:
        """One group commit of ``ops`` (one entry per operation) is durable;
        it took ``seconds``."""
        n = len(ops)
        if not n:
            return
        share = 1.0 / n
        syncs = (wal_syncs + dir_syncs) * share
        with self._lock:
            self.commit_seconds += seconds
            self.group_commits += 1
            self.batched_ops += n
            self.largest_batch = max(self.largest_batch, n)
            if wal_syncs:
                self.calls["wal"] += wal_syncs
            if dir_syncs:
                self.calls["dir"] += dir_syncs
            for op in ops:
                self.ops[op] += 1
                self.commits[op] += share
                if syncs:
                    self.fsyncs[op] += syncs

    def fsync(self, op: str, what: str, n: int = 1) -> None:
        """``n`` fsync calls made for one operation of kind ``op`` alone."""
        with self._lock:
            self.calls[what] += n
            if op:
                self.fsyncs[op] += n

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            by_op = {
                op: {
                    "ops": n,
                    "commits": round(self.commits[op], 3),
                    "fsyncs": round(self.fsyncs[op], 3),
                    "fsyncs_per_op": round(self.fsyncs[op] / n, 4) if n else 0.0,
                }
                for op, n in sorted(self.ops.items())
            }
            total_ops = sum(self.ops.values())
            total_fsyncs = sum(self.calls.values())
            return {
                "by_op": by_op,
                "fsync_calls": dict(sorted(self.calls.items())),
                "group_commits": self.group_commits,
                "inline_commits": self.inline_commits,
                "settle_timeouts": self.settle_timeouts,
                "committed_ops": self.batched_ops,
                "largest_batch": self.largest_batch,
                "commit_seconds": round(self.commit_seconds, 6),
                "ops_per_commit": round(self.batched_ops / self.group_commits, 3)
                if self.group_commits
                else 0.0,
                "fsyncs_per_op": round(total_fsyncs / total_ops, 4) if total_ops else 0.0,
            }

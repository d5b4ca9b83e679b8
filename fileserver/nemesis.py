"""Nemeses: faults the fileserver injects on purpose, off unless asked.

The lab (``afsfuse.lab``) and ``scripts/coherence.py --nemesis`` use them to
show what the callback machinery does when the network misbehaves; an
operator reaches them with ``afs-fileserver inject ...`` (``Admin.Inject``,
``Admin.Heal``).  Each injection, each heal and each effect is a server
event (``nemesis_inject``, ``nemesis_heal``, ``nemesis_effect``).

- ``delay-breaks CLIENT SECONDS``: every ``CB.CallBack`` to that client waits
  SECONDS before it is sent.  The change that caused it waits too, up to the
  break timeout; a delay past the break timeout is a break not answered in
  time (the client is marked down and the break kept as delayed).
- ``drop-breaks CLIENT``: a ``CB.CallBack`` to that client is not sent, as if
  lost on the wire.  The server treats it as not answered: the client is
  marked down and the fids kept as delayed breaks (or one
  ``CB.InitCallBackState3`` when too many), delivered when the client comes
  back (its next request, or the server's retry of down clients).
- ``partition CLIENT SECONDS``: its connection is closed now, and its
  ``FS.Hello`` refused for SECONDS; it reconnects by itself afterwards.
- ``shorten-promises SECONDS``: new promises last at most SECONDS.
- ``heal [CLIENT]``: ends that client's faults, or every fault.

Clients are named by UUID.  Only the hooks live elsewhere (``breaker.py``
calls ``before_break``; ``server.py`` calls ``refuses`` at Hello); may import
``protocol`` and ``fileserver.events``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import trio

from fileserver.events import event
from protocol.errors import RpcError

log = logging.getLogger(__name__)

KINDS = ("delay-breaks", "drop-breaks", "partition", "shorten-promises")


class _Table(Protocol):
    max_duration: int


class _Conn(Protocol):
    closed: bool

    async def aclose(self, reason: str = "") -> None: ...


class Nemesis:
    """The faults in force, and the hooks that apply them."""

    def __init__(self) -> None:
        self.delays: dict[str, float] = {}  # client UUID -> seconds per break
        self.drops: set[str] = set()
        self.partitions: dict[str, float] = {}  # client UUID -> trio time it ends
        self.promise_cap: int | None = None
        self._saved_duration: int | None = None

    @property
    def active(self) -> bool:
        return bool(self.delays or self.drops or self.partitions or self.promise_cap)

    # -- hooks ----------------------------------------------------------------

    async def before_break(self, client: str, fids: Sequence[Any], remaining: float) -> None:
        """Called before each ``CB.CallBack`` to ``client`` with the seconds left
        to its deadline.  Raises ``TooSlowError`` / ``RpcError`` for a break
        that will not be answered in time (delayed past the deadline, dropped)."""
        if not self.active:
            return
        delay = self.delays.get(client)
        if delay:
            event("nemesis_effect", kind="delay-breaks", client=client, fids=list(fids),
                  seconds=delay)  # fmt: skip
            if delay >= remaining:
                await trio.sleep(remaining)
                raise trio.TooSlowError
            await trio.sleep(delay)
        if client in self.drops:
            event("nemesis_effect", kind="drop-breaks", client=client, fids=list(fids))
            raise RpcError("ETIMEDOUT", "break dropped by the nemesis")

    def refuses(self, client: str) -> bool:
        """True while ``client`` is partitioned (its Hello is refused)."""
        until = self.partitions.get(client)
        if until is None:
            return False
        if trio.current_time() >= until:
            del self.partitions[client]
            event("nemesis_heal", kind="partition", client=client, why="elapsed")
            return False
        event("nemesis_effect", kind="partition", client=client, action="refused")
        return True

    # -- injection --------------------------------------------------------------

    async def inject(
        self,
        kind: str,
        client: str | None,
        seconds: float | None,
        table: _Table,
        conn_of: Callable[[str], _Conn | None],
    ) -> dict[str, Any]:
        """Start one fault; ``conn_of(uuid)`` gives a client's live connection."""
        if kind not in KINDS:
            raise RpcError("EINVAL", f"unknown nemesis {kind!r:.40}; one of {', '.join(KINDS)}")
        needs_client = kind != "shorten-promises"
        if needs_client and type(client) is not str:
            raise RpcError("EINVAL", f"{kind} needs a client UUID")
        needs_seconds = kind != "drop-breaks"
        if needs_seconds and (type(seconds) not in (int, float) or not 0 < seconds <= 86400):  # type: ignore[operator]
            raise RpcError("EINVAL", f"{kind} needs seconds in (0, 86400]")
        event("nemesis_inject", kind=kind, client=client or "", seconds=seconds or "")
        out: dict[str, Any] = {"kind": kind, "client": client, "seconds": seconds}
        if kind == "delay-breaks":
            self.delays[client] = float(seconds)  # type: ignore[index,arg-type]
        elif kind == "drop-breaks":
            self.drops.add(client)  # type: ignore[arg-type]
        elif kind == "partition":
            self.partitions[client] = trio.current_time() + float(seconds)  # type: ignore[index,arg-type]
            conn = conn_of(client)  # type: ignore[arg-type]
            out["closed"] = conn is not None and not conn.closed
            if out["closed"]:
                event("nemesis_effect", kind="partition", client=client, action="closed")
                await conn.aclose("partitioned by the nemesis")  # type: ignore[union-attr]
        else:
            if self._saved_duration is None:
                self._saved_duration = table.max_duration
            self.promise_cap = max(1, int(seconds))  # type: ignore[arg-type]
            table.max_duration = min(self._saved_duration, self.promise_cap)
            out["max_duration"] = table.max_duration
        return out

    def heal(self, client: str | None, table: _Table) -> dict[str, Any]:
        """End ``client``'s faults (every fault when None); returns what ended."""
        healed: list[str] = []
        for kind, held in (("delay-breaks", self.delays), ("drop-breaks", self.drops),
                           ("partition", self.partitions)):  # fmt: skip
            for uuid in [u for u in held if client is None or u == client]:
                if isinstance(held, dict):
                    del held[uuid]
                else:
                    held.discard(uuid)
                healed.append(f"{kind}:{uuid}")
                event("nemesis_heal", kind=kind, client=uuid)
        if client is None and self.promise_cap is not None:
            assert self._saved_duration is not None
            table.max_duration = self._saved_duration
            self.promise_cap = self._saved_duration = None
            healed.append("shorten-promises")
            event("nemesis_heal", kind="shorten-promises", client="")
        return {"healed": healed}

    def status(self) -> dict[str, Any]:
        now = trio.current_time()
        return {
            "delay_breaks": dict(self.delays),
            "drop_breaks": sorted(self.drops),
            "partitions": {u: round(t - now, 3) for u, t in self.partitions.items() if t > now},
            "promise_cap": self.promise_cap,
        }


class _Breaker(Protocol):
    nemesis: Nemesis
    clients: dict[str, Any]


def admin_handlers(
    breaker: _Breaker, table: _Table, check: Callable[[Any], None]
) -> dict[str, Callable[..., Any]]:
    """``Admin.Inject(kind, client, seconds)``, ``Admin.Heal(client|None)`` and
    ``Admin.Nemesis()`` (what is in force); ``check(conn)`` refuses a
    connection that did not authenticate as admin."""
    nem = breaker.nemesis

    def conn_of(uuid: str) -> _Conn | None:
        st = breaker.clients.get(uuid)
        return None if st is None else st.conn

    async def inject(conn: Any, kind: Any, client: Any = None, seconds: Any = None) -> Any:
        check(conn)
        return await nem.inject(kind, client, seconds, table, conn_of)

    async def heal(conn: Any, client: Any = None) -> Any:
        check(conn)
        if client is not None and type(client) is not str:
            raise RpcError("EINVAL", "client must be a UUID or nil (all)")
        return nem.heal(client, table)

    async def status(conn: Any) -> Any:
        check(conn)
        return nem.status()

    return {"Admin.Inject": inject, "Admin.Heal": heal, "Admin.Nemesis": status}


# -- afs-fileserver inject ... ----------------------------------------------------


def add_cli(sub: Any, admin: Any) -> None:
    """The ``inject`` subcommands (``admin`` gives --data-dir and --json)."""
    inj = sub.add_parser("inject", help="inject a fault (nemesis) or heal").add_subparsers(
        dest="inject_kind", required=True
    )
    p = inj.add_parser("delay-breaks", parents=[admin], help="delay every break to CLIENT")
    p.add_argument("client", help="client UUID")
    p.add_argument("seconds", type=float)
    p = inj.add_parser("drop-breaks", parents=[admin], help="drop breaks to CLIENT (lost)")
    p.add_argument("client", help="client UUID")
    p = inj.add_parser("partition", parents=[admin], help="cut CLIENT off for SECONDS")
    p.add_argument("client", help="client UUID")
    p.add_argument("seconds", type=float)
    p = inj.add_parser("shorten-promises", parents=[admin], help="promises last <= SECONDS")
    p.add_argument("seconds", type=float)
    p = inj.add_parser("heal", parents=[admin], help="end CLIENT's faults, or --all")
    p.add_argument("client", nargs="?", default=None, help="client UUID")
    p.add_argument("--all", action="store_true", help="end every fault")
    inj.add_parser("show", parents=[admin], help="the faults in force")


def cli_call(args: Any) -> tuple[str, str, tuple[Any, ...]]:
    """(command, method, params) for ``fileserver.admin.run_admin``."""
    kind = args.inject_kind
    if kind == "show":
        return "inject show", "Admin.Nemesis", ()
    if kind == "heal":
        if (args.client is None) != bool(args.all):
            raise SystemExit("inject heal: name a CLIENT or say --all")
        return "inject heal", "Admin.Heal", (args.client,)
    return (f"inject {kind}", "Admin.Inject",
            (kind, getattr(args, "client", None), getattr(args, "seconds", None)))  # fmt: skip

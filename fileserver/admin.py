"""Administration: ``Admin.*`` RPCs on the server and the CLI client for them.

An admin connection authenticates first with ``Admin.Auth(secret)`` (the
secret file in the data dir, mode 0600).  A connection that said
``FS.Hello`` is a client connection and is refused (EPERM); an admin
connection may not say ``FS.Hello`` either.  The CLI finds the running server
through the data dir (address file + secret).  See SPEC section 8.

Imports: the parts it administers (store, callback table, breaker, config,
nemeses) and ``protocol``; never ``fileserver.server``.
"""

from __future__ import annotations

import hmac
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from fileserver.breaker import Breaker
from fileserver.callback import CallbackTable
from fileserver.config import ServerConfig
from fileserver.nemesis import admin_handlers as nemesis_handlers
from fileserver.store import DataDir, VolumeHandle, VolumeStore
from fileserver.vldb import VLDB, vol_location
from protocol.connection import Connection, open_connection
from protocol.errors import RpcError
from protocol.records import Fid
from protocol.tls import admin_context

log = logging.getLogger(__name__)

ADMIN_AUTH = "Admin.Auth"
LIST_LIMIT = 10_000


class AdminService:
    """The ``Admin.*`` handlers over the parts they administer.

    ``identity()`` gives the server's ``{"server_uuid", "cell", "epoch"}`` and
    ``secret()`` the admin secret (both known only once the data dir is open);
    ``stats()`` the server's counters snapshot; ``vldb`` where the cell's
    volumes are, ``move`` moves a volume to another server (vol move).
    """

    def __init__(
        self,
        store: VolumeStore,
        table: CallbackTable,
        breaker: Breaker,
        config: ServerConfig,
        *,
        identity: Callable[[], dict[str, Any]],
        secret: Callable[[], str],
        stats: Callable[[], dict[str, Any]],
        vldb: VLDB | None = None,
        move: Callable[[VolumeHandle, str, int], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        self.store = store
        self.table = table
        self.breaker = breaker
        self.config = config
        self._identity = identity
        self._secret = secret
        self._stats = stats
        self.vldb = vldb  # where volumes of the cell are (fileserver.vldb)
        self._move = move  # fileserver.volmove.move_volume, bound to the server

    def _check(self, conn: Connection) -> None:
        if not conn.context.get("admin"):
            raise RpcError("EACCES", "admin call on a connection that did not Admin.Auth")

    def _vol(self, name_or_id: Any) -> VolumeHandle:
        if type(name_or_id) not in (int, str):
            raise RpcError("EINVAL", "volume must be a name or an id")
        return self.store.find(name_or_id)

    # -- handlers --------------------------------------------------------------

    async def auth(self, conn: Connection, secret: Any) -> dict[str, Any]:
        if conn.context.get("session") is not None:
            raise RpcError("EPERM", "admin calls are refused on a client (FS.Hello) connection")
        if type(secret) is not str or not hmac.compare_digest(
            secret.encode(), self._secret().encode()
        ):
            log.warning("admin auth failed from %s", conn.name)
            raise RpcError("EACCES", "bad admin secret")
        conn.context["admin"] = True
        conn.set_authenticated()  # the admin secret is this connection's handshake
        return self._identity()

    async def vol_create(
        self, conn: Connection, name: Any, quota_bytes: Any = 0, volume_id: Any = None
    ) -> dict[str, Any]:
        self._check(conn)
        if volume_id is not None and type(volume_id) is not int:
            raise RpcError("EINVAL", "volume_id must be an int")
        if self.vldb is not None:
            await self.vldb.check_new(name, volume_id)  # unique in the cell
        h = await self.store.create(
            name, quota_bytes=quota_bytes, volume_id=volume_id,
            random_ids=self.config.vl is not None or self.config.vldb is not None,
        )  # fmt: skip
        return await h.run(h.vol.volume_status)

    async def vol_list(self, conn: Connection) -> list[dict[str, Any]]:
        """This server's volumes; with an etcd VLDB also the cell's others,
        each with the server the VLDB names and whether it is up."""
        self._check(conn)
        me = self._identity()["server_uuid"]
        out = [dict(await h.run(h.vol.volume_status), server=me) for h in self.store.list()]
        if self.vldb is not None and self.config.vldb is not None:
            local = {v["volume_id"] for v in out}
            for e in await self.vldb.entries():
                if e["volume_id"] not in local and e["servers"]:
                    s = e["servers"][0]
                    out.append({"volume_id": e["volume_id"], "name": e["name"],
                                "server": s["uuid"], "up": s.get("up", True)})  # fmt: skip
        return out

    async def vol_examine(self, conn: Connection, vol: Any) -> dict[str, Any]:
        self._check(conn)
        located = await vol_location(self.vldb, vol) if self.vldb is not None else None
        if located is not None and located["volume_id"] not in self.store.by_id:
            return located  # held by another server of the cell
        h = self._vol(vol)
        info = await h.run(h.vol.volume_status)
        vh = self.table.volume_holders(h.id)
        info.update({
            "path": str(h.vol.path),
            "creation": h.vol.creation,
            "update": h.vol.update_s,
            "promises": sum(vh.values()),
            "clients_holding": len(vh),
            "servers": located["servers"] if located else [],
        })  # fmt: skip
        return info

    async def vol_remove(self, conn: Connection, vol: Any) -> None:
        self._check(conn)
        h = self._vol(vol)
        # Break first: clients must drop what they cache of it.
        await self.breaker.break_volume_all(h.id)
        await self.store.remove(h)

    async def vol_set_quota(self, conn: Connection, vol: Any, quota_bytes: Any) -> None:
        self._check(conn)
        if type(quota_bytes) is not int or quota_bytes < 0:
            raise RpcError("EINVAL", "quota must be a non-negative int")
        h = self._vol(vol)
        await h.run(h.vol.set_quota, quota_bytes)

    async def vol_set_online(self, conn: Connection, vol: Any, online: Any) -> dict[str, Any]:
        """Take a volume offline (changes fail with EBUSY) or back online; both
        send a whole-volume break so clients revalidate everything in it."""
        self._check(conn)
        if type(online) is not bool:
            raise RpcError("EINVAL", "online must be a bool")
        h = self._vol(vol)
        await h.run(h.vol.set_online, online)
        await self.breaker.break_volume_all(h.id)
        return {"volume_id": h.id, "name": h.name, "online": online}

    async def vol_move(self, conn: Connection, vol: Any, host: Any, port: Any) -> dict[str, Any]:
        """Move a volume to the fileserver at host:port (fileserver.volmove)."""
        self._check(conn)
        if type(host) is not str or type(port) is not int or not 0 < port < 65536:
            raise RpcError("EINVAL", "target must be a host str and a port int")
        if self._move is None:
            raise RpcError("ENOSYS", "this server cannot move volumes")
        return await self._move(self._vol(vol), host, port)

    async def clients(self, conn: Connection) -> list[dict[str, Any]]:
        self._check(conn)
        t = self.table
        return [st.to_dict(t.client_count(st.cid)) for st in self.breaker.clients.values()]

    async def callbacks(
        self, conn: Connection, client: Any = None, fid: Any = None
    ) -> dict[str, Any]:
        self._check(conn)
        t = self.table
        br = self.breaker
        out: list[dict[str, Any]] = []
        if fid is not None:
            f = Fid.parse(fid) if isinstance(fid, str) else Fid.from_wire(fid)
            for cid, left in sorted(t.holders(f).items()):
                st = br.by_cid.get(cid)
                if st is not None and (client is None or st.uuid == client):
                    out.append({"client": st.uuid, "fid": str(f), "expires_in": left})
        else:
            sts = list(br.clients.values())
            if client is not None:
                sts = [s for s in sts if s.uuid == client]
                if not sts:
                    raise RpcError("ENOENT", f"no client {client!r:.60}")
            for st in sts:
                for f, left in sorted(t.client_fids(st.cid).items()):
                    out.append({"client": st.uuid, "fid": str(f), "expires_in": left})
                    if len(out) >= LIST_LIMIT:
                        break
        return {"total": t.count, "callbacks": out[:LIST_LIMIT]}

    async def break_fid(self, conn: Connection, fid: Any) -> dict[str, Any]:
        self._check(conn)
        f = Fid.parse(fid) if isinstance(fid, str) else Fid.from_wire(fid)
        holders = len(self.table.holders(f))
        await self.breaker.break_fids([f], None)
        return {"fid": str(f), "clients": holders}

    async def break_volume(self, conn: Connection, vol: Any) -> dict[str, Any]:
        self._check(conn)
        h = self._vol(vol)
        await self.breaker.break_volume_all(h.id)
        return {"volume_id": h.id, "name": h.name}

    async def reset(self, conn: Connection, client: Any) -> dict[str, Any]:
        self._check(conn)
        st = self.breaker.clients.get(client) if type(client) is str else None
        if st is None:
            raise RpcError("ENOENT", f"no client {client!r:.60}")
        delivered = await self.breaker.reset_client(st, "admin_reset")
        return {"client": st.uuid, "delivered": delivered}

    async def stats(self, conn: Connection) -> dict[str, Any]:
        self._check(conn)
        return self._stats()

    def handlers(self) -> dict[str, Callable[..., Any]]:
        return {
            ADMIN_AUTH: self.auth,
            "Admin.VolCreate": self.vol_create,
            "Admin.VolList": self.vol_list,
            "Admin.VolExamine": self.vol_examine,
            "Admin.VolRemove": self.vol_remove,
            "Admin.VolSetQuota": self.vol_set_quota,
            "Admin.VolSetOnline": self.vol_set_online,
            "Admin.VolMove": self.vol_move,
            "Admin.Clients": self.clients,
            "Admin.Callbacks": self.callbacks,
            "Admin.Break": self.break_fid,
            "Admin.BreakVolume": self.break_volume,
            "Admin.Reset": self.reset,
            "Admin.Stats": self.stats,
            **nemesis_handlers(self.breaker, self.table, self._check),
        }


# -- client side (CLI) ---------------------------------------------------------


async def admin_call(data_dir: Path, method: str, *params: Any, timeout: float = 30) -> Any:
    """Authenticate with the server that owns ``data_dir`` and make one call."""
    dd = DataDir(data_dir)
    try:
        host, port = dd.read_address()
        secret = dd.read_secret()
        tls = admin_context(data_dir)  # the server's own certificate (TLS)
    except FileNotFoundError as exc:
        raise SystemExit(f"no running fileserver found in {data_dir} ({exc.filename})") from None
    try:
        async with open_connection(host, port, default_timeout=timeout, tls=tls) as conn:
            await conn.call(ADMIN_AUTH, secret)
            return await conn.call(method, *params)
    except OSError as exc:
        raise SystemExit(f"cannot reach the fileserver at {host}:{port}: {exc}") from None


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    if not rows:
        return "(none)"
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in cols)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def _human(cmd: str, result: Any) -> str:
    vol_cols = ["volume_id", "name", "online", "bytes_used", "quota_bytes", "files", "server"]
    if cmd in ("vol create", "vol examine"):
        shown = dict(result)
        if "servers" in shown:  # where the VLDB says it lives, and whether that server is up
            shown["servers"] = (
                ", ".join(
                    f"{s['uuid']} at {' '.join(f'{h}:{p}' for h, p in s['addrs'])} "
                    f"({'up' if s.get('up', True) else 'DOWN'})"
                    for s in result["servers"]
                )
                or "(none)"
            )
        return "\n".join(f"{k:14} {v}" for k, v in shown.items())
    if cmd == "vol list":
        return _table(result, vol_cols)
    if cmd == "clients":
        return _table(result, ["uuid", "up", "connected", "addr", "promises", "delayed",
                               "needs_init"])  # fmt: skip
    if cmd == "callbacks":
        return _table(result["callbacks"], ["client", "fid", "expires_in"]) + (
            f"\n{len(result['callbacks'])} shown, {result['total']} promises in the table"
        )
    if cmd == "locks":
        return _table(result["locks"], ["fid", "type", "client", "holder", "expires_in"]) + (
            f"\nlifetime {result['lifetime']}s, grace remaining {result['grace_remaining']}s"
        )
    if cmd == "stats":
        lines = []
        for section in ("counters", "gauges", "table", "rpcs", "rpc_errors"):
            lines.append(f"[{section}]")
            lines += [f"  {k:28} {v}" for k, v in result.get(section, {}).items()]
        for k in ("server_uuid", "cell", "epoch", "uptime"):
            if k in result:
                lines.append(f"{k}: {result[k]}")
        return "\n".join(lines)
    if result is None:
        return "ok"
    if isinstance(result, dict):
        return " ".join(f"{k}={v}" for k, v in result.items())
    return str(result)


def run_admin(args: Any) -> int:
    """Run one admin subcommand parsed by ``fileserver.cli``."""
    cmd, method, params = args.admin_call
    try:
        timeout = 3600 if method == "Admin.VolMove" else 30  # a move copies a whole volume
        result = trio.run(lambda: admin_call(Path(args.data_dir), method, *params, timeout=timeout))
    except RpcError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    else:
        print(_human(cmd, result))
    return 0

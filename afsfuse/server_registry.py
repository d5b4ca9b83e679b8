"""The server-record factory and the idle reaper (kAFS server.c).

``ServerRegistry`` keeps one ``ServerRecord`` per fileserver UUID (two cells
that alias each other share it), makes a record the first time a VL entry
names its server, starts its connection task, and destroys records that
have had no interests for ``idle_record_lifetime``: only then, and at
unmount, is ``FS.GiveUpAllCallBacks`` sent, once per record (P2).  A mass
break on a record queues one "server" kernel invalidation.

May import: ``afsfuse.cb_service``, ``afsfuse.config``, ``afsfuse.context``,
``afsfuse.server_record``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from afsfuse.cb_service import CallbackService
from afsfuse.cells import Address
from afsfuse.config import CacheConfig
from afsfuse.context import CacheContext
from afsfuse.server_record import ServerRecord


class ServerRegistry:
    def __init__(
        self,
        config: CacheConfig,
        ctx: CacheContext,
        client_uuid: str,
        cb: CallbackService,
        spawn: Callable[..., None],
    ) -> None:
        self.config = config
        self.ctx = ctx
        self.client_uuid = client_uuid
        self.cb = cb
        self._spawn = spawn
        self.servers: dict[str, ServerRecord] = {}

    def record(self, uuid: str, addrs: list[Address], cell: str) -> ServerRecord:
        """The live record for ``uuid`` (learning new addresses), or a new one."""
        rec = self.servers.get(uuid)
        if rec is not None and not rec.destroyed:
            for a in addrs:
                if a not in rec.addrs:
                    rec.addrs.append(a)
            return rec
        cfg = self.config
        rec = ServerRecord(
            uuid,
            addrs,
            client_uuid=self.client_uuid,
            connector=cfg.connector_for(cell),
            handlers=self.cb.handlers,
            stats=self.ctx.stats,
            rpc_timeout=cfg.rpc_timeout,
            connect_timeout=cfg.connect_timeout,
            backoff_max=cfg.reconnect_backoff_max,
            on_mass_break=self.on_mass_break,
            key=cfg.key_for(cell),
            keepalive_interval=cfg.keepalive_interval,
        )
        self.servers[uuid] = rec
        self._spawn(rec.run)
        return rec

    def on_mass_break(self, rec: ServerRecord, why: str) -> None:
        self.ctx.invalidations.put(CallbackService.server_invalidation(rec))

    async def reaper(self) -> None:
        """Destroy records idle (no interests) past the lifetime: only then is
        GiveUpAllCallBacks sent (P2)."""
        lifetime = self.config.idle_record_lifetime
        interval = max(min(lifetime / 4, 30.0), 0.01)
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            for rec in list(self.servers.values()):
                idle = not rec.interests and rec.idle_since is not None
                if idle and rec.idle_for(now) >= lifetime:
                    if self.servers.get(rec.uuid) is rec:
                        del self.servers[rec.uuid]
                    await rec.destroy()

    async def destroy_all(self) -> None:
        """Unmount: every record gives up its promises once (P2)."""
        for rec in list(self.servers.values()):
            await rec.destroy()
        self.servers.clear()

    def as_dict(self) -> dict[str, Any]:
        return {
            r.uuid: {"cb_s_break": r.cb_s_break, "epoch": r.epoch, "connected": r.conn is not None}
            for r in self.servers.values()
        }


__all__ = ["ServerRegistry"]

"""The CB.* service: what a fileserver calls back on our connection.

``CB.CallBack`` groups fids by volume, finds the volume instances interested
in that volume *through the server record that called* (P3), and in each
looks the vnode up without creating it (a fid we do not cache costs
nothing).  A vnode break bumps its ``cb_break`` and drops the promise; vnode
0 bumps the instance's ``cb_v_break`` (P4).  ``CB.InitCallBackState3`` bumps
the record's ``cb_s_break`` once, O(1) however many vnodes are cached.

Handlers take no vnode locks and never touch the kernel: the server may be
waiting for this reply while one of our requests holds a lock, and kernel
invalidations go to the queue the FUSE adapter drains.  The reply is sent
after the daemon-side break is complete (the handler returns then).

The service is handed a ``CacheContext`` (counters, invalidation queue) and
the client's UUID, nothing more.  May import: ``afsfuse.context`` (types),
``afsfuse.invalidation``, ``afsfuse.stats``, ``afsfuse.validation``,
``protocol``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from afsfuse.invalidation import Invalidate
from afsfuse.stats import log_event
from afsfuse.validation import break_vnode, volume_break
from protocol import methods as M
from protocol.connection import Connection, Handler
from protocol.errors import RpcError
from protocol.limits import MAX_CALLBACK_FIDS
from protocol.records import Fid

if TYPE_CHECKING:
    from afsfuse.context import CacheContext
    from afsfuse.server_record import ServerRecord

log = logging.getLogger(__name__)


class CallbackService:
    def __init__(self, ctx: CacheContext, client_uuid: str) -> None:
        self.ctx = ctx
        self.client_uuid = client_uuid
        # Instrumentation for the O(1) tests: vnodes a handler touched.
        self.vnodes_touched = 0

    def handlers(self, record: ServerRecord) -> Mapping[str, Handler]:
        """Handlers bound to ``record`` (the server that calls on this connection)."""

        async def callback(conn: Connection, fids: Any) -> None:
            self.callback(record, fids)

        async def init_state(conn: Connection, server_uuid: Any = None) -> None:
            self.init_callback_state(record, server_uuid)

        async def probe(conn: Connection) -> None:
            return None

        async def probe_uuid(conn: Connection, uuid: Any) -> bool:
            return isinstance(uuid, str) and uuid == self.client_uuid

        return {
            M.CB_CALLBACK: callback,
            M.CB_INIT_CALLBACK_STATE3: init_state,
            M.CB_PROBE: probe,
            M.CB_PROBE_UUID: probe_uuid,
        }

    def callback(self, record: ServerRecord, fids_wire: Any) -> None:
        if not isinstance(fids_wire, list) or len(fids_wire) > MAX_CALLBACK_FIDS:
            raise RpcError("EINVAL", "CB.CallBack wants a list of at most 50 fids")
        by_volume: dict[int, list[Fid]] = {}
        for f in fids_wire:
            fid = Fid.from_wire(f)
            by_volume.setdefault(fid.volume, []).append(fid)
        for volume_id, fids in by_volume.items():
            instances = record.instances(volume_id)
            if not instances:
                log_event("break_ignored", server=record.uuid, volume=volume_id, n=len(fids))
                continue
            for vol in tuple(instances):
                for fid in fids:
                    if fid.is_volume:
                        volume_break(self.ctx, vol, "callback")
                        continue
                    v = vol.find(fid)  # never creates (ilookup_nowait)
                    if v is None:
                        vol.cb_miss_break += 1
                        vol.break_seq += 1
                        vol.miss_at = vol.break_seq
                        self.ctx.stats.breaks_uncached += 1
                        continue
                    self.vnodes_touched += 1
                    break_vnode(self.ctx, v)

    def init_callback_state(self, record: ServerRecord, server_uuid: Any) -> None:
        if server_uuid is not None and server_uuid != record.uuid:
            log.warning(
                "server %s sent InitCallBackState3 naming %r; breaking it anyway",
                record.uuid,
                server_uuid,
            )
        record.mass_break("init_callback_state")

    @staticmethod
    def server_invalidation(record: ServerRecord) -> Invalidate:
        return Invalidate("server", server=record, volumes=record.all_instances())

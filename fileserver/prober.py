"""Probe clients the server has not heard from before trusting their promises.

After OpenAFS's host package (``h_CheckHosts``): a client that holds a
connection but has sent nothing for ``probe_after`` seconds may be gone (a
machine that froze, a half-open TCP connection), and every break to it
would then cost the changing client the whole break timeout.  So the
server asks it ``CB.ProbeUuid(its uuid)`` (``CB.Probe`` if it does not know
that method): an answer of True within the break timeout counts as hearing
from it; no answer, a wrong answer or an error marks it down and closes the
connection, so its promises are no longer trusted (breaks for it are kept as
delayed, and its next ``FS.Hello`` delivers them, or an InitCallBackState3).

Imports: ``fileserver.breaker``, ``fileserver.events``, ``protocol`` and trio.
"""

from __future__ import annotations

import logging
import time

import trio

from fileserver.breaker import Breaker, ClientState
from fileserver.events import event
from protocol.connection import Connection
from protocol.errors import RpcError
from protocol.methods import CB_PROBE, CB_PROBE_UUID

log = logging.getLogger(__name__)


async def probe_client(breaker: Breaker, st: ClientState, conn: Connection) -> bool:
    """Probe one client on ``conn``; returns whether it answered as itself."""
    async with st.lock:
        if st.down or st.conn is not conn:
            return False  # Hello or catch-up owns it now
        ok = False
        why = "no answer"
        try:
            with trio.fail_after(breaker.break_timeout):
                try:
                    ok = await conn.call(CB_PROBE_UUID, st.uuid) is True
                    why = "wrong uuid"
                except RpcError as exc:
                    if exc.code != "ENOSYS":
                        raise
                    await conn.call(CB_PROBE)  # an older client: liveness only
                    ok = True
        except (RpcError, trio.TooSlowError) as exc:
            why = f"no answer ({exc!r:.80})"
        if ok:
            st.last_seen = time.time()
            event("probe", client=st.uuid, result="ok")
            return True
        breaker.mark_down(st, f"probe: {why}")
        event("probe", client=st.uuid, result="failed", why=why)
        st.conn = None
    await conn.aclose("client did not answer a probe")
    return False


async def run_prober(breaker: Breaker, probe_after: float) -> None:
    """Every ``probe_after / 2`` seconds, probe each connected client that
    has been silent for ``probe_after`` seconds (0 turns probing off)."""
    if probe_after <= 0:
        return
    async with trio.open_nursery() as nursery:
        while True:
            await trio.sleep(probe_after / 2)
            now = time.time()
            for st in list(breaker.clients.values()):
                conn = st.conn
                if (
                    conn is not None
                    and not conn.closed
                    and not st.down
                    and not st.lock.locked()
                    and now - st.last_seen > probe_after
                ):
                    nursery.start_soon(probe_client, breaker, st, conn)


__all__ = ["probe_client", "run_prober"]

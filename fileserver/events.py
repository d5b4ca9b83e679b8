"""Structured event log lines for scenario timelines.

Every callback-relevant event is one INFO line on logger ``fileserver.events``:
``event=NAME key=value ...`` with a wall-clock ``t=`` (seconds, microsecond
precision) first after the event name, values without spaces (fids as
``VOL.VNODE.UNIQUE``, clients as their UUID).  A later tool parses these
lines into per-scenario timelines, so keys are stable:

- ``event=grant fid= client= expires_in=``
- ``event=change client= fids=F1,F2,...``  (a change by ``client``, before its breaks)
- ``event=break fid= client= result=sent|delayed|failed origin=``  (one line per fid per
  client; ``origin`` is the changing client's UUID or ``admin``; delayed deliveries
  on a client's return carry ``delayed=1``)
- ``event=break_volume volume= origin=``
- ``event=init_callback_state client= reason=``
- ``event=giveup client= promises=``
- ``event=client_down client= reason=`` / ``event=client_up client= conn=``
- ``event=hello client= new=0|1 delayed= dropped=0|1``
- ``event=revoke client= promises=``  (table full)
- ``event=sweep expired=``
- ``event=forget client=``  (client idle past every promise: state dropped)

Imports: the standard library only.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("fileserver.events")


def event(name: str, **fields: Any) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    parts = [f"event={name}", f"t={time.time():.6f}"]
    for k, v in fields.items():
        # Exact types: a Fid is a tuple subclass and prints as VOL.VNODE.UNIQUE.
        if type(v) in (list, tuple, set, frozenset):
            v = ",".join(str(x) for x in v)
        parts.append(f"{k}={str(v).replace(' ', '_')}")
    log.info(" ".join(parts))

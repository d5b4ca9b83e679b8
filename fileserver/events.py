"""Structured event log lines for scenario timelines.

Every callback-relevant event is one INFO line on logger ``fileserver.events``:
``event=NAME t=SECONDS key=value ...`` written by the shared logfmt writer
(``protocol/logfmt.py``: one quoting rule for client and server; fids as
``VOL.VNODE.UNIQUE``, clients as their UUID).  The lab's timeline parses
these lines, so keys are stable:

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
- ``event=nemesis_inject kind= client= seconds=`` / ``event=nemesis_heal kind= client=``
  and ``event=nemesis_effect kind= client= ...`` (a fault applied: ``fids=`` of a
  delayed or dropped break, ``action=closed|refused`` of a partition); see
  ``fileserver/nemesis.py``

Imports: the standard library and ``protocol.logfmt``.
"""

from __future__ import annotations

import logging
from typing import Any

from protocol.logfmt import format_event

log = logging.getLogger("fileserver.events")


def event(name: str, /, **fields: Any) -> None:
    """Log one event line (cheap when INFO is off)."""
    if log.isEnabledFor(logging.INFO):
        log.info("%s", format_event(name, **fields))

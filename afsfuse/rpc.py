"""How an operation calls a fileserver, and what may leave an operation.

Holds ``call`` (one RPC on a server record's connection, re-sent once after
a reconnect when it changes nothing), the credential type and its wire
form, ``err`` (an ``RpcError`` by code) and ``maps_errors`` (only
``RpcError``/``OSError`` leave a cache-manager operation; anything else is
EIO, so a malformed reply never ends the FUSE daemon).

May import: ``afsfuse.server_record``, ``afsfuse.stats``, ``afsfuse.validation`` (types only),
``protocol``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from afsfuse.server_record import NoConnection, ServerRecord
from afsfuse.stats import log_event
from protocol import methods as M
from protocol.connection import ConnectionLost
from protocol.errors import MOVED, RpcError
from protocol.records import Fid

if TYPE_CHECKING:
    from afsfuse.validation import CallSnapshot

log = logging.getLogger(__name__)

Cred = tuple[int, int, Sequence[int]] | None

#: Calls that change nothing: safe to send again after a reconnect.
RETRYABLE = frozenset(
    {
        M.FS_FETCH_STATUS,
        M.FS_FETCH_DATA,
        M.FS_LOOKUP,
        M.FS_READ_DIR,
        M.FS_INLINE_BULK_STATUS,
        M.FS_GET_VOLUME_STATUS,
    }
)


async def call(
    server: ServerRecord, method: str, *params: Any, snap: CallSnapshot | None = None
) -> Any:
    """One call on ``server``'s connection (counted per method).

    ``snap`` is re-taken at the moment the call is issued, after any wait
    for a (re)connection, whose Hello may itself bring breaks.  A server
    answering "moved" (EREMCHG: it did not run the call) sends the volume
    to VL and the call to the volume's new server."""
    retries = 1 if method in RETRYABLE else 0
    follows = 2  # "moved" answers followed
    while True:
        try:
            return await server.call(method, *params, on_issue=snap.retake if snap else None)
        except NoConnection:
            raise
        except ConnectionLost:
            # A read-only call lost to a dropped connection is sent again
            # once the record has reconnected (bounded by connect_timeout);
            # its snapshot is re-taken then, so breaks delivered at the
            # reconnect still void the promise it returns.
            if retries <= 0 or server.destroyed:
                raise
            retries -= 1
            log.info("%s: connection lost, retrying after reconnect", method)
        except RpcError as exc:
            if exc.code != MOVED or follows <= 0:
                raise
            log_event("moved_answer", server=server.uuid, method=method)
            follows -= 1
            moved_to = await follow_move(server, params, snap)
            if moved_to is None:
                raise
            server = moved_to
        except OSError as exc:
            raise ConnectionLost(f"{method}: {exc!r}") from exc


async def follow_move(
    server: ServerRecord, params: tuple[Any, ...], snap: CallSnapshot | None
) -> ServerRecord | None:
    """``server`` answered "moved" for the volume of a call: ask VL again (a
    whole-volume break; interests move to the new record, P3) and return
    the record to send the call to, None if VL knows no better."""
    if snap is not None:
        vols = [snap.volume]
    else:
        fid = next((p for p in params if isinstance(p, Fid)), None)
        vid = fid.volume if fid is not None else next(
            (p for p in params[1:2] if isinstance(p, int)), None
        )  # fmt: skip
        vols = list(server.instances(vid)) if vid is not None else []
    for vol in vols:
        if vol.relocate is not None:
            await vol.relocate()
    if not vols or not vols[0].servers or vols[0].server is server:
        return None
    if snap is not None:
        snap.server = vols[0].server  # the promise names the record it came from
    return vols[0].server


def wire_cred(cred: Any) -> Any:
    """``(uid, gid, gids)`` as the wire carries it (None: the machine)."""
    if cred is None:
        return None
    uid, gid, gids = cred
    return [int(uid), int(gid), [int(g) for g in gids]]


def err(code: str, msg: str = "") -> RpcError:
    return RpcError(code, msg)


_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])


def maps_errors(fn: _F) -> _F:
    """Only ``RpcError``/``OSError`` leave an operation: a malformed reply (or a
    bug) becomes EIO instead of an exception that would end the FUSE daemon."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except (RpcError, OSError):
            raise
        except ExceptionGroup as eg:
            inner = eg.exceptions[0] if len(eg.exceptions) == 1 else None
            if isinstance(inner, RpcError | OSError):
                raise inner from eg
            log.warning("%s failed: %r", fn.__name__, eg, exc_info=True)
            raise RpcError("EIO", f"{fn.__name__}: internal error") from eg
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            log.warning("%s failed: %r", fn.__name__, exc, exc_info=True)
            raise RpcError("EIO", f"{fn.__name__}: malformed reply or internal error") from exc

    return wrapper  # type: ignore[return-value]


__all__ = ["RETRYABLE", "Cred", "call", "err", "follow_move", "maps_errors", "wire_cred"]

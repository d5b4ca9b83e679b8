"""Wire protocol shared by the afsfuse client and the fileserver.

msgpack-RPC framing over a byte stream, a bidirectional trio connection,
the record types (Fid, FileStatus, CallBack, VolSync), error codes and
limits.  No filesystem logic lives here; ``SPEC.md`` beside this file is the
normative description of everything on the wire.
"""

from protocol.connection import Connection, ConnectionLost, RpcTimeout, open_connection
from protocol.errors import RemoteError, RpcError
from protocol.records import CallBack, CallBackType, Fid, FileStatus, FileType, VolSync

__all__ = [
    "CallBack",
    "CallBackType",
    "Connection",
    "ConnectionLost",
    "Fid",
    "FileStatus",
    "FileType",
    "RemoteError",
    "RpcError",
    "RpcTimeout",
    "VolSync",
    "open_connection",
]

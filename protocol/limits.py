"""Protocol limits, shared by both ends (see SPEC.md, "Limits")."""

PROTOCOL_VERSION = 1

#: Largest single msgpack-RPC message either end accepts, in bytes.
MAX_FRAME = 16 * 1024 * 1024 + 64 * 1024
#: Largest data payload of one FS.FetchData / FS.StoreData call.
MAX_IO = 4 * 1024 * 1024
#: Fids per CB.CallBack (as in AFS) and per FS.InlineBulkStatus.
MAX_CALLBACK_FIDS = 50
MAX_BULKSTAT_FIDS = 50
#: Directory entry names, in bytes of UTF-8 (or raw bytes, see SPEC.md).
MAX_NAME = 255
#: Symlink targets, in bytes.
MAX_SYMLINK = 4096
#: Entries per FS.ReadDir page.
MAX_READDIR_ENTRIES = 1000
#: User extended attributes (SPEC "Extended attributes"), as Linux bounds
#: them: a name of at most 255 bytes (ERANGE past it), a value of at most
#: 64 KiB (E2BIG), and per file at most 256 KiB of names and values together
#: (ENOSPC; ext4 allows one block, XFS 64 KiB per value).
MAX_XATTR_NAME = 255
MAX_XATTR_VALUE = 64 * 1024
MAX_XATTR_TOTAL = 256 * 1024

#: Incoming requests a connection runs at once, and how many more it queues
#: before it answers EAGAIN instead of reading without bound.
DEFAULT_MAX_CONCURRENT = 128
DEFAULT_MAX_PENDING = 1024
#: Bytes queued for sending before senders wait (backpressure).
SEND_HIGH_WATER = 8 * 1024 * 1024
#: A peer that accepts no bytes for this long is dropped.
SEND_TIMEOUT = 30.0

MAX_UINT32 = 0xFFFFFFFF
MAX_UINT64 = 0xFFFFFFFFFFFFFFFF

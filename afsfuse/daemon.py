"""The client daemon: one cache manager and one FUSE session in one trio run.

Order matters.  The volume is found and its root validated *before* the
mount, so an unreachable server or a missing volume fails the mount command
instead of leaving a mount that errors on every access.  Once the kernel has
the mount, the daemon reports "ok" on the ready pipe (the ``afsfuse mount``
parent then exits 0).  It serves until the filesystem is unmounted
(``afsfuse umount``, ``fusermount3 -u``) or it gets SIGTERM/SIGINT; then it
stores dirty data, destroys its server records (each sends
``FS.GiveUpAllCallBacks`` once) and makes sure the mount is gone.

A process that serves a FUSE mount must never touch its own mount point: it
would deadlock.  Nothing here does.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyfuse3
import trio

from afsfuse import kernel_readahead
from afsfuse.cache_manager import CacheConfig, CacheManager
from afsfuse.cells import CellDB
from afsfuse.fuse_ops import AfsOperations, drain_invalidations
from afsfuse.server_record import tcp_connector
from afsfuse.tls_config import fallback_connector, mount_tls
from protocol.auth import load_key
from protocol.connection import open_connection
from protocol.errors import RpcError
from protocol.gc_schedule import tune_gc
from protocol.methods import VL_GET_ENTRY_BY_NAME
from protocol.tls import TLSRefused

log = logging.getLogger(__name__)


@dataclass
class MountOptions:
    host: str
    port: int
    volume: str
    mountpoint: Path
    cache_dir: Path
    cells_file: Path | None = None
    cell: str | None = None
    #: The cell key; None: each cell's key_file from the cells file.
    key_file: Path | None = None
    #: The client bundle (TLS); None: the cell's cert_file, else $AFSFUSE_CERT_FILE.
    cert_file: Path | None = None
    #: Plaintext connections, no TLS (benchmarks; logged loudly).
    insecure: bool = False
    cache_size: int = 1 << 30
    chunk_size: int = 256 * 1024
    attr_timeout: float = 3600.0
    entry_timeout: float = 3600.0
    rpc_timeout: float = 30.0
    fuse_options: list[str] = field(default_factory=list)
    #: The kernel's read-ahead window for the mount, KiB (0: its default).
    kernel_readahead_kib: int = kernel_readahead.DEFAULT_KIB
    dir_ahead: int = 2
    debug: bool = False


class MountFailed(Exception):
    pass


class Ready:
    """The pipe to the ``afsfuse mount`` parent: one line, then closed."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def say(self, text: str) -> None:
        if self.fd is None:
            if text != "ok":
                print(f"afsfuse: {text}", file=sys.stderr)
            return
        try:
            os.write(self.fd, (text.replace("\n", " ") + "\n").encode())
            os.close(self.fd)
        except OSError:
            pass
        self.fd = None


def fuse_options(opts: MountOptions) -> set[str]:
    # default_permissions: the kernel checks mode bits against the statuses we
    # return, so a user cannot open what the mode forbids even before the
    # server is asked.  The server enforces the same rules for the cred of
    # every call; the kernel check is still needed because cached data and
    # attributes are served without asking the server (a second user on this
    # machine must not read pages the first one fetched).
    out = set(pyfuse3.default_options)
    # Shown by mount(8) and df like sshfs's user@host:path source.
    out |= {f"fsname={opts.host}:{opts.port}/{opts.volume}", "subtype=afsfuse"}
    for o in opts.fuse_options:
        out.add(o)
    # Device nodes come from the server (any client's root may make one):
    # they do not open as devices here unless the mount says "-o dev".
    if "dev" not in out:
        out.add("nodev")
    return out


async def cells_for(opts: MountOptions) -> CellDB:
    if opts.cells_file is not None:
        return CellDB.load(opts.cells_file)
    if opts.cell:
        return CellDB.single((opts.host, opts.port), name=opts.cell)
    # No cells file: one cell, named as the server names its own cell.
    try:
        with trio.fail_after(max(opts.rpc_timeout, 10.0)):
            tls = None if opts.insecure else mount_tls(opts, None).context_for(None)
            async with open_connection(opts.host, opts.port, tls=tls) as conn:
                entry = await conn.call(VL_GET_ENTRY_BY_NAME, opts.volume)
    except (OSError, trio.TooSlowError) as exc:
        raise MountFailed(f"cannot reach server {opts.host}:{opts.port}: {exc}") from None
    except RpcError as exc:
        raise MountFailed(
            f"cannot mount volume {opts.volume!r} from {opts.host}:{opts.port}: {exc}"
        ) from None
    cell = entry.get("cell") if isinstance(entry, dict) else None
    if isinstance(cell, str) and cell:
        return CellDB.single((opts.host, opts.port), name=cell)
    return CellDB.single((opts.host, opts.port))


#: Where the key comes from when neither --key-file nor the cells file names one.
KEY_ENV = "AFSFUSE_KEY_FILE"


def load_cell_key(opts: MountOptions, cells: CellDB) -> bytes | None:
    """--key-file, else None when the cells file names a key for the cell,
    else the file named by $AFSFUSE_KEY_FILE."""
    if opts.key_file is None and os.environ.get(KEY_ENV):
        cell = cells.cells.get(opts.cell or cells.default)
        if cell is None or cell.key_file is None:
            opts.key_file = Path(os.environ[KEY_ENV])
    if opts.key_file is not None:
        try:
            return load_key(opts.key_file)
        except (OSError, ValueError) as exc:
            raise MountFailed(f"cannot read the cell key: {exc}") from None
    cell = cells.get(opts.cell) if opts.cell in cells.cells or opts.cell is None else None
    if cell is None or cell.key_file is None:
        raise MountFailed(
            "no cell key: pass --key-file (the fileserver's DATA_DIR/cell.key), set "
            f"key_file for the cell in the cells file, or set ${KEY_ENV}"
        )
    try:
        load_key(cell.key_file)
    except (OSError, ValueError) as exc:
        raise MountFailed(f"cannot read the cell key of {cell.name}: {exc}") from None
    return None


async def serve(opts: MountOptions, ready: Ready) -> None:
    if opts.insecure:
        log.warning("*** --insecure: connections are NOT encrypted or integrity-protected "
                    "(plaintext, for benchmarks) ***")  # fmt: skip
    try:
        cells = await cells_for(opts)
        connectors = {} if opts.insecure else mount_tls(opts, cells).connectors()
    except TLSRefused as exc:
        raise MountFailed(str(exc.message)) from None
    config = CacheConfig(
        cell_connectors=connectors,
        connector=tcp_connector if opts.insecure else fallback_connector(),
        cells=cells,
        key=load_cell_key(opts, cells),
        cache_dir=opts.cache_dir,
        cache_bytes=opts.cache_size,
        chunk_size=opts.chunk_size,
        rpc_timeout=opts.rpc_timeout,
        dir_ahead=opts.dir_ahead,
    )
    async with CacheManager(config) as cm:
        try:
            with trio.fail_after(max(opts.rpc_timeout, 10.0) * 2):
                root = await cm.mount_volume(opts.cell, opts.volume)
        except RpcError as exc:
            raise MountFailed(
                f"cannot mount volume {opts.volume!r} from {opts.host}:{opts.port}: {exc}"
            ) from exc
        except trio.TooSlowError:
            raise MountFailed(f"server {opts.host}:{opts.port} did not answer") from None
        ops = AfsOperations(
            cm, root, attr_timeout=opts.attr_timeout, entry_timeout=opts.entry_timeout
        )
        try:
            pyfuse3.init(ops, str(opts.mountpoint), fuse_options(opts))
        except RuntimeError as exc:
            raise MountFailed(f"cannot mount at {opts.mountpoint}: {exc}") from exc
        log.info("mounted %s at %s", opts.volume, opts.mountpoint)
        ready.say("ok")
        unmounted = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain_invalidations, ops)
                nursery.start_soon(ops.locks.run)  # extends held server locks
                nursery.start_soon(_watch_signals)
                if opts.kernel_readahead_kib:
                    nursery.start_soon(
                        _widen_readahead, ops, opts.mountpoint, opts.kernel_readahead_kib
                    )
                await pyfuse3.main()
                unmounted = True
                nursery.cancel_scope.cancel()
        finally:
            # Open files the kernel never released (signal, lazy unmount) keep
            # their dirty data in the cache manager; cm.close() stores it.
            pyfuse3.close(unmount=True)
            log.info("FUSE session ended (%s)", "unmounted" if unmounted else "terminated")


async def _widen_readahead(ops: AfsOperations, mountpoint: Path, kib: int) -> None:
    # Only after FUSE_INIT: its reply sets the window to at most what the
    # kernel offered in it (the 128 KiB default), undoing an earlier setting.
    await ops.initialized.wait()
    kernel_readahead.set_readahead(mountpoint, kib)


async def _watch_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for sig in signals:
            log.info("signal %s: unmounting", signal.Signals(sig).name)
            pyfuse3.terminate()
            return


def run_daemon(opts: MountOptions, ready_fd: int | None = None) -> int:
    ready = Ready(ready_fd)
    # Absolute and without symlinks, as /proc/self/mountinfo names it, taken
    # now: once mounted, this process must never touch the path again.
    opts = replace(opts, mountpoint=Path(os.path.realpath(opts.mountpoint)))
    if opts.debug:
        logging.getLogger().setLevel(logging.DEBUG)
    tune_gc()
    try:
        trio.run(serve, opts, ready)
    except MountFailed as exc:
        log.error("%s", exc)
        ready.say(str(exc))
        return 1
    except Exception as exc:
        log.exception("daemon failed")
        ready.say(f"daemon failed: {exc!r}")
        return 1
    ready.say("daemon exited before the mount was live")
    log.info("daemon exiting")
    return 0

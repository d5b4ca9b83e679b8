"""``afs-fileserver``: run a fileserver, salvage its data dir, administer it.

    afs-fileserver serve --data-dir DIR --listen 127.0.0.1:7000
    afs-fileserver salvage --data-dir DIR [--repair]
    afs-fileserver issue-client-cert --data-dir DIR [--days N] --out FILE
    afs-fileserver revoke-client-cert --data-dir DIR SERIAL
    afs-fileserver vol create|list|examine|remove|quota|offline|online ...
    afs-fileserver clients | callbacks | break FID | break-volume VOL | reset CLIENT | stats
    afs-fileserver locks
    afs-fileserver inject delay-breaks|drop-breaks|partition|shorten-promises|heal|show ...

Admin subcommands find the running server through ``--data-dir`` (its
address file and admin secret) and accept ``--json``.

Imports: ``fileserver.config``; the server, salvage and admin modules lazily,
for the subcommand that runs.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import trio

from fileserver.config import DEFAULT_CELL, ServerConfig, default_data_dir, parse_hostport
from protocol.gc_schedule import tune_gc

log = logging.getLogger(__name__)


def _hostport(text: str) -> tuple[str, int]:
    try:
        return parse_hostport(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _vldb_url(text: str) -> str:
    from fileserver.etcd import parse_endpoints

    try:
        parse_endpoints(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _setup_logging(verbose: bool, event_log: str | None, events: bool = False) -> None:
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=fmt,
                        stream=sys.stderr)  # fmt: skip
    if not verbose:
        # The RPC layer at DEBUG is very chatty; keep it at INFO unless asked.
        logging.getLogger("protocol").setLevel(logging.INFO)
    if not (events or event_log or verbose):
        # Event lines are a trace (one per promise granted, per break): about
        # 40% of the server's CPU in a cold `ls -lR`.  Off unless asked for.
        logging.getLogger("fileserver.events").setLevel(logging.WARNING)
    if event_log:
        h = logging.FileHandler(event_log)
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logging.getLogger("fileserver.events").addHandler(h)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="afs-fileserver", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", type=Path, default=default_data_dir(),
                        help="data directory (default: %(default)s)")  # fmt: skip
    admin = argparse.ArgumentParser(add_help=False, parents=[common])
    admin.add_argument("--json", action="store_true", help="machine-readable output")

    s = sub.add_parser("serve", parents=[common], help="run the fileserver")
    s.add_argument(
        "--listen",
        type=_hostport,
        default=("127.0.0.1", 7000),
        help="HOST:PORT to listen on (default 127.0.0.1:7000; port 0 picks one); any other "
        "host is reachable from other machines (logged as a warning)",
    )
    s.add_argument("--key-file", type=Path, default=None,
                   help="cell key (default DATA_DIR/cell.key, created 0600 at first start); "
                        "clients and servers of one cell share it")  # fmt: skip
    s.add_argument("--root-squash", action="store_true", help="treat uid 0 of clients as nobody")
    s.add_argument("--sync", choices=("always", "batch", "none"), default="always",
                   help="always (default): a reply means the change survives power loss; "
                        "batch: it survives a server crash and is synced within ~1 s; "
                        "none: never synced by the server")  # fmt: skip
    s.add_argument("--inline-max", type=int, default=64 * 1024, metavar="BYTES",
                   help="files at most this long keep their bytes in the volume "
                        "database (one WAL sync per store, no data file); 0: never "
                        "(default %(default)s)")  # fmt: skip
    s.add_argument("--ca-file", type=Path, default=None,
                   help="cell CA, certificate + key (default: cell-ca.pem next to the cell key, "
                        "created 0600 at first start); servers of one cell share it")  # fmt: skip
    s.add_argument("--insecure", action="store_true",
                   help="plaintext, no TLS (benchmarks only; logged loudly)")  # fmt: skip
    lim = s.add_argument_group("limits (per peer, safe defaults)")
    d = ServerConfig(data_dir=Path("."))
    for flag, kind, attr, text in [
        ("--max-frame", int, "max_frame", "largest message, bytes"),
        ("--max-calls-in-flight", int, "max_calls_in_flight", "requests per connection"),
        ("--max-connections-per-peer", int, "max_connections_per_peer", "per peer address"),
        ("--max-connections", int, "max_connections", "in total"),
        ("--handshake-timeout", float, "handshake_timeout", "seconds to authenticate"),
        ("--idle-timeout", float, "idle_timeout", "seconds a silent peer is kept"),
        ("--probe-after", float, "probe_after", "seconds before a silent client is probed"),
        ("--frame-timeout", float, "frame_timeout", "seconds one partial message may take"),
        ("--max-name", int, "max_name", "bytes in an entry name"),
        ("--max-dir-entries", int, "max_dir_entries", "entries in one directory"),
        ("--max-file-size", int, "max_file_size", "bytes in one file"),
    ]:
        lim.add_argument(flag, type=kind, default=getattr(d, attr), dest=attr,
                         help=f"{text} (default %(default)s)")  # fmt: skip
    s.add_argument("--cell", default=DEFAULT_CELL, help="cell name at first start")
    s.add_argument(
        "--callback-duration",
        type=float,
        default=4 * 3600,
        metavar="SECONDS",
        help="cap on promise durations (OpenAFS-like schedule below it)",
    )
    s.add_argument(
        "--break-timeout",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="a client not answering a break within this is marked down",
    )
    s.add_argument(
        "--max-callbacks",
        type=int,
        default=4_000_000,
        help="bound on promises held (least recently active client revoked)",
    )
    s.add_argument(
        "--max-delayed",
        type=int,
        default=1000,
        help="delayed breaks kept per down client before InitCallBackState3",
    )
    s.add_argument("--sweep-interval", type=float, default=60.0, metavar="SECONDS")
    s.add_argument("--lock-lifetime", type=float, default=300.0, metavar="SECONDS",
                   help="a lock not extended for this long expires; also the grace period "
                   "after a restart (default 300)")  # fmt: skip
    s.add_argument(
        "--vl",
        type=_hostport,
        default=None,
        help="HOST:PORT of the VL service to register our volumes with",
    )
    s.add_argument("--vldb", type=_vldb_url, default=None, metavar="etcd://HOST:PORT[,HOST:PORT...]",
                   help="keep the cell's volume locations in etcd (default: this server's "
                        "own VL service)")  # fmt: skip
    s.add_argument(
        "--vldb-ttl",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="lease of this server's VLDB registration (shown down after it)",
    )
    s.add_argument(
        "--advertise",
        type=_hostport,
        default=None,
        help="HOST:PORT given out in VL entries (default: the listen address)",
    )
    s.add_argument(
        "--metrics", type=_hostport, default=None, help="HOST:PORT for the Prometheus exporter"
    )
    s.add_argument(
        "--events",
        action="store_true",
        help="log callback event lines (grants, breaks, ...) for scenario timelines",
    )
    s.add_argument(
        "--event-log", default=None, help="also append event lines to this file (implies --events)"
    )
    s.add_argument(
        "--no-root-volume", action="store_true", help="do not create root.cell at first start"
    )
    s.add_argument("-v", "--debug", "--verbose", action="store_true", dest="verbose")

    for name, text in [("issue-client-cert", "write a client bundle (cert, key, cell CA)"),
                       ("revoke-client-cert", "deny a client certificate (running servers "
                        "reload the list)")]:  # fmt: skip
        t = sub.add_parser(name, parents=[common], help=text)
        t.add_argument("--key-file", type=Path, default=None, help="as for serve")
        t.add_argument("--ca-file", type=Path, default=None, help="as for serve")
        if name == "issue-client-cert":
            t.add_argument("--out", type=Path, required=True, help="bundle file (written 0600)")
            t.add_argument("--days", type=float, default=365.0, help="validity (default 365)")
            t.add_argument("--name", default="", help="a name for the certificate's subject")
        else:
            t.add_argument("serial", help="the certificate serial (hex, as issue printed)")

    sv = sub.add_parser("salvage", parents=[common], help="check/repair the data directory")
    sv.add_argument("--repair", action="store_true")
    sv.add_argument("--json", action="store_true")

    vol = sub.add_parser("vol", help="volume administration").add_subparsers(
        dest="vol_command", required=True)  # fmt: skip
    c = vol.add_parser("create", parents=[admin])
    c.add_argument("name")
    c.add_argument("--quota", type=int, default=0, help="quota in bytes (0: none)")
    c.add_argument("--id", type=int, default=None, help="volume id (default: next free)")
    vol.add_parser("list", parents=[admin])
    vol.add_parser("examine", parents=[admin]).add_argument("volume")
    vol.add_parser("remove", parents=[admin]).add_argument("volume")
    vol.add_parser("offline", parents=[admin]).add_argument("volume")
    vol.add_parser("online", parents=[admin]).add_argument("volume")
    mv = vol.add_parser("move", parents=[admin], help="move a volume to another fileserver")
    mv.add_argument("volume")
    mv.add_argument("--to", type=_hostport, required=True, metavar="HOST:PORT",
                    help="the target fileserver (same cell and cell key)")  # fmt: skip
    q = vol.add_parser("quota", parents=[admin])
    q.add_argument("volume")
    q.add_argument("bytes", type=int)

    sub.add_parser("clients", parents=[admin], help="list clients")
    cb = sub.add_parser("callbacks", parents=[admin], help="list promises")
    cb.add_argument("--client", default=None)
    cb.add_argument("--fid", default=None, help="VOLUME.VNODE.UNIQUE")
    sub.add_parser("break", parents=[admin], help="break a fid").add_argument("fid")
    sub.add_parser("break-volume", parents=[admin], help="whole-volume break").add_argument(
        "volume")  # fmt: skip
    sub.add_parser("reset", parents=[admin], help="InitCallBackState3 a client").add_argument(
        "client")  # fmt: skip
    sub.add_parser("stats", parents=[admin], help="counters and RPCs by method")
    sub.add_parser("locks", parents=[admin], help="list file locks")
    from fileserver.nemesis import add_cli

    add_cli(sub, admin)
    return p


def _vol_arg(v: str) -> str | int:
    return int(v) if v.isdigit() else v


def _admin_call(args: argparse.Namespace) -> tuple[str, str, tuple[object, ...]]:
    cmd = args.command
    if cmd == "vol":
        vc = args.vol_command
        table = {
            "create": ("Admin.VolCreate",
                       (args.name, args.quota, args.id) if vc == "create" else ()),
            "list": ("Admin.VolList", ()),
            "examine": ("Admin.VolExamine", (_vol_arg(getattr(args, "volume", "")),)),
            "remove": ("Admin.VolRemove", (_vol_arg(getattr(args, "volume", "")),)),
            "offline": ("Admin.VolSetOnline", (_vol_arg(getattr(args, "volume", "")), False)),
            "online": ("Admin.VolSetOnline", (_vol_arg(getattr(args, "volume", "")), True)),
            "move": ("Admin.VolMove", (_vol_arg(getattr(args, "volume", "")),
                                       *(getattr(args, "to", None) or ("", 0)))),
            "quota": ("Admin.VolSetQuota",
                      (_vol_arg(getattr(args, "volume", "")), getattr(args, "bytes", 0))),
        }  # fmt: skip
        method, params = table[vc]
        return f"vol {vc}", method, params
    if cmd == "clients":
        return cmd, "Admin.Clients", ()
    if cmd == "callbacks":
        return cmd, "Admin.Callbacks", (args.client, args.fid)
    if cmd == "break":
        return cmd, "Admin.Break", (args.fid,)
    if cmd == "break-volume":
        return cmd, "Admin.BreakVolume", (_vol_arg(args.volume),)
    if cmd == "reset":
        return cmd, "Admin.Reset", (args.client,)
    if cmd == "stats":
        return cmd, "Admin.Stats", ()
    if cmd == "locks":
        return cmd, "Admin.Locks", ()
    if cmd == "inject":
        from fileserver.nemesis import cli_call

        return cli_call(args)
    raise SystemExit(f"unknown command {cmd}")


def serve(args: argparse.Namespace) -> int:
    from fileserver.server import FileServer

    _setup_logging(args.verbose, args.event_log, args.events)
    config = ServerConfig(
        data_dir=args.data_dir,
        host=args.listen[0],
        port=args.listen[1],
        cell=args.cell,
        callback_duration=args.callback_duration,
        break_timeout=args.break_timeout,
        max_callbacks=args.max_callbacks,
        max_delayed=args.max_delayed,
        sweep_interval=args.sweep_interval,
        lock_lifetime=args.lock_lifetime,
        vl=args.vl,
        vldb=args.vldb,
        vldb_ttl=args.vldb_ttl,
        advertise=args.advertise,
        metrics=args.metrics,
        create_root=False if args.no_root_volume else None,
        key_file=args.key_file,
        ca_file=args.ca_file,
        insecure=args.insecure,
        root_squash=args.root_squash,
        max_frame=args.max_frame,
        max_calls_in_flight=args.max_calls_in_flight,
        max_connections_per_peer=args.max_connections_per_peer,
        max_connections=args.max_connections,
        handshake_timeout=args.handshake_timeout,
        idle_timeout=args.idle_timeout,
        probe_after=args.probe_after,
        frame_timeout=args.frame_timeout,
        max_name=args.max_name,
        max_dir_entries=args.max_dir_entries,
        max_file_size=args.max_file_size,
        sync=args.sync,
        inline_max=args.inline_max,
    )
    server = FileServer(config)

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve)
                async for signum in signals:
                    log.info("got %s, shutting down", signal.Signals(signum).name)
                    server.stop()
                    break

    tune_gc()
    try:
        trio.run(main)
    except Exception as exc:
        leaf: BaseException = exc
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        if isinstance(leaf, RuntimeError | OSError):
            # Expected start-up failures (data dir in use, port taken): one line.
            log.error("cannot serve: %s", leaf)
            return 1
        raise
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command in ("issue-client-cert", "revoke-client-cert"):
        from protocol.tls import cert_command

        cfg = ServerConfig(data_dir=args.data_dir, key_file=args.key_file, ca_file=args.ca_file)
        return cert_command(args, cfg.ca_file)
    if args.command == "salvage":
        from fileserver.salvage import run_salvage

        logging.basicConfig(level=logging.WARNING)
        return run_salvage(args.data_dir, args.repair, args.json)
    from fileserver.admin import run_admin

    args.admin_call = _admin_call(args)
    return run_admin(args)


if __name__ == "__main__":
    sys.exit(main())

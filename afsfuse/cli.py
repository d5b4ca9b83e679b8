"""The ``afsfuse`` command: mount, umount, and OpenAFS-style ``fs`` commands.

``afsfuse mount`` checks its arguments, then (without ``-f``) starts the
daemon as a new session and waits until it reports the mount live or
failed over a pipe, so the command's exit status tells the truth: non-zero
with a clear message when the server is unreachable, the volume does not
exist, or the mount point is unusable.

The ``fs`` commands talk to the daemon through extended attributes on files
in the mount (``afs.fid``, ``afs.cell``, ``afs.volume`` as the Linux kernel
AFS client has them, plus ``afs.*`` attributes of our own), so they need no
socket and work on any path inside a mount.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from afsfuse.kernel_readahead import DEFAULT_KIB as KERNEL_READAHEAD_KIB

log = logging.getLogger(__name__)

DEFAULT_PORT = 7000
DEFAULT_VOLUME = "root.cell"
READY_TIMEOUT = 60.0


class UsageError(Exception):
    pass


def parse_target(text: str) -> tuple[str, int, str]:
    """``SERVER[:PORT][/VOLUME]`` -> (host, port, volume)."""
    m = re.fullmatch(r"(\[[^\]]+\]|[^:/\[\]]+)(?::(\d+))?(?:/(.+))?", text)
    if not m:
        raise UsageError(f"bad server address {text!r}: want SERVER[:PORT][/VOLUME]")
    host = m.group(1).strip("[]")
    port = int(m.group(2)) if m.group(2) else DEFAULT_PORT
    if not 0 < port < 65536:
        raise UsageError(f"bad port {port}")
    return host, port, m.group(3) or DEFAULT_VOLUME


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([kKmMgGtT]?)i?[bB]?", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 512M, 2G)")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(m.group(1)) * mult


def default_cache_dir(mountpoint: Path) -> Path:
    """One cache per mount point, so a remount finds its chunks again and two
    mounts on one machine never share a client UUID."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "afsfuse"
    name = str(mountpoint.resolve()).strip("/").replace("/", "_") or "root"
    return base / name


def check_mountpoint(path: Path) -> None:
    if not path.exists():
        raise UsageError(f"mount point {path} does not exist")
    if not path.is_dir():
        raise UsageError(f"mount point {path} is not a directory")
    if os.path.ismount(path):
        raise UsageError(f"{path} is already a mount point")
    if any(path.iterdir()):
        raise UsageError(f"mount point {path} is not empty")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="afsfuse", description="AFS-style network filesystem client")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("mount", help="mount a volume")
    m.add_argument("target", metavar="SERVER[:PORT][/VOLUME]")
    m.add_argument("mountpoint", type=Path)
    m.add_argument("-f", "--foreground", action="store_true", help="do not daemonize")
    m.add_argument("--cells", type=Path, help="cells file (TOML)")
    m.add_argument("--cell", help="cell name of SERVER (default: as the server says)")
    m.add_argument(
        "--key-file",
        type=Path,
        help="the cell key (the fileserver's DATA_DIR/cell.key); default: the cell's "
        "key_file in the cells file, else $AFSFUSE_KEY_FILE",
    )
    m.add_argument(
        "--cert",
        type=Path,
        help="client bundle of the cell (from `afs-fileserver issue-client-cert`); default: "
        "the cell's cert_file in the cells file, else $AFSFUSE_CERT_FILE",
    )
    m.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext connections, no TLS (benchmarks only; the server must run --insecure)",
    )
    m.add_argument("--cache-dir", type=Path)
    m.add_argument("--cache-size", type=parse_size, default=parse_size("1G"))
    m.add_argument("--chunk-size", type=parse_size, default=parse_size("256K"))
    m.add_argument("--attr-timeout", type=float, default=3600.0, help="kernel attribute cache")
    m.add_argument("--entry-timeout", type=float, default=3600.0, help="kernel entry cache")
    m.add_argument("--rpc-timeout", type=float, default=30.0)
    m.add_argument(
        "--kernel-readahead", type=int, default=KERNEL_READAHEAD_KIB, metavar="KIB",
        help="the kernel's read-ahead window for the mount (root only; 0: the kernel's 128 KiB)",
    )  # fmt: skip
    m.add_argument(
        "--dir-ahead", type=int, default=2, metavar="N",
        help="subdirectory listings read ahead of a tree walk per readdir (0: off)",
    )  # fmt: skip
    m.add_argument("-o", dest="fuse_options", action="append", default=[], help="FUSE options")
    m.add_argument("--log-file", type=Path, help="daemon log (default: CACHE_DIR/daemon.log)")
    m.add_argument(
        "--events",
        action="store_true",
        help="log cache-manager event lines (promises, breaks, validations) for timelines",
    )
    m.add_argument("-v", "--verbose", action="store_true")
    m.add_argument("--debug", action="store_true")
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    u = sub.add_parser("umount", help="store dirty data and unmount")
    u.add_argument("mountpoint", type=Path)
    u.add_argument("--timeout", type=float, default=60.0)

    fs = sub.add_parser("fs", help="inspect and steer the cache manager")
    fsub = fs.add_subparsers(dest="fs_command", required=True)
    for name, helptext in [
        ("examine", "fid, volume, data version, promise and break counters of PATH"),
        ("flush", "drop PATH's cached status and data"),
        ("flushvolume", "drop the cached state of PATH's volume"),
        ("whereis", "the server holding PATH"),
        ("lsmount", "the volume an AFS mount point DIR names"),
    ]:
        s = fsub.add_parser(name, help=helptext)
        s.add_argument("path", type=Path)
        s.add_argument("--json", action="store_true")
    s = fsub.add_parser("checkservers", help="probe the servers this mount uses")
    s.add_argument("path", type=Path, nargs="?", default=Path("."))
    s.add_argument("--json", action="store_true")
    s = fsub.add_parser("stats", help="the cache manager's counters")
    s.add_argument("path", type=Path)
    s.add_argument("--json", action="store_true")
    s = fsub.add_parser("mkmount", help="create an AFS mount point DIR for VOLUME")
    s.add_argument("path", type=Path)
    s.add_argument("volume")
    s.add_argument("--cell")
    return p


# -- mount ------------------------------------------------------------------


def cmd_mount(args: argparse.Namespace) -> int:
    host, port, volume = parse_target(args.target)
    mountpoint = args.mountpoint.resolve()
    check_mountpoint(mountpoint)
    cache_dir = (args.cache_dir or default_cache_dir(mountpoint)).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    if args.foreground:
        from afsfuse.daemon import MountOptions, run_daemon

        opts = MountOptions(
            host=host,
            port=port,
            volume=volume,
            mountpoint=mountpoint,
            cells_file=args.cells,
            cell=args.cell,
            key_file=args.key_file.resolve() if args.key_file else None,
            cert_file=args.cert.resolve() if args.cert else None,
            insecure=args.insecure,
            cache_dir=cache_dir,
            cache_size=args.cache_size,
            chunk_size=args.chunk_size,
            attr_timeout=args.attr_timeout,
            entry_timeout=args.entry_timeout,
            rpc_timeout=args.rpc_timeout,
            kernel_readahead_kib=args.kernel_readahead,
            dir_ahead=max(0, args.dir_ahead),
            fuse_options=[o for opt in args.fuse_options for o in opt.split(",") if o],
            debug=args.debug,
        )
        return run_daemon(opts, ready_fd=args.ready_fd)
    return spawn_daemon(args, cache_dir)


def spawn_daemon(args: argparse.Namespace, cache_dir: Path) -> int:
    """Start ``mount -f`` as a new session; wait for its verdict on a pipe."""
    read_fd, write_fd = os.pipe()
    log_file = args.log_file or cache_dir / "daemon.log"
    argv = [sys.executable, "-m", "afsfuse.cli", *sys.argv[1:]]
    argv = [a for a in argv if a not in ("-f", "--foreground")]
    argv += ["-f", "--ready-fd", str(write_fd)]
    if "--cache-dir" not in argv:
        argv += ["--cache-dir", str(cache_dir)]
    if "--log-file" not in argv:
        argv += ["--log-file", str(log_file)]
    with open(os.devnull, "rb") as devnull, open(log_file, "ab") as logf:
        proc = subprocess.Popen(
            argv,
            stdin=devnull,
            stdout=logf,
            stderr=logf,
            pass_fds=(write_fd,),
            start_new_session=True,
            close_fds=True,
        )
    os.close(write_fd)
    verdict = b""
    deadline = time.monotonic() + READY_TIMEOUT
    with os.fdopen(read_fd, "rb") as pipe:
        # The daemon writes one line ("ok" or an error) and closes the pipe;
        # EOF without a line means it died before saying anything.
        while time.monotonic() < deadline and not verdict.endswith(b"\n"):
            chunk = pipe.read1(4096) if hasattr(pipe, "read1") else pipe.read(4096)
            if not chunk:
                break
            verdict += chunk
    text = verdict.decode(errors="replace").strip()
    if text == "ok":
        print(f"afsfuse: mounted {args.target} at {args.mountpoint} (daemon pid {proc.pid})")
        return 0
    if proc.poll() is None and not text:
        proc.terminate()
    print(f"afsfuse: mount failed: {text or 'daemon exited'} (log: {log_file})", file=sys.stderr)
    return 1


# -- umount -----------------------------------------------------------------


def cmd_umount(args: argparse.Namespace) -> int:
    mp = args.mountpoint.resolve()
    if not os.path.ismount(mp):
        print(f"afsfuse: {mp} is not mounted", file=sys.stderr)
        return 1
    try:
        pid = int(os.getxattr(mp, "afs.pid"))
    except OSError:
        pid = None
    # Unmounting makes the kernel end the FUSE session; the daemon then
    # stores dirty data, gives up its callbacks and exits.
    res = subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True, text=True)
    if res.returncode != 0:
        print(f"afsfuse: umount failed: {res.stderr.strip()}", file=sys.stderr)
        return 1
    if pid is not None:
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.05)
        if pid_alive(pid):
            print(f"afsfuse: daemon {pid} still running after {args.timeout} s", file=sys.stderr)
            return 1
    return 0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return False


# -- fs ---------------------------------------------------------------------


def read_json_xattr(path: Path, name: str) -> object:
    try:
        raw = os.getxattr(path, name)
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror} (is it inside an afsfuse mount?)") from exc
    return json.loads(raw)


def print_info(info: object, as_json: bool) -> None:
    if as_json:
        print(json.dumps(info, indent=2, sort_keys=True))
    elif isinstance(info, dict):
        width = max((len(k) for k in info), default=0)
        for k, v in info.items():
            shown = json.dumps(v) if isinstance(v, dict | list) else v
            print(f"{k:<{width}}  {shown}")
    else:
        print(info)


def cmd_fs(args: argparse.Namespace) -> int:
    c = args.fs_command
    if c in ("examine", "whereis", "lsmount", "stats", "checkservers"):
        print_info(read_json_xattr(args.path, f"afs.{c}"), args.json)
        return 0
    if c in ("flush", "flushvolume"):
        try:
            os.setxattr(args.path, f"afs.{c}", b"1")
        except OSError as exc:
            raise UsageError(f"{args.path}: {exc.strerror}") from exc
        return 0
    if c == "mkmount":
        spec = f"{args.cell}:{args.volume}" if args.cell else args.volume
        parent, name = args.path.parent, args.path.name
        try:
            os.setxattr(parent, "afs.mkmount", f"{name}\0{spec}".encode())
        except OSError as exc:
            raise UsageError(f"{args.path}: {exc.strerror}") from exc
        return 0
    raise UsageError(f"unknown fs command {c}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if getattr(args, "debug", False) else logging.INFO
    if not getattr(args, "verbose", False) and not getattr(args, "debug", False):
        level = logging.WARNING if args.command != "mount" else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "mount" and not (args.events or args.verbose or args.debug):
        # Event lines are a trace (one per promise installed, per validation):
        # about a third of the daemon's CPU in a cold `ls -lR`.  Off unless asked.
        logging.getLogger("afsfuse.events").setLevel(logging.WARNING)
    try:
        if args.command == "mount":
            return cmd_mount(args)
        if args.command == "umount":
            return cmd_umount(args)
        return cmd_fs(args)
    except UsageError as exc:
        print(f"afsfuse: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

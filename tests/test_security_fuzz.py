"""Fuzzing a live fileserver (subprocess) with hypothesis, for a bounded time.

Two kinds of input: malformed frames (random bytes, truncated and corrupted
msgpack, wrong shapes), before and after the handshake; and valid FS.*
requests with randomly mutated params, method names and creds, on
authenticated connections.  Afterwards the server is still up, still serves
a real mount, and ``afs-fileserver salvage`` reports the data dir clean.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import os
import socket
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from afsfuse.lab.admin import server_stats
from afsfuse.lab.mount import ClientMount
from afsfuse.lab.server import REPO, ServerProcess
from protocol.tls import client_context

#: Wall-clock bound for each of the two fuzzers (seconds).
FUZZ_BUDGET = 12.5
_deadline = [0.0]
#: Frames each fuzzer actually sent: a fuzzer that fed nothing fails.
_fed = {"malformed": 0, "mutated": 0}
#: Mutated frames that are well-formed calls of an FS handler sent on a
#: connection the server kept open (it must dispatch them), and those of them
#: it answered (each answer means the handler ran and was counted in its
#: ``rpcs`` stats).  A connection the server closed over an earlier frame of
#: the batch runs nothing after it: those frames are not counted.
_fs_calls = {"fed": 0, "answered": 0}
#: How long a mutated call waits for its answer: a bound for a hung handler,
#: not a speed expectation (answers normally come in milliseconds).
REPLY_WAIT = 5.0


class SyncPeer:
    """A blocking msgpack-RPC client inside TLS (the lab's client bundle for
    the server): enough to fuzz with, answers CB.* with nil."""

    def __init__(self, host: str, port: int, bundle: Path) -> None:
        raw = socket.create_connection((host, port), timeout=5)
        self.sock = client_context(bundle).wrap_socket(raw)
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        self.ids = itertools.count(1)
        self.eof = False  # the server hung up

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def messages(self, timeout: float) -> Iterator[Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            yield from self.unpacker
            self.sock.settimeout(max(0.01, end - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return
            except OSError:
                self.eof = True
                return
            if not data:
                self.eof = True
                return
            self.unpacker.feed(data)

    def call(self, method: str, *params: Any, timeout: float = 5.0) -> tuple[Any, Any]:
        """(error, result); ("closed", None) if the server hung up."""
        msgid = next(self.ids)
        self.send(msgpack.packb([0, msgid, method, list(params)], use_bin_type=True))
        for msg in self.messages(timeout):
            if isinstance(msg, list) and msg and msg[0] == 0:  # a CB.* call to us
                self.send(msgpack.packb([1, msg[1], None, None]))
            elif isinstance(msg, list) and len(msg) == 4 and msg[1] == msgid:
                return msg[2], msg[3]
        return "closed", None

    def handshake(self, key: bytes) -> None:
        cn = os.urandom(32)
        err, r = self.call("Auth.Challenge", cn)
        assert err is None, err
        mine = hmac.new(key, b"afsfuse-v1 client\0" + r["nonce"] + cn, hashlib.sha256).digest()
        err, _ = self.call("Auth.Prove", mine)
        assert err is None, err
        err, _ = self.call("FS.Hello", {"uuid": str(uuidlib.uuid4()), "version": 1})
        assert err is None, err


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp("fuzz")
    srv = ServerProcess(base / "fs", extra_args=["--max-name", "64", "--max-dir-entries", "500"])
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def alive(srv: ServerProcess) -> None:
    assert srv.proc is not None and srv.proc.poll() is None, srv.log_text()[-3000:]


_root: list[list[int]] = []


def root_fid(srv: ServerProcess) -> list[int]:
    """root.cell's root fid (asked once: the strategies draw around it)."""
    if not _root:
        p = SyncPeer(srv.host, srv.port, srv.cert_file)
        try:
            _, e = p.call("VL.GetEntryByName", "root.cell")
        finally:
            p.close()
        _root.append([e["volume_id"], 1, 1])
    return _root[0]


def out_of_time() -> bool:
    return time.monotonic() > _deadline[0]


def run_fuzzer(name: str, fuzz: Any, srv: ServerProcess) -> None:
    """Run one hypothesis fuzzer within its own budget; fail if it fed no input.

    The budget bounds the wall clock, so under load a fuzzer may run fewer
    examples than it asks for, but a run that stopped before it sent a
    single frame checked nothing and must not pass.
    """
    _fed[name] = 0
    _deadline[0] = time.monotonic() + FUZZ_BUDGET
    fuzz(srv)
    print(f"fuzz {name}: {_fed[name]} frames fed")
    assert _fed[name] > 0, f"the {name} fuzzer returned before it fed any input"


# -- strategies ------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=300)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
FS_METHODS = ["FS.FetchStatus", "FS.FetchData", "FS.StoreData", "FS.StoreStatus",
              "FS.CreateFile", "FS.MakeDir", "FS.Symlink", "FS.Link", "FS.RemoveFile",
              "FS.RemoveDir", "FS.Rename", "FS.Lookup", "FS.ReadDir", "FS.InlineBulkStatus",
              "FS.GetVolumeStatus", "FS.GetCapabilities", "FS.Hello", "VL.GetEntryByName",
              "VL.GetEntryById", "VL.ListEntries", "VL.RegisterServer", "Admin.Auth",
              "Admin.VolRemove", "CB.CallBack", "Auth.Challenge", "Auth.Prove"]  # fmt: skip


def valid_requests(root: list[int]) -> list[tuple[str, list[Any]]]:
    """Well-formed requests; the fuzzer mutates them."""
    d = root
    return [
        ("FS.FetchStatus", [None, d]),
        ("FS.CreateFile", [[1001, 1001, []], d, b"fz", 0o644]),
        ("FS.MakeDir", [None, d, b"fzd", 0o755]),
        ("FS.StoreData", [None, [d[0], 2, 2], 0, b"data", None, None]),
        ("FS.StoreStatus", [None, [d[0], 2, 2], {"mode": 0o600, "size": 3}]),
        ("FS.Lookup", [None, d, b"fz"]),
        ("FS.ReadDir", [None, d, None, 10, True]),
        ("FS.Rename", [None, d, b"fz", d, b"fz2", 0]),
        ("FS.RemoveFile", [None, d, b"fz2"]),
        ("FS.Symlink", [None, d, b"fzl", b"target", 0o777]),
        ("FS.InlineBulkStatus", [None, [d, [d[0], 2, 2]]]),
        ("FS.FetchData", [None, [d[0], 2, 2], 0, 100]),
        ("FS.GetVolumeStatus", [None, d[0]]),
    ]


#: The FS methods the mutations start from: every one has a handler.
FS_HANDLED = frozenset(m for m, _ in valid_requests([1, 1, 1]))


@st.composite
def mutated(draw: st.DrawFn, root: list[int]) -> tuple[Any, ...]:
    method, params = draw(st.sampled_from(valid_requests(root)))
    params = list(params)
    how = draw(st.sampled_from(["param", "param", "cred", "method", "drop", "add", "msgid"]))
    msgid: Any = 1
    if how == "param" and params:
        params[draw(st.integers(0, len(params) - 1))] = draw(values)
    elif how == "cred":
        params[0] = draw(st.lists(values, max_size=4) | values)
    elif how == "method":
        method = draw(st.sampled_from(FS_METHODS) | st.text(max_size=30))
    elif how == "drop" and params:
        params.pop(draw(st.integers(0, len(params) - 1)))
    elif how == "add":
        params.append(draw(values))
    else:
        msgid = draw(st.integers(min_value=-5, max_value=2**33) | values)
    return (0, msgid, method, params)


def dispatched(msg: tuple[Any, ...]) -> bool:
    """Whether the server must run an FS handler for ``msg`` (and count it):
    a valid msgid, a params list and an FS method it serves (not FS.Hello)."""
    _, msgid, method, params = msg
    return (type(msgid) is int and 0 <= msgid <= 2**32 - 1 and type(params) is list
            and method in FS_HANDLED)  # fmt: skip


def frame_of(msg: tuple[Any, ...]) -> bytes:
    return msgpack.packb(list(msg), use_bin_type=True)


@st.composite
def malformed(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["random", "truncated", "flipped", "shape", "huge_header"]))
    good = frame_of((0, 5, "FS.FetchStatus", [None, [536870912, 1, 1]]))
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=200))
    if kind == "truncated":
        return good[: draw(st.integers(1, len(good) - 1))]
    if kind == "flipped":
        i = draw(st.integers(0, len(good) - 1))
        return good[:i] + bytes([good[i] ^ draw(st.integers(1, 255))]) + good[i + 1 :]
    if kind == "huge_header":
        # A bin/str/array header announcing gigabytes.
        return bytes([draw(st.sampled_from([0xC6, 0xDB, 0xDD]))]) + b"\x7f\xff\xff\xff"
    return msgpack.packb(draw(values), use_bin_type=True)


# -- the fuzzers ---------------------------------------------------------------------


def test_malformed_frames(server: ServerProcess) -> None:
    run_fuzzer("malformed", fuzz_malformed_frames, server)


def test_mutated_requests(server: ServerProcess) -> None:
    run_fuzzer("mutated", fuzz_mutated_requests, server)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def fuzz_malformed_frames(server: ServerProcess, data: st.DataObject) -> None:
    # Everything is drawn before the budget check: hypothesis needs each run
    # of an example to draw the same, whatever the clock says.
    frame = data.draw(malformed())
    authed = data.draw(st.booleans())
    if out_of_time():
        return
    p = SyncPeer(server.host, server.port, server.cert_file)
    try:
        if authed:
            p.handshake(server.key)
        p.send(frame)
        _fed["malformed"] += 1
        for _ in p.messages(0.05):
            pass
    except OSError:
        pass  # the server hung up on us: fine
    finally:
        p.close()
    alive(server)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def fuzz_mutated_requests(server: ServerProcess, data: st.DataObject) -> None:
    root = root_fid(server)
    msgs = [data.draw(mutated(root)) for _ in range(data.draw(st.integers(1, 8)))]
    if out_of_time():  # after the draws, as above
        return
    p = SyncPeer(server.host, server.port, server.cert_file)
    try:
        p.handshake(server.key)
        for msg in msgs:
            try:
                p.send(frame_of(msg))
            except (ValueError, TypeError, OverflowError):
                continue  # not encodable: nothing to send
            _fed["mutated"] += 1
            must_run = dispatched(msg)
            answered = False
            # A call the server must dispatch waits for its own answer (a
            # later call on a connection closed early would not be run); any
            # other frame waits briefly for an error answer or the hang-up.
            for reply in p.messages(REPLY_WAIT if must_run else 0.2):
                if isinstance(reply, list) and reply and reply[0] == 0:
                    p.send(msgpack.packb([1, reply[1], None, None]))
                    continue
                # Every error is an [errno name, text] pair.
                if isinstance(reply, list) and len(reply) == 4 and reply[2] is not None:
                    assert isinstance(reply[2][0], str) and reply[2][0].startswith("E")
                answered = isinstance(reply, list) and len(reply) == 4 and reply[1] == msg[1]
                break
            if must_run and (answered or not p.eof):
                _fs_calls["fed"] += 1
                _fs_calls["answered"] += answered
            if p.eof:
                break  # hung up: nothing more is read on this connection
    except OSError:
        pass
    finally:
        p.close()
    alive(server)


def test_server_survives_and_data_dir_is_clean(
    server: ServerProcess, tmp_path, require_fuse
) -> None:
    alive(server)
    assert "Traceback" not in server.log_text()
    stats = server_stats(server.data_dir)
    # FS.Hello is every handshake, not a mutation reaching a handler.
    handled = sum(n for m, n in stats["rpcs"].items() if m.startswith("FS.") and m != "FS.Hello")
    fed, answered = _fs_calls["fed"], _fs_calls["answered"]
    print(f"fuzz: {handled} FS calls handled, {answered} of {fed} dispatchable mutated calls "
          f"answered, errors {stats['rpc_errors']}")  # fmt: skip
    # The mutations reached the handlers: however many frames the budget
    # allowed, the server answered nearly every call it had to dispatch, and
    # counted each one it answered.
    assert fed > 0, "no mutated frame was a call the server must dispatch"
    assert answered >= 0.9 * fed, f"only {answered} of {fed} dispatchable calls were answered"
    assert handled >= answered
    with ClientMount(server, tmp_path / "m") as m:
        (m.mnt / "after-fuzz").write_bytes(b"still fine")
        assert (m.mnt / "after-fuzz").read_bytes() == b"still fine"
    server.stop()
    res = subprocess.run(
        [sys.executable, "-m", "fileserver.cli", "salvage", "--data-dir", str(server.data_dir),
         "--json"], capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    report = json.loads(res.stdout[res.stdout.index("{") :])
    assert res.returncode == 0 and report["clean"], report

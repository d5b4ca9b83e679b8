"""A bidirectional msgpack-RPC connection on trio.

Either end can call methods on the other over one byte stream: the client
calls ``FS.*`` on the fileserver and the fileserver calls ``CB.*`` back on the
connection the client opened.  Calls are multiplexed by msgid, so any number
may be in flight; incoming requests run as concurrent tasks, at most
``max_concurrent`` at a time, with ``max_pending`` more queued before the
connection answers EAGAIN (the reader never blocks, so replies always flow
and a handler that calls back across the same connection cannot deadlock).

Output goes through one writer task that coalesces queued messages into one
``send_all``: a cancelled caller can never leave half a message on the wire,
and many small replies cost one syscall.

When the stream ends or breaks, every waiting caller gets ``ConnectionLost``
at once, and the handlers still running are cancelled.

The authentication gate: a connection built with ``allow_unauthenticated``
(a predicate on method names) runs only the methods it allows until its
owner calls ``set_authenticated()``.  Any other request gets one EACCES
reply and the connection is closed; nothing of it reaches a handler.  A
handler raising ``AuthError`` also ends the connection after its reply.
``handshake_timeout`` bounds the time to authenticate, ``idle_timeout`` the
time without a byte from the peer, ``frame_timeout`` the time one partial
message may take to complete (a peer that sends half a frame and stalls).
"""

from __future__ import annotations

import itertools
import logging
import math
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import trio

from protocol.errors import AuthError, RpcError
from protocol.limits import (
    DEFAULT_MAX_CONCURRENT,
    DEFAULT_MAX_PENDING,
    MAX_FRAME,
    MAX_UINT32,
    SEND_HIGH_WATER,
    SEND_TIMEOUT,
)
from protocol.tls import ServerTLS, looks_like_tls, peek, tcp_connect

log = logging.getLogger(__name__)

REQUEST, RESPONSE, NOTIFICATION = 0, 1, 2
_RECV_SIZE = 256 * 1024
# Bytes kept from the start of a partial message: enough for the array
# header, the type and a 32-bit msgid, so an oversized request still gets
# an error reply naming its msgid.
_HEAD_KEEP = 16

#: A handler is called as ``await handler(connection, *params)``.
Handler = Callable[..., Awaitable[Any]]


class ConnectionLost(RpcError):
    """The connection closed or broke while a call waited for its reply."""

    def __init__(self, message: str = "connection lost") -> None:
        super().__init__("ENOTCONN", message)


class RpcTimeout(RpcError):
    """A call got no reply within its timeout."""

    def __init__(self, message: str = "call timed out") -> None:
        super().__init__("ETIMEDOUT", message)


class _ProtocolViolation(Exception):
    """The peer sent something we cannot continue after; the stream is closed."""


def _pack_default(obj: Any) -> Any:
    to_wire = getattr(obj, "to_wire", None)
    if to_wire is not None:
        return to_wire()
    raise TypeError(f"cannot send {type(obj).__name__} on the wire")


def _new_packer() -> msgpack.Packer:
    return msgpack.Packer(use_bin_type=True, default=_pack_default)


def _msgid_from_head(head: bytes) -> int | None:
    """Read the msgid of a request from the first bytes of its frame."""
    try:
        u = msgpack.Unpacker(raw=False)
        u.feed(head)
        if u.read_array_header() != 4 or u.unpack() != REQUEST:
            return None
        msgid = u.unpack()
    except Exception:
        return None
    if type(msgid) is int and 0 <= msgid <= MAX_UINT32:
        return msgid
    return None


class _Call:
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: Any = None
        self.error: RpcError | None = None


class Connection:
    """One msgpack-RPC peer on a trio stream.

    ``handlers`` maps method names to ``async def h(conn, *params)``.  A handler
    returns the result (records are sent through their ``to_wire()``), or raises
    ``RpcError`` for an error reply.  ``TypeError``/``ValueError`` from a
    handler become EINVAL (bad params), anything else EIO; no handler failure
    ever ends the connection.  ``context`` is free for the owner's per-peer
    state (for example the server's client session).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        handlers: Mapping[str, Handler] | None = None,
        *,
        name: str = "",
        max_frame: int = MAX_FRAME,
        max_concurrent: int = DEFAULT_MAX_CONCURRENT,
        max_pending: int = DEFAULT_MAX_PENDING,
        send_timeout: float = SEND_TIMEOUT,
        default_timeout: float | None = None,
        allow_unauthenticated: Callable[[str], bool] | None = None,
        handshake_timeout: float | None = None,
        idle_timeout: float | None = None,
        frame_timeout: float | None = None,
        refuse: RpcError | None = None,
        on_receive: Callable[[Connection], None] | None = None,
    ) -> None:
        self.stream = stream
        #: Called with this connection before each request or notification
        #: it sent is dispatched, and for a chunk that leaves a message
        #: incomplete (a frame still arriving is activity too); not for a
        #: chunk of whole responses to this side's own calls (a client's
        #: answer to a callback break is no work for the server).  Must be
        #: cheap and not raise.
        self._on_receive = on_receive
        self.handlers: dict[str, Handler] = dict(handlers or {})
        self.name = name or f"conn-{id(self):x}"
        self.context: dict[str, Any] = {}
        self.max_frame = max_frame
        self.max_pending = max_pending
        self.send_timeout = send_timeout
        self.default_timeout = default_timeout
        self._limiter = trio.CapacityLimiter(max_concurrent)
        self._packer = _new_packer()
        self._msgids = itertools.count(1)
        self._calls: dict[int, _Call] = {}
        self._incoming = 0  # requests running or queued for the limiter
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._writer_lot = trio.lowlevel.ParkingLot()
        self._drained_lot = trio.lowlevel.ParkingLot()
        self._writing = False
        # A stream that can send without waiting (``SocketTLSStream``): a lone
        # message (no other call or request in flight, nothing queued) goes
        # out at once instead of a scheduling round later from the writer
        # task; beside others, messages queue and the writer sends them joined.
        self._send_now: Callable[[bytes], int] | None = getattr(stream, "send_nowait", None)
        self._nursery: trio.Nursery | None = None
        self._closed = False
        self.close_reason = ""
        self._finished = trio.Event()
        self.stats = {"calls_sent": 0, "requests_received": 0, "errors_sent": 0}
        # No gate: the connection counts as authenticated from the start.
        self._allow = allow_unauthenticated
        self.authenticated = allow_unauthenticated is None
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.frame_timeout = frame_timeout
        # Set when the owner will serve nothing here (over a connection limit):
        # the first request gets this error, then the connection closes.
        self.refuse = refuse
        self._authed = trio.Event()

    # -- state ------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    async def wait_closed(self) -> None:
        await self._finished.wait()

    def set_authenticated(self) -> None:
        """The peer proved itself: every method may run from now on."""
        self.authenticated = True
        self._authed.set()

    # -- running ------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[Connection] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve the connection until it closes; handlers run inside."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer)
                if self.handshake_timeout is not None and not self.authenticated:
                    nursery.start_soon(self._handshake_watch)
                task_status.started(self)
                try:
                    await self._reader()
                    # Give the writer a moment to send what is queued (a final
                    # error reply after a protocol violation, say).
                    with trio.move_on_after(1):
                        while (self._out or self._writing) and not self._closed:
                            await self._drained_lot.park()
                finally:
                    self._mark_closed(self.close_reason or "connection closed")
                    nursery.cancel_scope.cancel()
        finally:
            await self._close_stream()
            self._finished.set()

    async def _handshake_watch(self) -> None:
        assert self.handshake_timeout is not None
        with trio.move_on_after(self.handshake_timeout):
            await self._authed.wait()
            return
        log.warning("%s: no authentication within %.3g s, closing", self.name,
                    self.handshake_timeout)  # fmt: skip
        self._fail(f"no authentication within {self.handshake_timeout} s")

    def _close_after_flush(self, reason: str) -> None:
        """Close once what is queued (a final error reply) went out, bounded."""
        self.close_reason = self.close_reason or reason

        async def closer() -> None:
            with trio.move_on_after(2):
                while self._out or self._writing:
                    await self._drained_lot.park()
            self._fail(reason)

        if self._nursery is not None and not self._closed:
            self._nursery.start_soon(closer)

    async def _close_stream(self) -> None:
        # Shielded and bounded: closing must finish even when our caller is
        # being cancelled, and must not hang on a peer that stopped reading.
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            try:
                await self.stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    async def aclose(
        self, reason: str = "closed by this end", *, flush_timeout: float = 2.0
    ) -> None:
        """Close cleanly: send what is queued (bounded in time), then close."""
        if not self._closed and self._nursery is not None:
            with trio.move_on_after(flush_timeout):
                while self._out or self._writing:
                    await self._drained_lot.park()
        self.close_reason = self.close_reason or reason
        self._mark_closed(reason)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True), trio.move_on_after(flush_timeout + 1):
                await self._finished.wait()
        else:
            await self._close_stream()
            self._finished.set()

    def _mark_closed(self, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        self.close_reason = self.close_reason or reason
        log.debug("%s: closed (%s)", self.name, self.close_reason)
        calls, self._calls = self._calls, {}
        for call in calls.values():
            call.error = ConnectionLost(f"connection lost: {self.close_reason}")
            call.done.set()
        self._writer_lot.unpark_all()
        self._drained_lot.unpark_all()

    # -- calling --------------------------------------------------------------

    async def call(self, method: str, *params: Any, timeout: float | None = None) -> Any:
        """Call ``method`` on the peer and return its result.

        Raises ``RemoteError`` for an error reply, ``RpcTimeout`` when no reply
        comes within ``timeout`` (default: ``default_timeout``), and
        ``ConnectionLost`` when the connection closes first.
        """
        if self._closed:
            raise ConnectionLost(f"connection closed: {self.close_reason}")
        msgid = next(self._msgids) & MAX_UINT32
        if msgid == 0:  # wrapped: skip 0 so ids stay nonzero and distinct
            self._msgids = itertools.count(2)
            msgid = 1
        call = _Call()
        self._calls[msgid] = call
        if timeout is None:
            timeout = self.default_timeout
        try:
            with trio.fail_after(math.inf if timeout is None else timeout):
                await self._send([REQUEST, msgid, method, list(params)])
                self.stats["calls_sent"] += 1
                await call.done.wait()
        except trio.TooSlowError:
            raise RpcTimeout(f"{method}: no reply within {timeout} s") from None
        finally:
            self._calls.pop(msgid, None)
        if call.error is not None:
            raise call.error
        return call.result

    async def notify(self, method: str, *params: Any) -> None:
        """Send a notification: no reply, no error reported."""
        if self._closed:
            raise ConnectionLost(f"connection closed: {self.close_reason}")
        await self._send([NOTIFICATION, method, list(params)])

    # -- sending --------------------------------------------------------------

    async def _send(self, message: list[Any]) -> None:
        data = self._packer.pack(message)
        if len(data) > self.max_frame:
            raise RpcError("EMSGSIZE", f"message of {len(data)} bytes is over the limit")
        # A call with none other outstanding may go at once; beside others it
        # queues, so the writer sends them together.
        self._enqueue(data, alone=message[0] == REQUEST and len(self._calls) <= 1)
        # Backpressure: a peer that reads slowly makes its callers wait here
        # instead of growing our buffer without bound.
        while self._out_bytes > SEND_HIGH_WATER and not self._closed:
            await self._drained_lot.park()
        if self._closed:
            raise ConnectionLost(f"connection closed: {self.close_reason}")

    def _enqueue(self, data: bytes, alone: bool = False) -> None:
        """Queue ``data`` for the writer; with ``alone`` (nothing else in
        flight to send it with), send it from this task if the stream can."""
        if self._closed:
            return
        if alone and self._send_now is not None and not self._out and not self._writing:
            try:
                sent = self._send_now(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._fail(f"send failed: {exc!r}")
                return
            if sent == len(data):
                return
            data = data[sent:]  # the rest, first in line (the stream's retry rule)
        self._out.append(data)
        self._out_bytes += len(data)
        self._writer_lot.unpark()

    async def _writer(self) -> None:
        # One cancel scope for the whole loop, armed only around a send: a
        # send that times out ends the writer anyway, and entering a fresh
        # fail_after per send was a visible share of a small RPC's cost.
        with trio.CancelScope() as timer:
            while not self._closed:
                if not self._out:
                    await self._writer_lot.park()
                    continue
                out, self._out = self._out, []
                self._out_bytes = 0
                data = out[0] if len(out) == 1 else b"".join(out)
                self._writing = True
                try:
                    if self.send_timeout is not None:
                        timer.deadline = trio.current_time() + self.send_timeout
                    await self.stream.send_all(data)
                    timer.deadline = math.inf
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self._fail(f"send failed: {exc!r}")
                    return
                finally:
                    self._writing = False
                    self._drained_lot.unpark_all()
        if timer.cancelled_caught:
            self._fail(f"peer accepted no data for {self.send_timeout} s")

    def _fail(self, reason: str) -> None:
        self.close_reason = self.close_reason or reason
        self._mark_closed(reason)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _reply(self, msgid: int, error: RpcError | None, result: Any) -> None:
        if error is not None:
            self.stats["errors_sent"] += 1
            msg: list[Any] = [RESPONSE, msgid, error.to_wire(), None]
        else:
            msg = [RESPONSE, msgid, None, result]
        try:
            data = self._packer.pack(msg)
        except Exception as exc:  # an unpackable result is our bug, not the peer's
            log.error("%s: cannot pack reply to %d: %r", self.name, msgid, exc)
            self._packer = _new_packer()  # a failed pack may leave the buffer dirty
            data = self._packer.pack([RESPONSE, msgid, ["EIO", "unencodable result"], None])
        if len(data) > self.max_frame:
            data = self._packer.pack([RESPONSE, msgid, ["EMSGSIZE", "reply too large"], None])
        self._enqueue(data, alone=self._incoming <= 1)  # the only request running here

    # -- receiving ------------------------------------------------------------

    async def _reader(self) -> None:
        # The unpacker's own limit is a backstop; the real frame check is ours
        # below, so that an oversized request can still be answered.
        unpacker = msgpack.Unpacker(
            raw=False, max_buffer_size=2 * self.max_frame + _RECV_SIZE, strict_map_key=False
        )
        # A stream's borrowed view (``SocketTLSStream.receive_view``) will do:
        # every byte of a chunk is copied (fed, or kept in ``head``) before
        # the next receive.
        receive = getattr(self.stream, "receive_view", None) or self.stream.receive_some
        fed = 0  # bytes fed so far
        head = b""  # first bytes of the partial message at offset head_pos
        head_pos = -1
        frame_started: float | None = None  # when the current partial message began
        wait = math.inf
        # One cancel scope for the whole loop, its deadline moved before each
        # receive (a timeout ends the reader anyway): cheaper than entering a
        # move_on_after per receive.  Nothing between receives checkpoints.
        timer = trio.CancelScope()
        try:
            with timer:
                while True:
                    wait = math.inf
                    if self.idle_timeout is not None:
                        wait = self.idle_timeout
                    if frame_started is not None and self.frame_timeout is not None:
                        wait = min(wait, frame_started + self.frame_timeout - trio.current_time())
                    try:
                        timer.deadline = trio.current_time() + max(wait, 0)
                        chunk = await receive(_RECV_SIZE)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                        self.close_reason = self.close_reason or f"receive failed: {exc!r}"
                        return
                    if not chunk:
                        self.close_reason = self.close_reason or "peer closed the connection"
                        return
                    unpacker.feed(chunk)
                    fed += len(chunk)
                    start = unpacker.tell()
                    for msg in unpacker:
                        end = unpacker.tell()
                        if end - start > self.max_frame:
                            self._refuse_oversized(msg)
                        start = end
                        self._dispatch(msg)
                    pos = start
                    leftover = fed - pos
                    if leftover and self._on_receive is not None:
                        self._on_receive(self)
                    if leftover == 0:
                        frame_started = None
                    elif head_pos != pos:
                        frame_started = trio.current_time()
                    if leftover == 0:
                        head, head_pos = b"", -1
                    elif head_pos != pos:
                        head, head_pos = bytes(chunk[len(chunk) - leftover :][:_HEAD_KEEP]), pos
                    elif len(head) < _HEAD_KEEP:
                        head += chunk[: _HEAD_KEEP - len(head)]
                    if leftover > self.max_frame:
                        msgid = _msgid_from_head(head)
                        if msgid is not None:
                            self._reply(msgid, RpcError("EMSGSIZE", "frame over the limit"), None)
                        raise _ProtocolViolation(f"frame over {self.max_frame} bytes")
            if timer.cancelled_caught:
                what = "a partial message stalled" if frame_started is not None else "idle"
                log.warning("%s: %s for %.3g s, closing", self.name, what, wait)
                self.close_reason = self.close_reason or f"{what}: timed out"
        except _ProtocolViolation as exc:
            self._protocol_error(str(exc))
        except (msgpack.UnpackException, ValueError, TypeError, UnicodeDecodeError) as exc:
            self._protocol_error(f"undecodable data: {exc!r}")

    def _refuse_oversized(self, msg: Any) -> None:
        if type(msg) is list and len(msg) == 4 and msg[0] == REQUEST:
            msgid = msg[1]
            if type(msgid) is int and 0 <= msgid <= MAX_UINT32:
                self._reply(msgid, RpcError("EMSGSIZE", "frame over the limit"), None)
        raise _ProtocolViolation(f"frame over {self.max_frame} bytes")

    def _protocol_error(self, reason: str) -> None:
        log.warning("%s: protocol error, closing: %s", self.name, reason)
        self.close_reason = f"protocol error: {reason}"
        # Let the writer flush a final error reply, then the run() finally
        # closes the stream.

    def _dispatch(self, msg: Any) -> None:
        if type(msg) is not list or not msg:
            raise _ProtocolViolation(f"not a msgpack-RPC message: {msg!r:.100}")
        kind = msg[0]
        if kind == RESPONSE and len(msg) == 4:
            self._on_response(msg)
            return
        if self._on_receive is not None:
            self._on_receive(self)
        if kind == REQUEST:
            self._on_request(msg)
        elif kind == NOTIFICATION and len(msg) == 3:
            method, params = msg[1], msg[2]
            if type(method) is str and type(params) is list:
                self._start_handler(None, method, params)
            else:
                log.info("%s: malformed notification dropped", self.name)
        else:
            raise _ProtocolViolation(f"bad message type or shape: {msg!r:.100}")

    def _on_response(self, msg: list[Any]) -> None:
        _, msgid, error, result = msg
        call = self._calls.pop(msgid, None) if type(msgid) is int else None
        if call is None:
            return  # the caller timed out or was cancelled; nobody waits
        if error is not None:
            call.error = RpcError.from_wire(error)
        else:
            call.result = result
        call.done.set()

    def _on_request(self, msg: list[Any]) -> None:
        msgid = msg[1] if len(msg) > 1 else None
        if type(msgid) is not int or not 0 <= msgid <= MAX_UINT32:
            raise _ProtocolViolation(f"request without a valid msgid: {msg!r:.100}")
        if len(msg) != 4 or type(msg[2]) is not str or type(msg[3]) is not list:
            self._reply(
                msgid, RpcError("EPROTO", "request must be [0, msgid, method, params]"), None
            )
            return
        self.stats["requests_received"] += 1
        self._start_handler(msgid, msg[2], msg[3])

    def _start_handler(self, msgid: int | None, method: str, params: list[Any]) -> None:
        if self.refuse is not None:
            if msgid is not None:
                self._reply(msgid, self.refuse, None)
            raise _ProtocolViolation(f"refused: {self.refuse.message}")
        if not self.authenticated and not (self._allow is not None and self._allow(method)):
            # The gate: nothing before the handshake reaches a handler.
            if msgid is not None:
                self._reply(msgid, RpcError("EACCES", f"{method:.100} before authentication"),
                            None)  # fmt: skip
            raise _ProtocolViolation(f"{method!r:.100} before authentication")
        handler = self.handlers.get(method)
        if handler is None:
            if msgid is not None:
                self._reply(msgid, RpcError("ENOSYS", f"unknown method {method!r:.100}"), None)
            return
        if self._incoming >= self.max_pending or self._nursery is None or self._closed:
            if not self._closed:
                log.info("%s: %s refused: %d calls in flight", self.name, method, self._incoming)
            if msgid is not None:
                self._reply(msgid, RpcError("EAGAIN", "too many calls in flight"), None)
            return
        self._incoming += 1
        self._nursery.start_soon(self._run_handler, msgid, method, handler, params)

    async def _run_handler(
        self, msgid: int | None, method: str, handler: Handler, params: list[Any]
    ) -> None:
        limiter = self._limiter
        try:
            # A free slot is taken without the checkpoint (one task switch per
            # request) ``async with limiter`` costs; the handler checkpoints.
            try:
                limiter.acquire_nowait()
            except trio.WouldBlock:
                await limiter.acquire()
            try:
                try:
                    coro = handler(self, *params)
                except TypeError as exc:
                    # Raised by the call itself (wrong number of params), not
                    # from inside the handler.
                    if exc.__traceback__ is not None and exc.__traceback__.tb_next is None:
                        raise RpcError("EINVAL", f"{method}: wrong number of params") from None
                    raise
                result = await coro
            finally:
                limiter.release()
        except RpcError as exc:
            if msgid is not None:
                self._reply(msgid, exc, None)
            if isinstance(exc, AuthError):
                log.warning("%s: %s refused: %s; closing", self.name, method, exc.message)
                self._close_after_flush(f"authentication failed: {exc.message}")
        except (TypeError, ValueError, KeyError, IndexError) as exc:
            log.info("%s: %s: bad params: %r", self.name, method, exc)
            if msgid is not None:
                self._reply(msgid, RpcError("EINVAL", f"{method}: invalid params: {exc}"), None)
        except Exception:
            log.exception("%s: handler for %s failed", self.name, method)
            if msgid is not None:
                self._reply(msgid, RpcError("EIO", f"{method}: internal error"), None)
        else:
            if msgid is not None:
                self._reply(msgid, None, result)
        finally:
            self._incoming -= 1


@asynccontextmanager
async def open_connection(
    host: str,
    port: int,
    handlers: Mapping[str, Handler] | None = None,
    *,
    connect_timeout: float = 10.0,
    tls: ssl.SSLContext | None = None,
    **kwargs: Any,
) -> AsyncIterator[Connection]:
    """Connect over TCP (inside TLS with ``tls``, see ``protocol.tls``) and
    run a Connection for the body of the block."""
    with trio.fail_after(connect_timeout):
        stream = await tcp_connect(host, port, tls)
    conn = Connection(stream, handlers, name=kwargs.pop("name", f"{host}:{port}"), **kwargs)
    failure: Exception | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(conn.run)
        try:
            yield conn
        except Exception as exc:
            # Carried out of the nursery, so the caller gets the RpcError
            # itself and not an ExceptionGroup around it.
            failure = exc
        finally:
            await conn.aclose()
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


async def serve_tcp(
    on_connection: Callable[[Connection], Awaitable[None]],
    host: str,
    port: int,
    handlers: Mapping[str, Handler],
    *,
    tls: ServerTLS | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    **kwargs: Any,
) -> None:
    """Accept TCP connections; each gets a Connection, handed to ``on_connection``
    while it runs (``on_connection`` must return only once it has awaited
    ``conn.run()`` or otherwise finished with the connection).

    With ``tls`` every connection runs inside TLS: a peer that speaks
    plaintext gets one EPROTO reply saying so, a refused client certificate
    (expired, revoked) one EACCES reply naming the reason; nothing of theirs
    reaches a handler.  Without, a peer that starts a TLS handshake is
    closed with a log line."""
    wait = kwargs.get("handshake_timeout")

    async def handle(stream: trio.SocketStream) -> None:
        try:
            peer = stream.socket.getpeername()
            name = f"{peer[0]}:{peer[1]}"
        except OSError:
            name = "peer"
        try:
            first, s = await peek(stream, wait)
        except (trio.BrokenResourceError, OSError):
            await trio.aclose_forcefully(stream)
            return
        if not first:
            await trio.aclose_forcefully(stream)
            return
        serial, refuse = 0, kwargs.get("refuse")
        if tls is None and looks_like_tls(first):
            log.warning("%s: TLS client on a plaintext (--insecure) server: closing", name)
            await trio.aclose_forcefully(stream)
            return
        if tls is not None and not looks_like_tls(first):
            log.warning("%s: plaintext client on a TLS server: refusing", name)
            refuse = RpcError(
                "EPROTO",
                "this fileserver requires TLS: mount with the cell's client certificate "
                "(--cert), or run both ends with --insecure",
            )
        elif tls is not None:
            tls_stream, serial, refused = await tls.accept(s, name, wait)
            if tls_stream is None:
                return
            s, refuse = tls_stream, refused or refuse
        opts = dict(kwargs, refuse=refuse) if refuse is not None else kwargs
        conn = Connection(s, handlers, name=name, **opts)
        if tls is not None and refuse is None:
            conn.context["tls_serial"] = serial
            tls.track(serial, conn)
        try:
            await on_connection(conn)
        finally:
            if tls is not None and refuse is None:
                tls.untrack(serial, conn)

    await trio.serve_tcp(handle, port, host=host, task_status=task_status)

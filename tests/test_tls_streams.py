"""The two TLS stream classes under the connection layer (protocol/tls.py).

``SocketTLSStream`` (TLS on the socket itself, every TCP connection) and
``TLSStream`` (TLS through memory BIOs, any other stream) must carry bytes
exactly, both ways at once, in any chunking; report EOF, a broken session
and a close the way ``trio.SSLStream`` does; and never leave a task hanging
on a stream another task closed.
"""

from __future__ import annotations

import hashlib
import os
import ssl
from pathlib import Path

import pytest
import trio
import trio.testing

from protocol.tls import (
    CellCA,
    ServerTLS,
    SocketTLSStream,
    TLSStream,
    client_context,
    ensure_server_cert,
    wrap_client,
    write_client_bundle,
)


@pytest.fixture(scope="module")
def cell(tmp_path_factory: pytest.TempPathFactory) -> tuple[ServerTLS, ssl.SSLContext]:
    d: Path = tmp_path_factory.mktemp("cell")
    ca = CellCA.create(d / "ca.pem", "streams")
    cert = ensure_server_cert(ca, d / "server.pem", "uuid", ["127.0.0.1"])
    write_client_bundle(ca, d / "client.pem")
    return ServerTLS.for_server(ca, cert), client_context(d / "client.pem")


async def tcp_pair(cell, nursery):
    """(client stream, server stream), both SocketTLSStream over loopback."""
    server_tls, cctx = cell
    send, recv = trio.open_memory_channel(1)

    async def handler(stream: trio.SocketStream) -> None:
        s, _serial, refused = await server_tls.accept(stream, "peer", 10)
        assert refused is None
        await send.send(s)
        await trio.sleep_forever()

    listeners = await nursery.start(trio.serve_tcp, handler, 0)
    port = listeners[0].socket.getsockname()[1]
    client = await wrap_client(await trio.open_tcp_stream("127.0.0.1", port), cctx, "srv")
    server = await recv.receive()
    return client, server


async def bio_pair(cell):
    """(client, server) TLSStreams over an in-memory stream pair."""
    server_tls, cctx = cell
    a, b = trio.testing.memory_stream_pair()
    out = {}

    async def srv() -> None:
        out["s"], _, _ = await server_tls.accept(b, "peer", 10)

    async with trio.open_nursery() as n:
        n.start_soon(srv)
        out["c"] = await wrap_client(a, cctx, "srv")
    return out["c"], out["s"]


async def pump(src, dst, payload: bytes, chunk: int) -> None:
    for i in range(0, len(payload), chunk):
        await src.send_all(payload[i : i + chunk])


async def drain(stream, n: int, max_bytes: int | None) -> bytes:
    got = bytearray()
    while len(got) < n:
        data = await stream.receive_some(max_bytes)
        assert data, "EOF before every byte arrived"
        got += data
    return bytes(got)


async def exchange(c, s) -> None:
    """Both directions at once: 8 MiB one way in odd chunks, 3 MiB back."""
    up, down = os.urandom(8 << 20), os.urandom(3 << 20)
    res = {}

    async def take(name, stream, n, max_bytes):
        res[name] = await drain(stream, n, max_bytes)

    async with trio.open_nursery() as n:
        n.start_soon(pump, c, s, up, 70_001)
        n.start_soon(pump, s, c, down, 1 << 20)
        n.start_soon(take, "up", s, len(up), 5_000)
        n.start_soon(take, "down", c, len(down), None)
    assert hashlib.sha256(res["up"]).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(res["down"]).digest() == hashlib.sha256(down).digest()


async def test_tcp_connections_run_tls_on_the_socket_and_carry_bytes_exactly(cell):
    async with trio.open_nursery() as n:
        c, s = await tcp_pair(cell, n)
        assert isinstance(c, SocketTLSStream) and isinstance(s, SocketTLSStream)
        assert c.sock.version() == "TLSv1.3"
        assert s.getpeercert(binary_form=True)  # the client's certificate
        await exchange(c, s)
        await c.aclose()
        assert await s.receive_some() == b""  # close_notify reads as EOF
        await s.aclose()
        n.cancel_scope.cancel()


async def test_memory_streams_use_the_bio_stream_and_carry_bytes_exactly(cell):
    c, s = await bio_pair(cell)
    assert isinstance(c, TLSStream) and isinstance(s, TLSStream)
    await exchange(c, s)
    await c.aclose()
    assert await s.receive_some() == b""
    await s.aclose()


async def test_closing_a_tcp_stream_wakes_its_waiting_reader(cell):
    async with trio.open_nursery() as n:
        c, _s = await tcp_pair(cell, n)
        outcome = {}

        async def reader() -> None:
            try:
                await c.receive_some()
            except trio.ClosedResourceError:
                outcome["closed"] = True

        async with trio.open_nursery() as inner:
            inner.start_soon(reader)
            await trio.sleep(0.05)
            with trio.fail_after(5):
                await c.aclose()
        assert outcome == {"closed": True}
        with pytest.raises(trio.ClosedResourceError):
            await c.send_all(b"x")
        n.cancel_scope.cancel()


async def test_a_cancelled_receive_leaves_the_tcp_stream_usable(cell):
    async with trio.open_nursery() as n:
        c, s = await tcp_pair(cell, n)
        with trio.move_on_after(0.05) as scope:
            await c.receive_some()
        assert scope.cancelled_caught
        await s.send_all(b"after the cancel")
        assert await drain(c, 16, None) == b"after the cancel"
        n.cancel_scope.cancel()


async def test_garbage_on_the_wire_breaks_the_tcp_session(cell):
    async with trio.open_nursery() as n:
        c, s = await tcp_pair(cell, n)
        # Bytes that are no TLS record of this session, written under it.
        os.write(c.sock.fileno(), b"\x17\x03\x03\x00\x20" + b"\x00" * 32)
        with pytest.raises(trio.BrokenResourceError):
            await drain(s, 1, None)
        with pytest.raises(trio.BrokenResourceError):
            await s.send_all(b"x")
        await s.aclose()
        n.cancel_scope.cancel()


async def test_a_cancelled_caller_never_loses_bytes_already_here(cell):
    async with trio.open_nursery() as n:
        c, s = await tcp_pair(cell, n)
        await s.send_all(b"abc")
        await trio.sleep(0.05)  # the record is in c's socket now
        reached = False
        with trio.CancelScope() as scope:
            scope.cancel()
            await c.receive_some()
            reached = True
        assert scope.cancelled_caught and not reached
        with trio.fail_after(5):
            assert await drain(c, 3, None) == b"abc"
        n.cancel_scope.cancel()


async def test_send_nowait_sends_at_once_and_a_refused_write_is_retried_exactly(cell):
    """``send_nowait`` (the connection layer's send when nothing is queued)
    sends without waiting while the socket takes the bytes; once the peer
    stops reading it refuses (0), and the next ``send_all`` starting with the
    same bytes (OpenSSL's retry rule) delivers everything, in order."""
    async with trio.open_nursery() as n:
        c, s = await tcp_pair(cell, n)
        chunk = 60_000
        sent = []
        for i in range(4000):  # bounded: loopback buffers hold a few MiB at most
            data = i.to_bytes(4, "big") * (chunk // 4)
            k = c.send_nowait(data)
            if k == 0:
                break
            assert k == len(data)
            sent.append(data)
        else:
            pytest.fail("the socket never filled up")
        assert c.send_nowait(b"x") == 0, "nothing may overtake the write being retried"
        rest = data + b"tail"
        total = sum(map(len, sent)) + len(rest)
        got = {}
        done = trio.Event()

        async def take() -> None:
            got["b"] = await drain(s, total, None)
            done.set()

        n.start_soon(take)
        await c.send_all(rest)
        with trio.fail_after(30):
            await done.wait()
        assert got["b"] == b"".join(sent) + rest
        assert c.send_nowait(b"more") == 4  # retried: sending at once again
        await c.aclose()
        n.cancel_scope.cancel()


async def test_receive_view_gathers_every_record_here_into_the_streams_own_buffer(cell):
    """``receive_view`` (what the connection layer's reader uses on a TCP
    stream) hands back the bytes of every record already received, up to
    the size asked, in one view of a buffer the stream reuses; copied before
    the next call, the views carry the bytes exactly; EOF is an empty view."""
    async with trio.open_nursery() as n:
        c, s = await tcp_pair(cell, n)
        payload = os.urandom(200_000)  # 13 records of at most 16 KiB
        n.start_soon(c.send_all, payload)  # beside the reads: buffers may not hold it all
        with trio.fail_after(10):
            first = await s.receive_view(256 * 1024)
            got, sizes = bytearray(first), [len(first)]
            while len(got) < len(payload):
                await trio.sleep(0.05)  # let the rest arrive: one call takes it all
                view = await s.receive_view(256 * 1024)
                assert view, "EOF before every byte arrived"
                got += view
                sizes.append(len(view))
        assert bytes(got) == payload
        assert max(sizes) > 16 * 1024, f"one record per call: {sizes}"
        # One buffer: the next receive reuses the memory the last view showed.
        assert view.obj is first.obj
        await c.send_all(b"abc")
        with trio.fail_after(5):
            small = await s.receive_view(2)
            assert bytes(small) == b"ab" and small.obj is first.obj
            assert bytes(await s.receive_view()) == b"c"
        await c.aclose()
        with trio.fail_after(5):
            assert len(await s.receive_view()) == 0  # close_notify reads as EOF
        await s.aclose()
        n.cancel_scope.cancel()

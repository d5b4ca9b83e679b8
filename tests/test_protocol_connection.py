"""The bidirectional msgpack-RPC connection: multiplexing, both directions on
one stream, timeouts, lost connections, bad input, and a real loopback test."""

import random

import msgpack
import pytest
import trio
import trio.lowlevel
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.connection import (
    Connection,
    ConnectionLost,
    RpcTimeout,
    open_connection,
    serve_tcp,
)
from protocol.errors import RemoteError, RpcError
from protocol.limits import MAX_UINT32

i64 = st.integers(-(2**63), 2**63 - 1)


async def echo(conn, *args):
    return list(args)


async def fail_enoent(conn):
    raise RpcError("ENOENT", "nothing here")


async def boom(conn):
    raise RuntimeError("bug in handler")


async def bad_type(conn, n):
    return n + 1  # TypeError for a str param, raised from inside the handler


BASIC = {"echo": echo, "enoent": fail_enoent, "boom": boom, "inc": bad_type}


async def pair(nursery, handlers_a=None, handlers_b=None, **kw):
    sa, sb = trio.testing.memory_stream_pair()
    a = Connection(sa, handlers_a, name="a", **kw)
    b = Connection(sb, handlers_b, name="b", **kw)
    await nursery.start(a.run)
    await nursery.start(b.run)
    return a, b


async def test_call_and_errors_keep_connection_open():
    async with trio.open_nursery() as n:
        a, _b = await pair(n, handlers_b=BASIC)
        assert await a.call("echo", 1, "x", b"y", [2]) == [1, "x", b"y", [2]]
        with pytest.raises(RemoteError) as e:
            await a.call("enoent")
        assert e.value.code == "ENOENT" and e.value.message == "nothing here"
        with pytest.raises(RemoteError) as e:
            await a.call("no.such.method")
        assert e.value.code == "ENOSYS"
        with pytest.raises(RemoteError) as e:
            await a.call("enoent", 1, 2)  # wrong arity
        assert e.value.code == "EINVAL"
        with pytest.raises(RemoteError) as e:
            await a.call("inc", "not a number")
        assert e.value.code == "EINVAL"
        with pytest.raises(RemoteError) as e:
            await a.call("boom")
        assert e.value.code == "EIO"
        # Still usable after every kind of error.
        assert await a.call("echo", 5) == [5]
        n.cancel_scope.cancel()


async def test_both_directions_on_one_connection():
    """The server calls back into the client while the client's call is open,
    as a fileserver does when it breaks promises during a client's store."""
    seen = []

    async def cb_callback(conn, fids):
        seen.append(fids)
        return None

    async def store(conn, fid):
        # Server side: call the caller back on the same connection first.
        await conn.call("CB.CallBack", [fid])
        return "stored"

    async with trio.open_nursery() as n:
        client, server = await pair(
            n, handlers_a={"CB.CallBack": cb_callback}, handlers_b={"FS.StoreData": store}
        )
        assert await client.call("FS.StoreData", [1, 2, 3]) == "stored"
        assert seen == [[[1, 2, 3]]]
        # And the server can call the client on its own initiative.
        assert await server.call("CB.CallBack", [[9, 9, 9]]) is None
        assert seen[-1] == [[9, 9, 9]]
        n.cancel_scope.cancel()


async def test_hundreds_of_concurrent_calls_out_of_order(autojump_clock):
    rng = random.Random(7)
    delays = {i: rng.uniform(0, 5) for i in range(500)}
    finished = []

    async def slow_echo(conn, i):
        await trio.sleep(delays[i])
        finished.append(i)
        return i * 2

    results = {}

    async with trio.open_nursery() as n:
        a, _ = await pair(n, handlers_b={"slow": slow_echo}, max_concurrent=1000)

        async def one(i):
            results[i] = await a.call("slow", i)

        async with trio.open_nursery() as calls:
            for i in range(500):
                calls.start_soon(one, i)
        n.cancel_scope.cancel()
    assert results == {i: i * 2 for i in range(500)}
    # Replies really came back out of order.
    assert finished != sorted(finished)


async def test_concurrency_bound_and_backlog(autojump_clock):
    running = 0
    peak = 0

    async def work(conn):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await trio.sleep(1)
        running -= 1
        return "ok"

    async with trio.open_nursery() as n:
        sa, sb = trio.testing.memory_stream_pair()
        a = Connection(sa, name="a")
        b = Connection(sb, {"work": work}, name="b", max_concurrent=3, max_pending=10)
        await n.start(a.run)
        await n.start(b.run)
        outcomes = []

        async def one():
            try:
                outcomes.append(await a.call("work"))
            except RemoteError as e:
                outcomes.append(e.code)

        async with trio.open_nursery() as calls:
            for _ in range(15):
                calls.start_soon(one)
        n.cancel_scope.cancel()
    assert peak == 3
    assert outcomes.count("ok") == 10
    assert outcomes.count("EAGAIN") == 5


async def test_timeout_then_late_reply_ignored(autojump_clock):
    release = trio.Event()

    async def stuck(conn):
        await release.wait()
        return "late"

    async with trio.open_nursery() as n:
        a, _ = await pair(n, handlers_b={"stuck": stuck, **BASIC})
        t0 = trio.current_time()
        with pytest.raises(RpcTimeout) as e:
            await a.call("stuck", timeout=5)
        assert e.value.code == "ETIMEDOUT"
        assert trio.current_time() - t0 == pytest.approx(5)
        release.set()
        await trio.sleep(1)  # the late reply arrives and is dropped
        assert await a.call("echo", "after") == ["after"]
        n.cancel_scope.cancel()


async def test_default_timeout_applies(autojump_clock):
    async def never(conn):
        await trio.sleep_forever()

    async with trio.open_nursery() as n:
        sa, sb = trio.testing.memory_stream_pair()
        a = Connection(sa, name="a", default_timeout=2)
        b = Connection(sb, {"never": never}, name="b")
        await n.start(a.run)
        await n.start(b.run)
        with pytest.raises(RpcTimeout):
            await a.call("never")
        n.cancel_scope.cancel()


async def test_cancelled_caller_leaves_stream_usable(autojump_clock):
    async def slow(conn):
        await trio.sleep(10)
        return "slow"

    async with trio.open_nursery() as n:
        a, _ = await pair(n, handlers_b={"slow": slow, **BASIC})
        with trio.move_on_after(1):
            await a.call("slow")
        assert await a.call("echo", 1) == [1]
        n.cancel_scope.cancel()


async def test_lost_connection_fails_waiters_at_once(autojump_clock):
    async def never(conn):
        await trio.sleep_forever()

    async with trio.open_nursery() as n:
        a, b = await pair(n, handlers_b={"never": never})
        errors = []

        async def waiter():
            try:
                await a.call("never")
            except ConnectionLost as e:
                errors.append((e, trio.current_time()))

        for _ in range(20):
            n.start_soon(waiter)
        await trio.sleep(1)
        t_close = trio.current_time()
        await b.stream.aclose()  # the peer vanishes
        await a.wait_closed()
        await trio.lowlevel.checkpoint()
        assert len(errors) == 20
        assert all(t == t_close for _, t in errors)
        assert all(e.code == "ENOTCONN" for e, _ in errors)
        with pytest.raises(ConnectionLost):
            await a.call("never")
        n.cancel_scope.cancel()


async def test_clean_close_from_either_end():
    for closer in ("a", "b"):
        async with trio.open_nursery() as n:
            a, b = await pair(n, handlers_a=BASIC, handlers_b=BASIC)
            assert await a.call("echo", 1) == [1]
            first, second = (a, b) if closer == "a" else (b, a)
            await first.aclose()
            with trio.fail_after(5):
                await second.wait_closed()
            assert first.closed and second.closed
            with pytest.raises(ConnectionLost):
                await second.call("echo", 2)


async def test_clean_close_flushes_queued_replies():
    """A reply queued just before aclose() still reaches the peer."""
    got = []

    async with trio.open_nursery() as n:
        a, b = await pair(n, handlers_b=BASIC)
        got.append(await a.call("echo", "x" * 100_000))
        await b.aclose()
        n.cancel_scope.cancel()
    assert got == [["x" * 100_000]]


# -- bad input on a serving connection ----------------------------------------


async def raw_server(nursery, **kw):
    """A serving Connection on one end, a raw byte stream on the other."""
    raw, served = trio.testing.memory_stream_pair()
    conn = Connection(served, BASIC, name="served", **kw)
    await nursery.start(conn.run)
    return raw, conn


async def read_messages(stream, count, timeout=5):
    unpacker = msgpack.Unpacker(raw=False)
    out = []
    with trio.move_on_after(timeout):
        while len(out) < count:
            data = await stream.receive_some(65536)
            if not data:
                break
            unpacker.feed(data)
            out.extend(unpacker)
    return out


async def test_wrong_shape_with_msgid_gets_error_reply():
    async with trio.open_nursery() as n:
        raw, conn = await raw_server(n)
        await raw.send_all(msgpack.packb([0, 11, "echo"]))  # no params
        await raw.send_all(msgpack.packb([0, 12, 5, []]))  # method not a str
        await raw.send_all(msgpack.packb([0, 13, "echo", "notalist"]))
        await raw.send_all(msgpack.packb([0, 14, "echo", [1]]))
        replies = await read_messages(raw, 4)
        assert [r[1] for r in replies] == [11, 12, 13, 14]
        assert [r[2][0] if r[2] else None for r in replies] == ["EPROTO"] * 3 + [None]
        assert replies[3][3] == [1]
        assert not conn.closed
        n.cancel_scope.cancel()


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xc1",  # a byte msgpack never uses
        msgpack.packb("just a string"),
        msgpack.packb([7, 1, 2, 3]),  # unknown message type
        msgpack.packb([0, "id", "echo", []]),  # unreadable msgid
        msgpack.packb([0, MAX_UINT32 + 1, "echo", []]),
        msgpack.packb([]),
    ],
)
async def test_unparseable_input_closes_only_that_connection(garbage):
    async with trio.open_nursery() as n:
        other_a, _ = await pair(n, handlers_b=BASIC)
        raw, conn = await raw_server(n)
        await raw.send_all(garbage)
        with trio.fail_after(5):
            await conn.wait_closed()
        assert "protocol error" in conn.close_reason
        assert await other_a.call("echo", 1) == [1]
        n.cancel_scope.cancel()


async def test_oversized_frame_gets_emsgsize_then_close():
    async with trio.open_nursery() as n:
        raw, conn = await raw_server(n, max_frame=4096)
        big = msgpack.packb([0, 99, "echo", [b"x" * 100_000]], use_bin_type=True)

        async def send():
            try:
                await raw.send_all(big)
            except trio.BrokenResourceError:
                pass

        n.start_soon(send)
        replies = await read_messages(raw, 1)
        assert replies and replies[0][:2] == [1, 99] and replies[0][2][0] == "EMSGSIZE"
        with trio.fail_after(5):
            await conn.wait_closed()
        n.cancel_scope.cancel()


async def test_truncated_frame_then_eof_closes_cleanly():
    async with trio.open_nursery() as n:
        raw, conn = await raw_server(n)
        frame = msgpack.packb([0, 1, "echo", [b"y" * 1000]], use_bin_type=True)
        await raw.send_all(frame[:500])
        await raw.send_stream.aclose()
        with trio.fail_after(5):
            await conn.wait_closed()
        n.cancel_scope.cancel()


async def test_unknown_response_and_notification_are_harmless():
    async with trio.open_nursery() as n:
        raw, _conn = await raw_server(n)
        await raw.send_all(msgpack.packb([1, 4242, None, "nobody asked"]))
        await raw.send_all(msgpack.packb([2, "echo", [1]]))
        await raw.send_all(msgpack.packb([2, "no.such", [1]]))
        await raw.send_all(msgpack.packb([0, 5, "echo", ["alive"]]))
        replies = await read_messages(raw, 1)
        assert replies == [[1, 5, None, ["alive"]]]
        n.cancel_scope.cancel()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=64),
            st.builds(
                lambda t, i, m, p: msgpack.packb([t, i, m, p], use_bin_type=True),
                st.integers(-1, 3),
                st.one_of(st.integers(-5, 2**33), st.text(max_size=3), st.none()),
                st.one_of(st.sampled_from(["echo", "enoent", "boom", "inc", "x"]), i64),
                st.one_of(
                    st.lists(st.one_of(i64, st.text(), st.binary(), st.none())),
                    i64,
                    st.dictionaries(st.text(max_size=3), i64, max_size=3),
                ),
            ),
        ),
        max_size=8,
    )
)
async def test_fuzz_serving_connection_survives_garbage(chunks):
    """Random and malformed frames never raise out of a serving connection;
    a fresh connection afterwards works normally."""
    async with trio.open_nursery() as n:
        raw, conn = await raw_server(n)
        try:
            for chunk in chunks:
                await raw.send_all(chunk)
            await raw.send_stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        with trio.fail_after(5):
            await conn.wait_closed()
        a, _ = await pair(n, handlers_b=BASIC)
        assert await a.call("echo", "fresh") == ["fresh"]
        n.cancel_scope.cancel()


# -- a real socket ------------------------------------------------------------


async def test_loopback_tcp_both_directions_and_fuzz():
    server_conns = []

    async def on_connection(conn):
        server_conns.append(conn)
        await conn.run()

    async def ask_back(conn, x):
        return await conn.call("client.double", x)

    async def double(conn, x):
        return 2 * x

    async with trio.open_nursery() as n:
        listeners = await n.start(
            serve_tcp, on_connection, "127.0.0.1", 0, {**BASIC, "ask_back": ask_back}
        )
        port = listeners[0].socket.getsockname()[1]
        rng = random.Random(1)
        # Garbage on raw sockets first: the server must keep serving.
        for _ in range(20):
            s = await trio.open_tcp_stream("127.0.0.1", port)
            try:
                await s.send_all(rng.randbytes(rng.randint(1, 300)))
            except trio.BrokenResourceError:
                pass
            await s.aclose()
        async with open_connection(
            "127.0.0.1", port, {"client.double": double}, name="client"
        ) as c:
            assert await c.call("ask_back", 21) == 42
            payload = rng.randbytes(1 << 20)
            assert await c.call("echo", payload) == [payload]
            results = []

            async def one(i):
                results.append(await c.call("echo", i))

            async with trio.open_nursery() as calls:
                for i in range(300):
                    calls.start_soon(one, i)
            assert sorted(r[0] for r in results) == list(range(300))
        n.cancel_scope.cancel()


async def test_every_chunk_received_is_reported_before_its_frame_is_whole():
    """``on_receive``: the fileserver counts a request still arriving as
    activity (``fileserver.activity``), so it must hear of the first bytes."""
    heard = []
    async with trio.open_nursery() as n:
        raw, conn = await raw_server(n, on_receive=heard.append)
        frame = msgpack.packb([0, 21, "echo", ["y" * 50_000]])
        await raw.send_all(frame[:100])
        await trio.testing.wait_all_tasks_blocked()
        assert heard == [conn]  # the frame is not whole yet
        await raw.send_all(frame[100:])
        replies = await read_messages(raw, 1)
        assert replies[0][1] == 21 and len(heard) >= 2
        n.cancel_scope.cancel()


async def test_answers_to_this_sides_own_calls_are_not_reported_as_activity():
    """A client's answer to a callback break is no work for the fileserver:
    reporting it kept every commit of the client doing the changes out of
    the fast path (``fileserver.activity``) while another client held
    promises on what it changed."""
    heard = []
    async with trio.open_nursery() as n:
        raw, conn = await raw_server(n, on_receive=heard.append)
        results = []

        async def call() -> None:
            results.append(await conn.call("CB.CallBack", [1]))

        n.start_soon(call)
        (req,) = await read_messages(raw, 1)
        assert req[0] == 0 and req[2] == "CB.CallBack"
        await raw.send_all(msgpack.packb([1, req[1], None, "ok"]))
        await trio.testing.wait_all_tasks_blocked()
        assert results == ["ok"] and heard == []
        await raw.send_all(msgpack.packb([2, "echo", [1]]))  # a notification is
        await trio.testing.wait_all_tasks_blocked()
        assert heard == [conn]
        await raw.send_all(msgpack.packb([0, 22, "echo", ["x"]]))  # and a request
        replies = await read_messages(raw, 1)
        assert replies[0][1] == 22 and heard == [conn, conn]
        n.cancel_scope.cancel()

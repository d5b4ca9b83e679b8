"""Every record round-trips through its exact wire form; malformed forms are refused."""

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import RemoteError, RpcError
from protocol.names import check_name
from protocol.records import (
    CallBack,
    CallBackType,
    Fid,
    FileStatus,
    FileType,
    VolSync,
)

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)

fids = st.builds(Fid, u32, u32, u32)
statuses = st.builds(
    FileStatus,
    type=st.sampled_from(FileType),
    mode=st.integers(0, 0o7777),
    nlink=u32,
    size=u64,
    data_version=u64,
    owner=u32,
    group=u32,
    mtime_ns=i64,
    ctime_ns=i64,
    parent_vnode=u32,
    parent_unique=u32,
    access=st.integers(0, 7),
    rdev=u64,
)
callbacks = st.builds(CallBack, u32, u32, st.sampled_from(CallBackType))
volsyncs = st.builds(VolSync, i64, i64)


def wire_trip(obj):
    """Through msgpack bytes and back, as a peer would see it."""
    return msgpack.unpackb(msgpack.packb(obj.to_wire(), use_bin_type=True), raw=False)


@given(fids)
def test_fid_round_trip(fid):
    assert Fid.from_wire(wire_trip(fid)) == fid
    assert Fid.parse(str(fid)) == fid


@given(statuses)
def test_filestatus_round_trip(status):
    back = FileStatus.from_wire(wire_trip(status))
    assert back == status
    assert isinstance(back.type, FileType)


@given(callbacks)
def test_callback_round_trip(cb):
    assert CallBack.from_wire(wire_trip(cb)) == cb


@given(volsyncs)
def test_volsync_round_trip(vs):
    assert VolSync.from_wire(wire_trip(vs)) == vs


def test_fid_wire_form_is_exact():
    assert msgpack.packb(Fid(1, 2, 3).to_wire()) == b"\x93\x01\x02\x03"
    assert Fid(7, 0, 0).is_volume and not Fid(7, 1, 1).is_volume


@pytest.mark.parametrize(
    "bad",
    [None, [1, 2], [1, 2, 3, 4], [1, -2, 3], [1, 2**32, 3], [1, "2", 3], [1, True, 3], "1.2.3"],
)
def test_fid_malformed_refused(bad):
    with pytest.raises(RpcError) as exc:
        Fid.from_wire(bad)
    assert exc.value.code == "EINVAL"


@given(statuses, st.integers(0, 12), st.sampled_from(["x", None, 2**64, 1.5, True, b"1"]))
def test_filestatus_any_bad_field_refused(status, index, value):
    wire = status.to_wire()
    wire[index] = value
    with pytest.raises(RpcError):
        FileStatus.from_wire(wire)


# Each field's bounds and just past them, and values of the wrong type.
_edges = [0, 1, 7, 8, 255, 256, 0o7777, 0o10000, 2**32 - 1, 2**32, 2**63 - 1, 2**63,
          2**64 - 1, 2**64, -1, -(2**63), -(2**63) - 1]  # fmt: skip


def test_filestatus_fast_decode_agrees_with_the_checked_one_at_every_edge():
    """The fast path accepts exactly what the field-by-field checks accept,
    and decodes it the same way: every field set to every edge value, in
    current (13-field) and older (12-field) statuses and wrong lengths."""
    base = FileStatus(FileType.FILE, 0o644, 1, 0, 1, 0, 0, 0, 0, 1, 1).to_wire()
    values = [*_edges, True, False, None, 1.0, "1", b"1"]
    cases = [base[:n] for n in (11, 12, 14)] + [(*base,)]  # lengths, a tuple
    for length in (12, 13):
        for index in range(length):
            for value in values:
                wire = base[:length]
                wire[index] = value
                cases.append(wire)
    accepted = 0
    for wire in cases:
        try:
            want = FileStatus._from_wire_checked(wire)
        except RpcError:
            with pytest.raises(RpcError):
                FileStatus.from_wire(wire)
        else:
            accepted += 1
            got = FileStatus.from_wire(wire)
            assert got == want and type(got.type) is FileType, wire
    assert accepted > 100  # both kinds of case were met


@given(statuses)
def test_filestatus_fast_decode_of_any_valid_status(status):
    wire = status.to_wire()
    back = FileStatus.from_wire(wire)
    assert back == status and back == FileStatus._from_wire_checked(wire)
    assert type(back.type) is FileType


def test_filestatus_without_rdev_from_an_older_peer_reads_as_rdev_0():
    wire = FileStatus(FileType.FIFO, 0o644, 1, 0, 1, 0, 0, 0, 0, 1, 1, rdev=7).to_wire()
    assert len(wire) == 13 and wire[12] == 7
    old = FileStatus.from_wire(wire[:12])
    assert old.type == FileType.FIFO and old.rdev == 0


def test_enum_values_refused_outside_range():
    with pytest.raises(RpcError):
        CallBack.from_wire([1, 10, 9])
    good = FileStatus(FileType.FILE, 0o644, 1, 0, 1, 0, 0, 0, 0, 1, 1).to_wire()
    good[0] = 99
    with pytest.raises(RpcError):
        FileStatus.from_wire(good)


def test_error_encoding_maps_to_errno():
    import errno

    e = RpcError(errno.ENOENT, "no such file")
    assert e.to_wire() == ["ENOENT", "no such file"]
    back = RpcError.from_wire(e.to_wire())
    assert isinstance(back, RemoteError) and back.errno == errno.ENOENT
    assert RpcError.from_wire(["EWHATEVER", "?"]).errno == errno.EIO
    assert RpcError.from_wire(42).code == "EPROTO"


@pytest.mark.parametrize(
    ("name", "code"),
    [
        (b"", "EINVAL"),
        (b".", "EINVAL"),
        (b"..", "EINVAL"),
        (b"a/b", "EINVAL"),
        (b"a\0b", "EINVAL"),
        (b"x" * 256, "ENAMETOOLONG"),
        ("text", "EINVAL"),
    ],
)
def test_bad_names_refused(name, code):
    with pytest.raises(RpcError) as exc:
        check_name(name)
    assert exc.value.code == code


def test_good_names_accepted():
    for name in (b"a", b"x" * 255, b"\xff\xfe not utf-8", b"...", b".hidden"):
        assert check_name(name) == name

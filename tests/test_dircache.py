"""DirListing's name order, kept up by edits instead of a sort per edit."""

from __future__ import annotations

import bisect

from hypothesis import given
from hypothesis import strategies as st

from afsfuse.dircache import DirListing
from protocol.records import Fid, FileType

names = st.binary(min_size=1, max_size=3)
edits = st.lists(
    st.tuples(st.sampled_from(["add", "remove", "look"]), names, st.integers(1, 9)), max_size=60
)


@given(edits)
def test_sorted_and_position_match_a_fresh_sort_after_any_edits(ops) -> None:
    listing = DirListing(1)
    held = []
    for op, name, vnode in ops:
        if op == "add":
            listing.add(name, Fid(1, vnode, 1), FileType.FILE)
        elif op == "remove":
            listing.remove(name)
        else:
            ents = listing.sorted()
            held.append((ents, list(ents)))
        want = sorted(listing.entries.values(), key=lambda e: e.name)
        if listing._sorted is not None:  # only once sorted() was asked for
            assert listing.sorted() == want
            assert listing.position(name) == bisect.bisect_left([e.name for e in want], name)
    # A list handed out earlier never changes under its holder (it may be
    # iterated across an await while the listing is edited).
    for ents, copy in held:
        assert ents == copy
    assert listing.sorted() == sorted(listing.entries.values(), key=lambda e: e.name)


def test_a_replaced_name_keeps_one_place_with_its_new_fid() -> None:
    listing = DirListing(1)
    for n in (b"b", b"a", b"c"):
        listing.add(n, Fid(1, 2, 1), FileType.FILE)
    assert [e.name for e in listing.sorted()] == [b"a", b"b", b"c"]
    listing.add(b"b", Fid(1, 9, 1), FileType.DIRECTORY)
    assert [(e.name, e.fid.vnode) for e in listing.sorted()] == [(b"a", 2), (b"b", 9), (b"c", 2)]
    assert listing.remove(b"zz") is None and len(listing.sorted()) == 3

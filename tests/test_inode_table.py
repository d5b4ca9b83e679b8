"""Lookup counting and inode stability in the FUSE adapter's inode table."""

from hypothesis import given
from hypothesis import strategies as st

from afsfuse.inode_table import ROOT_INODE, InodeTable


def test_inode_stable_while_known_and_dropped_at_zero():
    t = InodeTable()
    t.set_root(("vol", 1, 1), "root")
    a = t.remember(("vol", 5, 9), "node5", 9)
    assert a.ino != ROOT_INODE and a.generation == 9
    assert t.remember(("vol", 5, 9), "node5", 9).ino == a.ino  # same fid, same inode
    assert t.get(a.ino).lookups == 2
    assert not t.forget(a.ino, 1)
    assert t.forget(a.ino, 1)
    assert t.find(("vol", 5, 9)) is None
    b = t.remember(("vol", 5, 9), "node5", 9)
    assert b.ino != a.ino  # a new binding after the kernel forgot the old one


def test_same_fid_in_two_volume_instances_gets_two_inodes():
    t = InodeTable()
    x = t.remember(("cellA", 7, 1, 1), "a", 1)
    y = t.remember(("cellB", 7, 1, 1), "b", 1)
    assert x.ino != y.ino


def test_root_is_never_forgotten_and_unknown_forget_is_harmless():
    t = InodeTable()
    t.set_root(("vol", 1, 1), "root")
    assert not t.forget(ROOT_INODE, 100)
    assert t.get(ROOT_INODE).node == "root"
    assert not t.forget(12345, 1)


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 3), st.booleans()), max_size=60))
def test_lookup_counts_match_a_model(ops):
    t = InodeTable()
    model: dict[int, int] = {}
    inos: dict[int, int] = {}
    for key, n, is_lookup in ops:
        if is_lookup:
            ino = t.remember(("v", key), key, key, count=n).ino
            if key in inos:
                assert inos[key] == ino
            inos[key] = ino
            model[key] = model.get(key, 0) + n
        elif key in inos:
            take = min(n, model[key])
            dropped = t.forget(inos[key], take)
            model[key] -= take
            assert dropped == (model[key] == 0)
            if dropped:
                del inos[key], model[key]
    assert len(t) == len(model)
    for key, count in model.items():
        assert t.get(inos[key]).lookups == count

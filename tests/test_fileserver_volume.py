"""The volume store on its own: a namespace model test, redo-log recovery, salvage."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from fileserver.volume import Volume
from protocol.errors import RpcError
from protocol.records import FileType

NAMES = [b"a", b"b", b"c"]


class VolumeMachine(RuleBasedStateMachine):
    """Random namespace/data operations against a dict model; after every step
    the volume passes its own consistency check."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self._tmp = tempfile.TemporaryDirectory()

    @initialize()
    def setup(self) -> None:
        from pathlib import Path

        self.vol = Volume.create(Path(self._tmp.name) / "v", 7, "v")
        # model: dir vnode -> {name: vnode}; vnode -> ("f"|"d", content)
        self.dirs: dict[int, dict[bytes, int]] = {1: {}}
        self.files: dict[int, bytearray] = {}

    def teardown(self) -> None:
        if hasattr(self, "vol"):
            self.vol.close()
        self._tmp.cleanup()

    def _unique(self, vn: int) -> int:
        v = self.vol._load(vn)
        assert v is not None
        return v.unique

    def _pick_dir(self, i: int) -> int:
        ds = sorted(self.dirs)
        return ds[i % len(ds)]

    @rule(d=st.integers(0, 10), name=st.sampled_from(NAMES), is_dir=st.booleans())
    def create(self, d: int, name: bytes, is_dir: bool) -> None:
        dv = self._pick_dir(d)
        ft = FileType.DIRECTORY if is_dir else FileType.FILE
        try:
            v, _ = self.vol.create_vnode(dv, self._unique(dv), name, ft, 0o644, 0, 0)
        except RpcError as exc:
            assert exc.code == "EEXIST" and name in self.dirs[dv]
            return
        assert name not in self.dirs[dv]
        self.dirs[dv][name] = v.vnode
        if is_dir:
            self.dirs[v.vnode] = {}
        else:
            self.files[v.vnode] = bytearray()

    @rule(d=st.integers(0, 10), name=st.sampled_from(NAMES))
    def remove(self, d: int, name: bytes) -> None:
        dv = self._pick_dir(d)
        vn = self.dirs[dv].get(name)
        try:
            if vn is not None and vn in self.dirs:
                self.vol.remove_dir(dv, self._unique(dv), name)
            else:
                self.vol.remove_file(dv, self._unique(dv), name)
        except RpcError as exc:
            assert exc.code in ("ENOENT", "ENOTEMPTY")
            assert vn is None or self.dirs.get(vn)
            return
        del self.dirs[dv][name]
        if vn in self.dirs:
            del self.dirs[vn]
        elif not any(vn in ents.values() for ents in self.dirs.values()):
            del self.files[vn]

    @rule(d1=st.integers(0, 10), n1=st.sampled_from(NAMES), d2=st.integers(0, 10),
          n2=st.sampled_from(NAMES))  # fmt: skip
    def rename(self, d1: int, n1: bytes, d2: int, n2: bytes) -> None:
        a, b = self._pick_dir(d1), self._pick_dir(d2)
        try:
            self.vol.rename(a, self._unique(a), n1, b, self._unique(b), n2, 0)
        except RpcError as exc:
            assert exc.code in ("ENOENT", "EINVAL", "ENOTDIR", "EISDIR", "ENOTEMPTY"), exc
            return
        vn = self.dirs[a].pop(n1)
        old = self.dirs[b].get(n2)
        self.dirs[b][n2] = vn
        if old is not None and old != vn:
            if old in self.dirs:
                del self.dirs[old]
            elif not any(old in ents.values() for ents in self.dirs.values()):
                del self.files[old]

    @rule(d=st.integers(0, 10), name=st.sampled_from(NAMES), off=st.integers(0, 5000),
          data=st.binary(max_size=300), nl=st.one_of(st.none(), st.integers(0, 6000)))  # fmt: skip
    def store(self, d: int, name: bytes, off: int, data: bytes, nl: int | None) -> None:
        dv = self._pick_dir(d)
        vn = self.dirs[dv].get(name)
        if vn is None or vn not in self.files:
            return
        self.vol.store_data(vn, self._unique(vn), off, data, nl, None)
        buf = self.files[vn]
        if len(buf) < off + len(data):
            buf.extend(bytes(off + len(data) - len(buf)))
        buf[off : off + len(data)] = data
        if nl is not None:
            del buf[nl:]
            buf.extend(bytes(nl - len(buf)))

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "vol"):
            return
        for dv, ents in self.dirs.items():
            got, nxt, _ = self.vol.readdir(dv, self._unique(dv), None, 1000)
            assert nxt is None
            assert {n: v.vnode for n, v in got} == ents
        for vn, buf in self.files.items():
            v, data = self.vol.fetch_data(vn, self._unique(vn), 0, 1 << 20)
            assert data == bytes(buf) and v.size == len(buf)
        assert self.vol.check() == []


TestVolumeMachine = VolumeMachine.TestCase
TestVolumeMachine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow])  # fmt: skip


def _volume_with_a_file(path: Path) -> tuple[Volume, Any]:
    vol = Volume.create(path, 7, "v")
    f, _ = vol.create_vnode(1, 1, b"f", FileType.FILE, 0o644, 0, 0)
    vol.store_data(f.vnode, f.unique, 0, b"old contents", None, None)  # DV 2
    return vol, f


def _apply_part_then(vol: Volume, exc: BaseException) -> Callable[..., None]:
    """An ``_apply`` that writes two of the bytes, then fails with ``exc``."""

    def apply(vn: int, uq: int, off: int, data: bytes, new_size: int) -> None:
        fd = os.open(vol._data_path(vn, uq), os.O_WRONLY)
        os.pwrite(fd, data[:2], off)
        os.close(fd)
        raise exc

    return apply


def test_store_interrupted_after_its_intent_gets_a_new_dv_at_recovery(tmp_path, monkeypatch):
    vol, f = _volume_with_a_file(tmp_path / "v")
    monkeypatch.setattr(vol, "_apply", _apply_part_then(vol, SystemExit("power cut")))
    monkeypatch.setattr(vol, "_settle_intents", lambda: 0)  # the process is gone
    with pytest.raises(SystemExit):
        vol.store_data(f.vnode, f.unique, 4, b"NEW", 20, None)
    vol.db.close()
    monkeypatch.undo()
    reopened = Volume(tmp_path / "v", recover=False)
    assert [x.kind for x in reopened.check()] == ["pending"]
    reopened.close()
    vol2 = Volume(tmp_path / "v")  # normal open recovers
    v, data = vol2.fetch_data(f.vnode, f.unique, 0, 100)
    # Never acknowledged, so any mix of old and new bytes will do, but the DV
    # moves (cached copies of DV 2 must go) and the size is the file's.
    assert data == b"old NEntents" and v.size == 12 and v.dv == 3
    assert vol2.check() == []
    vol2.close()


def test_store_failing_midway_moves_the_dv_at_once(tmp_path, monkeypatch):
    vol, f = _volume_with_a_file(tmp_path / "v")
    monkeypatch.setattr(vol, "_apply", _apply_part_then(vol, OSError(errno.ENOSPC, "disk full")))
    with pytest.raises(OSError):
        vol.store_data(f.vnode, f.unique, 4, b"NEW", 20, None)
    monkeypatch.undo()
    v, data = vol.fetch_data(f.vnode, f.unique, 0, 100)
    assert data == b"old NEntents" and v.dv == 3
    assert vol.check() == []
    vol.close()


def test_quota_and_counters(tmp_path):
    vol = Volume.create(tmp_path / "v", 7, "v", quota_bytes=100)
    f, _ = vol.create_vnode(1, 1, b"f", FileType.FILE, 0o644, 0, 0)
    vol.store_data(f.vnode, f.unique, 0, b"x" * 60, None, None)
    with pytest.raises(RpcError) as ei:
        vol.store_data(f.vnode, f.unique, 60, b"x" * 41, None, None)
    assert ei.value.code == "EDQUOT"
    assert vol.bytes_used == 60 and vol.files == 2
    vol.remove_file(1, 1, b"f")
    assert vol.bytes_used == 0 and vol.files == 1
    assert vol.check() == []
    vol.close()


def test_store_whose_metadata_commit_fails_still_moves_the_dv(tmp_path, monkeypatch):
    vol, f = _volume_with_a_file(tmp_path / "v")

    put = vol._put
    calls = []

    def fail_once(db: object, v: object) -> None:
        calls.append(v)
        if len(calls) == 1:
            raise OSError(errno.EIO, "metadata commit failed")
        put(db, v)

    monkeypatch.setattr(vol, "_put", fail_once)
    with pytest.raises(OSError):
        vol.store_data(f.vnode, f.unique, 0, b"NEW", None, None)
    monkeypatch.undo()
    # The bytes are in the data file: they must not pass for DV 2's.
    v, data = vol.fetch_data(f.vnode, f.unique, 0, 100)
    assert data == b"NEW contents" and v.dv == 3
    assert vol.check() == []
    vol.close()


def test_volume_from_before_the_intents_table_opens_and_stores(tmp_path):
    vol = Volume.create(tmp_path / "v", 7, "v")
    f, _ = vol.create_vnode(1, 1, b"f", FileType.FILE, 0o644, 0, 0)
    vol.db.execute("DROP TABLE intents")  # as an older version created it
    vol.close()
    vol = Volume(tmp_path / "v")
    vol.store_data(f.vnode, f.unique, 0, b"hello", None, None)
    assert vol.fetch_data(f.vnode, f.unique, 0, 10)[1] == b"hello"
    assert vol.check() == []
    vol.close()


@pytest.mark.parametrize("table", ["intents", "pending"])
def test_deletes_by_vnode_search_an_index_also_in_an_older_volume(tmp_path, table):
    """Intent and redo rows go by vnode on every store, remove and idle
    disarm; every file stored into in the last ARMED_IDLE_S keeps an intent
    row, so a scan there is work growing with the write rate (issue 12: no
    hidden linear costs).  A volume made before the index gets it at open."""
    vol = Volume.create(tmp_path / "v", 7, "v")
    vol.db.execute(f"DROP INDEX IF EXISTS {table}_by_vnode")  # as an older version created it
    vol.close()
    vol = Volume(tmp_path / "v")
    try:
        plan = vol.db.execute(f"EXPLAIN QUERY PLAN DELETE FROM {table} WHERE vnode = ?", (5,))
        detail = " ".join(row[-1] for row in plan)
        assert f"INDEX {table}_by_vnode" in detail and "SCAN" not in detail, detail
    finally:
        vol.close()


def test_small_store_committed_before_its_bytes_landed_is_replayed(tmp_path, monkeypatch):
    vol, f = _volume_with_a_file(tmp_path / "v")
    # The process dies right after the commit, before the data file got the bytes.
    monkeypatch.setattr(vol, "_redo_applied", lambda *a: None)
    v = vol.store_small(f.vnode, f.unique, 4, b"NEW", 20, None)
    assert v.dv == 3 and v.size == 20
    vol.db.close()
    monkeypatch.undo()
    assert (tmp_path / "v" / "data" / f"{f.vnode}.{f.unique}").read_bytes() == b"old contents"
    vol2 = Volume(tmp_path / "v")  # recovery replays the committed redo record
    v, data = vol2.fetch_data(f.vnode, f.unique, 0, 100)
    # The file was armed (its intent stays while it is written to), so the
    # crash also costs it one more DV: never less than the committed one.
    assert data == b"old NEWtents" + bytes(8) and v.dv == 4 and v.size == 20
    assert vol2.check() == []
    vol2.close()


def test_small_store_records_go_once_their_files_are_synced(tmp_path):
    vol, f = _volume_with_a_file(tmp_path / "v")
    vol.store_small(f.vnode, f.unique, 0, b"NEW", None, None)
    assert vol.fetch_data(f.vnode, f.unique, 0, 100)[1] == b"NEW contents"
    assert vol.redo_unsynced == 1 and vol.check() == []  # known to this process
    assert vol.sync_redo() >= 1 and vol.redo_unsynced == 0
    vol.store_small(f.vnode, f.unique, 0, b"n", None, None)  # the next commit drops it
    vol.close()  # and a clean close syncs and drops the rest
    vol = Volume(tmp_path / "v", recover=False)
    assert vol.check() == []
    assert vol.db.execute("SELECT COUNT(*) FROM pending").fetchone()[0] == 0
    assert vol.fetch_data(f.vnode, f.unique, 0, 100)[1] == b"nEW contents"
    vol.close()


def test_files_without_a_data_file_are_stored_and_removed_without_looking_for_one(
    tmp_path, monkeypatch
):
    """A file created here whose bytes are inline, or that has none, has no
    data file: storing into it and removing it never build (stat, unlink)
    one's path.  A file that has one, big from the start or grown out of the
    database, still loses it when removed."""
    vol = Volume.create(tmp_path / "v", 7, "v")
    made = {n: vol.create_vnode(1, 1, n, FileType.FILE, 0o644, 0, 0)[0]
            for n in (b"small", b"empty", b"big", b"grown")}  # fmt: skip
    big, grown = made[b"big"], made[b"grown"]
    vol.store_small(big.vnode, big.unique, 0, b"x" * (vol.inline_max + 1), None, None)
    vol.store_small(grown.vnode, grown.unique, 0, b"tiny", None, None)
    assert vol.is_inline(grown.vnode)
    vol.store_small(grown.vnode, grown.unique, 4, b"y" * vol.inline_max, None, None)
    assert not vol.is_inline(grown.vnode)
    paths = {n: vol._data_path(made[n].vnode, made[n].unique) for n in (b"big", b"grown")}
    assert all(p.exists() for p in paths.values())

    looked: list[int] = []
    real = Volume._data_path

    def spy(self: Volume, vnode: int, unique: int) -> Path:
        looked.append(vnode)
        return real(self, vnode, unique)

    monkeypatch.setattr(Volume, "_data_path", spy)
    small = made[b"small"]
    vol.store_small(small.vnode, small.unique, 0, b"hello", None, None)
    assert vol.is_inline(small.vnode)
    vol.remove_file(1, 1, b"small")
    vol.remove_file(1, 1, b"empty")
    assert looked == []
    vol.remove_file(1, 1, b"big")
    vol.remove_file(1, 1, b"grown")
    assert not any(p.exists() for p in paths.values())
    assert vol.check() == []
    vol.close()


def test_a_file_removed_in_the_batch_that_stored_into_it_leaves_no_data_file(tmp_path):
    """A store's post-commit step writes the data file after the commit, so
    a removal in the same batch must still unlink it (found in review: the
    no-data-file shortcut leaked it until the next restart)."""
    vol = Volume.create(tmp_path / "v", 7, "v")
    f, _ = vol.create_vnode(1, 1, b"f", FileType.FILE, 0o644, 0, 0)
    vol.run_batch([
        ("store", lambda: vol.store_small(f.vnode, f.unique, vol.inline_max + 1, b"x", None, None)),
        ("remove", lambda: vol.remove_file(1, 1, b"f")),
    ])  # fmt: skip
    assert list(vol.data_dir.iterdir()) == []
    assert vol.check() == []
    vol.close()

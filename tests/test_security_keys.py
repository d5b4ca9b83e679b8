"""Where a client finds the cell key: --key-file, the cells file's
``key_file`` (relative to the cells file; aliases share their target's), or
``$AFSFUSE_KEY_FILE``; with none the mount refuses to start."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from afsfuse.cache_manager import CacheConfig
from afsfuse.cells import CellDB
from afsfuse.daemon import KEY_ENV, MountFailed, MountOptions, load_cell_key
from afsfuse.tls_config import mount_tls
from protocol.auth import create_key, load_key
from protocol.tls import CERT_ENV, CellCA, TLSRefused, write_client_bundle


def opts(tmp_path: Path, **kw: object) -> MountOptions:
    return MountOptions(host="127.0.0.1", port=1, volume="root.cell", mountpoint=tmp_path / "m",
                        cache_dir=tmp_path / "c", **kw)  # type: ignore[arg-type]  # fmt: skip


def test_cells_file_key_paths_and_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    (tmp_path / "etc").mkdir()
    k1 = create_key(tmp_path / "etc" / "one.key")
    k2 = create_key(tmp_path / "two.key")
    cells = tmp_path / "etc" / "cells.toml"
    cells.write_text(
        '[cells."one"]\nvlservers = ["127.0.0.1:1"]\nkey_file = "one.key"\n'
        f'[cells."two"]\nvlservers = ["127.0.0.1:2"]\nkey_file = "{tmp_path / "two.key"}"\n'
        '[cells."alias"]\nalias = "one"\n'
        '[cells."bare"]\nvlservers = ["127.0.0.1:3"]\n'
    )
    db = CellDB.load(cells)
    assert db.get("one").key_file == tmp_path / "etc" / "one.key"
    assert db.get("alias").key_file == db.get("one").key_file
    cfg = CacheConfig(cells=db, cache_dir=tmp_path / "c")
    assert cfg.key_for("one") == k1 and cfg.key_for("two") == k2 and cfg.key_for("alias") == k1
    assert cfg.key_for("bare") is None
    # --key-file wins over the cells file.
    cfg2 = CacheConfig(cells=db, cache_dir=tmp_path / "c", key=b"x" * 32)
    assert cfg2.key_for("one") == b"x" * 32
    # The daemon: the cells file's key is used (None = per cell)...
    assert load_cell_key(opts(tmp_path, cell="one"), db) is None
    # ...a cell without one needs --key-file or the environment.
    with pytest.raises(MountFailed, match="no cell key"):
        load_cell_key(opts(tmp_path, cell="bare"), db)
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "two.key"))
    assert load_cell_key(opts(tmp_path, cell="bare"), db) == k2
    assert load_cell_key(opts(tmp_path, key_file=tmp_path / "etc" / "one.key"), db) == k1
    with pytest.raises(MountFailed, match="cannot read"):
        load_cell_key(opts(tmp_path, key_file=tmp_path / "absent.key"), db)


def test_key_files(tmp_path, caplog):
    k = create_key(tmp_path / "k")
    assert len(k) == 32 and create_key(tmp_path / "k") == k  # kept, not replaced
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    os.chmod(tmp_path / "k", 0o644)
    assert load_key(tmp_path / "k") == k
    assert "readable by group/others" in caplog.text
    (tmp_path / "bad").write_text("not hex")
    with pytest.raises(ValueError):
        load_key(tmp_path / "bad")
    (tmp_path / "short").write_text("abcd")
    with pytest.raises(ValueError):
        load_key(tmp_path / "short")


async def test_client_bundle_paths_and_precedence(tmp_path, monkeypatch):
    """The same order for the client bundle (TLS): --cert, the cell's
    cert_file (relative to the cells file; aliases share it), else
    $AFSFUSE_CERT_FILE; a cell left without one never connects in plaintext."""
    monkeypatch.delenv(CERT_ENV, raising=False)
    (tmp_path / "etc").mkdir()
    ca = CellCA.create(tmp_path / "ca.pem", "one")
    one = tmp_path / "etc" / "one.pem"
    write_client_bundle(ca, one)
    env = tmp_path / "env.pem"
    write_client_bundle(ca, env)
    cells = tmp_path / "etc" / "cells.toml"
    cells.write_text(
        '[cells."one"]\nvlservers = ["127.0.0.1:1"]\ncert_file = "one.pem"\n'
        '[cells."alias"]\nalias = "one"\n'
        '[cells."bare"]\nvlservers = ["127.0.0.1:3"]\n'
    )
    db = CellDB.load(cells)
    assert db.get("one").cert_file == one and db.get("alias").cert_file == one
    t = mount_tls(opts(tmp_path, cell="one"), db)
    assert t.path_for("one") == one and t.path_for("bare") is None
    conns = t.connectors()
    with pytest.raises(TLSRefused, match="no client certificate for cell bare"):
        await conns["bare"]("127.0.0.1", 3)  # refused before any connect
    with pytest.raises(TLSRefused, match="no client certificate for cell bare"):
        mount_tls(opts(tmp_path, cell="bare"), db).connectors()  # the mount's own cell
    monkeypatch.setenv(CERT_ENV, str(env))
    assert mount_tls(opts(tmp_path), db).path_for("bare") == env
    assert mount_tls(opts(tmp_path), db).path_for("one") == one
    assert mount_tls(opts(tmp_path, cert_file=env), db).path_for("one") == env  # --cert wins

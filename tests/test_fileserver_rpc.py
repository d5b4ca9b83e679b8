"""Every FS.* method: results as SPEC section 5 says, and each error case."""

from __future__ import annotations

import pytest

from afsfuse.lab.server import fs_client, running_server
from protocol.errors import RpcError
from protocol.limits import MAX_IO


async def expect(code: str, coro) -> RpcError:
    with pytest.raises(RpcError) as ei:
        await coro
    assert ei.value.code == code, ei.value
    return ei.value


@pytest.fixture
async def env(tmp_path):
    async with (
        running_server(tmp_path / "fs", break_timeout=1) as srv,
        fs_client(srv.host, srv.port) as c,
    ):
        c.root = await c.root_fid()
        c.server = srv
        yield c


async def test_hello_result_and_bad_hello(tmp_path):
    async with (
        running_server(tmp_path / "fs") as srv,
        fs_client(srv.host, srv.port, hello=False) as c,
    ):
        await expect("EINVAL", c.call("FS.Hello", {"uuid": "not-a-uuid"}))
        await expect("EINVAL", c.call("FS.Hello", "x"))
        await expect("EINVAL", c.call("FS.Hello"))
        r = await c.say_hello()
        assert r["uuid"] == srv.uuid and r["cell"] == "localcell" and r["version"] == 1
        assert isinstance(r["epoch"], int) and isinstance(r["capabilities"], list)
        await expect(
            "EINVAL", c.call("FS.Hello", {"uuid": "0" * 8 + "-0000-4000-8000-" + "0" * 12})
        )


async def test_fetch_status_root(env):
    c = env
    r = await c.call("FS.FetchStatus", None, c.root)
    st = r["status"]
    assert st[0] == 2 and st[2] == 2 and st[9:11] == [1, 1]
    assert r["callback"][0] == 1 and r["callback"][2] in (1, 2)
    assert len(r["volsync"]) == 2
    await expect("ESTALE", c.call("FS.FetchStatus", None, [c.root[0], 99, 99]))
    await expect("ESTALE", c.call("FS.FetchStatus", None, [12345, 1, 1]))
    await expect("EINVAL", c.call("FS.FetchStatus", None, [1, 2]))
    await expect("EINVAL", c.call("FS.FetchStatus", "cred", c.root))
    await expect("EINVAL", c.call("FS.FetchStatus", None))
    await expect("ENOSYS", c.call("FS.NoSuchMethod"))


async def test_store_and_fetch_data(env):
    c = env
    r = await c.call("FS.CreateFile", [1000, 100, [100]], c.root, b"file", 0o640)
    fid = r["fid"]
    assert r["status"][1] == 0o640 and r["status"][5:7] == [1000, 100]
    assert r["status"][4] == 1 and r["callback"][1] > 0 and r["dir_callback"][1] > 0
    dv0 = r["status"][4]
    s = await c.call("FS.StoreData", None, fid, 0, b"hello world", None, None)
    assert s["status"][3] == 11 and s["status"][4] == dv0 + 1
    s = await c.call("FS.StoreData", None, fid, 20, b"!", None, 123)
    assert s["status"][3] == 21 and s["status"][7] == 123
    f = await c.call("FS.FetchData", None, fid, 0, 100)
    assert f["data"] == b"hello world" + bytes(9) + b"!"
    f = await c.call("FS.FetchData", None, fid, 6, 5)
    assert f["data"] == b"world" and f["status"][4] == dv0 + 2
    assert (await c.call("FS.FetchData", None, fid, 100, 10))["data"] == b""
    # new_length truncates after writing
    s = await c.call("FS.StoreData", None, fid, 0, b"HE", 5, None)
    assert s["status"][3] == 5
    assert (await c.call("FS.FetchData", None, fid, 0, 100))["data"] == b"HEllo"
    await expect("EINVAL", c.call("FS.FetchData", None, fid, 0, MAX_IO + 1))
    await expect("EINVAL", c.call("FS.FetchData", None, fid, -1, 10))
    await expect("EISDIR", c.call("FS.FetchData", None, c.root, 0, 10))
    await expect("EISDIR", c.call("FS.StoreData", None, c.root, 0, b"x", None, None))
    await expect("EINVAL", c.call("FS.StoreData", None, fid, 0, "text", None, None))
    await expect("EINVAL", c.call("FS.StoreData", None, fid, 0, b"x" * (MAX_IO + 1), None, None))
    await expect("ESTALE", c.call("FS.StoreData", None, [c.root[0], 77, 1], 0, b"", None, None))
    big = bytes(range(256)) * (MAX_IO // 256)
    await c.call("FS.StoreData", None, fid, 0, big, None, None)
    assert (await c.call("FS.FetchData", None, fid, 0, MAX_IO))["data"] == big


async def test_store_status(env):
    c = env
    fid = (await c.call("FS.CreateFile", None, c.root, b"f", 0o644))["fid"]
    await c.call("FS.StoreData", None, fid, 0, b"abcdef", None, None)
    st = (await c.call("FS.FetchStatus", None, fid))["status"]
    r = await c.call("FS.StoreStatus", None, fid, {"mode": 0o600, "owner": 5, "group": 6,
                                                    "mtime_ns": 42})  # fmt: skip
    s2 = r["status"]
    assert s2[1] == 0o600 and s2[5] == 5 and s2[6] == 6 and s2[7] == 42
    assert s2[4] == st[4]  # chmod/chown/utimens: DV unchanged
    r = await c.call("FS.StoreStatus", None, fid, {"size": 2})
    assert r["status"][3] == 2 and r["status"][4] == st[4] + 1
    assert (await c.call("FS.FetchData", None, fid, 0, 10))["data"] == b"ab"
    r = await c.call("FS.StoreStatus", None, fid, {"size": 4})
    assert (await c.call("FS.FetchData", None, fid, 0, 10))["data"] == b"ab\0\0"
    await expect("EINVAL", c.call("FS.StoreStatus", None, fid, {"color": 1}))
    await expect("EINVAL", c.call("FS.StoreStatus", None, fid, {"mode": 0o77777}))
    await expect("EINVAL", c.call("FS.StoreStatus", None, fid, [1]))
    await expect("EISDIR", c.call("FS.StoreStatus", None, c.root, {"size": 0}))


async def test_create_mkdir_symlink_errors(env):
    c = env
    r = await c.call("FS.MakeDir", None, c.root, b"d", 0o755)
    d = r["fid"]
    assert r["status"][0] == 2 and r["status"][2] == 2 and r["dir_status"][2] == 3
    assert r["status"][9:11] == c.root[1:]
    await expect("EEXIST", c.call("FS.CreateFile", None, c.root, b"d", 0o644))
    await expect("EEXIST", c.call("FS.MakeDir", None, c.root, b"d", 0o644))
    await expect("EINVAL", c.call("FS.CreateFile", None, c.root, b"", 0o644))
    await expect("EINVAL", c.call("FS.CreateFile", None, c.root, b"a/b", 0o644))
    await expect("EINVAL", c.call("FS.CreateFile", None, c.root, b"a\0b", 0o644))
    await expect("EINVAL", c.call("FS.CreateFile", None, c.root, b".", 0o644))
    await expect("EINVAL", c.call("FS.CreateFile", None, c.root, b"..", 0o644))
    await expect("EINVAL", c.call("FS.CreateFile", None, c.root, "str", 0o644))
    await expect("ENAMETOOLONG", c.call("FS.CreateFile", None, c.root, b"x" * 256, 0o644))
    await c.call("FS.CreateFile", None, c.root, b"x" * 255, 0o644)
    f = (await c.call("FS.CreateFile", None, d, b"f", 0o644))["fid"]
    await expect("ENOTDIR", c.call("FS.CreateFile", None, f, b"g", 0o644))
    await expect("ESTALE", c.call("FS.CreateFile", None, [c.root[0], 999, 1], b"g", 0o644))
    s = await c.call("FS.Symlink", None, c.root, b"ln", b"d/f", 0o777)
    assert s["status"][0] == 3 and s["status"][3] == 3
    assert (await c.call("FS.FetchData", None, s["fid"], 0, 100))["data"] == b"d/f"
    await expect("EINVAL", c.call("FS.Symlink", None, c.root, b"ln2", b"", 0o777))
    await expect("ENAMETOOLONG", c.call("FS.Symlink", None, c.root, b"ln2", b"x" * 4097, 0o777))
    await expect("EEXIST", c.call("FS.Symlink", None, c.root, b"ln", b"t", 0o777))


async def test_link_remove(env):
    c = env
    d = (await c.call("FS.MakeDir", None, c.root, b"d", 0o755))["fid"]
    f = (await c.call("FS.CreateFile", None, c.root, b"f", 0o644))["fid"]
    await c.call("FS.StoreData", None, f, 0, b"data", None, None)
    r = await c.call("FS.Link", None, d, b"f2", f)
    assert r["status"][2] == 2 and r["dir_status"][3] == 1
    await expect("EEXIST", c.call("FS.Link", None, d, b"f2", f))
    await expect("EPERM", c.call("FS.Link", None, c.root, b"d2", d))
    other = await c.server.store.create("other")
    await expect("EXDEV", c.call("FS.Link", None, [other.id, 1, 1], b"x", f))
    r = await c.call("FS.RemoveFile", None, c.root, b"f")
    assert r["fid"] == f and r["status"][2] == 1
    assert (await c.call("FS.FetchData", None, f, 0, 10))["data"] == b"data"
    r = await c.call("FS.RemoveFile", None, d, b"f2")
    assert r["status"][2] == 0
    await expect("ESTALE", c.call("FS.FetchStatus", None, f))
    await expect("ENOENT", c.call("FS.RemoveFile", None, d, b"f2"))
    await expect("EISDIR", c.call("FS.RemoveFile", None, c.root, b"d"))
    await c.call("FS.CreateFile", None, d, b"g", 0o644)
    await expect("ENOTEMPTY", c.call("FS.RemoveDir", None, c.root, b"d"))
    g = await c.call("FS.Lookup", None, d, b"g")
    await expect("ENOTDIR", c.call("FS.RemoveDir", None, d, b"g"))
    await expect("ENOTDIR", c.call("FS.RemoveDir", None, g["fid"], b"x"))
    await c.call("FS.RemoveFile", None, d, b"g")
    r = await c.call("FS.RemoveDir", None, c.root, b"d")
    assert r["fid"] == d and r["dir_status"][2] == 2
    await expect("ENOENT", c.call("FS.RemoveDir", None, c.root, b"d"))


async def test_rename_cases(env):
    c = env
    root = c.root
    a = (await c.call("FS.MakeDir", None, root, b"a", 0o755))["fid"]
    b = (await c.call("FS.MakeDir", None, root, b"b", 0o755))["fid"]
    sub = (await c.call("FS.MakeDir", None, a, b"sub", 0o755))["fid"]
    f = (await c.call("FS.CreateFile", None, a, b"f", 0o644))["fid"]
    g = (await c.call("FS.CreateFile", None, b, b"g", 0o644))["fid"]
    dv_a = (await c.call("FS.FetchStatus", None, a))["status"][4]
    r = await c.call("FS.Rename", None, a, b"f", b, b"f", 0)
    assert r["fid"] == f and r["replaced_fid"] is None and r["replaced_status"] is None
    assert r["old_dir_status"][4] == dv_a + 1 and r["status"][9] == b[1]
    # replace a file by a file
    r = await c.call("FS.Rename", None, b, b"f", b, b"g", 0)
    assert r["replaced_fid"] == g and r["replaced_status"][2] == 0
    await expect("ESTALE", c.call("FS.FetchStatus", None, g))
    h = (await c.call("FS.CreateFile", None, b, b"h", 0o644))["fid"]
    await expect("EEXIST", c.call("FS.Rename", None, b, b"g", b, b"h", 1))
    await expect("EINVAL", c.call("FS.Rename", None, b, b"g", b, b"h", 7))
    await expect("EISDIR", c.call("FS.Rename", None, b, b"g", root, b"a", 0))
    await expect("ENOTDIR", c.call("FS.Rename", None, root, b"a", b, b"h", 0))
    await expect("EINVAL", c.call("FS.Rename", None, root, b"a", sub, b"x", 0))
    await expect("EINVAL", c.call("FS.Rename", None, root, b"a", a, b"x", 0))
    await expect("ENOENT", c.call("FS.Rename", None, root, b"nope", b, b"x", 0))
    await expect("ENOTEMPTY", c.call("FS.Rename", None, root, b"b", root, b"a", 0))
    other = await c.server.store.create("other")
    await expect("EXDEV", c.call("FS.Rename", None, root, b"a", [other.id, 1, 1], b"a", 0))
    # directory replaces an empty directory; nlinks follow
    e = (await c.call("FS.MakeDir", None, root, b"e", 0o755))["fid"]
    r = await c.call("FS.Rename", None, a, b"sub", root, b"e", 0)
    assert r["replaced_fid"] == e and r["fid"] == sub
    assert r["old_dir_status"][2] == 2 and r["new_dir_status"][2] == 5  # a, b, e(=sub)
    # renaming onto itself changes nothing
    dv = (await c.call("FS.FetchStatus", None, b))["status"][4]
    await c.call("FS.Rename", None, b, b"h", b, b"h", 0)
    assert (await c.call("FS.FetchStatus", None, b))["status"][4] == dv
    assert h


async def test_lookup_readdir_paging(env):
    c = env
    names = [b"n%03d" % i for i in range(25)] + [b"\xff\xfe", b"A"]
    for n in names:
        await c.call("FS.CreateFile", None, c.root, n, 0o644)
    r = await c.call("FS.Lookup", None, c.root, b"n007")
    assert r["status"][0] == 1 and r["callback"][1] > 0 and r["dir_callback"][1] > 0
    await expect("ENOENT", c.call("FS.Lookup", None, c.root, b"missing"))
    await expect("ENOTDIR", c.call("FS.Lookup", None, r["fid"], b"x"))
    got: list[bytes] = []
    cookie = None
    pages = 0
    while True:
        p = await c.call("FS.ReadDir", None, c.root, cookie, 10, pages % 2 == 0)
        pages += 1
        for e in p["entries"]:
            got.append(e[0])
            assert len(e) == (5 if pages % 2 == 1 else 3)
        cookie = p["next"]
        if cookie is None:
            break
        assert pages < 10
    assert got == sorted(names) and pages == 3
    await expect("EINVAL", c.call("FS.ReadDir", None, c.root, None, 0, False))
    await expect("EINVAL", c.call("FS.ReadDir", None, c.root, None, 1001, False))
    await expect("EINVAL", c.call("FS.ReadDir", None, c.root, "x", 10, False))
    await expect("ENOTDIR", c.call("FS.ReadDir", None, r["fid"], None, 10, False))


async def test_inline_bulk_status_volume_status_capabilities(env):
    c = env
    f = (await c.call("FS.CreateFile", None, c.root, b"f", 0o644))["fid"]
    r = await c.call("FS.InlineBulkStatus", None, [c.root, f, [c.root[0], 50, 50], [9, 1, 1]])
    res = r["results"]
    assert res[0][0] is None and res[0][1][0] == 2 and res[0][2][1] > 0
    assert res[1][0] is None and res[1][1][0] == 1
    assert res[2][0][0] == "ESTALE" and res[2][1] is None and res[3][0][0] == "ESTALE"
    await expect("EINVAL", c.call("FS.InlineBulkStatus", None, [c.root] * 51))
    v = await c.call("FS.GetVolumeStatus", None, c.root[0])
    assert v["name"] == "root.cell" and v["online"] is True and v["files"] == 2
    assert v["quota_bytes"] == 0 and v["block_size"] > 0
    await expect("ENOENT", c.call("FS.GetVolumeStatus", None, 4242))
    caps = await c.call("FS.GetCapabilities")
    assert isinstance(caps["capabilities"], list)


async def test_dv_rules(env):
    c = env
    d0 = (await c.call("FS.FetchStatus", None, c.root))["status"][4]
    f = await c.call("FS.CreateFile", None, c.root, b"f", 0o644)
    assert f["dir_status"][4] == d0 + 1
    await c.call("FS.StoreData", None, f["fid"], 0, b"", None, None)
    assert (await c.call("FS.FetchStatus", None, f["fid"]))["status"][4] == 2
    await c.call("FS.StoreStatus", None, c.root, {"mode": 0o700})
    assert (await c.call("FS.FetchStatus", None, c.root))["status"][4] == d0 + 1


async def test_quota(env):
    c = env
    srv = c.server
    h = await srv.store.create("small", quota_bytes=10)
    root = [h.id, 1, 1]
    f = (await c.call("FS.CreateFile", None, root, b"f", 0o644))["fid"]
    await c.call("FS.StoreData", None, f, 0, b"x" * 8, None, None)
    await expect("EDQUOT", c.call("FS.StoreData", None, f, 8, b"x" * 3, None, None))
    await expect("EDQUOT", c.call("FS.StoreStatus", None, f, {"size": 11}))
    st = (await c.call("FS.FetchStatus", None, f))["status"]
    assert st[3] == 8 and st[4] == 2  # nothing changed
    await expect("EDQUOT", c.call("FS.Symlink", None, root, b"s", b"abc", 0o777))
    await c.call("FS.StoreData", None, f, 0, b"y" * 10, None, None)  # exactly at quota
    await expect("EDQUOT", c.call("FS.CreateFile", None, root, b"g", 0o644))
    await c.call("FS.StoreData", None, f, 0, b"", 0, None)  # shrinking is always fine
    v = await c.call("FS.GetVolumeStatus", None, h.id)
    assert v["bytes_used"] == 0 and v["quota_bytes"] == 10


async def test_store_data_takes_attributes_after_its_bytes(env):
    """``store-attrs``: a chmod/chown that waited on the client for the file's
    writes comes with them, checked before any byte lands and applied after."""
    c = env
    assert "store-attrs" in (await c.call("FS.GetCapabilities"))["capabilities"]
    owner = [1000, 100, [100]]
    fid = (await c.call("FS.CreateFile", owner, c.root, b"t", 0o600))["fid"]
    big = b"b" * (256 * 1024)  # past the small-store size: the data-file path too
    for data in (b"small", big):
        s = await c.call("FS.StoreData", owner, fid, 0, data, len(data), 7, {"mode": 0o644})
        st = s["status"]
        assert st[1] == 0o644 and st[3] == len(data) and st[7] == 7
        assert (await c.call("FS.FetchData", None, fid, 0, 10))["data"] == data[:10]
        await c.call("FS.StoreStatus", None, fid, {"mode": 0o600})
    # Someone who may write but not chmod: refused, and not a byte landed.
    await c.call("FS.StoreStatus", None, fid, {"mode": 0o666})
    dv = (await c.call("FS.FetchStatus", None, fid))["status"][4]
    await expect("EPERM", c.call("FS.StoreData", [2000, 200, [200]], fid, 0, b"NO", None, None,
                                 {"mode": 0o777}))  # fmt: skip
    await expect("EPERM", c.call("FS.StoreData", owner, fid, 0, b"NO", None, None,
                                 {"owner": 0}))  # fmt: skip
    st = (await c.call("FS.FetchStatus", None, fid))["status"]
    assert st[4] == dv and st[1] == 0o666 and st[5] == 1000
    assert (await c.call("FS.FetchData", None, fid, 0, 2))["data"] == b"bb"
    # Only mode, owner and group: the size and the mtime have their own arguments.
    for bad in ({"size": 1}, {"mtime_ns": 1}, {"mode": "x"}, [1]):
        await expect("EINVAL", c.call("FS.StoreData", None, fid, 0, b"", None, None, bad))
    # Root gives the file away with its bytes (setuid would go, as with chown).
    s = await c.call("FS.StoreData", None, fid, 0, b"root", None, None, {"owner": 5, "group": 6})
    assert s["status"][5:7] == [5, 6]

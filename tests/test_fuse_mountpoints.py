"""AFS mount points inside a volume, and two aliased cells in one mount.

A mount point (``afsfuse fs mkmount DIR VOLUME``) shows another volume's
root as a directory: its own volume instance inside the same FUSE mount.
One volume reached through two cells that alias each other is two volume
instances on one server record, and one break reaches both (P3).
"""

from __future__ import annotations

import errno
import json
import os
import time

import pytest

from afsfuse.lab.mount import ClientMount
from afsfuse.lab.server import ServerProcess
from tests.cli_support import run
from tests.posix_support import eventually

pytestmark = pytest.mark.mount


def test_mount_point_enters_another_volume(tmp_path, require_fuse):
    with ServerProcess(tmp_path / "fs") as srv:
        run("fileserver.cli", "vol", "create", "--data-dir", srv.data_dir, "projects")
        with ClientMount(srv, tmp_path / "a") as a, ClientMount(srv, tmp_path / "b") as b:
            run("afsfuse.cli", "fs", "mkmount", a.mnt / "proj", "projects")
            assert (a.mnt / "proj").is_dir()
            assert os.getxattr(a.mnt / "proj", "afs.volume") == b"projects"
            (a.mnt / "proj" / "plan.txt").write_text("inside projects")
            assert os.getxattr(a.mnt / "proj" / "plan.txt", "afs.volume") == b"projects"
            assert sorted(os.listdir(a.mnt)) == ["proj"]
            lsmount = json.loads(run("afsfuse.cli", "fs", "lsmount", a.mnt / "proj", "--json"))
            assert lsmount["volume"] == "projects"
            # Another client sees the same mount point and the volume behind it.
            assert (b.mnt / "proj" / "plan.txt").read_text() == "inside projects"
            # Rename across volumes is EXDEV; cp+rm is what mv then does.
            (a.mnt / "top.txt").write_text("top")
            with pytest.raises(OSError) as exc:
                os.rename(a.mnt / "top.txt", a.mnt / "proj" / "top.txt")
            assert exc.value.errno == errno.EXDEV
            # ".." of the volume root leads back to the directory holding it.
            assert os.stat(a.mnt / "proj" / "..").st_ino == os.stat(a.mnt).st_ino
            # A dangling mount point fails on its own, and does not empty (or
            # fail) the listing of the directory holding it.
            run("afsfuse.cli", "fs", "mkmount", a.mnt / "gone", "no.such.volume")
            assert sorted(os.listdir(a.mnt)) == ["gone", "proj", "top.txt"]
            assert sorted(os.listdir(b.mnt)) == ["gone", "proj", "top.txt"]
            assert os.readlink(a.mnt / "gone") == "#no.such.volume."
            time.sleep(1.2)  # past the short timeout: lookup shows it the same way
            assert os.readlink(a.mnt / "gone") == "#no.such.volume."
            assert (a.mnt / "proj" / "plan.txt").read_text() == "inside projects"


def test_aliased_cells_share_one_server_record(tmp_path, require_fuse):
    with ServerProcess(tmp_path / "fs") as srv:
        cells = tmp_path / "cells.toml"
        cells.write_text(
            'default = "localcell"\n'
            f'[cells."localcell"]\nvlservers = ["{srv.host}:{srv.port}"]\n'
            '[cells."othercell"]\nalias = "localcell"\n'
        )
        a = ClientMount(srv, tmp_path / "a", extra_args=("--cells", str(cells)))
        with a, ClientMount(srv, tmp_path / "b") as b:
            run("afsfuse.cli", "fs", "mkmount", a.mnt / "other", "root.cell", "--cell",
                "othercell")  # fmt: skip
            (b.mnt / "shared.txt").write_text("one")
            assert (a.mnt / "shared.txt").read_text() == "one"
            assert (a.mnt / "other" / "shared.txt").read_text() == "one"
            assert os.getxattr(a.mnt / "other" / "shared.txt", "afs.cell") == b"othercell"
            assert os.getxattr(a.mnt / "shared.txt", "afs.cell") == b"localcell"
            # Same fid, two volume instances: two inodes.
            assert (a.mnt / "shared.txt").stat().st_ino != (
                a.mnt / "other" / "shared.txt"
            ).stat().st_ino
            stats = a.stats()
            assert len(stats["servers"]) == 1
            assert {"localcell", "othercell"} <= {k.split(":")[0] for k in stats["volumes"]}
            breaks = stats["breaks"]
            (b.mnt / "shared.txt").write_text("two!")
            # One break from the server reaches both instances.
            assert (a.mnt / "shared.txt").read_text() == "two!"
            assert (a.mnt / "other" / "shared.txt").read_text() == "two!"
            assert eventually(lambda: (a.mnt / "other" / "shared.txt").stat().st_size == 4)
            assert a.stats()["breaks"] > breaks

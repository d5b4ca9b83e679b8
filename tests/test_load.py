"""Load: ``scripts/load.py`` for a short run (20 protocol sessions + 2 real
mounts): no errors, no lost update, server RSS bounded."""

from __future__ import annotations

import json
import subprocess
import sys

from afsfuse.lab.server import REPO


def test_load_short_run(require_fuse):
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "load.py"), "--duration", "8", "--json",
         "--max-rss-mb", "400"],
        capture_output=True, text=True, cwd=REPO, timeout=180,
    )  # fmt: skip
    assert res.stdout.strip(), res.stderr[-3000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"load: {result}")
    assert result["errors"] == 0, result["first_errors"]
    assert result["lost_updates"] == 0
    assert result["session_ops"] > 500 and result["mount_ops"] > 20
    assert result["rss_peak_mb"] < 400
    assert result["ok"] and res.returncode == 0

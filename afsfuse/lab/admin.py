"""Read a running fileserver's counters through its admin command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

# The checkout this package runs from (editable install): subprocesses start
# there, and tests find scripts/ under it.
REPO = Path(__file__).resolve().parents[2]


def server_stats(data_dir: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "fileserver.cli", "stats", "--data-dir", str(data_dir), "--json"],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=True,
    )  # fmt: skip
    return json.loads(out.stdout)


def rpc_count(data_dir: Path, method: str) -> int:
    return int(server_stats(data_dir)["rpcs"].get(method, 0))

"""Running the project's command-line tools from tests: ``run(MODULE, ARGS...)``
is ``python -m MODULE ARGS...`` from the checkout (its stdout; a non-zero
exit fails the test with the tool's stderr), and ``admin(srv, ARGS...)`` is
``afs-fileserver ARGS --data-dir DIR --json`` on a lab server, parsed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from afsfuse.lab.server import REPO


def run(*argv: Any, timeout: float = 60) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-m", *map(str, argv)], capture_output=True,
                         text=True, cwd=REPO, env=env, timeout=timeout)  # fmt: skip
    assert res.returncode == 0, res.stderr
    return res.stdout


def admin(srv: Any, *argv: Any) -> Any:
    return json.loads(run("fileserver.cli", *argv, "--data-dir", srv.data_dir, "--json"))

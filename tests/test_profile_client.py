"""The profile driver's ``--perf`` summary reads ``perf report`` tables right:
every row's samples counted once, under the kind of code its library is
(the figures a closing note quotes as "where the CPU went").  No perf run
here: the tables are what ``perf report --stdio --no-children -n`` prints."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import profile_client as pc  # noqa: E402

DSO_REPORT = """\
# To display the perf.data header info, please use --header/--header-only options.
#
# Total Lost Samples: 0
#
# Samples: 5K of event 'cpu-clock:ppp'
# Event count (approx.): 1336000000
#
# Overhead       Samples  Shared Object
# ........  ............  .........................................
#
    49.99%          2670  libpython3.11.so.1.0
    35.74%          1909  [kernel.kallsyms]
     6.22%           332  libsqlite3.so.0.8.6
     4.61%           246  libc.so.6
     1.41%            75  libcrypto.so.3
     0.67%            36  _cmsgpack.cpython-311-x86_64-linux-gnu.so
     0.59%            31  libssl.so.3
     0.49%            26  libfuse3.so.3.14.0
     0.22%            12  __init__.cpython-311-x86_64-linux-gnu.so
     0.07%             4  _socket.cpython-311-x86_64-linux-gnu.so


#
# (Tip: For a higher level overview, try: perf report --sort comm,dso)
#
"""

SYM_REPORT = """\
# Overhead       Samples  Shared Object         Symbol
#
    25.26%          1348  [kernel.kallsyms]     [k] __pi_memcpy
     5.43%           290  libpython3.11.so.1.0  [.] _PyEval_EvalFrameDefault
"""


def test_perf_rows_reads_every_table_row_and_skips_comments() -> None:
    rows = pc.perf_rows(DSO_REPORT)
    assert len(rows) == 10
    assert rows[0] == (2670, "libpython3.11.so.1.0")
    assert rows[-1] == (4, "_socket.cpython-311-x86_64-linux-gnu.so")
    # A symbol row keeps its library and symbol, with the padding squeezed.
    assert pc.perf_rows(SYM_REPORT) == [
        (1348, "[kernel.kallsyms] [k] __pi_memcpy"),
        (290, "libpython3.11.so.1.0 [.] _PyEval_EvalFrameDefault"),
    ]


def test_code_kinds_puts_each_library_under_its_kind_once() -> None:
    kinds = pc.code_kinds(pc.perf_rows(DSO_REPORT))
    assert kinds == {
        "python": 2670,
        "kernel": 1909,
        "sqlite": 332,
        "libc": 246,
        "tls": 75 + 31,
        "fuse": 26 + 12,  # libfuse and pyfuse3's compiled module
        "msgpack": 36,
        "other": 4,
    }
    assert sum(kinds.values()) == sum(n for n, _ in pc.perf_rows(DSO_REPORT))
    assert list(kinds)[:2] == ["python", "kernel"]  # largest first

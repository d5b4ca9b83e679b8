"""The shared event-line writer and parser (``protocol/logfmt.py``): what the
client and server write parses back to the same values, whatever they hold."""

from __future__ import annotations

import logging
import os

from hypothesis import given
from hypothesis import strategies as st

from afsfuse.lab.timeline import parse_client_log, parse_server_log
from afsfuse.stats import log_event
from fileserver.events import event
from protocol import logfmt
from protocol.records import Fid

AWKWARD = {
    "space": "two words",
    "quote": 'say "hi"',
    "equals": "a=b",
    "backslash": "c:\\dir\\",
    "newline": "line1\nline2\r\tend",
    "empty": "",
    "utf8": "café ☕",
    "control": "bell\x07",
}


def test_round_trip_of_awkward_values() -> None:
    line = logfmt.format_fields(AWKWARD)
    assert "\n" not in line and "\r" not in line
    assert logfmt.parse(line) == AWKWARD


def test_non_utf8_name_round_trips_to_its_bytes() -> None:
    raw = b"caf\xe9 \xff=x"
    line = logfmt.format_event("create", name=raw)
    assert "\\xe9" in line and "\\xff" in line
    parsed = logfmt.parse(line)
    assert os.fsencode(parsed["name"]) == raw
    assert parsed["event"] == "create" and float(parsed["t"]) > 0


def test_safe_values_stay_bare_and_collections_join() -> None:
    line = logfmt.format_fields({"fid": Fid(536870912, 2, 2), "fids": ["1.2.3", "1.4.5"], "n": 3})
    assert line == "fid=536870912.2.2 fids=1.2.3,1.4.5 n=3"


def test_truncated_quoted_value_still_parses() -> None:
    assert logfmt.parse('a=1 b="open ended') == {"a": "1", "b": "open ended"}


@given(st.dictionaries(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), st.text(max_size=20)))
def test_any_text_round_trips(fields: dict[str, str]) -> None:
    assert logfmt.parse(logfmt.format_fields(fields)) == fields


def test_client_and_server_lines_parse_the_same_way(tmp_path, caplog) -> None:
    # Both processes' real logger formats, through the timeline's parsers.
    fields = {"fid": "1.2.3", "reason": 'it said "no" = twice', "path": "a b\nc"}
    for name, fmt, emit, parse in (
        ("fileserver.events", "%(asctime)s %(levelname)s %(name)s: %(message)s",
         lambda: event("probe", **fields), parse_server_log),
        ("afsfuse.events", "%(asctime)s %(name)s %(levelname)s %(message)s",
         lambda: log_event("probe", **fields), lambda p: parse_client_log(p, "A")),
    ):  # fmt: skip
        path = tmp_path / f"{name}.log"
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter(fmt))
        logger = logging.getLogger(name)
        old = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            emit()
        finally:
            logger.removeHandler(handler)
            logger.setLevel(old)
            handler.close()
        [ev] = parse(path)
        assert ev.name == "probe" and ev.fields == fields and ev.t > 0

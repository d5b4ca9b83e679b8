"""The one logfmt writer and parser of the event logs (client and server).

An event line is ``event=NAME t=SECONDS key=value ...``: ``t`` is the wall
clock (``time.time()``, microseconds) when the event was logged, so lines of
different processes merge by time.  Values are written bare when they hold
only printable characters other than space, ``"``, ``=`` and ``\\``;
otherwise (and when empty) they are double-quoted with backslash escapes:
``\\"``, ``\\\\``, ``\\n``, ``\\r``, ``\\t``, ``\\xHH`` for a byte that is not
UTF-8 (a name decoded with ``os.fsdecode`` carries it as a surrogate escape),
``\\uXXXX`` for any other unprintable character.  ``parse`` undoes exactly
that, so ``parse(format_fields(f))`` gives ``f`` back as strings, and
``os.fsencode`` of a parsed name gives its original bytes.

Value conversion: ``bytes`` go through ``os.fsdecode``; exact ``list``,
``tuple``, ``set`` and ``frozenset`` are joined with commas (a ``Fid`` is a
tuple subclass and prints as ``VOL.VNODE.UNIQUE``); anything else is ``str()``.

Imports only the standard library: both ``fileserver`` and ``afsfuse`` use it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

_SPECIAL = frozenset(' "=\\')
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNESCAPES = {'"': '"', "\\": "\\", "n": "\n", "r": "\r", "t": "\t"}


def to_text(value: Any) -> str:
    """The text a value is logged as (before quoting)."""
    if isinstance(value, bytes):
        return os.fsdecode(value)
    if type(value) in (list, tuple, set, frozenset):
        return ",".join(to_text(x) for x in value)
    return str(value)


def _needs_quotes(text: str) -> bool:
    return not text or any(c in _SPECIAL or not c.isprintable() for c in text)


def _escape_char(c: str) -> str:
    if c in _ESCAPES:
        return _ESCAPES[c]
    if c.isprintable():
        return c
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # surrogate escape of a non-UTF-8 byte
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def quote(value: Any) -> str:
    """One value as logfmt text: bare if safe, else quoted and escaped."""
    text = to_text(value)
    if not _needs_quotes(text):
        return text
    return '"' + "".join(_escape_char(c) for c in text) + '"'


def format_fields(fields: Mapping[str, Any]) -> str:
    """``k=v k=v ...`` in the mapping's order."""
    return " ".join(f"{k}={quote(v)}" for k, v in fields.items())


def format_event(name: str, t: float | None = None, /, **fields: Any) -> str:
    """One event line: ``event=NAME t=SECONDS`` and then ``fields``."""
    stamp = time.time() if t is None else t
    head = f"event={quote(name)} t={stamp:.6f}"
    return f"{head} {format_fields(fields)}" if fields else head


def parse(text: str) -> dict[str, str]:
    """The ``key=value`` pairs of a logfmt line, in order (values as text).

    A key without ``=`` maps to ``""``; an unterminated quoted value runs to
    the end of the line (a truncated line still parses)."""
    out: dict[str, str] = {}
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] == " ":
            i += 1
        start = i
        while i < n and text[i] not in " =":
            i += 1
        key = text[start:i]
        if i >= n or text[i] == " ":
            if key:
                out[key] = ""
            continue
        i += 1  # '='
        if i < n and text[i] == '"':
            value, i = _quoted(text, i + 1)
        else:
            start = i
            while i < n and text[i] != " ":
                i += 1
            value = text[start:i]
        if key:
            out[key] = value
    return out


def _quoted(text: str, i: int) -> tuple[str, int]:
    """The value of a quoted string whose body starts at ``i``; and the index after it."""
    parts: list[str] = []
    n = len(text)
    while i < n:
        c = text[i]
        if c == '"':
            return "".join(parts), i + 1
        if c != "\\" or i + 1 >= n:
            parts.append(c)
            i += 1
            continue
        e = text[i + 1]
        width = {"x": 2, "u": 4, "U": 8}.get(e)
        if e in _UNESCAPES:
            parts.append(_UNESCAPES[e])
            i += 2
        elif width is not None and _is_hex(text[i + 2 : i + 2 + width], width):
            code = int(text[i + 2 : i + 2 + width], 16)
            # \xHH is a raw byte: back to its surrogate escape for os.fsencode.
            parts.append(chr(0xDC00 + code if e == "x" and code >= 0x80 else code))
            i += 2 + width
        else:
            parts.append(e)
            i += 2
    return "".join(parts), n


def _is_hex(s: str, width: int) -> bool:
    return len(s) == width and all(c in "0123456789abcdefABCDEF" for c in s)

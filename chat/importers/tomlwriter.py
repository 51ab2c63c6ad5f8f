"""Writing an imported card as ``persona.toml``: readable TOML that :mod:`tomllib` reads back to the same data.

Written by hand because the standard library only reads TOML and the card needs only a small
part of it: tables, arrays of tables, strings, numbers, booleans and lists. Text with newlines
becomes a multi-line string, so a card's description stays editable; every control character but
newline and tab is escaped (TOML forbids them raw). ``None`` values are left out (TOML has no null).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

_BARE = re.compile(r"[A-Za-z0-9_-]+\Z")
_ESCAPE = re.compile(r'[\x00-\x08\x0b-\x1f\x7f"\\]')
_ESCAPE_ONE_LINE = re.compile(r'[\x00-\x1f\x7f"\\]')
_NAMED = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def dumps(data: Mapping[str, Any]) -> str:
    """``data`` as a TOML document: plain keys first, then tables, then arrays of tables."""
    lines: list[str] = []
    _table(data, [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _table(data: Mapping[str, Any], path: list[str], lines: list[str]) -> None:
    tables: list[tuple[str, Mapping[str, Any]]] = []
    arrays: list[tuple[str, list[Mapping[str, Any]]]] = []
    for key, value in data.items():
        if value is None:
            continue
        if isinstance(value, Mapping) and not (path and path[-1] == "sampling"):
            tables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            arrays.append((key, value))
        else:
            lines.append(f"{key_text(key)} = {value_text(value)}")
    for key, table in tables:
        if not table:
            continue
        lines += ["", f"[{'.'.join(key_text(k) for k in [*path, key])}]"]
        _table(table, [*path, key], lines)
    for key, items in arrays:
        for item in items:
            lines += ["", f"[[{'.'.join(key_text(k) for k in [*path, key])}]]"]
            _table(item, [*path, key], lines)


def key_text(key: str) -> str:
    return key if _BARE.match(key) else _basic(key)


def value_text(value: Any) -> str:
    """One TOML value: strings, booleans, integers, floats, lists and inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _multiline(value) if "\n" in value else _basic(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_basic(v) if isinstance(v, str) else value_text(v) for v in value if v is not None) + "]"
    if isinstance(value, Mapping):
        items = ", ".join(f"{key_text(k)} = {value_text(v)}" for k, v in value.items() if v is not None)
        return "{ " + items + " }" if items else "{}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _escape(match: re.Match[str]) -> str:
    c = match.group()
    return _NAMED.get(c) or f"\\u{ord(c):04x}"


def _basic(text: str) -> str:
    return '"' + _ESCAPE_ONE_LINE.sub(_escape, text) + '"'


def _multiline(text: str) -> str:
    """A multi-line basic string; the newline right after the opening quotes is not part of the value."""
    body = _ESCAPE.sub(_escape, text)  # CR is escaped too, so CRLF reads back as CRLF
    return '"""\n' + body + '"""'

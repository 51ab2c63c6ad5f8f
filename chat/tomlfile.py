"""Reading the TOML files people hand us (cards, config, presets), and quoting their contents in errors.

Cards come from strangers, so reading one must never crash or hang: every problem is one
``ChatError`` naming the file. :func:`read_toml` is the one place that reads such a file —
a regular file (a FIFO would block forever), at most :data:`MAX_TOML_BYTES`, UTF-8 with or
without a byte-order mark — and parses it with :mod:`tomllib`, turning what tomllib lets
escape (``RecursionError`` on deep nesting, ``ValueError`` on integers past Python's
4,300-digit limit) into the same one line. It also holds what the TOML spec promises and
tomllib does not enforce: integers fit in 64 bits. A shallow nesting limit keeps every later
step (pydantic, ``repr`` in messages, JSON in history) far from the recursion limit.

:func:`user_path` is the check every path or name taken from outside data (a card, the
config, ``-m``, ``-p``) passes before it reaches the file system, whose ``OSError`` or
``ValueError`` would otherwise escape (a name over 255 bytes, a NUL). :func:`quote` and
:func:`shorten` keep a 5 MB value from becoming a 5 MB error line, and a newline in it from
becoming a second one.
"""

from __future__ import annotations

import os
import re
import reprlib
import stat
import tomllib
from pathlib import Path
from typing import Any

from chat.errors import ChatError

MAX_TOML_BYTES = 4 << 20  # no card, config or preset is anywhere near this
MAX_TOML_DEPTH = 32  # tables and arrays inside each other; real files use 3
MAX_KEY_PARTS = 64  # a.b.c…: tomllib's time grows with the square (or worse) of the parts
INT64 = range(-(2**63), 2**63)  # TOML: "integers must be 64-bit signed", larger ones an error
MAX_NAME_BYTES = 255  # one path component (NAME_MAX on Linux, macOS and Windows)
MAX_PATH_BYTES = 4096  # a whole path (PATH_MAX on Linux)
QUOTE_CHARS = 80  # how much of a user's value an error message repeats


def read_toml(path: Path, error_cls: type[ChatError], hint: str) -> dict[str, Any]:
    """Parse ``path`` as TOML; any problem is one ``error_cls`` naming the file (``hint``: how to fix the syntax)."""
    user_path(str(path), error_cls, "file")
    text = _decode(path, read_regular(path, error_cls), error_cls)
    if text.count(".") >= MAX_KEY_PARTS and _LONG_DOTTED_KEY.search(text):
        raise error_cls(f"{path}: invalid TOML: a dotted key has more than {MAX_KEY_PARTS} parts", hint)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise error_cls(f"{path}: invalid TOML: {shorten(str(exc))}", hint) from None
    except RecursionError:
        raise error_cls(f"{path}: invalid TOML: nested too deeply", hint) from None
    except ValueError as exc:  # tomllib lets int("9" * 5000) escape: Python's 4,300-digit limit
        why = "an integer does not fit in 64 bits" if "integer" in str(exc) else shorten(str(exc))
        raise error_cls(f"{path}: invalid TOML: {why}", hint) from None
    _check_shape(path, data, error_cls, hint)
    return data


def read_regular(
    path: Path,
    error_cls: type[ChatError],
    limit: int = MAX_TOML_BYTES,
    kind_hint: str = "point it at a text file, not a folder, pipe or device",
) -> bytes:
    """A file's bytes: only a regular file (opened without blocking, so a FIFO cannot hang us), within ``limit``."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise error_cls(f"{path}: cannot open: {exc.strerror or exc}", "check the path and its permissions") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error_cls(f"{path}: not a regular file", kind_hint)
        if info.st_size > limit:
            raise error_cls(f"{path}: too large ({info.st_size:,} bytes)", f"keep it under {limit >> 20} MiB")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise error_cls(f"{path}: cannot read: {exc.strerror or exc}", "check the file and its permissions") from None
    finally:
        os.close(fd)
    if len(data) > limit:  # it grew while we read it
        raise error_cls(f"{path}: too large", f"keep it under {limit >> 20} MiB")
    return data


def _decode(path: Path, data: bytes, error_cls: type[ChatError]) -> str:
    """UTF-8 text; a byte-order mark (as Windows editors write) is dropped, as the TOML spec allows."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error_cls(f"{path}: not UTF-8 text (byte {exc.start})", "save the file as UTF-8") from None


_KEY_PART = r"""(?:[A-Za-z0-9_-]++|"(?:[^"\\\n]|\\.)*+"|'[^'\n]*+')"""
# MAX_KEY_PARTS parts in a row where a key can start: a line's start, after "[", "{" or ",". Anchored so that
# a failed try costs one key, not the rest of the text. It may match prose inside a multi-line string
# ("a.b.c…" 64 times over), which no real file has.
_LONG_DOTTED_KEY = re.compile(
    rf"(?:^|(?<=[\[{{,]))[ \t]*+(?:{_KEY_PART}[ \t]*+\.[ \t]*+){{{MAX_KEY_PARTS}}}", re.MULTILINE
)


def _check_shape(path: Path, data: dict[str, Any], error_cls: type[ChatError], hint: str) -> None:
    """Refuse nesting deeper than MAX_TOML_DEPTH and integers outside 64 bits (walked without recursion)."""
    stack: list[tuple[Any, int, _Where]] = [(data, 0, None)]
    while stack:
        value, depth, where = stack.pop()
        if isinstance(value, int) and not isinstance(value, bool) and value not in INT64:
            raise error_cls(f"{path}: {_where_text(where)}: integer does not fit in 64 bits", hint)
        if isinstance(value, (dict, list)) and depth >= MAX_TOML_DEPTH:
            raise error_cls(f"{path}: {_where_text(where)}: nested more than {MAX_TOML_DEPTH} levels deep", hint)
        if isinstance(value, dict):
            stack.extend((v, depth + 1, (where, k)) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, depth + 1, (where, i)) for i, v in enumerate(value))


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]{1,40}")
_Where = tuple[Any, str | int] | None  # (parent, key or index): built lazily, so huge keys are never copied


def _where_text(where: _Where) -> str:
    """``sampling.stop[2]`` for a place in the data, each key cut short."""
    parts: list[str] = []
    while where is not None:
        where, key = where
        parts.append(f"[{key}]" if isinstance(key, int) else "." + (key if _BARE_KEY.fullmatch(key) else quote(key)))
    text = "".join(reversed(parts)).removeprefix(".")
    return shorten(text, QUOTE_CHARS) or "the file"


def user_path(text: str, error_cls: type[ChatError], what: str) -> Path:
    """A path taken from outside data, checked before the file system sees it, ``~`` expanded.

    ``what`` names where the text came from (``-m``, ``card.toml: adapters[0].path``); the error quotes the
    text cut short. ``os.path.expanduser`` leaves an unknown ``~user`` alone where pathlib's would raise.
    """
    why = path_problem(text)
    if why:
        hint = "remove the NUL character" if "\0" in text else "use shorter names"
        raise error_cls(f"{what} {quote(text)} {why}", hint)
    return Path(os.path.expanduser(text))


def path_problem(text: str) -> str | None:
    """Why ``text`` cannot name a file (NUL, a name over 255 bytes, a path over 4096 bytes), or None."""
    if "\0" in text:
        return "contains a NUL character"
    size = _bytes(text)
    if size > MAX_PATH_BYTES:
        return f"is too long ({size:,} bytes; a path may have {MAX_PATH_BYTES:,})"
    size = max(_bytes(part) for part in text.replace("\\", "/").split("/"))
    if size > MAX_NAME_BYTES:
        return f"has a name that is too long ({size:,} bytes; a file or folder name may have {MAX_NAME_BYTES})"
    return None


def _bytes(text: str) -> int:
    """Length as the file system counts it (UTF-8 bytes; lone surrogates from a byte-y argv count too)."""
    return len(text.encode("utf-8", "surrogatepass"))


class _Quoter(reprlib.Repr):
    """reprlib's short repr, minus its one crash: ``repr()`` of an integer past 4,300 digits."""

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 64:
            return f"<an integer of {x.bit_length()} bits>"
        return super().repr_int(x, level)


_REPR = _Quoter()
_REPR.maxstring = QUOTE_CHARS
_REPR.maxother = QUOTE_CHARS
_REPR.maxlevel = 3
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.fillvalue = "…"


def quote(value: Any) -> str:
    """``repr(value)`` cut to about 80 characters (the middle elided with "…"): how errors repeat user data."""
    return _REPR.repr(value)


def shorten(text: str, limit: int = QUOTE_CHARS) -> str:
    """``text`` as one printable line of at most ``limit`` characters (ending in "…" when cut), controls escaped.

    For user data shown without repr's quotes (``temperature=abc``): a newline in it must not split the line.
    """
    cut = text if len(text) <= limit else text[: limit - 1] + "…"
    if cut.isprintable():
        return cut
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in cut)

"""Opening weight files from strangers: regular files only, read through a memory map.

Opening a named pipe blocks until someone writes to it, and a device may never end: a
path given as a model, adapter or vector would hang the program. Everything that reads
a part opens it here.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from chat.errors import AdapterError, ChatError

_NOT_REGULAR = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _kind(mode: int) -> str:
    return next((what for test, what in _NOT_REGULAR if test(mode)), "not a regular file")


def open_regular(path: str | os.PathLike[str], what: str = "file", error: type[ChatError] = AdapterError) -> IO[bytes]:
    """Open ``path`` for reading if it is a regular file; anything else is an ``error``, never a wait.

    The path is checked before opening (nothing else is touched) and the open file again
    (a swap in between cannot slip through); ``O_NONBLOCK`` makes even that open return at once.
    """
    p = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        if not stat.S_ISREG(mode := os.stat(p).st_mode):
            raise _not_regular(p, mode, what, error)
        fd = os.open(p, flags)
    except OSError as exc:
        raise error(
            f"{p}: cannot read the {what} ({exc.strerror or exc})", "check the path and its permissions"
        ) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _not_regular(p, mode, what, error)
    return os.fdopen(fd, "rb")


def _not_regular(p: Path, mode: int, what: str, error: type[ChatError]) -> ChatError:
    return error(
        f"{p}: the {what} is {_kind(mode)}, not a regular file",
        "point to a regular file (reading a pipe or a device could wait forever)",
    )


@contextlib.contextmanager
def mapped(
    path: str | os.PathLike[str], what: str = "file", error: type[ChatError] = AdapterError
) -> Iterator[tuple[Any, int]]:
    """The regular file ``path`` memory-mapped read-only (``b""`` when empty) and its size.

    Data is read through the map, so checking an adapter's numbers never copies it whole.
    """
    with open_regular(path, what, error) as fh:
        size = os.fstat(fh.fileno()).st_size
        try:
            buf: Any = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        except (OSError, ValueError) as exc:
            raise error(f"{path}: cannot read the {what} ({exc})", "check the path and its permissions") from None
    try:
        yield buf, size
    finally:
        if isinstance(buf, mmap.mmap):
            with contextlib.suppress(BufferError):  # an array still viewing it: the map closes with it
                buf.close()


def human_size(n: float) -> str:
    """``812 B``, ``1.5 MiB`` … for listings."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""

"""A fast read of a GGUF header: metadata scalars and strings, and the tensor list.

``gguf.GGUFReader`` builds Python objects for every element of every array; on a real
model's 150k-token vocabulary that takes seconds. Converting an adapter only needs the
base's architecture, head counts and tensor shapes, so this walks the header with
``struct`` and skips arrays by their length.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chat.errors import ModelError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    metadata: dict[str, Any]  # arrays appear as ("array", length)
    metadata_types: dict[str, int]  # GGUF value type of each key
    tensors: dict[str, tuple[tuple[int, ...], int]]  # name → (numpy-order shape, ggml type)


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise EOFError
        (v,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return v

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.data):
            raise EOFError
        s = self.data[self.pos : self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return s

    def skip_array(self, item_type: int, count: int) -> None:
        if item_type in _SCALARS:
            self.pos += struct.calcsize(_SCALARS[item_type]) * count
        elif item_type == _STRING:
            for _ in range(count):
                n = self.take("<Q")
                self.pos += n
        else:
            for _ in range(count):
                self.value(self.take("<I"))
        if self.pos > len(self.data):
            raise EOFError

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.take("<I"), self.take("<Q")
            self.skip_array(item_type, count)
            return ("array", count)
        raise ValueError(f"unknown metadata value type {vtype}")


def read_gguf_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Parse the header of ``path`` or raise ModelError saying why it is not a usable GGUF."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            import mmap

            try:
                buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # empty file
                buf = b""
            try:
                return _parse(p, buf)
            finally:
                if isinstance(buf, mmap.mmap):
                    buf.close()
    except OSError as exc:
        raise ModelError(f"{p}: cannot read it ({exc.strerror or exc})") from None


def _parse(p: Path, buf: Any) -> GGUFHeader:
    if bytes(buf[:4]) != b"GGUF":
        raise ModelError(f"{p}: not a GGUF file")
    c = _Cursor(buf)
    c.pos = 4
    try:
        version = c.take("<I")
        if version < 2:
            raise ModelError(f"{p}: GGUF version {version} is too old")
        n_tensors, n_kv = c.take("<Q"), c.take("<Q")
        meta: dict[str, Any] = {}
        types: dict[str, int] = {}
        for _ in range(n_kv):
            key = c.string()
            vtype = c.take("<I")
            meta[key] = c.value(vtype)
            types[key] = vtype
        tensors: dict[str, tuple[tuple[int, ...], int]] = {}
        for _ in range(n_tensors):
            name = c.string()
            dims = [c.take("<Q") for _ in range(c.take("<I"))]
            ggml_type = c.take("<I")
            c.take("<Q")  # offset
            tensors[name] = (tuple(reversed(dims)), ggml_type)
    except (EOFError, struct.error, ValueError) as exc:
        raise ModelError(f"{p}: the GGUF header is truncated or corrupt ({exc or 'ends early'})",
                         hint="download the file again") from None
    return GGUFHeader(p, meta, types, tensors)

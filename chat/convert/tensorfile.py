"""Reading and writing ``.safetensors`` with numpy alone.

The format is an 8-byte little-endian header length, a JSON header (name → dtype, shape,
byte offsets) and the raw data. Reading it by hand means bf16 checkpoints (most
published models) work without torch, and a tensor is only read from disk when it is
asked for, so converting a model never holds it twice.
Pickle checkpoints (``*.bin``, ``*.pt``) are never opened: unpickling runs code.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chat.errors import ModelError

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits; widened to float32 on read
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NUMPY_TO_ST = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<f8"): "F64"}

PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_DAMAGED = "the file is damaged or incomplete; download or save it again"


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


class SafetensorsFile:
    """One ``.safetensors`` file: its header now, tensor data on demand."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from chat.parts.files import open_regular

        self.path = Path(path)
        with open_regular(self.path, "safetensors file", ModelError) as f:  # a pipe would block forever
            try:
                raw = f.read(8)
                if len(raw) < 8:
                    raise ValueError("file is shorter than its header length")
                (n,) = struct.unpack("<Q", raw)
                size = os.fstat(f.fileno()).st_size
                if n > size - 8:
                    raise ValueError("header length runs past the end of the file")
                header = json.loads(f.read(n))
            except (OSError, ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError included
                raise ModelError(
                    f"{self.path}: not a readable safetensors file ({_first_line(exc)})", _DAMAGED
                ) from None
        if not isinstance(header, dict):
            raise ModelError(
                f"{self.path}: the safetensors header is a JSON {type(header).__name__}, not an object", _DAMAGED
            )
        metadata = header.pop("__metadata__", None) or {}
        self.metadata: dict[str, str] = metadata if isinstance(metadata, dict) else {}
        self.entries: dict[str, TensorEntry] = {
            name: self._entry(name, info, 8 + n, size) for name, info in header.items()
        }

    def _entry(self, name: str, info: Any, base: int, size: int) -> TensorEntry:
        """One header entry, checked: a dtype string, a shape of counts, offsets inside the file."""
        where = f"{self.path}: tensor {name}"
        if not isinstance(info, dict):
            raise ModelError(f"{where}: its header entry is not an object", _DAMAGED)
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str):
            raise ModelError(f"{where}: no dtype in its header entry", _DAMAGED)
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise ModelError(f"{where}: shape {shape!r} is not a list of sizes", _DAMAGED)
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(map(_is_count, offsets))
            and offsets[0] <= offsets[1]
        ):
            raise ModelError(f"{where}: data_offsets {offsets!r} are not two increasing byte offsets", _DAMAGED)
        entry = TensorEntry(self.path, name, dtype, tuple(shape), base + offsets[0], base + offsets[1])
        if entry.end > size:
            raise ModelError(f"{where} runs past the end of the file (truncated download?)", _DAMAGED)
        return entry

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def raw(self, name: str) -> np.ndarray:
        """The tensor as stored (bf16 as uint16 bits), read into a new array.

        Read with ``fromfile`` rather than through a memory map: mapped pages would
        count as this process's memory until the whole model had been read.
        """
        e = self.entries[name]
        dtype = _DTYPES.get(e.dtype)
        if dtype is None:
            raise ModelError(f"{self.path}: tensor {name} has dtype {e.dtype}, which the converter cannot read")
        count = (e.end - e.start) // dtype.itemsize
        if count != int(np.prod(e.shape, dtype=np.int64)):
            raise ModelError(f"{self.path}: tensor {name}: {e.end - e.start} bytes do not hold shape {e.shape}")
        return np.fromfile(self.path, dtype=dtype, count=count, offset=e.start).reshape(e.shape)

    def float32(self, name: str) -> np.ndarray:
        """The tensor as a float32 array of its own."""
        e = self.entries[name]
        a = self.raw(name)
        if e.dtype == "BF16":
            return (a.astype(np.uint32) << 16).view(np.float32)
        return a if a.dtype == np.float32 else a.astype(np.float32)

    def first_non_finite(self) -> str | None:
        """The first float tensor holding a NaN or an infinity, read through a read-only memory map.

        NaN weights are not an error any loader reports: they make every answer empty.
        """
        for name, e in self.entries.items():
            dtype = _DTYPES.get(e.dtype)
            if dtype is None or (dtype.kind != "f" and e.dtype != "BF16") or e.end == e.start:
                continue
            count = (e.end - e.start) // dtype.itemsize
            values = np.memmap(self.path, dtype=dtype, mode="r", offset=e.start, shape=(count,))
            if e.dtype == "BF16":  # exponent bits all ones: NaN or ±Inf
                bad = bool(((values & 0x7F80) == 0x7F80).any())
            else:
                with np.errstate(all="ignore"):  # the NaN being looked for must not print a RuntimeWarning
                    bad = not (np.isfinite(values.min()) and np.isfinite(values.max()))
            del values
            if bad:
                return name
        return None

    def close(self) -> None:
        """Nothing stays open between reads; kept so callers can say when they are done."""


class TensorSet:
    """All tensors of a model folder across its safetensors shards."""

    def __init__(self, files: list[Path]) -> None:
        self.files = [SafetensorsFile(p) for p in files]
        self._where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for name in f.entries:
                self._where[name] = f

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def entry(self, name: str) -> TensorEntry:
        return self._where[name].entries[name]

    def float32(self, name: str) -> np.ndarray:
        return self._where[name].float32(name)

    def close(self) -> None:
        for f in self.files:
            f.close()


def safetensors_files(model_dir: str | os.PathLike[str], what: str = "model") -> list[Path]:
    """The weight files of a model folder, refusing pickle-only checkpoints with a clear message."""
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        from chat.parts.files import open_regular

        try:
            with open_regular(index, "shard index", ModelError) as fh:
                weight_map = json.loads(fh.read().decode("utf-8"))["weight_map"]
            files = sorted({d / f for f in weight_map.values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise ModelError(f"{index}: cannot read the shard index ({_first_line(exc)})", _DAMAGED) from None
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelError(
                f"{d}: shard {missing[0]} named in model.safetensors.index.json is missing", hint="finish the download"
            )
        return files
    files = sorted(p for p in d.glob("*.safetensors") if p.name != "adapter_model.safetensors")
    if files:
        return files
    pickles = sorted(p.name for pat in PICKLE_PATTERNS for p in d.glob(pat))
    if pickles:
        raise ModelError(
            f"{d}: the {what} weights are only in pickle format ({', '.join(pickles[:3])}); "
            "refusing to load them, because unpickling a file can run arbitrary code",
            hint="get the safetensors version of this checkpoint, or convert it yourself in a "
            "sandbox you trust (transformers: model.save_pretrained(dir, safe_serialization=True))",
        )
    raise ModelError(f"{d}: no *.safetensors weight files here")


def write_safetensors(
    path: str | os.PathLike[str], tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write float tensors as a ``.safetensors`` file that torch/safetensors/peft load."""
    path = Path(path)
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    arrays: list[np.ndarray] = []
    for name, arr in tensors.items():
        a = np.ascontiguousarray(arr)
        dtype = _NUMPY_TO_ST.get(a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype)
        if dtype is None:
            raise ValueError(f"{name}: cannot store dtype {a.dtype}")
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a.astype(a.dtype.newbyteorder("<"), copy=False))
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())
    return path

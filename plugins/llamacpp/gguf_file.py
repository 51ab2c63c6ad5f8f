"""Reading and checking a GGUF file's header before llama.cpp sees it.

llama.cpp aborts the whole process on some malformed files, and on others it
fails with a message only its log shows. Reading the header here first turns the
common problems (missing file, not a GGUF, truncated download, an architecture
this llama.cpp cannot run, an adapter passed as a model) into one ModelError.
The reader walks the header with ``struct`` over an ``mmap``: it skips the big
arrays (the tokenizer's vocabulary) without building Python objects for them,
so a model with a 150k-token vocabulary is checked in milliseconds.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chat.errors import ModelError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types (gguf.GGUFValueType): code -> struct format (None: variable size).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9

# Architectures in gguf's list that are not text models llama.cpp can chat with.
_NOT_CHAT_MODELS = {"clip"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # relative to the start of the data section
    n_bytes: int


@dataclass(frozen=True)
class GGUFHeader:
    """What the header says: metadata scalars and strings (arrays only by length), and the tensors."""

    path: Path
    version: int
    file_size: int
    metadata: dict[str, Any]
    array_lengths: dict[str, int]
    tensors: tuple[TensorInfo, ...] = field(repr=False)
    data_start: int = 0

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def chat_template(self) -> str | None:
        value = self.metadata.get("tokenizer.chat_template")
        return value if isinstance(value, str) and value.strip() else None

    def arch_value(self, key: str, default: Any = None) -> Any:
        """``{architecture}.{key}``, e.g. ``context_length``."""
        return self.metadata.get(f"{self.architecture}.{key}", default)


class _Truncated(Exception):
    pass


class _Reader:
    def __init__(self, buf: mmap.mmap | bytes) -> None:
        self.buf = buf
        self.pos = 0
        self.size = len(buf)

    def need(self, n: int) -> None:
        if self.pos + n > self.size:
            raise _Truncated

    def scalar(self, fmt: str) -> Any:
        n = struct.calcsize("<" + fmt)
        self.need(n)
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, keep: bool = True) -> str | None:
        n = self.scalar("Q")
        self.need(n)
        start = self.pos
        self.pos += n
        if not keep:
            return None
        return bytes(self.buf[start : start + n]).decode("utf-8", errors="replace")

    def value(self, vtype: int, keep: bool = True) -> tuple[Any, int | None]:
        """(value, array length or None); arrays are skipped, not built."""
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype]), None
        if vtype == _STRING:
            return self.string(keep), None
        if vtype == _ARRAY:
            etype = self.scalar("I")
            count = self.scalar("Q")
            if etype in _SCALARS:
                n = struct.calcsize("<" + _SCALARS[etype]) * count
                self.need(n)
                self.pos += n
            elif etype == _STRING:
                buf, pos, size = self.buf, self.pos, self.size
                unpack = struct.unpack_from
                for _ in range(count):
                    if pos + 8 > size:
                        raise _Truncated
                    (n,) = unpack("<Q", buf, pos)
                    pos += 8 + n
                if pos > size:
                    raise _Truncated
                self.pos = pos
            elif etype == _ARRAY:
                for _ in range(count):
                    self.value(_ARRAY, keep=False)
            else:
                raise ValueError(f"unknown metadata array type {etype}")
            return None, count
        raise ValueError(f"unknown metadata value type {vtype}")


def read_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Parse the header of ``path``; raise ModelError naming the problem."""
    p = Path(path).expanduser()
    where = str(p)
    if not p.exists():
        raise ModelError(f"{where}: no such file", "check the path, or pass a model id your backends know")
    if p.is_dir():
        raise ModelError(f"{where}: is a folder, not a GGUF file", "pass the .gguf file inside it")
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            if size < 4 or fh.read(4) != GGUF_MAGIC:
                raise ModelError(
                    f"{where}: not a GGUF file (it does not start with the GGUF magic bytes)",
                    "llama.cpp loads .gguf files; convert the model with llama.cpp's convert_hf_to_gguf.py",
                )
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise ModelError(f"{where}: cannot read the file ({exc.strerror or exc})", "check its permissions") from None
    try:
        return _parse(p, buf, size)
    except _Truncated:
        raise ModelError(
            f"{where}: truncated: the file ends inside its header ({size} bytes)",
            "the download is incomplete; download the file again",
        ) from None
    except (ValueError, UnicodeDecodeError, struct.error, OverflowError) as exc:
        raise ModelError(f"{where}: corrupt GGUF header ({exc})", "download or convert the file again") from None
    finally:
        buf.close()


def _parse(path: Path, buf: mmap.mmap, size: int) -> GGUFHeader:
    r = _Reader(buf)
    r.pos = 4
    version = r.scalar("I")
    if version > 0xFFFF:
        raise ValueError("big-endian GGUF files are not supported")
    if version < 2:
        raise ValueError(f"GGUF version {version} is too old; llama.cpp reads versions 2 and 3")
    if version > 3:
        raise ValueError(f"GGUF version {version} is newer than this reader knows")
    n_tensors = r.scalar("Q")
    n_kv = r.scalar("Q")
    # Every tensor or key takes at least 8 bytes: counts beyond that are garbage, not a huge model.
    if n_tensors > size // 8 or n_kv > size // 8:
        raise ValueError(f"implausible counts ({n_tensors} tensors, {n_kv} keys)")
    metadata: dict[str, Any] = {}
    arrays: dict[str, int] = {}
    for _ in range(n_kv):
        key = r.string()
        vtype = r.scalar("I")
        value, count = r.value(vtype)
        if count is None:
            metadata[key] = value
        else:
            arrays[key] = count
    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.scalar("I")
        if n_dims > 8:
            raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
        shape = tuple(r.scalar("Q") for _ in range(n_dims))
        ggml_type = r.scalar("I")
        offset = r.scalar("Q")
        tensors.append(TensorInfo(name, shape, ggml_type, offset, _tensor_bytes(name, shape, ggml_type)))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT) or DEFAULT_ALIGNMENT)
    data_start = (r.pos + alignment - 1) // alignment * alignment
    return GGUFHeader(path, version, size, metadata, arrays, tuple(tensors), data_start)


def _tensor_bytes(name: str, shape: tuple[int, ...], ggml_type: int) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        qtype = GGMLQuantizationType(ggml_type)
        block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise ValueError(f"tensor {name!r} has an unknown data type ({ggml_type})") from None
    n = 1
    for d in shape:
        n *= d
    if shape and shape[0] % block:
        raise ValueError(f"tensor {name!r}: row of {shape[0]} values does not fit {qtype.name} blocks of {block}")
    return n // block * type_size


def check_model_file(path: str | os.PathLike[str]) -> GGUFHeader:
    """Read the header and check that llama.cpp can load it as a chat model; raise ModelError if not."""
    header = read_header(path)
    where = str(header.path)
    arch = header.architecture
    kind = str(header.metadata.get("general.type", "model"))
    if kind == "adapter":
        raise ModelError(
            f"{where}: is a {header.metadata.get('adapter.type', 'LoRA')} adapter, not a model",
            "load a base model with -m and attach the adapter through a persona card's [[adapters]]",
        )
    if arch == "controlvector" or "controlvector.layer_count" in header.metadata:
        raise ModelError(f"{where}: is a control vector, not a model", "attach it through a persona card's [[steering]]")
    if not arch:
        raise ModelError(f"{where}: the file has no general.architecture key", "convert the model again with a current llama.cpp")
    if arch not in supported_architectures():
        raise ModelError(
            f"{where}: unsupported architecture {arch!r}",
            "this llama.cpp (llama-cpp-python 0.3.36) cannot run it; try a newer llama-cpp-python or another backend",
        )
    if "tokenizer.ggml.model" not in header.metadata or "tokenizer.ggml.tokens" not in header.array_lengths:
        raise ModelError(f"{where}: the file has no tokenizer", "convert the model again including its tokenizer")
    end = header.data_start + max((t.offset + t.n_bytes for t in header.tensors), default=0)
    if end > header.file_size:
        missing = end - header.file_size
        raise ModelError(
            f"{where}: truncated: the tensors need {end} bytes but the file has {header.file_size} ({missing} missing)",
            "the download is incomplete; download the file again",
        )
    if not header.tensors:
        raise ModelError(f"{where}: the file holds no tensors (vocabulary-only GGUF?)", "pass a model file with weights")
    return header


def supported_architectures() -> frozenset[str]:
    """The architectures gguf (the writer llama.cpp ships with) knows, less the non-chat ones."""
    from gguf.constants import MODEL_ARCH_NAMES

    return frozenset(MODEL_ARCH_NAMES.values()) - _NOT_CHAT_MODELS

"""The one GGUF header reader: models, LoRA adapters and control vectors, for every backend and converter.

Some malformed files abort the whole process inside ggml, others make llama.cpp refuse
them with a reason only its log shows. The header is read with ``struct`` over an
``mmap``: arrays such as a 150k-token vocabulary are skipped, not built (gguf's own
``GGUFReader`` takes seconds on big vocabularies), so a file is described and checked in
milliseconds, without importing llama_cpp or torch. The numbers of a part are checked too
(NaN and infinities give empty answers, not errors), through the same map.

Shapes are kept in GGUF order (``ne``: the fastest-varying dimension first), which is
the reverse of numpy's: a numpy ``(out, in)`` weight is ``(in, out)`` here, a LoRA ``A``
of numpy shape ``(r, in)`` is ``(in, r)`` and ``B`` ``(out, r)`` is ``(r, out)``.
"""

from __future__ import annotations

import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from chat.errors import AdapterError, ChatError
from chat.parts.files import mapped

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# gguf.GGUFValueType codes → struct format (strings and arrays are handled apart).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
TYPE_NAMES = {
    0: "uint8",
    1: "int8",
    2: "uint16",
    3: "int16",
    4: "uint32",
    5: "int32",
    6: "float32",
    7: "bool",
    8: "string",
    9: "array",
    10: "uint64",
    11: "int64",
    12: "float64",
}
_STRING, _ARRAY = 8, 9
FLOAT32 = 6  # the value type adapter.lora.alpha must have
GGML_F32, GGML_F16 = 0, 1

#: ggml types llama.cpp's CPU backend can multiply: those with a ``vec_dot`` in ggml-cpu's type traits
#: (F32 0, F16 1, BF16 30, Q4_0 2, Q4_1 3, Q5_0 6, Q5_1 7, Q8_0 8, Q2_K…Q6_K 10-14, the IQ types 16-23 and 29,
#: TQ1_0 34, TQ2_0 35, MXFP4 39, NVFP4 40, Q1_0 41). The others — I8, I16, I32, I64, F64 and the
#: activation-only Q8_1/Q8_K — have none: a LoRA or projection weight of such a type is accepted at load and
#: kills the process at the first matmul (SIGSEGV or abort; measured for every type on llama-cpp-python 0.3.36).
MATMUL_TYPES = frozenset(
    {0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 16, 17, 18, 19, 20, 21, 22, 23, 29, 30, 34, 35, 39, 40, 41}
)

#: A layer number in a tensor name: ASCII digits only ("²".isdigit() is True but int("²") fails).
LAYER_NUMBER = re.compile(r"[0-9]+")


def type_name(ggml_type: int) -> str:
    """``F32``, ``Q8_0``, ``I32`` … for messages."""
    from gguf.constants import GGMLQuantizationType

    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


# --- the header ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]  # GGUF order (ne)
    ggml_type: int
    offset: int  # from the start of the data section
    n_bytes: int


@dataclass(frozen=True)
class Header:
    """A GGUF header: scalar/string metadata with each key's value type, array lengths, tensors."""

    path: Path
    file_size: int
    metadata: dict[str, Any]
    value_types: dict[str, int]
    array_lengths: dict[str, int]
    tensors: dict[str, Tensor] = field(repr=False)
    data_start: int = 0
    duplicate_tokens: int = 0  # vocabulary entries that repeat an earlier one

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def data_end(self) -> int:
        """Where the last tensor's data ends; more than ``file_size`` means the file is truncated."""
        return self.data_start + max((t.offset + t.n_bytes for t in self.tensors.values()), default=0)

    @property
    def chat_template(self) -> str | None:
        value = self.metadata.get("tokenizer.chat_template")
        return value if isinstance(value, str) and value.strip() else None

    def arch_int(self, key: str) -> int | None:
        value = self.metadata.get(f"{self.architecture}.{key}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        return int(value)


_U64 = struct.Struct("<Q")


class TruncatedHeader(Exception):
    """The file ends inside its GGUF header."""


class _Reader:
    def __init__(self, buf: Any) -> None:
        self.buf, self.pos, self.size = buf, 0, len(buf)

    def take(self, fmt: str) -> Any:
        n = struct.calcsize("<" + fmt)
        if self.pos + n > self.size:
            raise TruncatedHeader
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > self.size:
            raise TruncatedHeader
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_array(self, distinct: set[bytes] | None = None) -> int:
        """Step over an array; with ``distinct``, collect a string array's items into it (duplicate check)."""
        etype, count = self.take("I"), self.take("Q")
        if etype in _SCALARS:
            n = struct.calcsize("<" + _SCALARS[etype]) * count
            if self.pos + n > self.size:
                raise TruncatedHeader
            self.pos += n
        elif etype == _STRING:  # the hot loop of a 262k-token vocabulary: kept to the bare minimum
            buf, pos, size, length = self.buf, self.pos, self.size, _U64.unpack_from
            add = distinct.add if distinct is not None else None
            for _ in range(count):
                if pos + 8 > size:
                    raise TruncatedHeader
                start = pos + 8
                pos = start + length(buf, pos)[0]
                if add is not None:  # llama.cpp reads these as C strings: text after a NUL does not count
                    add(buf[start:pos].partition(b"\0")[0])
            if pos > size:
                raise TruncatedHeader
            self.pos = pos
        elif etype == _ARRAY:  # llama.cpp reads no nested arrays; a deep nest would exhaust Python's stack
            raise ValueError("nested metadata arrays are not supported")
        else:
            raise ValueError(f"unknown metadata array type {etype}")
        return count


#: What to do about a file that is not a GGUF at all, by the kind of file it was meant to be.
_CONVERT_HINTS = {
    "model": "llama.cpp loads .gguf files; convert the model with llama.cpp's convert_hf_to_gguf.py "
    "(or `chat convert model`)",
    "adapter": "convert it with llama.cpp's convert_lora_to_gguf.py or `chat convert adapter`",
    "control vector": "generate it with llama.cpp's cvector-generator",
}
_AGAIN = "the file is incomplete or damaged; copy, download or convert it again"


def read_header(path: str | os.PathLike[str], what: str = "file", error: type[ChatError] = AdapterError) -> Header:
    """Parse ``path``'s GGUF header; any problem is one ``error`` (AdapterError by default) naming the file.

    ``what`` ("model", "adapter", "control vector" …) says in messages what the file was meant to be.
    Truncated files are refused here, before anything reads past their end.
    """
    p = Path(path)
    with mapped(p, what, error) as (buf, size):
        if size < 4 or bytes(buf[:4]) != MAGIC:
            raise error(
                f"{p}: not a GGUF file (it does not start with the GGUF magic bytes)",
                _CONVERT_HINTS.get(what, "pass a GGUF file"),
            )
        try:
            header = parse_header(p, buf, size)
        except TruncatedHeader:
            raise error(f"{p}: truncated: the file ends inside its header ({size} bytes)", _AGAIN) from None
        except (ValueError, UnicodeDecodeError, struct.error, OverflowError, RecursionError) as exc:
            raise error(f"{p}: corrupt GGUF header ({exc})", _AGAIN) from None
    end = header.data_end
    if end > size:
        raise error(
            f"{p}: truncated: its tensors need {end} bytes but the file has {size} ({end - size} missing)", _AGAIN
        )
    return header


def first_non_finite(header: Header) -> str | None:
    """The first tensor holding a NaN or an infinity, read through an mmap (adapters and vectors are small).

    A NaN weight or direction is not an error llama.cpp reports: every logit becomes NaN
    and the answer is empty. Types numpy cannot decode (none llama.cpp writes for
    adapters or vectors) are skipped.
    """
    with mapped(header.path, "file") as (buf, _):
        for t in header.tensors.values():
            raw = np.frombuffer(buf, dtype=np.uint8, count=t.n_bytes, offset=header.data_start + t.offset)
            bad = _has_non_finite(raw, t.ggml_type)
            del raw  # no view may outlive the map
            if bad:
                return t.name
    return None


def _has_non_finite(raw: np.ndarray, ggml_type: int) -> bool:
    """min/max propagate NaN and show ±Inf without a temporary as large as the tensor."""
    if raw.size == 0:
        return False
    with np.errstate(all="ignore"):  # the NaN being looked for must not print a RuntimeWarning
        if ggml_type in (GGML_F32, GGML_F16):
            values = raw.view(np.float32 if ggml_type == GGML_F32 else np.float16)
        else:
            from gguf.constants import GGMLQuantizationType
            from gguf.quants import dequantize

            try:
                values = dequantize(raw, GGMLQuantizationType(ggml_type))
            except (NotImplementedError, ValueError):
                return False
        return not (math.isfinite(float(values.min())) and math.isfinite(float(values.max())))


def parse_header(path: Path, buf: Any, size: int) -> Header:
    """Walk a GGUF header in ``buf`` (skipping big arrays); raise TruncatedHeader, ValueError or struct.error."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    r = _Reader(buf)
    r.pos = 4
    version = r.take("I")
    if not 2 <= version <= 3:
        raise ValueError(f"GGUF version {version} is not one llama.cpp reads")
    n_tensors, n_kv = r.take("Q"), r.take("Q")
    if n_tensors > size // 8 or n_kv > size // 8:
        raise ValueError(f"implausible counts ({n_tensors} tensors, {n_kv} keys)")
    metadata: dict[str, Any] = {}
    types: dict[str, int] = {}
    arrays: dict[str, int] = {}
    duplicate_tokens = 0
    for _ in range(n_kv):
        key = r.string()
        vtype = r.take("I")
        types[key] = vtype
        if vtype in _SCALARS:
            metadata[key] = r.take(_SCALARS[vtype])
        elif vtype == _STRING:
            metadata[key] = r.string()
        elif vtype == _ARRAY and key == "tokenizer.ggml.tokens":
            distinct: set[bytes] = set()
            arrays[key] = r.skip_array(distinct)
            duplicate_tokens = arrays[key] - len(distinct)  # llama.cpp asserts (aborts) on a repeated token
        elif vtype == _ARRAY:
            arrays[key] = r.skip_array()
        else:
            raise ValueError(f"key {key!r} has an unknown value type {vtype}")
    tensors: dict[str, Tensor] = {}
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.take("I")
        if n_dims > 8:
            raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
        shape = tuple(r.take("Q") for _ in range(n_dims))
        ggml_type, offset = r.take("I"), r.take("Q")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise ValueError(f"tensor {name!r} has an unknown data type ({ggml_type})") from None
        count = math.prod(shape)  # Python ints: a hostile shape cannot overflow (numpy would warn and wrap)
        if shape and shape[0] % block:
            raise ValueError(f"tensor {name!r}: rows of {shape[0]} values do not fit blocks of {block}")
        tensors[name] = Tensor(name, shape, ggml_type, offset, count // block * type_size)
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT) or DEFAULT_ALIGNMENT)
    if alignment < 1 or alignment & (alignment - 1):  # llama.cpp refuses these too; here they would misplace data
        raise ValueError(f"general.alignment {alignment} is not a power of two")
    data_start = (r.pos + alignment - 1) // alignment * alignment
    return Header(path, size, metadata, types, arrays, tensors, data_start, duplicate_tokens)


def tensor_values(buf: Any, header: Header, t: Tensor) -> np.ndarray:
    """The values of tensor ``t`` as a float32 copy in numpy order (``ne`` reversed), read from the mapped file.

    F32 and F16 are viewed directly, other types dequantized with gguf; the copy keeps no view of the map.
    """
    shape = tuple(reversed(t.shape))
    if t.ggml_type in (GGML_F32, GGML_F16):
        dtype = np.float32 if t.ggml_type == GGML_F32 else np.float16
        raw = np.frombuffer(
            buf, dtype=dtype, count=t.n_bytes // np.dtype(dtype).itemsize, offset=header.data_start + t.offset
        )
        values = raw.astype(np.float32).reshape(shape)
    else:
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        raw = np.frombuffer(buf, dtype=np.uint8, count=t.n_bytes, offset=header.data_start + t.offset)
        values = np.array(dequantize(raw, GGMLQuantizationType(t.ggml_type)), dtype=np.float32).reshape(shape)
    del raw  # no view may outlive the map
    return values

"""Reading and checking GGUF parameter parts (LoRA adapters, control vectors) against a base model.

Some malformed adapter files abort the whole process inside ggml (an
``adapter.lora.alpha`` that is not float32), others make llama.cpp refuse them
with a reason only its log shows. Everything here reads the GGUF *header* with
``struct`` over an ``mmap`` (arrays such as a 150k-token vocabulary are skipped,
not built), so a part can be described and checked in milliseconds, before any
backend sees it, and without importing llama_cpp or torch. The numbers of a part are
checked too (NaN and infinities give empty answers, not errors), through the same mmap,
and only regular files are ever opened: a named pipe given as a path would block forever.

Shapes are kept in GGUF order (``ne``: the fastest-varying dimension first), which
is the reverse of numpy's: a numpy ``(out, in)`` weight is ``(in, out)`` here, a
LoRA ``A`` of numpy shape ``(r, in)`` is ``(in, r)`` and ``B`` ``(out, r)`` is ``(r, out)``.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import re
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from chat.errors import AdapterError, ChatError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# gguf.GGUFValueType codes → struct format (strings and arrays are handled apart).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32", 7: "bool",
               8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64"}
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6
GGML_F32, GGML_F16 = 0, 1

LORA_SUFFIXES = (".lora_a", ".lora_b")

#: ggml types llama.cpp's CPU backend can multiply: those with a ``vec_dot`` in ggml-cpu's type traits
#: (F32 0, F16 1, BF16 30, Q4_0 2, Q4_1 3, Q5_0 6, Q5_1 7, Q8_0 8, Q2_K…Q6_K 10-14, the IQ types 16-23 and 29,
#: TQ1_0 34, TQ2_0 35, MXFP4 39, NVFP4 40, Q1_0 41). The others — I8, I16, I32, I64, F64 and the
#: activation-only Q8_1/Q8_K — have none: a LoRA or projection weight of such a type is accepted at load and
#: kills the process at the first matmul (SIGSEGV or abort; measured for every type on llama-cpp-python 0.3.36).
MATMUL_TYPES = frozenset({0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 16, 17, 18, 19, 20, 21, 22, 23,
                          29, 30, 34, 35, 39, 40, 41})

#: A layer number in a tensor name: ASCII digits only ("²".isdigit() is True but int("²") fails).
LAYER_NUMBER = re.compile(r"[0-9]+")


def type_name(ggml_type: int) -> str:
    """``F32``, ``Q8_0``, ``I32`` … for messages."""
    from gguf.constants import GGMLQuantizationType

    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


# --- opening files from strangers ----------------------------------------------------------------

_NOT_REGULAR = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
                (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _kind(mode: int) -> str:
    return next((what for test, what in _NOT_REGULAR if test(mode)), "not a regular file")


def open_regular(path: str | os.PathLike[str], what: str = "file", error: type[ChatError] = AdapterError) -> IO[bytes]:
    """Open ``path`` for reading if it is a regular file; anything else is an ``error``, never a wait.

    Opening a named pipe blocks until someone writes to it, and a device may never end: a
    path given as a model, adapter or vector would hang the program. The path is checked
    before opening (nothing else is touched) and the open file again (a swap in between
    cannot slip through); ``O_NONBLOCK`` makes even that open return at once.
    """
    p = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        if not stat.S_ISREG(mode := os.stat(p).st_mode):
            raise _not_regular(p, mode, what, error)
        fd = os.open(p, flags)
    except OSError as exc:
        raise error(f"{p}: cannot read the {what} ({exc.strerror or exc})",
                    "check the path and its permissions") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _not_regular(p, mode, what, error)
    return os.fdopen(fd, "rb")


def _not_regular(p: Path, mode: int, what: str, error: type[ChatError]) -> ChatError:
    return error(f"{p}: the {what} is {_kind(mode)}, not a regular file",
                 "point to a regular file (reading a pipe or a device could wait forever)")


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
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


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
        elif etype == _ARRAY:
            for _ in range(count):
                self.skip_array()
        else:
            raise ValueError(f"unknown metadata array type {etype}")
        return count


def read_header(path: str | os.PathLike[str], what: str = "file", error: type[ChatError] = AdapterError) -> Header:
    """Parse ``path``'s GGUF header; any problem is an ``error`` (AdapterError by default) naming the file."""
    p = Path(path)
    with mapped(p, what, error) as (buf, size):
        if size < 24 or bytes(buf[:4]) != MAGIC:
            raise error(f"{p}: not a GGUF {what} (it does not start with the GGUF magic bytes)",
                        "convert it with llama.cpp's convert_lora_to_gguf.py (adapters) or cvector-generator (vectors)")
        try:
            header = parse_header(p, buf, size)
        except TruncatedHeader:
            raise error(f"{p}: truncated: the {what} ends inside its header ({size} bytes)",
                        "the file is incomplete; copy or convert it again") from None
        except (ValueError, struct.error, OverflowError) as exc:
            raise error(f"{p}: corrupt GGUF header ({exc})", "convert the file again") from None
    if header.data_end > size:
        raise error(
            f"{p}: truncated: its tensors need {header.data_end} bytes but the file has {size}",
            "the file is incomplete; copy or convert it again",
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


# --- the base model -------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseModel:
    """What a part must agree with: the base model's architecture, width, depth and tensor shapes."""

    path: Path
    architecture: str
    n_embd: int
    n_layer: int
    tensors: dict[str, tuple[int, ...]] = field(repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    @classmethod
    def from_header(cls, header: Any) -> "BaseModel":
        """From a :class:`Header` or any header with ``path``, ``architecture``, ``metadata`` and ``tensors``."""
        arch = header.architecture
        md = header.metadata
        tensors = header.tensors.values() if isinstance(header.tensors, dict) else header.tensors
        return cls(
            path=Path(header.path),
            architecture=arch,
            n_embd=int(md.get(f"{arch}.embedding_length", 0) or 0),
            n_layer=int(md.get(f"{arch}.block_count", 0) or 0),
            tensors={t.name: tuple(t.shape) for t in tensors},
        )

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> "BaseModel":
        try:
            return cls.from_header(read_header(path, "model"))
        except AdapterError as exc:  # the base's own problem, not a part's
            from chat.errors import ModelError

            raise ModelError(exc.message, exc.hint) from None


# --- LoRA adapters --------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraInfo:
    """A well-formed LoRA adapter GGUF, as its header describes it."""

    path: Path
    architecture: str
    alpha: float
    pairs: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(repr=False)  # base tensor → (A ne, B ne)
    file_size: int = 0

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.pairs)

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(sorted({a[1] for a, _ in self.pairs.values()}))

    @property
    def rank_text(self) -> str:
        r = self.ranks
        return f"rank {r[0]}" if len(r) == 1 else "ranks " + "/".join(map(str, r))

    def target_kinds(self) -> list[str]:
        """``attn_q``, ``ffn_down`` … : the projections touched, without the layer numbers."""
        kinds = dict.fromkeys(n.split(".")[2] if n.startswith("blk.") and n.count(".") >= 2 else n.removesuffix(".weight") for n in self.pairs)
        return list(kinds)

    def layers(self) -> list[int]:
        parts = (n.split(".") for n in self.pairs)
        return sorted({int(p[1]) for p in parts if len(p) > 2 and p[0] == "blk" and LAYER_NUMBER.fullmatch(p[1])})


def read_lora(path: str | os.PathLike[str]) -> LoraInfo:
    """Read an adapter's header and check what does not depend on a base model."""
    p = Path(path)
    h = read_header(p, "adapter")
    kind = h.metadata.get("general.type")
    if kind != "adapter":
        if h.architecture == "controlvector":
            what = "a control vector: list it under [[steering]]"
        elif kind in (None, "model") and h.arch_int("block_count"):
            what = "a model"
        else:
            what = f"general.type = {kind!r}"
        raise AdapterError(f"{p}: is not a LoRA adapter ({what}; expected general.type = 'adapter')",
                           "[[adapters]] takes adapter GGUFs (convert_lora_to_gguf.py); a model goes to -m")
    if h.metadata.get("adapter.type") != "lora":
        raise AdapterError(f"{p}: adapter.type is {h.metadata.get('adapter.type')!r}, not 'lora'",
                           "only LoRA adapters can be attached")
    vtype = h.value_types.get("adapter.lora.alpha", _FLOAT32)
    if vtype != _FLOAT32:
        raise AdapterError(
            f"{p}: adapter.lora.alpha is stored as {_TYPE_NAMES.get(vtype, vtype)}, llama.cpp needs float32 (it would abort)",
            "write alpha with GGUFWriter.add_float32, or convert the adapter again",
        )
    alpha = float(h.metadata.get("adapter.lora.alpha", 0.0))  # llama.cpp reads a missing alpha as 0
    check_gguf_alpha(alpha, p)
    pairs: dict[str, list] = {}
    for t in h.tensors.values():
        base, dot, suffix = t.name.rpartition(".")
        if not dot or "." + suffix not in LORA_SUFFIXES:
            raise AdapterError(f"{p}: tensor {t.name!r} is not a lora_a/lora_b tensor", "is this a LoRA adapter GGUF?")
        if len(t.shape) != 2:
            raise AdapterError(f"{p}: tensor {t.name!r} has {len(t.shape)} dimensions, LoRA tensors have 2", "convert the adapter again")
        if t.ggml_type not in MATMUL_TYPES:
            raise AdapterError(
                f"{p}: tensor {t.name!r} is stored as {type_name(t.ggml_type)}, which llama.cpp cannot multiply "
                "(it would crash at the first token)",
                "LoRA tensors must be F32, F16, BF16 or a quantized type such as Q8_0; convert the adapter again",
            )
        pairs.setdefault(base, [None, None])[0 if suffix == "lora_a" else 1] = t.shape
    done: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    for base, (a, b) in pairs.items():
        if a is None or b is None:
            missing = "lora_a" if a is None else "lora_b"
            raise AdapterError(f"{p}: {base}.{missing} is missing (the other half of the pair is there)",
                               "the adapter is incomplete; convert it again")
        if a[1] != b[0]:
            raise AdapterError(f"{p}: {base}: lora_a has rank {a[1]} but lora_b has rank {b[0]}", "convert the adapter again")
        done[base] = (a, b)
    if not done:
        raise AdapterError(f"{p}: the adapter holds no tensors", "convert the adapter again")
    bad = first_non_finite(h)
    if bad is not None:
        raise AdapterError(f"{p}: tensor {bad!r} holds NaN or infinite values (the answers would be empty)",
                           "the adapter is damaged or its training diverged; train or convert it again")
    return LoraInfo(p, h.architecture, alpha, done, h.file_size)


def check_gguf_alpha(alpha: float, path: Path) -> None:
    """``adapter.lora.alpha`` must be finite and not negative.

    The one alpha rule, for both backends: llama.cpp scales an adapter by s·α/r and reads
    α = 0 as "no alpha: the user scale s alone" (FACTS.md); a GGUF carried to transformers
    keeps that meaning as α = r. A PEFT ``lora_alpha`` must be a finite number > 0 (checked
    by chat.convert.adapter.load_peft_config, the reader both backends use): PEFT's α = 0
    would switch the adapter off, which no llama.cpp file can say, so it is refused on
    both backends rather than quietly changed (it used to become r or 8 on llama.cpp).
    """
    if not math.isfinite(alpha) or alpha < 0:
        raise AdapterError(f"{path}: adapter.lora.alpha is {alpha}; it must be a finite number ≥ 0",
                           "0 means the user scale alone; convert the adapter again with a real alpha")


def check_lora(info: LoraInfo, base: BaseModel) -> None:
    """Raise AdapterError naming the adapter, the base and what differs, if the adapter does not fit."""
    where = f"{info.path}: does not fit {base.name}"
    if info.architecture != base.architecture:
        raise AdapterError(f"{where}: adapter architecture {info.architecture!r}, base {base.architecture!r}",
                           "use an adapter trained for this base model")
    for name, (a, b) in info.pairs.items():
        w = base.tensors.get(name)
        if w is None:
            raise AdapterError(f"{where}: the base has no tensor {name!r} (the adapter targets it)",
                               "use an adapter trained for this base model")
        if len(w) != 2:
            raise AdapterError(f"{where}: {name} has {len(w)} dimensions in the base, LoRA needs a matrix", "use an adapter made for this base")
        if a[0] != w[0] or b[1] != w[1]:
            rank = a[1]
            raise AdapterError(
                f"{where}: {name} is {w[1]}×{w[0]} in the base but the adapter's B·A is {b[1]}×{a[0]} (rank {rank})",
                "use an adapter trained for this base model (same width and layer sizes)",
            )


# --- control vectors ------------------------------------------------------------------------


@dataclass(frozen=True)
class VectorInfo:
    """A well-formed control vector GGUF: one direction of width ``n_embd`` per layer it lists."""

    path: Path
    model_hint: str
    n_embd: int
    layers: tuple[int, ...]
    file_size: int = 0

    @property
    def layer_text(self) -> str:
        if not self.layers:
            return "no layers"
        lo, hi = self.layers[0], self.layers[-1]
        contiguous = len(self.layers) == hi - lo + 1
        return f"layers {lo}-{hi}" if contiguous else "layers " + ",".join(map(str, self.layers))


def read_vector(path: str | os.PathLike[str]) -> VectorInfo:
    p = Path(path)
    h = read_header(p, "control vector")
    if h.architecture != "controlvector":
        what = "a LoRA adapter" if h.metadata.get("general.type") == "adapter" else f"general.architecture = {h.architecture!r}"
        raise AdapterError(f"{p}: is not a control vector ({what})", "[[steering]] takes llama.cpp control-vector GGUFs (cvector-generator)")
    widths: set[int] = set()
    layers: dict[int, str] = {}
    for t in h.tensors.values():
        il = direction_layer(t.name)
        if il is None:
            raise AdapterError(f"{p}: tensor {t.name!r} is not a direction.N tensor (N in ASCII digits)",
                               "is this a control vector GGUF?")
        if len(t.shape) != 1 or t.ggml_type not in (GGML_F32, GGML_F16):
            raise AdapterError(f"{p}: {t.name} must be a 1-D float32 vector", "generate the vector again")
        if il in layers:
            raise AdapterError(f"{p}: {layers[il]!r} and {t.name!r} both name layer {il}", "generate the vector again")
        widths.add(t.shape[0])
        layers[il] = t.name
    if not layers:
        raise AdapterError(f"{p}: the control vector holds no direction tensors", "generate the vector again")
    if len(widths) > 1:
        raise AdapterError(f"{p}: its directions have different widths ({sorted(widths)})", "generate the vector again")
    bad = first_non_finite(h)
    if bad is not None:
        raise AdapterError(f"{p}: tensor {bad!r} holds NaN or infinite values (the answers would be empty)",
                           "generate the vector again")
    return VectorInfo(p, str(h.metadata.get("controlvector.model_hint", "")), widths.pop(), tuple(sorted(layers)), h.file_size)


def direction_layer(name: str) -> int | None:
    """N of a ``direction.N`` tensor name, or None when it is not one."""
    prefix, _, idx = name.partition(".")
    return int(idx) if prefix == "direction" and LAYER_NUMBER.fullmatch(idx) else None


def check_vector(info: VectorInfo, base: BaseModel) -> None:
    where = f"{info.path}: does not fit {base.name}"
    if info.n_embd != base.n_embd:
        raise AdapterError(f"{where}: the vector is {info.n_embd} wide, the base's embedding is {base.n_embd}",
                           "use a control vector generated for this base model")
    bad = [il for il in info.layers if not 1 <= il < base.n_layer]
    if bad:
        raise AdapterError(
            f"{where}: the vector has layer {bad[0]} but the base has layers 1-{base.n_layer - 1} for vectors ({base.n_layer} blocks)",
            "use a control vector generated for this base model",
        )


def read_directions(path: str | os.PathLike[str]) -> dict[int, np.ndarray]:
    """The vector's directions as float32 arrays, by layer (call after :func:`read_vector`)."""
    h = read_header(path, "control vector")
    out: dict[int, np.ndarray] = {}
    with mapped(h.path, "control vector") as (buf, _):
        for t in h.tensors.values():
            il = direction_layer(t.name)
            if il is None:
                continue
            dtype = np.float32 if t.ggml_type == GGML_F32 else np.float16
            count = t.n_bytes // np.dtype(dtype).itemsize
            raw = np.frombuffer(buf, dtype=dtype, count=count, offset=h.data_start + t.offset)
            out[il] = raw.astype(np.float32)  # a copy: nothing keeps the map open
            del raw
    return out


def layer_selection(info: VectorInfo, layers: tuple[int, int] | None) -> tuple[int, ...]:
    """The vector's layers inside the inclusive range ``layers`` (all of them when None)."""
    if layers is None:
        return info.layers
    lo, hi = layers
    return tuple(il for il in info.layers if lo <= il <= hi)


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""

"""Reading and checking GGUF parameter parts (LoRA adapters, control vectors) against a base model.

Some malformed adapter files abort the whole process inside ggml (an
``adapter.lora.alpha`` that is not float32), others make llama.cpp refuse them
with a reason only its log shows. Everything here reads the GGUF *header* with
``struct`` over an ``mmap`` (arrays such as a 150k-token vocabulary are skipped,
not built), so a part can be described and checked in milliseconds, before any
backend sees it, and without importing llama_cpp or torch.

Shapes are kept in GGUF order (``ne``: the fastest-varying dimension first), which
is the reverse of numpy's: a numpy ``(out, in)`` weight is ``(in, out)`` here, a
LoRA ``A`` of numpy shape ``(r, in)`` is ``(in, r)`` and ``B`` ``(out, r)`` is ``(r, out)``.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

    def skip_array(self) -> int:
        etype, count = self.take("I"), self.take("Q")
        if etype in _SCALARS:
            n = struct.calcsize("<" + _SCALARS[etype]) * count
            if self.pos + n > self.size:
                raise TruncatedHeader
            self.pos += n
        elif etype == _STRING:
            for _ in range(count):
                n = self.take("Q")
                self.pos += n
                if self.pos > self.size:
                    raise TruncatedHeader
        elif etype == _ARRAY:
            for _ in range(count):
                self.skip_array()
        else:
            raise ValueError(f"unknown metadata array type {etype}")
        return count


def read_header(path: str | os.PathLike[str], what: str = "file", error: type[ChatError] = AdapterError) -> Header:
    """Parse ``path``'s GGUF header; any problem is an ``error`` (AdapterError by default) naming the file."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            if size < 24 or fh.read(4) != MAGIC:
                raise error(f"{p}: not a GGUF {what} (it does not start with the GGUF magic bytes)",
                                   "convert it with llama.cpp's convert_lora_to_gguf.py (adapters) or cvector-generator (vectors)")
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise error(f"{p}: cannot read the {what} ({exc.strerror or exc})", "check the path and its permissions") from None
    try:
        header = parse_header(p, buf, size)
    except TruncatedHeader:
        raise error(f"{p}: truncated: the {what} ends inside its header ({size} bytes)",
                           "the file is incomplete; copy or convert it again") from None
    except (ValueError, struct.error, OverflowError) as exc:
        raise error(f"{p}: corrupt GGUF header ({exc})", "convert the file again") from None
    finally:
        buf.close()
    if header.data_end > size:
        raise error(
            f"{p}: truncated: its tensors need {header.data_end} bytes but the file has {size}",
            "the file is incomplete; copy or convert it again",
        )
    return header


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
    for _ in range(n_kv):
        key = r.string()
        vtype = r.take("I")
        types[key] = vtype
        if vtype in _SCALARS:
            metadata[key] = r.take(_SCALARS[vtype])
        elif vtype == _STRING:
            metadata[key] = r.string()
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
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if shape and shape[0] % block:
            raise ValueError(f"tensor {name!r}: rows of {shape[0]} values do not fit blocks of {block}")
        tensors[name] = Tensor(name, shape, ggml_type, offset, count // block * type_size)
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT) or DEFAULT_ALIGNMENT)
    data_start = (r.pos + alignment - 1) // alignment * alignment
    return Header(path, size, metadata, types, arrays, tensors, data_start)


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
        return sorted({int(n.split(".")[1]) for n in self.pairs if n.startswith("blk.") and n.split(".")[1].isdigit()})


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
    vtype = h.value_types.get("adapter.lora.alpha")
    if vtype is None:
        raise AdapterError(f"{p}: has no adapter.lora.alpha", "convert the adapter again with llama.cpp's convert_lora_to_gguf.py")
    if vtype != _FLOAT32:
        raise AdapterError(
            f"{p}: adapter.lora.alpha is stored as {_TYPE_NAMES.get(vtype, vtype)}, llama.cpp needs float32 (it would abort)",
            "write alpha with GGUFWriter.add_float32, or convert the adapter again",
        )
    pairs: dict[str, list] = {}
    for t in h.tensors.values():
        base, dot, suffix = t.name.rpartition(".")
        if not dot or "." + suffix not in LORA_SUFFIXES:
            raise AdapterError(f"{p}: tensor {t.name!r} is not a lora_a/lora_b tensor", "is this a LoRA adapter GGUF?")
        if len(t.shape) != 2:
            raise AdapterError(f"{p}: tensor {t.name!r} has {len(t.shape)} dimensions, LoRA tensors have 2", "convert the adapter again")
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
    return LoraInfo(p, h.architecture, float(h.metadata["adapter.lora.alpha"]), done, h.file_size)


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
    layers: list[int] = []
    for t in h.tensors.values():
        prefix, _, idx = t.name.partition(".")
        if prefix != "direction" or not idx.isdigit():
            raise AdapterError(f"{p}: tensor {t.name!r} is not a direction.N tensor", "is this a control vector GGUF?")
        if len(t.shape) != 1 or t.ggml_type not in (GGML_F32, GGML_F16):
            raise AdapterError(f"{p}: {t.name} must be a 1-D float32 vector", "generate the vector again")
        widths.add(t.shape[0])
        layers.append(int(idx))
    if not layers:
        raise AdapterError(f"{p}: the control vector holds no direction tensors", "generate the vector again")
    if len(widths) > 1:
        raise AdapterError(f"{p}: its directions have different widths ({sorted(widths)})", "generate the vector again")
    return VectorInfo(p, str(h.metadata.get("controlvector.model_hint", "")), widths.pop(), tuple(sorted(layers)), h.file_size)


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
    with open(h.path, "rb") as fh:
        for t in h.tensors.values():
            fh.seek(h.data_start + t.offset)
            dtype = np.float32 if t.ggml_type == GGML_F32 else np.float16
            arr = np.frombuffer(fh.read(t.n_bytes), dtype=dtype).astype(np.float32)
            out[int(t.name.split(".")[1])] = arr
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

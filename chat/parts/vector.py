"""Control vectors (llama.cpp's cvector GGUF): one reader and one fit check for every backend.

The rules are llama.cpp's own loader's (``common_control_vector_load_one`` in common.cpp), which
refuses the whole file rather than skipping a tensor:

* every tensor is ``direction.N`` with N in ASCII digits, else the file is refused (llama.cpp:
  "invalid/unparsable direction tensor layer index");
* ``direction.0`` is refused: layer 0 has no slot (llama.cpp: "invalid (zero) direction tensor layer index");
* each direction is a 1-D float32 vector, all of one length (llama.cpp refuses non-F32, non-1-D and
  "does not match previous dimensions"), and that length is the base's hidden size
  (``llama_adapter_cvec::apply``: "control vector n_embd does not match model");
* a layer the base does not have (N ≥ its block count) is refused: llama.cpp would drop it
  without a word, and such a vector was made for another (deeper) model;
* NaN or infinite values are refused (every answer would be empty; llama.cpp does not check).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chat.errors import AdapterError
from chat.parts.files import mapped
from chat.parts.gguf import GGML_F32, LAYER_NUMBER, first_non_finite, read_header, type_name
from chat.parts.shape import BaseShape

_AGAIN = "generate the vector again (llama.cpp's cvector-generator)"


@dataclass(frozen=True)
class VectorInfo:
    """A well-formed control vector: one direction of width ``n_embd`` for each layer it lists (all ≥ 1)."""

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


def direction_layer(name: str) -> int | None:
    """N of a ``direction.N`` tensor name, or None when it is not one."""
    prefix, _, idx = name.partition(".")
    return int(idx) if prefix == "direction" and LAYER_NUMBER.fullmatch(idx) else None


def read_vector(path: str | os.PathLike[str]) -> VectorInfo:
    """Read and check a control vector GGUF's header and numbers (no base model needed)."""
    p = Path(path)
    h = read_header(p, "control vector")
    if h.architecture != "controlvector":
        kind = h.metadata.get("general.type")
        what = "a LoRA adapter" if kind == "adapter" else f"general.architecture = {h.architecture!r}"
        raise AdapterError(
            f"{p}: is not a control vector ({what})",
            "[[steering]] takes llama.cpp control-vector GGUFs (cvector-generator)",
        )
    layers: dict[int, str] = {}
    width = 0
    for t in h.tensors.values():
        il = direction_layer(t.name)
        if il is None:
            raise AdapterError(f"{p}: tensor {t.name!r} is not a direction.N tensor (N in ASCII digits)", _AGAIN)
        if il == 0:
            raise AdapterError(
                f"{p}: tensor {t.name!r} is for layer 0, which has no control-vector slot "
                "(directions start at layer 1)",
                _AGAIN,
            )
        if len(t.shape) != 1 or t.ggml_type != GGML_F32:
            raise AdapterError(
                f"{p}: tensor {t.name!r} is a {len(t.shape)}-D {type_name(t.ggml_type)} tensor; "
                "directions are 1-D float32 vectors",
                _AGAIN,
            )
        if il in layers:
            raise AdapterError(f"{p}: {layers[il]!r} and {t.name!r} both name layer {il}", _AGAIN)
        if width and t.shape[0] != width:
            first = next(iter(layers.values()))
            raise AdapterError(f"{p}: tensor {t.name!r} has {t.shape[0]} values but {first!r} has {width}", _AGAIN)
        width = t.shape[0]
        layers[il] = t.name
    if not layers:
        raise AdapterError(f"{p}: the control vector holds no direction tensors", _AGAIN)
    bad = first_non_finite(h)
    if bad is not None:
        raise AdapterError(f"{p}: tensor {bad!r} holds NaN or infinite values (the answers would be empty)", _AGAIN)
    hint = h.metadata.get("controlvector.model_hint", "")
    return VectorInfo(p, str(hint), width, tuple(sorted(layers)), h.file_size)


def check_vector(info: VectorInfo, base: BaseShape) -> None:
    """Raise AdapterError naming the vector, the base and what differs, if the vector does not fit."""
    where = f"{info.path}: does not fit {base.name}"
    if info.n_embd != base.n_embd:
        raise AdapterError(
            f"{where}: direction.{info.layers[0]} has {info.n_embd} values but the base's hidden size is {base.n_embd}",
            "use a control vector generated for this base model",
        )
    bad = [il for il in info.layers if il >= base.n_layer]
    if bad:
        raise AdapterError(
            f"{where}: direction.{bad[0]} is for layer {bad[0]} but the base has layers 1-{base.n_layer - 1} "
            f"for vectors ({base.n_layer} blocks)",
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
            raw = np.frombuffer(buf, dtype=np.float32, count=t.n_bytes // 4, offset=h.data_start + t.offset)
            out[il] = raw.copy()  # nothing keeps the map open
            del raw
    return out


def layer_selection(info: VectorInfo, layers: tuple[int, int] | None) -> tuple[int, ...]:
    """The vector's layers inside the inclusive range ``layers`` (all of them when None)."""
    if layers is None:
        return info.layers
    lo, hi = layers
    return tuple(il for il in info.layers if lo <= il <= hi)

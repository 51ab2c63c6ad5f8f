"""The one reader of llama.cpp LoRA adapter GGUFs, and the check of one against a base model.

The llama.cpp backend runs it before ``llama_adapter_lora_init`` (a non-float32 alpha aborts
the process inside ggml; other mismatches only show in llama.cpp's log), the GGUF → PEFT
converter runs it before converting (so the transformers backend, which converts a card's
GGUF adapter, gives the same verdict), and ``chat personas show`` describes adapters with it.

The alpha rule, the same for GGUF and PEFT (:mod:`chat.parts.peft`): α must be a finite
number > 0. llama.cpp would read a missing or zero ``adapter.lora.alpha`` as "the user
scale alone", which a PEFT folder cannot say (PEFT's α = 0 switches an adapter off), so a
card's adapter would mean different things on the two backends: it is refused on both.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chat.errors import AdapterError
from chat.parts.files import mapped
from chat.parts.gguf import (
    FLOAT32,
    LAYER_NUMBER,
    MATMUL_TYPES,
    TYPE_NAMES,
    first_non_finite,
    read_header,
    tensor_values,
    type_name,
)
from chat.parts.shape import BaseShape

LORA_SUFFIXES = (".lora_a", ".lora_b")

_AGAIN = "convert the adapter again"


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
        kinds = dict.fromkeys(
            n.split(".")[2] if n.startswith("blk.") and n.count(".") >= 2 else n.removesuffix(".weight")
            for n in self.pairs
        )
        return list(kinds)

    def layers(self) -> list[int]:
        parts = (n.split(".") for n in self.pairs)
        return sorted({int(p[1]) for p in parts if len(p) > 2 and p[0] == "blk" and LAYER_NUMBER.fullmatch(p[1])})


def read_lora(path: str | os.PathLike[str]) -> LoraInfo:
    """Read an adapter's header and check everything that does not depend on a base model."""
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
        raise AdapterError(
            f"{p}: is not a LoRA adapter ({what}; expected general.type = 'adapter')",
            "[[adapters]] takes adapter GGUFs (convert_lora_to_gguf.py); a model goes to -m",
        )
    if h.metadata.get("adapter.type") != "lora":
        raise AdapterError(
            f"{p}: adapter.type is {h.metadata.get('adapter.type')!r}, not 'lora'", "only LoRA adapters can be attached"
        )
    vtype = h.value_types.get("adapter.lora.alpha", FLOAT32)
    if vtype != FLOAT32:
        raise AdapterError(
            f"{p}: adapter.lora.alpha is stored as {TYPE_NAMES.get(vtype, vtype)}, llama.cpp needs float32 "
            "(it would abort)",
            "write alpha with GGUFWriter.add_float32, or convert the adapter again",
        )
    if "adapter.lora.alpha" not in h.metadata:
        raise AdapterError(
            f"{p}: adapter.lora.alpha is missing; it must be a finite number > 0",
            "convert the adapter again with its alpha (convert_lora_to_gguf.py writes it)",
        )
    alpha = float(h.metadata["adapter.lora.alpha"])
    check_gguf_alpha(alpha, p)
    pairs: dict[str, list] = {}
    for t in h.tensors.values():
        base, dot, suffix = t.name.rpartition(".")
        if not dot or "." + suffix not in LORA_SUFFIXES:
            raise AdapterError(f"{p}: tensor {t.name!r} is not a lora_a/lora_b tensor", "is this a LoRA adapter GGUF?")
        if len(t.shape) != 2:
            raise AdapterError(f"{p}: tensor {t.name!r} has {len(t.shape)} dimensions, LoRA tensors have 2", _AGAIN)
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
            raise AdapterError(
                f"{p}: {base}.{missing} is missing (the other half of the pair is there)",
                "the adapter is incomplete; convert it again",
            )
        if a[1] != b[0]:
            raise AdapterError(f"{p}: {base}: lora_a has rank {a[1]} but lora_b has rank {b[0]}", _AGAIN)
        done[base] = (a, b)
    if not done:
        raise AdapterError(f"{p}: the adapter holds no tensors", _AGAIN)
    bad = first_non_finite(h)
    if bad is not None:
        raise AdapterError(
            f"{p}: tensor {bad!r} holds NaN or infinite values (the answers would be empty)",
            "the adapter is damaged or its training diverged; train or convert it again",
        )
    return LoraInfo(p, h.architecture, alpha, done, h.file_size)


def check_gguf_alpha(alpha: float, path: Path) -> None:
    """``adapter.lora.alpha`` must be a finite number > 0 (the module docstring says why 0 is refused)."""
    if not math.isfinite(alpha) or alpha <= 0:
        raise AdapterError(
            f"{path}: adapter.lora.alpha is {alpha}; it must be a finite number > 0",
            "convert the adapter again with its real alpha (PEFT's lora_alpha)",
        )


def check_lora(info: LoraInfo, base: BaseShape) -> None:
    """Raise AdapterError naming the adapter, the base and what differs, if the adapter does not fit."""
    where = f"{info.path}: does not fit {base.name}"
    if info.architecture != base.architecture:
        raise AdapterError(
            f"{where}: adapter architecture {info.architecture!r}, base {base.architecture!r}",
            "use an adapter trained for this base model",
        )
    for name, (a, b) in info.pairs.items():
        w = base.tensors.get(name)
        if w is None:
            raise AdapterError(
                f"{where}: the base has no tensor {name!r} (the adapter targets it)",
                "use an adapter trained for this base model",
            )
        if len(w) != 2:
            raise AdapterError(
                f"{where}: {name} has {len(w)} dimensions in the base, LoRA needs a matrix",
                "use an adapter made for this base",
            )
        if a[0] != w[0] or b[1] != w[1]:
            raise AdapterError(
                f"{where}: {name} is {w[1]}×{w[0]} in the base but the adapter's B·A is {b[1]}×{a[0]} (rank {a[1]})",
                "use an adapter trained for this base model (same width and layer sizes)",
            )


def read_lora_tensors(info: LoraInfo) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The adapter's pairs as float32 arrays in PEFT orientation: base tensor → (A (r, in), B (out, r)).

    Call after :func:`read_lora` (which checked every type and number); B rows stay as stored
    (rope-permuted for llama q/k).
    """
    h = read_header(info.path, "adapter")
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with mapped(info.path, "adapter") as (buf, _):
        for name in info.pairs:
            a = tensor_values(buf, h, h.tensors[name + ".lora_a"])
            b = tensor_values(buf, h, h.tensors[name + ".lora_b"])
            out[name] = (a, b)
    return out

"""LoRA adapters between PEFT folders and llama.cpp adapter GGUFs, both ways.

A PEFT adapter is ``adapter_config.json`` + ``adapter_model.safetensors`` with
``base_model.model.<module>.lora_A.weight`` (r, in) and ``lora_B.weight`` (out, r). The
llama.cpp adapter GGUF holds the same matrices as ``<base tensor>.lora_a`` /
``.lora_b`` with ``general.type = adapter``, ``adapter.type = lora`` and
``adapter.lora.alpha`` as float32 (another type aborts llama.cpp). For architectures
whose q/k weights llama.cpp keeps rope-permuted (llama), the rows of ``lora_b`` of q/k
are permuted the same way; ``lora_a`` never is.

Both directions read and check the adapter with the readers the backends use
(:mod:`chat.parts.peft`, :mod:`chat.parts.lora`) against the base (:mod:`chat.parts.shape`),
so a conversion refuses exactly what a backend would, in the same words: a card's PEFT
folder on llama.cpp and its GGUF on transformers go through here.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chat.convert.architecture import (
    LAYER_MODULES,
    Shape,
    gguf_name,
    hf_module_for_gguf,
    permute_qk,
    qk_heads,
    unpermute_qk,
)
from chat.errors import AdapterError
from chat.parts.gguf import MAGIC as GGUF_MAGIC
from chat.parts.lora import LoraInfo, check_lora, read_lora, read_lora_tensors
from chat.parts.peft import PEFT_DEFAULT_ALPHA, check_peft, load_peft_config, natural_key, read_peft, read_peft_tensors
from chat.parts.shape import BaseShape, read_base

#: The old name of :class:`chat.parts.shape.BaseShape`.
BaseModel = BaseShape

BaseLike = str | os.PathLike[str] | dict[str, Any] | BaseShape


def is_gguf_file(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _convertible(base: BaseShape, what: str) -> Shape:
    """The head counts a conversion needs (to rope-permute q/k rows); a base without them is refused."""
    from chat.convert.architecture import GGUF_ARCH_PERMUTES

    if base.architecture not in GGUF_ARCH_PERMUTES:
        raise AdapterError(
            f"{base.source}: base architecture {base.architecture!r} is not supported for {what}",
            hint=f"supported: {', '.join(GGUF_ARCH_PERMUTES)}",
        )
    if not (base.n_head and base.n_layer):
        raise AdapterError(
            f"{base.source}: the base lacks the attention head counts or block count",
            hint="convert the base model again with a current converter",
        )
    return Shape(base.n_layer, base.n_head, base.n_head_kv or base.n_head)


# --------------------------------------------------------------------------------------
# PEFT → GGUF
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvertedAdapter:
    path: Path
    architecture: str
    alpha: float
    ranks: tuple[int, ...]
    n_modules: int


def read_peft_config(peft_dir: Path) -> dict[str, Any]:
    """The checked ``adapter_config.json`` (kept for older callers: :func:`chat.parts.peft.load_peft_config`)."""
    return load_peft_config(peft_dir)


def peft_to_gguf(peft_dir: str | os.PathLike[str], base: BaseLike, out: str | os.PathLike[str]) -> ConvertedAdapter:
    """Convert a PEFT LoRA folder into a llama.cpp adapter GGUF for ``base``."""
    import gguf

    src = Path(peft_dir)
    if not src.is_dir():
        raise AdapterError(
            f"{src}: not a folder", hint="pass a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)"
        )
    info = read_peft(src)
    base_model = read_base(base)
    check_peft(info, base_model)  # the same verdict the transformers backend gives this folder
    shape = _convertible(base_model, "adapter conversion")
    names: dict[str, str] = {}
    for module in info.pairs:
        name = gguf_name(module + ".weight", base_model.architecture, shape.n_layer)
        if name is None:
            raise AdapterError(
                f"{src}: target module {module} has no counterpart in a llama.cpp {base_model.architecture} model",
                hint="use an adapter trained for this base model",
            )
        names[module] = name
    arrays = read_peft_tensors(info)
    tensors: list[tuple[str, np.ndarray]] = []
    for module in sorted(info.pairs, key=natural_key):
        a, b = arrays[module]
        heads = qk_heads(module, shape) if base_model.permutes_qk else None
        if heads:
            b = permute_qk(b, heads)
        tensors.append((names[module] + ".lora_a", np.ascontiguousarray(a, dtype=np.float32)))
        tensors.append((names[module] + ".lora_b", np.ascontiguousarray(b, dtype=np.float32)))
    alpha = info.gguf_alpha

    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    part = out_path.with_name(out_path.name + ".part")
    w = gguf.GGUFWriter(str(part), base_model.architecture)
    w.add_string("general.type", "adapter")
    w.add_name(src.resolve().name)
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(alpha))
    for name, arr in tensors:
        w.add_tensor(name, arr)
    finish_gguf(w, part, out_path)
    return ConvertedAdapter(out_path, base_model.architecture, alpha, info.ranks, len(info.pairs))


# --------------------------------------------------------------------------------------
# GGUF → PEFT
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFAdapter:
    architecture: str
    alpha: float
    #: base tensor name → (lora_a (r, in), lora_b (out, r)) as stored (lora_b still permuted).
    pairs: dict[str, tuple[np.ndarray, np.ndarray]]
    info: LoraInfo | None = None


def read_gguf_adapter(path: str | os.PathLike[str]) -> GGUFAdapter:
    """A llama.cpp LoRA adapter GGUF with its numbers, read and checked as the backends read it."""
    info = read_lora(path)
    return GGUFAdapter(info.architecture, info.alpha, read_lora_tensors(info), info)


def gguf_adapter_to_peft(
    gguf_path: str | os.PathLike[str], base_hf_dir_or_config: BaseLike, out_dir: str | os.PathLike[str]
) -> Path:
    """Write a PEFT folder (adapter_config.json + adapter_model.safetensors) from a llama.cpp adapter.

    The base (a Hugging Face folder, its config.json, or a GGUF) supplies the head counts to
    undo the q/k permutation and the shapes to check every tensor against.
    """
    from chat.convert.tensorfile import write_safetensors

    src = Path(gguf_path)
    info = read_lora(src)
    base = read_base(base_hf_dir_or_config)
    check_lora(info, base)  # the same verdict llama.cpp's backend gives this file on this base
    shape = _convertible(base, "adapter conversion")
    to_module = hf_module_for_gguf(base.architecture, base.n_layer)
    for name in info.pairs:
        if name not in to_module:
            raise AdapterError(
                f"{src}: tensor {name} is not a projection PEFT can adapt",
                hint="the adapter was trained for another base model",
            )
    adapter = GGUFAdapter(info.architecture, info.alpha, read_lora_tensors(info), info)
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    for name in sorted(adapter.pairs, key=natural_key):
        a, b = adapter.pairs[name]
        module = to_module[name]
        heads = qk_heads(module, shape) if base.permutes_qk else None
        if heads:
            b = unpermute_qk(b, heads)
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(a, dtype=np.float32)
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(b, dtype=np.float32)
        ranks[module] = a.shape[0]

    r = Counter(ranks.values()).most_common(1)[0][0]
    rank_pattern = {m: k for m, k in ranks.items() if k != r}
    lora_alpha, alpha_pattern = adapter.alpha, dict[str, float]()  # > 0: checked by read_lora (the one alpha rule)
    suffixes = sorted({m.rsplit(".", 1)[-1] for m in ranks})
    full = {
        f"model.layers.{i}.{s}" for i in range(base.n_layer) for s in LAYER_MODULES if s.rsplit(".", 1)[-1] in suffixes
    }
    targets: list[str] = suffixes if set(ranks) == full else sorted(ranks)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": targets,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


__all__ = [
    "PEFT_DEFAULT_ALPHA",
    "BaseModel",
    "BaseShape",
    "ConvertedAdapter",
    "GGUFAdapter",
    "gguf_adapter_to_peft",
    "is_gguf_file",
    "load_peft_config",
    "natural_key",
    "peft_to_gguf",
    "read_base",
    "read_gguf_adapter",
]


def finish_gguf(writer: Any, part: Path, out_path: Path) -> None:
    """Write ``writer``'s GGUF to ``part``, then move it to ``out_path``: never a half-written file there."""
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(part, out_path)
    except BaseException:
        writer.close()
        part.unlink(missing_ok=True)
        raise

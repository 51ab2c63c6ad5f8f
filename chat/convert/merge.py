"""A persona's weighted LoRA adapters as one adapter, exactly: for engines that apply one per request (vLLM).

LoRA deltas add: ``Σ sᵢ·(αᵢ/rᵢ)·Bᵢ·Aᵢ``. Stacking the Aᵢ as rows and the scaled Bᵢ as columns gives
one pair whose product is that sum, with no approximation; every target is padded with zeros to one
rank R and alpha is set to R, so the merged adapter runs at scale 1 with its weights baked in.
llama.cpp adapter GGUFs are read and checked by the backends' own reader (:mod:`chat.parts.lora`);
a PEFT folder is converted first (``chat convert adapter``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chat.convert.adapter import finish_gguf
from chat.errors import AdapterError
from chat.persona import Persona


@dataclass(frozen=True)
class MergedAdapter:
    path: Path
    rank: int
    targets: int
    parts: int


def merge_adapters(persona: Persona, out: str | os.PathLike[str]) -> MergedAdapter:
    """Write ``persona``'s adapters, at their scales, as one llama.cpp adapter GGUF at ``out``."""
    import gguf

    from chat.convert.adapter import is_gguf_file, read_gguf_adapter

    if not persona.adapters:
        raise AdapterError(f"{persona.label} has no LoRA adapters to merge", "add [[adapters]] to the card")
    pairs: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    arch: str | None = None
    for part in persona.adapters:
        if not is_gguf_file(part.path):
            raise AdapterError(
                f"{part.path}: a PEFT folder; merging reads llama.cpp adapter GGUFs",
                f"convert it first: chat convert adapter {part.path} --base BASE -o {part.name}.gguf",
            )
        adapter = read_gguf_adapter(part.path)
        if arch is not None and adapter.architecture != arch:
            raise AdapterError(f"{part.path}: a {adapter.architecture} adapter, the others are {arch}")
        arch = adapter.architecture
        for name, (a, b) in adapter.pairs.items():
            factor = part.scale * adapter.alpha / a.shape[0]
            pairs.setdefault(name, []).append((a, b * np.float32(factor)))
    assert arch is not None  # at least one adapter was read
    rank = max(sum(a.shape[0] for a, _ in group) for group in pairs.values())
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".part")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_string("general.type", "adapter")
    w.add_name(f"{persona.name}-merged")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(rank))
    for name in sorted(pairs):
        a = np.concatenate([a for a, _ in pairs[name]], axis=0)
        b = np.concatenate([b for _, b in pairs[name]], axis=1)
        pad = rank - a.shape[0]
        a = np.pad(a, ((0, pad), (0, 0)))
        b = np.pad(b, ((0, 0), (0, pad)))
        w.add_tensor(name + ".lora_a", np.ascontiguousarray(a, dtype=np.float32))
        w.add_tensor(name + ".lora_b", np.ascontiguousarray(b, dtype=np.float32))
    finish_gguf(w, tmp, out_path)
    return MergedAdapter(out_path, rank, len(pairs), len(persona.adapters))

"""Which Hugging Face model families we convert, and how their tensors map to llama.cpp's.

The rules follow llama.cpp's own ``convert_hf_to_gguf.py``: ``LlamaForCausalLM`` and
``MistralForCausalLM`` both become GGUF architecture ``llama`` and get their q/k rows
(weights and biases) permuted into ggml's rope layout; ``Qwen2ForCausalLM`` becomes
``qwen2`` and is *not* permuted (llama.cpp runs qwen2 with NeoX-style rope, which is the
Hugging Face layout already). Names are mapped with ``gguf.get_tensor_name_map``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from chat.errors import ModelError


@dataclass(frozen=True)
class Architecture:
    """One supported model family."""

    hf_class: str  # config.json "architectures"[0]
    model_type: str  # config.json "model_type"
    gguf_arch: str  # general.architecture in the GGUF
    permute_qk: bool  # llama.cpp wants q/k rows in its interleaved rope layout


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("LlamaForCausalLM", "llama", "llama", permute_qk=True),
    Architecture("MistralForCausalLM", "mistral", "llama", permute_qk=True),
    Architecture("Qwen2ForCausalLM", "qwen2", "qwen2", permute_qk=False),
)

#: GGUF architectures an adapter can target, and whether their q/k rows are rope-permuted. gemma3 is not:
#: llama.cpp's converter only shifts its norm weights (by +1), which no LoRA targets.
GGUF_ARCH_PERMUTES: dict[str, bool] = {"llama": True, "qwen2": False, "gemma3": False}


def supported_names() -> str:
    return ", ".join(f"{a.hf_class} ({a.model_type})" for a in ARCHITECTURES)


def architecture_for(config: dict[str, Any], where: str = "config.json") -> Architecture:
    """The family a Hugging Face ``config.json`` describes, or a ModelError naming it."""
    classes = config.get("architectures") or []
    model_type = config.get("model_type")
    for arch in ARCHITECTURES:
        if arch.hf_class in classes:
            return arch
    if not classes:
        for arch in ARCHITECTURES:
            if arch.model_type == model_type:
                return arch
    found = classes[0] if classes else model_type or "unknown"
    raise ModelError(
        f"{where}: architecture {found!r} is not supported for conversion",
        hint=f"supported: {supported_names()}",
    )


def read_hf_config(hf_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse ``config.json`` of a Hugging Face model folder (or a config.json path)."""
    path = Path(hf_dir)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ModelError(
            f"{path}: no config.json here",
            hint="pass a Hugging Face model folder (config.json, *.safetensors, tokenizer.json)",
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: cannot read it ({exc})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path}: not a JSON object")
    # Multimodal wrappers keep the language model's settings under text_config.
    if "text_config" in config and "num_hidden_layers" not in config:
        config = {**config["text_config"], "architectures": config.get("architectures")}
    return config


@dataclass(frozen=True)
class Shape:
    """The attention shape every converter needs: heads for the rope permutation, layers for names."""

    n_layer: int
    n_head: int
    n_head_kv: int

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> Shape:
        try:
            n_head = int(config["num_attention_heads"])
            return cls(
                n_layer=int(config["num_hidden_layers"]),
                n_head=n_head,
                n_head_kv=int(config.get("num_key_value_heads") or n_head),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"config.json lacks a usable {exc} value") from None


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face → llama.cpp rope layout for the rows of a q/k projection (or its bias, or LoRA B)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ModelError(f"cannot rope-permute a tensor with {rows} rows over {n_head} heads")
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of :func:`permute_qk`."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ModelError(f"cannot rope-permute a tensor with {rows} rows over {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qk_heads(hf_name: str, shape: Shape) -> int | None:
    """Heads to permute over when ``hf_name`` is a q or k projection tensor, else None."""
    module = hf_name.removesuffix(".weight").removesuffix(".bias")
    if module.endswith("q_proj"):
        return shape.n_head
    if module.endswith("k_proj"):
        return shape.n_head_kv
    return None


@lru_cache(maxsize=16)
def _name_map(gguf_arch: str, n_layer: int):
    import gguf

    model_arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[gguf_arch]
    return gguf.get_tensor_name_map(model_arch, n_layer)


def gguf_name(hf_name: str, gguf_arch: str, n_layer: int) -> str | None:
    """llama.cpp's name for a Hugging Face tensor (``model.layers.0.self_attn.q_proj.weight`` →
    ``blk.0.attn_q.weight``), or None when llama.cpp has no such tensor."""
    return _name_map(gguf_arch, n_layer).get_name(hf_name, try_suffixes=(".weight", ".bias"))


#: Hugging Face module names of one llama-family decoder layer (what LoRA targets).
LAYER_MODULES: tuple[str, ...] = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def hf_module_for_gguf(gguf_arch: str, n_layer: int) -> dict[str, str]:
    """``blk.N.attn_q.weight`` → ``model.layers.N.self_attn.q_proj`` for every LoRA-able module (and lm_head)."""
    out: dict[str, str] = {}
    for i in range(n_layer):
        for suffix in LAYER_MODULES:
            module = f"model.layers.{i}.{suffix}"
            name = gguf_name(module + ".weight", gguf_arch, n_layer)
            if name is not None:
                out[name] = module
    head = gguf_name("lm_head.weight", gguf_arch, n_layer)
    if head is not None:
        out[head] = "lm_head"
    return out

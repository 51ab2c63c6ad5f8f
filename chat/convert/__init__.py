"""Converters users run on their own files: Hugging Face models and PEFT adapters to GGUF, and back.

Only numpy and gguf are needed (no torch, no transformers): safetensors are read by
hand, pickle checkpoints are refused. ``model`` writes a model GGUF, ``adapter``
converts LoRA adapters both ways, ``cache`` converts an adapter once per content
and base model and reuses the result.
"""

from __future__ import annotations

from chat.convert.adapter import BaseModel, ConvertedAdapter, gguf_adapter_to_peft, peft_to_gguf
from chat.convert.architecture import ARCHITECTURES
from chat.convert.cache import adapter_format, ensure_format
from chat.convert.model import OUT_TYPES, ConvertedModel, convert_model
from chat.parts.shape import BaseShape, read_base

__all__ = [
    "ARCHITECTURES",
    "OUT_TYPES",
    "BaseModel",
    "BaseShape",
    "ConvertedAdapter",
    "ConvertedModel",
    "adapter_format",
    "convert_model",
    "ensure_format",
    "gguf_adapter_to_peft",
    "peft_to_gguf",
    "read_base",
]

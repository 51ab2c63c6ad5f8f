"""The one description of a base model that parts are checked against, whatever it was read from.

A LoRA adapter or a control vector fits a base when its architecture, width, depth and
target shapes agree. :class:`BaseShape` holds exactly that, built from a GGUF header (the
llama.cpp backend, ``chat personas show -m``), a Hugging Face ``config.json`` (the
converters) or a loaded transformers model (the transformers backend): the same checks
then give the same verdict and the same message on every path.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chat.errors import AdapterError, ModelError

#: Hugging Face module name (``model.layers.0.self_attn.q_proj``) → numpy weight shape (out, in).
ModuleShapes = dict[str, tuple[int, int]]


@dataclass(frozen=True)
class BaseShape:
    """What a part must agree with: the base model's architecture, width, depth and tensor shapes.

    ``tensors`` maps GGUF tensor names to GGUF-order shapes (``ne``), the language of
    adapter GGUFs; :meth:`module_shapes` gives the same weights by Hugging Face module name
    in numpy order, the language of PEFT folders. A loaded model supplies its modules
    directly (``modules``); otherwise they are derived from the tensors.
    """

    path: Path
    architecture: str  # GGUF name: "llama", "qwen2" …
    n_embd: int
    n_layer: int
    tensors: dict[str, tuple[int, ...]] = field(repr=False)
    n_head: int = 0
    n_head_kv: int = 0
    modules: ModuleShapes | None = field(default=None, repr=False)
    label: str = ""  # what messages call the base; the file or folder name by default

    @property
    def name(self) -> str:
        return self.label or self.path.name

    @property
    def source(self) -> str:
        return str(self.path)

    # --- building one ---------------------------------------------------------------------

    @classmethod
    def from_header(cls, header: Any) -> "BaseShape":
        """From a :class:`chat.parts.gguf.Header` (or any header with path, architecture, metadata, tensors)."""
        arch = header.architecture
        md = header.metadata
        tensors = header.tensors.values() if isinstance(header.tensors, dict) else header.tensors
        n_head = _int(md.get(f"{arch}.attention.head_count"))
        return cls(
            path=Path(header.path),
            architecture=arch,
            n_embd=_int(md.get(f"{arch}.embedding_length")),
            n_layer=_int(md.get(f"{arch}.block_count")),
            tensors={t.name: tuple(t.shape) for t in tensors},
            n_head=n_head,
            n_head_kv=_int(md.get(f"{arch}.attention.head_count_kv")) or n_head,
        )

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> "BaseShape":
        """From a model GGUF's header; its problems are ModelErrors (the base's, not a part's)."""
        from chat.parts.gguf import read_header

        header = read_header(path, "model", ModelError)
        if header.metadata.get("general.type") == "adapter":
            raise AdapterError(
                f"{header.path}: this is an adapter, not a base model",
                "pass the base model (a model GGUF or a Hugging Face folder)",
            )
        return cls.from_header(header)

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], path: str | os.PathLike[str] = "base config") -> "BaseShape":
        """From a Hugging Face ``config.json`` of a family the converters know (llama, mistral, qwen2)."""
        from chat.convert.architecture import Shape, architecture_for, gguf_name

        arch = architecture_for(config, where=str(path))
        shape = Shape.from_hf_config(config)
        try:
            hidden = int(config["hidden_size"])
            head_dim = int(config.get("head_dim") or hidden // shape.n_head)
            ffn = int(config["intermediate_size"])
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            raise ModelError(f"{path}: config.json lacks a usable {exc} value") from None
        q, kv = shape.n_head * head_dim, shape.n_head_kv * head_dim
        per_layer = {
            "self_attn.q_proj": (q, hidden),
            "self_attn.k_proj": (kv, hidden),
            "self_attn.v_proj": (kv, hidden),
            "self_attn.o_proj": (hidden, q),
            "mlp.gate_proj": (ffn, hidden),
            "mlp.up_proj": (ffn, hidden),
            "mlp.down_proj": (hidden, ffn),
        }
        tensors: dict[str, tuple[int, ...]] = {}
        for i in range(shape.n_layer):
            for suffix, (out_dim, in_dim) in per_layer.items():
                name = gguf_name(f"model.layers.{i}.{suffix}.weight", arch.gguf_arch, shape.n_layer)
                if name:
                    tensors[name] = (in_dim, out_dim)  # GGUF order
        if not config.get("tie_word_embeddings") and config.get("vocab_size"):
            tensors["output.weight"] = (hidden, int(config["vocab_size"]))
        return cls(Path(path), arch.gguf_arch, hidden, shape.n_layer, tensors, shape.n_head, shape.n_head_kv)

    @classmethod
    def from_hf_model(cls, model: Any) -> "BaseShape":
        """From a loaded transformers model: its own linear modules, before any adapter is injected."""
        config = model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        path = Path(str(getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "") or "model"))
        modules: ModuleShapes = {}
        for name, module in model.named_modules():
            n_in, n_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
            if isinstance(n_in, int) and isinstance(n_out, int) and ".lora_" not in name:
                modules[name.removesuffix(".base_layer")] = (n_out, n_in)
        try:
            base = cls.from_hf_config(text.to_dict(), path)
            tensors, arch = base.tensors, base.architecture
        except ModelError:  # a family the converters do not know: PEFT checks still work on its modules
            tensors, arch = {}, str(getattr(text, "model_type", "") or "")
        n_head = _int(getattr(text, "num_attention_heads", 0))
        return cls(
            path,
            arch,
            _int(getattr(text, "hidden_size", 0)),
            _int(getattr(text, "num_hidden_layers", 0)),
            tensors,
            n_head,
            _int(getattr(text, "num_key_value_heads", 0)) or n_head,
            modules,
        )

    # --- views -----------------------------------------------------------------------------

    def module_shapes(self) -> ModuleShapes:
        """Hugging Face module name → numpy weight shape (out, in) of every weight a PEFT LoRA may target."""
        if self.modules is not None:
            return self.modules
        from chat.convert.architecture import hf_module_for_gguf

        try:
            names = hf_module_for_gguf(self.architecture, self.n_layer)
        except (KeyError, ValueError):  # an architecture gguf's name map does not know
            return {}
        return {
            module: (shape[1], shape[0])
            for name, module in names.items()
            if len(shape := self.tensors.get(name, ())) == 2
        }

    @property
    def permutes_qk(self) -> bool:
        """llama.cpp keeps this architecture's q/k rows rope-permuted (llama), so converted LoRA B rows are too."""
        from chat.convert.architecture import GGUF_ARCH_PERMUTES

        return GGUF_ARCH_PERMUTES[self.architecture]

    def identity(self) -> dict[str, Any]:
        """Everything a converted adapter depends on (the conversion cache key's base part).

        Only the weights LoRA can target count, in numpy order, so one model as GGUF or as a
        Hugging Face folder has one identity.
        """
        return {
            "arch": self.architecture,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_head_kv": self.n_head_kv,
            "shapes": sorted((name, [shape[1], shape[0]]) for name, shape in self._adaptable().items()),
        }

    def _adaptable(self) -> dict[str, tuple[int, ...]]:
        from chat.convert.architecture import hf_module_for_gguf

        names = hf_module_for_gguf(self.architecture, self.n_layer)
        return {n: s for n, s in self.tensors.items() if n in names and len(s) == 2}


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return 0
    return int(value)


def read_base(base: "str | os.PathLike[str] | dict[str, Any] | BaseShape") -> BaseShape:
    """The base model from a GGUF file, a Hugging Face folder or its config.json (path or dict), or a BaseShape."""
    if isinstance(base, BaseShape):
        return base
    if isinstance(base, dict):
        return BaseShape.from_hf_config(base)
    from chat.convert.architecture import read_hf_config
    from chat.parts.gguf import MAGIC

    p = Path(base)
    if p.is_file():
        with open(p, "rb") as fh:
            if fh.read(4) == MAGIC:
                return BaseShape.from_gguf(p)
    if p.is_dir() or p.name.endswith(".json"):
        return BaseShape.from_hf_config(read_hf_config(p), p if p.is_dir() else p.parent)
    if not p.exists():
        raise ModelError(f"{p}: base model not found")
    raise ModelError(f"{p}: base model is neither a GGUF file nor a Hugging Face folder")

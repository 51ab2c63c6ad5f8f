"""TransformersBackend: a Hugging Face model folder loaded once, generating through slots.

The model (:mod:`.model`: weights, tokenizer, templates, loaded adapters and vectors) is
loaded once; each slot (:mod:`.slot`) has its own KV cache, parameter set and sampler. The
backend is slot 0 for the session; a server asks for more with
:meth:`TransformersBackend.new_slot`. The generation loop itself is the core's
(:mod:`chat.generation`, :mod:`chat.beam`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from chat.backend import BackendOptions
from chat.localbackend import LocalBackend

from .checkpoint import cached_snapshot, is_model_folder, looks_like_id
from .model import TransformersModel
from .options import TransformersOptions
from .slot import TransformersSlot


class TransformersBackend(LocalBackend):
    """A Hugging Face causal LM through transformers (CPU, CUDA or MPS)."""

    name: ClassVar[str] = "transformers"
    # shown when the library it drives is missing
    install_hint: ClassVar[str] = (
        'install it: pip install "chat[transformers]" (torch==2.13.0 first, for the CPU build)'
    )

    Options: ClassVar[type[BackendOptions]] = TransformersOptions

    @classmethod
    def can_load(cls, model: str) -> bool:
        """A folder with config.json, or a model id already in the local Hugging Face cache (looked up offline)."""
        model = str(model)
        if model.lower().endswith(".gguf"):
            return False
        path = Path(model).expanduser()
        if path.exists():
            return is_model_folder(path)
        return looks_like_id(model) and cached_snapshot(model) is not None

    def __init__(
        self, model: str, options: BackendOptions | None = None, *, stages: Mapping[str, Any] | None = None
    ) -> None:
        """``stages``: the plugin sampler stages by name (``chat.plugins.get_registry().samplers``)."""
        self.options = TransformersOptions.from_options(options)
        self.stages = stages
        super().__init__()
        self.model = TransformersModel(str(model), self.options)
        self.path = self.model.path
        self.model_name = str(model) if not Path(str(model)).expanduser().exists() else self.path.name
        self.new_slot()

    def make_slot(self) -> TransformersSlot:
        """A KV cache of its own on the loaded model; adapters and vectors stay loaded once, for every slot."""
        return TransformersSlot(self.model, self.stages)

    slot: TransformersSlot  # type: ignore[assignment]  # the session's slot, typed for this backend

    # --- the model --------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    @property
    def eos_ids(self) -> frozenset[int]:
        return self.model.eos_ids

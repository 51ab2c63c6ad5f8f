"""LlamaCppBackend: one GGUF model loaded once, generating through slots on llama.cpp's low-level API.

The model (:mod:`.model`: weights, vocabulary, templates, saved persona states) is loaded
once; each slot (:mod:`.slot`) is a context of its own with its parameter parts, memory and
sampler. The backend is slot 0 for the session (``apply``/``stream``/…); a server asks
for more with :meth:`LlamaCppBackend.new_slot`. The generation loop itself is the core's
(:mod:`chat.generation`, :mod:`chat.beam`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from chat.backend import BackendOptions
from chat.localbackend import LocalBackend

from .model import LlamaModel
from .options import LlamaCppOptions
from .slot import LlamaSlot
from .statecache import StateCache

if TYPE_CHECKING:
    from chat.sampling import SamplerSettings

    from .sampler import NativeSampler


class LlamaCppBackend(LocalBackend):
    """A GGUF model on llama.cpp (CPU, or GPU layers when llama-cpp-python was built with one)."""

    name: ClassVar[str] = "llama.cpp"
    install_hint: ClassVar[str] = 'install it: pip install "chat[llamacpp]"'  # shown when the library is missing
    Options: ClassVar[type[BackendOptions]] = LlamaCppOptions

    @classmethod
    def can_load(cls, model: str) -> bool:
        return str(model).lower().endswith(".gguf")

    def __init__(
        self,
        model: str,
        options: BackendOptions | None = None,
        *,
        kv_type: str = "f16",
        stages: Mapping[str, Any] | None = None,
    ) -> None:
        """``kv_type`` "f32" keeps the KV cache in float32 (bit-stable comparisons in tests); "f16" is the default.

        ``stages``: the plugin sampler stages by name (``chat.plugins.get_registry().samplers``).
        """
        if kv_type not in ("f16", "f32"):
            raise ValueError(f"kv_type must be 'f16' or 'f32', not {kv_type!r}")
        self.options = LlamaCppOptions.from_options(options)
        self.path = Path(model).expanduser().resolve()
        self.model_name = self.path.name
        self.stages = stages
        super().__init__()
        self.model = LlamaModel(self.path, self.options, kv_type)
        try:
            self.new_slot()
        except BaseException:
            self.close()
            raise

    def make_slot(self) -> LlamaSlot:
        """A context of its own on the loaded model; adapters stay loaded once, for every slot."""
        first = self.slots[0].parts if self.slots else None  # type: ignore[attr-defined]
        return LlamaSlot(self.model, first, self.stages)

    slot: LlamaSlot  # type: ignore[assignment]  # the session's slot, typed for this backend

    # --- the session's slot (llama.cpp specifics) ----------------------------------------

    def sampler_for(self, sampling: "SamplerSettings") -> "NativeSampler":
        return self.slot.sampler_for(sampling)

    def plugin_sampler(self, name: str, stage: Any, params: dict[str, Any]) -> Any:
        return self.slot.plugin_sampler(name, stage, params)

    @property
    def state_cache(self) -> StateCache:
        return self.model.states

    @property
    def loaded_adapters(self) -> int:
        """Adapters loaded into memory so far (they stay until the model is closed)."""
        return self.slot.parts.loaded

    # --- the model --------------------------------------------------------------------

    @property
    def header(self) -> Any:
        return self.model.header

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        return self.model.tokenize(text, special=special)

    def piece(self, token: int) -> bytes:
        return self.model.piece(token)

    def token_text(self, token: int) -> str:
        return self.model.token_text(token)

    def is_eog(self, token: int) -> bool:
        return self.model.is_eog(token)

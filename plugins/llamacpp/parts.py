"""A persona's parameter parts on one llama.cpp context: LoRA adapters and control vectors.

* Every file is read and checked by the core readers (:mod:`chat.parts`, the same the
  transformers backend and the converters use) before llama.cpp opens it (a non-float32
  alpha aborts the process inside ggml; other mismatches only show in llama.cpp's log).
* An adapter is loaded once (``llama_adapter_lora_init``) and kept for the life of
  the model; switching personas replaces the whole active set in one call
  (``llama_set_adapters_lora``), so a switch costs microseconds and no reload.
* Control vectors are summed in numpy after scaling, each limited to its own layer
  range, into one buffer of ``n_embd × (n_layer − 1)`` floats (llama.cpp has no
  layer-0 slot) and set with ``llama_set_adapter_cvec``. The full buffer is always
  passed: llama.cpp keeps the old values of layers a shorter buffer leaves out.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from chat.errors import AdapterError
from chat.parts.files import human_size
from chat.parts.lora import LoraInfo, check_lora, read_lora
from chat.parts.shape import BaseShape
from chat.parts.vector import VectorInfo, check_vector, layer_selection, read_directions, read_vector

from . import native

if TYPE_CHECKING:
    from chat.persona import Persona, SteeringPart

NO_PARTS: tuple = ((), ())


@dataclass(frozen=True)
class ActivePart:
    """One attached part, for ``/adapters`` and ``info()``."""

    kind: str  # "adapter" or "steering"
    name: str
    scale: float
    card: str
    detail: str  # rank and size, or layers and size
    path: Path

    def line(self) -> str:
        card = f"  card {self.card}" if self.card else ""
        off = "  (off: scale 0)" if self.scale == 0 else ""
        return f"{self.kind:<8}  {self.name}  scale {self.scale:g}{card}  {self.detail}{off}"


class ParameterParts:
    """The adapters and vectors one context has loaded, and the set that is active."""

    def __init__(self, L: Any, model: Any, ctx: Any, base: BaseShape) -> None:
        self._L, self._model, self._ctx, self.base = L, model, ctx, base
        self._lora_info: dict[Path, LoraInfo] = {}
        self._lora_ptr: dict[Path, Any] = {}
        self._vector_info: dict[Path, VectorInfo] = {}
        self._directions: dict[Path, dict[int, np.ndarray]] = {}
        self.key: tuple = NO_PARTS
        self.active: list[ActivePart] = []
        self.loads = 0  # llama_adapter_lora_init calls that succeeded
        self._lora_set: tuple[list[Any], list[float]] = ([], [])  # what the context has attached

    # --- checking and loading ------------------------------------------------------------

    def lora(self, path: Path) -> LoraInfo:
        info = self._lora_info.get(path)
        if info is None:
            with self._naming_the_base():
                info = read_lora(path)
                check_lora(info, self.base)
            self._lora_info[path] = info
        return info

    def vector(self, path: Path) -> VectorInfo:
        info = self._vector_info.get(path)
        if info is None:
            with self._naming_the_base():
                info = read_vector(path)
                check_vector(info, self.base)
                self._directions[path] = read_directions(path)
            self._vector_info[path] = info
        return info

    @contextlib.contextmanager
    def _naming_the_base(self) -> Iterator[None]:
        """Every refusal names the base it was checked against."""
        try:
            yield
        except AdapterError as exc:
            if self.base.name in exc.message:
                raise
            raise AdapterError(f"{exc.message} (base model {self.base.name})", exc.hint) from None

    def _load_lora(self, path: Path) -> Any:
        ptr = self._lora_ptr.get(path)
        if ptr is None:
            native.forget_log()
            ptr = self._L.llama_adapter_lora_init(self._model, str(path).encode("utf-8"))
            if not ptr:
                reason = native.recent_errors() or "llama.cpp refused it"
                raise AdapterError(
                    f"{path}: llama.cpp cannot attach it to {self.base.name}: {reason}",
                    "use an adapter trained for this base model",
                )
            self._lora_ptr[path] = ptr
            self.loads += 1
        return ptr

    @property
    def loaded(self) -> int:
        return len(self._lora_ptr)

    # --- the active set ----------------------------------------------------------------------

    def attach(self, persona: "Persona") -> list[str]:
        """Check every part, load new adapters, then replace the active set at once.

        Nothing changes in the context when a part is refused: every check and load
        happens before the first llama.cpp call that alters the context.
        """
        warnings: list[str] = []
        adapters: dict[Path, list] = {}
        for part in persona.adapters:
            path = Path(part.path)
            if path.is_dir():  # a PEFT folder: one card, either format — convert once, cached by content hash
                from chat.convert.cache import ensure_format

                path, converted_now = ensure_format(path, "gguf", base=self.base.path)
                if converted_now:
                    warnings.append(
                        f"{persona.label}: converted PEFT adapter {part.name} to GGUF once (cached in {path.parent})"
                    )
            lora = self.lora(path)
            entry = adapters.setdefault(path, [0.0, part, lora])
            entry[0] += part.scale
        vectors: list[tuple["SteeringPart", VectorInfo, tuple[int, ...]]] = []
        for s in persona.steering:
            info = self.vector(Path(s.path))
            chosen = layer_selection(info, s.layers)
            if s.layers is not None and not chosen:
                warnings.append(
                    f"{persona.label}: control vector {s.name}: layers {s.layers[0]}-{s.layers[1]} hold none of "
                    f"its layers ({info.layer_text.removeprefix('layers ')}); it has no effect"
                )
            vectors.append((s, info, chosen))
        live = [(path, scale) for path, (scale, _, _) in adapters.items() if scale != 0.0]
        ptrs = [self._load_lora(path) for path, _ in live]
        buffer, il_start, il_end, vector_key = self._vector_buffer(vectors)

        L = self._L
        rc = self._set_loras(ptrs, [s for _, s in live])
        if rc != 0:
            raise AdapterError(
                f"llama.cpp could not attach the adapters of {persona.label} (code {rc})",
                native.recent_errors() or None,
            )
        native.forget_log()
        if buffer is None:
            rc = L.llama_set_adapter_cvec(self._ctx, None, 0, self.base.n_embd, -1, -1)
        else:
            ptr = buffer.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            rc = L.llama_set_adapter_cvec(self._ctx, ptr, buffer.size, self.base.n_embd, il_start, il_end)
        if rc != 0:
            reason = native.recent_errors()
            self._set_loras(*self._lora_set)  # the context keeps the previous set, adapters included
            raise AdapterError(
                f"llama.cpp refused the control vectors of {persona.label} on {self.base.name} (code {rc})",
                reason or "use vectors generated for this base model",
            )
        self._lora_set = (ptrs, [s for _, s in live])

        self.key = (tuple(sorted((str(p), round(s, 6)) for p, s in live)), vector_key)
        self.active = [
            ActivePart(
                "adapter",
                part.name,
                scale,
                part.card,
                f"{info.rank_text}, {len(info.pairs)} tensors, {human_size(info.file_size)}",
                path,
            )
            for path, (scale, part, info) in adapters.items()
        ] + [
            ActivePart(
                "steering",
                s.name,
                s.scale,
                s.card,
                ("layers " + ",".join(map(str, chosen)) if chosen else "no layers in range")
                + f", {human_size(info.file_size)}",
                Path(s.path),
            )
            for s, info, chosen in vectors
        ]
        return warnings

    def _vector_buffer(self, vectors: list) -> tuple[np.ndarray | None, int, int, tuple]:
        n_embd, n_layer = self.base.n_embd, self.base.n_layer
        buf = np.zeros((max(n_layer - 1, 0), n_embd), dtype=np.float32)
        used: set[int] = set()
        key = []
        for s, _info, chosen in vectors:
            if s.scale == 0.0 or not chosen:
                continue
            dirs = self._directions[Path(s.path)]
            for il in chosen:
                buf[il - 1] += np.float32(s.scale) * dirs[il]
            used.update(chosen)
            key.append((str(s.path), round(s.scale, 6), chosen))
        if not used:
            return None, -1, -1, ()
        return np.ascontiguousarray(buf.reshape(-1)), min(used), max(used), tuple(sorted(key))

    def _set_loras(self, ptrs: list[Any], scales: list[float]) -> int:
        L, n = self._L, len(ptrs)
        if not n:
            return int(L.llama_set_adapters_lora(self._ctx, None, 0, None))
        arr = (L.llama_adapter_lora_p_ctypes * n)(*ptrs)
        return int(L.llama_set_adapters_lora(self._ctx, arr, n, (ctypes.c_float * n)(*scales)))

    def detach_all(self) -> None:
        if self._ctx:
            self._L.llama_set_adapters_lora(self._ctx, None, 0, None)
            self._L.llama_set_adapter_cvec(self._ctx, None, 0, self.base.n_embd, -1, -1)
        self.key, self.active = NO_PARTS, []

    def share_loaded(self, other: "ParameterParts") -> None:
        """Use ``other``'s loaded adapters and read files (another slot's context on the same model).

        llama.cpp adapters belong to the model, so every slot attaches the same loaded ones;
        only the active set is per context.
        """
        self._lora_info, self._lora_ptr = other._lora_info, other._lora_ptr
        self._vector_info, self._directions = other._vector_info, other._directions

"""Parameter parts on a loaded transformers model: LoRA adapters (peft) and control vectors (forward hooks).

Every file is read and checked by the core readers (:mod:`chat.parts.peft`,
:mod:`chat.parts.vector`), the same the llama.cpp backend and the converters use, against
the loaded model's own shape (:meth:`chat.parts.shape.BaseShape.from_hf_model`): one file,
one verdict on both backends. peft itself only warns about keys it cannot place.

LoRA: each adapter is loaded once and kept; the active set is set whole, with several
adapters active at once (``set_adapter([...])``) and each one's ``scaling`` = s·α/r. That
is what llama.cpp computes (Σ sᵢ·αᵢ/rᵢ·BᵢAᵢ); peft's "linear" ``add_weighted_adapter``
mixes A and B separately and is not used. An empty set disables the adapter layers: the
base output, exactly.

Control vectors: llama.cpp's cvector GGUF, ``direction.N`` being added to the output
hidden states of decoder layer N (N ≥ 1: llama.cpp has no slot for layer 0), within
the part's inclusive layer range. One hook per decoder layer, installed once; it
adds nothing when no vector covers its layer.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chat.errors import AdapterError
from chat.parts.peft import PeftInfo, check_peft, read_peft
from chat.parts.peft import check_finite as _check_finite  # noqa: F401  (the one NaN check, kept under its old name)
from chat.parts.shape import BaseShape

if TYPE_CHECKING:
    import numpy as np
    import torch


# --- LoRA ------------------------------------------------------------------------------------


@dataclass
class LoadedAdapter:
    path: Path
    name: str  # peft's adapter name (unique per path)
    label: str  # what people see: the folder name
    rank: int
    alpha: float
    load_s: float

    @property
    def scaling(self) -> float:
        """α/r; α > 0 always (the one alpha rule: chat.parts.lora)."""
        return self.alpha / self.rank


def check_adapter(model: Any, folder: Path, base: BaseShape | None = None) -> PeftInfo:
    """Read and check a PEFT LoRA folder against ``model`` (or its ``base`` shape); AdapterError names the tensor."""
    info = read_peft(Path(folder))  # everything that does not need the model comes first
    check_peft(info, base or BaseShape.from_hf_model(model))
    return info


class LoraSet:
    """The adapters loaded into one model (each once, for the process) and the active set."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.peft: Any = None  # the PeftModel wrapping ``model`` (whose modules it injected in place)
        self.loaded: dict[Path, LoadedAdapter] = {}
        self.active: list[tuple[LoadedAdapter, float]] = []
        self.loads = 0  # adapters read from disk (tests: never twice for one path)
        self.last_switch_s = 0.0
        self._layers: list[Any] = []  # the model's LoRA layers, listed once per adapter load
        self._layers_at = -1
        self._scales: dict[str, float] = {}  # the user scale each adapter's layers hold now
        self._base: BaseShape | None = None  # the model's shape, read before peft injects anything

    def load(self, folder: Path) -> LoadedAdapter:
        folder = Path(folder).resolve()
        got = self.loaded.get(folder)
        if got is not None:
            return got
        started = time.perf_counter()
        if self._base is None:
            self._base = BaseShape.from_hf_model(self.model)
        info = check_adapter(self.model, folder, self._base)
        name = f"a{len(self.loaded)}"
        try:
            with warnings.catch_warnings():  # deprecation chatter from transformers/peft internals
                warnings.simplefilter("ignore", FutureWarning)
                if self.peft is None:
                    from peft import PeftModel

                    self.peft = PeftModel.from_pretrained(
                        self.model, str(folder), adapter_name=name, is_trainable=False
                    )
                else:
                    self.peft.load_adapter(str(folder), adapter_name=name, is_trainable=False)
        except Exception as exc:
            raise AdapterError(
                f"{folder}: peft could not load the adapter: {_first_line(exc)}",
                "check that it is a LoRA adapter for this model",
            ) from None
        self.peft.eval()
        got = LoadedAdapter(
            path=folder,
            name=name,
            label=folder.name,
            rank=info.rank,
            alpha=info.alpha,  # checked > 0 (absent: peft's default 8) by the PEFT reader
            load_s=time.perf_counter() - started,
        )
        self.loaded[folder] = got
        self.loads += 1
        if not self.active:
            self._disable()  # loading may have activated it; the active set changes only in activate()
        return got

    def activate(self, entries: Sequence[tuple[LoadedAdapter, float]]) -> None:
        """Make exactly ``entries`` (adapter, user scale s) active, each scaled s·α/r; none → the base.

        peft's own ``set_adapter``/``enable_adapter_layers`` walk every module several times and
        toggle ``requires_grad`` (6.6 ms per switch on an 88M model, most of a reload's cost).
        Inference needs only each LoRA layer's active names, its enabled flag and its scales, so
        those are set directly on the layers, listed once per adapter load (0.3 ms; same tokens,
        checked against the peft path in benchmarks/bench_transformers.py and the parity tests).
        """
        started = time.perf_counter()
        entries = [(a, s) for a, s in entries if s != 0.0]
        if self.peft is None:
            self.active = []
            return
        if self._layers_at != self.loads:
            from peft.tuners.lora import LoraLayer

            self._layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
            self._layers_at = self.loads
            self._scales.clear()  # a new adapter's layers start at peft's default scale
        names = [a.name for a, _ in entries]
        rescale = [(a.name, s) for a, s in entries if self._scales.get(a.name) != s]
        for layer in self._layers:
            if not names:
                layer._disable_adapters = True
                continue
            layer._active_adapter = [n for n in names if n in layer.scaling]
            layer._disable_adapters = False
            for name, s in rescale:
                if name in layer.scaling:
                    layer.set_scale(name, s)  # s·α/r (s·α/√r for rsLoRA)
        self._scales.update(rescale)
        if names:
            self.peft.base_model.active_adapter = names
        self.active = list(entries)
        self.last_switch_s = time.perf_counter() - started

    def _disable(self) -> None:
        if self.peft is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.peft.base_model.disable_adapter_layers()


# --- control vectors ----------------------------------------------------------------------------


@dataclass
class ControlVector:
    path: Path
    directions: dict[int, "np.ndarray"]  # layer → direction (float32)
    width: int


def read_control_vector(path: Path, base: BaseShape | int) -> ControlVector:
    """Read a llama.cpp cvector GGUF with the core reader and check it against ``base``.

    ``base`` is the model's shape; a bare hidden size checks the width alone.
    """
    from chat.parts.vector import check_vector, read_directions, read_vector

    path = Path(path)
    if isinstance(base, int):
        base = BaseShape(Path("model"), "", base, 1 << 30, {}, label="the model")
    info = read_vector(path)
    check_vector(info, base)
    return ControlVector(path, read_directions(path), info.n_embd)


def decoder_layers(model: Any) -> Any:
    """The model's list of decoder layers (``model.model.layers`` for llama-like models)."""
    import torch.nn as nn

    n = getattr(model.config, "num_hidden_layers", None)
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList) and (n is None or len(layers) == n):
        return layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and n is not None and len(module) == n:
            return module
    raise AdapterError(
        f"{type(model).__name__}: cannot find the decoder layers to steer", "control vectors need a decoder-only model"
    )


class Steering:
    """Control vectors as forward hooks on the decoder layers."""

    def __init__(self, model: Any, hidden_size: int) -> None:
        self.model = model
        self.hidden_size = hidden_size
        self.vectors: dict[Path, ControlVector] = {}
        self.per_layer: dict[int, "torch.Tensor"] = {}
        self.active: list[tuple[ControlVector, float, tuple[int, int] | None]] = []
        self._hooks: list[Any] = []
        self._layers: Any = None
        self._base: BaseShape | None = None

    @property
    def n_layers(self) -> int:
        if self._layers is None:
            self._layers = decoder_layers(self.model)
        return len(self._layers)

    def load(self, path: Path) -> ControlVector:
        path = Path(path).resolve()
        got = self.vectors.get(path)
        if got is None:
            if self._base is None:
                self._base = BaseShape.from_hf_model(self.model)
            got = self.vectors[path] = read_control_vector(path, self._base)
        return got

    def activate(self, entries: Sequence[tuple[ControlVector, float, tuple[int, int] | None]]) -> list[str]:
        """Sum scale·direction.N per layer N within each entry's inclusive range; return notes."""
        import numpy as np
        import torch

        notes: list[str] = []
        n_layers = self.n_layers
        sums: dict[int, np.ndarray] = {}
        for vec, scale, layers in entries:
            if scale == 0.0:
                continue
            lo, hi = layers if layers is not None else (0, n_layers - 1)
            skipped = []
            for il, direction in sorted(vec.directions.items()):
                if il == 0 or il >= n_layers:
                    skipped.append(il)
                    continue
                if lo <= il <= hi:
                    sums[il] = sums.get(il, 0) + np.float32(scale) * direction
            if skipped:
                notes.append(
                    f"{vec.path.name}: direction for layer(s) {', '.join(map(str, skipped))} ignored "
                    f"(layers 1..{n_layers - 1} can be steered, as in llama.cpp)"
                )
        param = next(self.model.parameters())
        self.per_layer = {il: torch.from_numpy(v).to(device=param.device, dtype=param.dtype) for il, v in sums.items()}
        self.active = [(v, s, r) for v, s, r in entries if s != 0.0]
        if self.per_layer and not self._hooks:
            self._install()
        return notes

    def _install(self) -> None:
        for il, layer in enumerate(self._layers):
            self._hooks.append(layer.register_forward_hook(self._hook_for(il)))

    def _hook_for(self, il: int) -> Any:
        def hook(module: Any, args: Any, output: Any) -> Any:
            vec = self.per_layer.get(il)
            if vec is None:
                return None
            if isinstance(output, tuple):
                return (output[0] + vec,) + tuple(output[1:])
            return output + vec

        return hook

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]

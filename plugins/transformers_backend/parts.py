"""Parameter parts on a loaded transformers model: LoRA adapters (peft) and control vectors (forward hooks).

LoRA: each PEFT folder is checked against the base (every tensor must name a module
of the base and fit its shape) before peft sees it — peft itself only warns about
keys it cannot place. Each adapter is loaded once and kept; the active set is set
whole, with several adapters active at once (``set_adapter([...])``) and each
one's ``scaling`` = s·α/r. That is what llama.cpp computes (Σ sᵢ·αᵢ/rᵢ·BᵢAᵢ);
peft's "linear" ``add_weighted_adapter`` mixes A and B separately and is not used.
An empty set disables the adapter layers: the base output, exactly.

Control vectors: llama.cpp's cvector GGUF, ``direction.N`` being added to the output
hidden states of decoder layer N (N ≥ 1: llama.cpp has no slot for layer 0), within
the part's inclusive layer range. One hook per decoder layer, installed once; it
adds nothing when no vector covers its layer.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chat.errors import AdapterError

from .checkpoint import check_adapter_folder

if TYPE_CHECKING:
    import numpy as np
    import torch

_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?(?:\.weight)?$")


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
        """α/r; α > 0 always (see chat.gguf_parts.check_gguf_alpha for the one alpha rule)."""
        return self.alpha / self.rank


def _base_module(model: Any, name: str) -> Any | None:
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        return None
    return getattr(mod, "base_layer", mod)  # after injection the original sits in .base_layer


def check_adapter(model: Any, folder: Path) -> dict[str, Any]:
    """Validate a PEFT LoRA folder against ``model``; return its adapter_config. AdapterError names the tensor."""
    from safetensors import safe_open

    from chat.convert.adapter import load_peft_config

    weights = check_adapter_folder(folder)
    config = load_peft_config(folder)  # the rules llama.cpp's conversion applies too: r, lora_alpha, patterns
    rank = int(config["r"])
    patterned = bool(config["rank_pattern"])
    seen = 0
    try:
        with safe_open(str(weights), framework="numpy") as f:
            for key in f.keys():
                shape = tuple(f.get_slice(key).get_shape())
                _check_tensor(model, folder, key, shape, rank, patterned)
                seen += 1
    except AdapterError:
        raise
    except Exception as exc:
        raise AdapterError(f"{weights}: not a readable safetensors file ({exc})", "re-save the adapter with peft") from None
    if not seen:
        raise AdapterError(f"{weights}: the adapter holds no tensors", "re-save the adapter with peft")
    _check_finite(weights)
    return config


def _check_finite(weights: Path) -> None:
    """NaN or infinite weights give empty answers, not errors: refuse them naming the tensor."""
    from chat.convert.tensorfile import SafetensorsFile
    from chat.errors import ModelError

    try:
        bad = SafetensorsFile(weights).first_non_finite()
    except ModelError as exc:
        raise AdapterError(exc.message, exc.hint) from None
    if bad is not None:
        raise AdapterError(f"{weights}: tensor {bad} holds NaN or infinite values (the answers would be empty)",
                           "the adapter is damaged or its training diverged; train it again")


def _check_tensor(model: Any, folder: Path, key: str, shape: tuple[int, ...], rank: int, patterned: bool) -> None:
    m = _LORA_KEY.match(key)
    if m is None:  # modules_to_save and similar: a full tensor that must fit the base's parameter
        name = key.removeprefix("base_model.model.")
        try:
            param = model.get_parameter(name)
        except AttributeError:
            raise AdapterError(
                f"{folder}: tensor {key} has no counterpart {name!r} in the base model",
                "the adapter was trained for another base model; use one made for this model",
            ) from None
        if tuple(param.shape) != shape:
            raise AdapterError(
                f"{folder}: tensor {key} has shape {list(shape)} but the base's {name} is {list(param.shape)}",
                "the adapter was trained for another base model; use one made for this model",
            )
        return
    module_name, kind = m["module"], m["kind"]
    mod = _base_module(model, module_name)
    if mod is None:
        raise AdapterError(
            f"{folder}: tensor {key} targets {module_name!r}, which the base model does not have",
            "the adapter was trained for another base model (or architecture); use one made for this model",
        )
    if kind.startswith("lora_embedding"):
        n_in, n_out = getattr(mod, "num_embeddings", None), getattr(mod, "embedding_dim", None)
    else:
        n_in, n_out = getattr(mod, "in_features", None), getattr(mod, "out_features", None)
    if n_in is None or n_out is None or len(shape) != 2:
        raise AdapterError(f"{folder}: tensor {key} (shape {list(shape)}) does not fit module {module_name!r}", "use an adapter made for this model")
    r = shape[0] if kind in ("lora_A", "lora_embedding_A") else shape[1]
    # PEFT stores A as (r, in) and B as (out, r); embedding variants the other way round.
    if kind == "lora_A":
        expected = (r, n_in)
    elif kind == "lora_B":
        expected = (n_out, r)
    elif kind == "lora_embedding_A":
        expected = (r, n_in)
    else:
        expected = (n_out, r)
    if shape != expected:
        raise AdapterError(
            f"{folder}: tensor {key} has shape {list(shape)} but {module_name} of this base needs {list(expected)}",
            "the adapter was trained for another base model (a different size); use one made for this model",
        )
    if not patterned and r != rank:
        raise AdapterError(f"{folder}: tensor {key} has rank {r} but adapter_config.json says r = {rank}", "re-save the adapter with peft")


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

    def load(self, folder: Path) -> LoadedAdapter:
        folder = Path(folder).resolve()
        got = self.loaded.get(folder)
        if got is not None:
            return got
        started = time.perf_counter()
        config = check_adapter(self.model, folder)
        name = f"a{len(self.loaded)}"
        try:
            with warnings.catch_warnings():  # deprecation chatter from transformers/peft internals
                warnings.simplefilter("ignore", FutureWarning)
                if self.peft is None:
                    from peft import PeftModel

                    self.peft = PeftModel.from_pretrained(self.model, str(folder), adapter_name=name, is_trainable=False)
                else:
                    self.peft.load_adapter(str(folder), adapter_name=name, is_trainable=False)
        except Exception as exc:
            raise AdapterError(f"{folder}: peft could not load the adapter: {_first_line(exc)}", "check that it is a LoRA adapter for this model") from None
        self.peft.eval()
        got = LoadedAdapter(
            path=folder,
            name=name,
            label=folder.name,
            rank=int(config["r"]),
            alpha=float(config["lora_alpha"]),  # checked > 0 (absent: peft's default 8) by load_peft_config
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


def read_control_vector(path: Path, hidden_size: int) -> ControlVector:
    """Read a llama.cpp cvector GGUF; a width other than the model's hidden size is an AdapterError.

    The core reader (:mod:`chat.gguf_parts`, shared with llama.cpp) opens regular files only,
    reads layer numbers in ASCII digits and refuses NaN or infinite directions.
    """
    from chat.gguf_parts import read_directions, read_vector

    path = Path(path)
    info = read_vector(path)
    if info.n_embd != hidden_size:
        raise AdapterError(
            f"{path}: tensor direction.{info.layers[0]} has {info.n_embd} values "
            f"but the model's hidden size is {hidden_size}",
            "the control vector was made for another model; generate one for this model",
        )
    return ControlVector(path, read_directions(path), hidden_size)


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
    raise AdapterError(f"{type(model).__name__}: cannot find the decoder layers to steer", "control vectors need a decoder-only model")


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

    @property
    def n_layers(self) -> int:
        if self._layers is None:
            self._layers = decoder_layers(self.model)
        return len(self._layers)

    def load(self, path: Path) -> ControlVector:
        path = Path(path).resolve()
        got = self.vectors.get(path)
        if got is None:
            got = self.vectors[path] = read_control_vector(path, self.hidden_size)
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

"""The one reader of PEFT LoRA folders, and the check of one against a base model.

A PEFT adapter is ``adapter_config.json`` + ``adapter_model.safetensors`` with
``base_model.model.<module>.lora_A.weight`` (r, in) and ``lora_B.weight`` (out, r). The
transformers backend runs this before peft sees a folder (peft itself only warns about keys
it cannot place), the PEFT → GGUF converter before converting (so the llama.cpp backend,
which converts a card's PEFT folder, gives the same verdict), ``chat personas show`` to
describe one.

The rules, one verdict for both backends (a card's adapter must mean the same on both):

* ``peft_type`` LORA; ``r`` a whole number > 0; ``lora_alpha`` a finite number > 0 (absent:
  PEFT's default 8), and so every value of ``rank_pattern`` / ``alpha_pattern``;
* only what one llama.cpp adapter can carry: no DoRA, no ``modules_to_save``, no trained
  biases, no ``fan_in_fan_out``, one alpha for every module, rsLoRA with one rank;
* only ``lora_A``/``lora_B`` pairs of linear modules (no embedding LoRA, no other tensors),
  each pair sharing one rank, that rank being ``r`` unless ``rank_pattern`` says otherwise;
* finite weights; safetensors only (unpickling a file can run code);
* against a base: every targeted module must exist there (an unknown one is refused, never
  skipped) and the pair must fit its weight's shape.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from chat.errors import AdapterError, ModelError
from chat.parts.files import open_regular
from chat.parts.shape import BaseShape

#: PEFT's ``LoraConfig`` default for a config without ``lora_alpha`` (what peft itself then uses).
PEFT_DEFAULT_ALPHA = 8.0
PICKLE_PATTERNS = ("adapter_model.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.bin")
_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_RESAVE = "re-save the adapter with peft (save_pretrained)"
_OTHER_BASE = "the adapter was trained for another base model; use one made for this model"
_ONE_ADAPTER = "a card's adapter must run on both backends: train a plain LoRA (one alpha, no DoRA)"


def natural_key(name: str) -> list[int | str]:
    """``blk.10`` after ``blk.9``: runs of ASCII digits compare as numbers (``"²".isdigit()`` is True, int() fails)."""
    return [int(p) if i % 2 else p for i, p in enumerate(re.split(r"([0-9]+)", name))]


@dataclass(frozen=True)
class PeftPair:
    """One module's LoRA pair as the safetensors header describes it (numpy shapes)."""

    key_a: str
    key_b: str
    a: tuple[int, ...]  # (r, in)
    b: tuple[int, ...]  # (out, r)

    @property
    def rank(self) -> int:
        return self.a[0]


@dataclass(frozen=True)
class PeftInfo:
    """A well-formed PEFT LoRA folder: its checked config and its pairs, by Hugging Face module name."""

    folder: Path
    config: dict[str, Any] = field(repr=False)
    weights: Path
    pairs: dict[str, PeftPair] = field(repr=False)

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    @property
    def alpha(self) -> float:
        return float(self.config["lora_alpha"])

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(sorted({p.rank for p in self.pairs.values()}))

    @property
    def gguf_alpha(self) -> float:
        """The alpha that gives llama.cpp's s·α/r the same scale as peft (rsLoRA scales by α/√r)."""
        if self.config.get("use_rslora"):
            return self.alpha * math.sqrt(self.ranks[0])
        return self.alpha


def load_peft_config(peft_dir: Path) -> dict[str, Any]:
    """``adapter_config.json`` of a PEFT LoRA folder, its values checked and normalised (``r`` int, alphas float)."""
    path = Path(peft_dir) / "adapter_config.json"
    if not path.exists():
        raise AdapterError(
            f"{peft_dir}: no adapter_config.json",
            "a PEFT adapter is a folder with adapter_config.json and adapter_model.safetensors",
        )
    try:
        with open_regular(path, "adapter config") as fh:
            config = json.loads(fh.read().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise AdapterError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})", hint=_RESAVE) from None
    except (OSError, ValueError, RecursionError) as exc:
        raise AdapterError(f"{path}: not valid JSON ({_first_line(exc)})", hint=_RESAVE) from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: holds a JSON {type(config).__name__}, not an object of settings", hint=_RESAVE)
    kind = config.get("peft_type")
    if not isinstance(kind, str) or kind.upper() != "LORA":
        raise AdapterError(f"{path}: peft_type {kind!r} is not LoRA", hint="only LoRA adapters can be used")
    config["r"] = int(_positive(config.get("r"), "r", path, whole=True))
    config["lora_alpha"] = _positive(config.get("lora_alpha", PEFT_DEFAULT_ALPHA), "lora_alpha", path)
    for key, whole in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise AdapterError(
                f"{path}: {key} is a {type(pattern).__name__}, not an object of module: value", hint=_RESAVE
            )
        values = {m: _positive(v, f"{key}[{m!r}]", path, whole=whole) for m, v in pattern.items()}
        config[key] = {m: int(v) for m, v in values.items()} if whole else values
    _check_features(config, path)
    return config


def _check_features(config: dict[str, Any], path: Path) -> None:
    """Refuse what one llama.cpp adapter cannot carry, on both backends (one card, one meaning)."""
    for flag, what in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out weights")):
        if config.get(flag):
            raise AdapterError(f"{path}: {what} cannot be expressed as a llama.cpp LoRA adapter", _ONE_ADAPTER)
    if config.get("modules_to_save"):
        raise AdapterError(
            f"{path}: modules_to_save {config['modules_to_save']} replaces whole modules, "
            "which a llama.cpp LoRA adapter cannot do",
            _ONE_ADAPTER,
        )
    if config.get("bias", "none") != "none":
        raise AdapterError(
            f"{path}: bias={config['bias']!r} trains base biases, which a llama.cpp adapter cannot carry", _ONE_ADAPTER
        )
    if set(config["alpha_pattern"].values()) - {config["lora_alpha"]}:
        raise AdapterError(
            f"{path}: per-module alpha (alpha_pattern) cannot be expressed in one llama.cpp adapter", _ONE_ADAPTER
        )


def _positive(value: Any, key: str, where: Path, whole: bool = False) -> float:
    """``value`` if it is a finite number > 0 (whole when ``whole``); JSON true/false are not numbers."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok or (whole and value != int(value)):
        what = "a whole number > 0" if whole else "a finite number > 0"
        raise AdapterError(f"{where}: {key} is {json.dumps(value)}; it must be {what}", hint=_RESAVE)
    return float(value)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def weights_file(folder: Path) -> Path:
    """``adapter_model.safetensors`` of a PEFT folder; pickle-only adapters are refused, naming why."""
    path = folder / "adapter_model.safetensors"
    if path.exists():
        return path
    pickles = sorted(p.name for pat in PICKLE_PATTERNS for p in folder.glob(pat))
    if pickles:
        raise AdapterError(
            f"{folder}: the adapter weights are only in pickle format ({pickles[0]}); "
            "refusing to load them, because unpickling a file can run arbitrary code",
            hint="save the adapter with safe_serialization=True (adapter_model.safetensors)",
        )
    raise AdapterError(f"{folder}: no adapter_model.safetensors", "copy the adapter's weights file into the folder")


def read_peft(folder: Path) -> PeftInfo:
    """Read a PEFT LoRA folder and check everything that does not depend on a base model."""
    from chat.convert.tensorfile import SafetensorsFile

    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(
            f"{folder}: not a PEFT adapter folder",
            "a PEFT adapter is a folder with adapter_config.json and adapter_model.safetensors",
        )
    config = load_peft_config(folder)
    path = weights_file(folder)
    try:
        f = SafetensorsFile(path)
    except ModelError as exc:
        raise AdapterError(exc.message, exc.hint) from None
    try:
        halves: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
        for key in sorted(f.names(), key=natural_key):
            m = _PEFT_KEY.match(key)
            if m is None:
                if "lora_embedding" in key:
                    raise AdapterError(
                        f"{path}: {key}: LoRA on the embeddings cannot be expressed as a llama.cpp adapter",
                        hint="train the adapter without the embeddings in target_modules",
                    )
                raise AdapterError(f"{path}: unexpected tensor {key} (not a lora_A/lora_B weight)", hint=_RESAVE)
            halves.setdefault(m["module"], {})[m["ab"]] = (key, f.entries[key].shape)
        pairs = {module: _pair(path, module, ab, config) for module, ab in halves.items()}
        if not pairs:
            raise AdapterError(f"{path}: no LoRA tensors", hint=_RESAVE)
    finally:
        f.close()
    check_finite(path)
    info = PeftInfo(folder, config, path, pairs)
    if config.get("use_rslora") and len(info.ranks) != 1:
        raise AdapterError(
            f"{folder / 'adapter_config.json'}: rsLoRA with several ranks cannot be expressed in one llama.cpp adapter",
            _ONE_ADAPTER,
        )
    return info


def check_finite(weights: Path) -> None:
    """NaN or infinite weights give empty answers, not errors: refuse them naming the tensor."""
    from chat.convert.tensorfile import SafetensorsFile

    try:
        bad = SafetensorsFile(weights).first_non_finite()
    except ModelError as exc:
        raise AdapterError(exc.message, exc.hint) from None
    if bad is not None:
        raise AdapterError(
            f"{weights}: tensor {bad} holds NaN or infinite values (the answers would be empty)",
            "the adapter is damaged or its training diverged; train it again",
        )


def _pair(path: Path, module: str, ab: dict[str, tuple[str, tuple[int, ...]]], config: dict[str, Any]) -> PeftPair:
    if set(ab) != {"A", "B"}:
        raise AdapterError(
            f"{path}: {module} has lora_{''.join(ab)} but not its pair", hint="the adapter is incomplete; " + _RESAVE
        )
    (key_a, a), (key_b, b) = ab["A"], ab["B"]
    for key, shape in ((key_a, a), (key_b, b)):
        if len(shape) != 2:
            raise AdapterError(f"{path}: tensor {key} has shape {list(shape)}; LoRA tensors are matrices", _RESAVE)
    if a[0] != b[1]:
        raise AdapterError(
            f"{path}: {module}: lora_A has rank {a[0]} but lora_B has rank {b[1]} (shapes {list(a)} and {list(b)})",
            hint=_RESAVE,
        )
    if not config["rank_pattern"] and a[0] != config["r"]:
        raise AdapterError(
            f"{path}: tensor {key_a} has rank {a[0]} but adapter_config.json says r = {config['r']}", hint=_RESAVE
        )
    return PeftPair(key_a, key_b, a, b)


def check_peft(info: PeftInfo, base: BaseShape) -> None:
    """Raise AdapterError naming the adapter, the base and the first tensor that does not fit it."""
    where = f"{info.folder}: does not fit {base.name}"
    modules = base.module_shapes()
    for module, pair in info.pairs.items():
        weight = modules.get(module)
        if weight is None:
            raise AdapterError(
                f"{where}: tensor {pair.key_a} targets {module!r}, which the base model does not have "
                "(or LoRA cannot adapt)",
                _OTHER_BASE,
            )
        out_dim, in_dim = weight
        for key, shape, want in ((pair.key_a, pair.a, (pair.rank, in_dim)), (pair.key_b, pair.b, (out_dim, pair.rank))):
            if shape != want:
                raise AdapterError(
                    f"{where}: tensor {key} has shape {list(shape)} but {module} of the base "
                    f"({out_dim}×{in_dim}) needs {list(want)}",
                    _OTHER_BASE,
                )


def read_peft_tensors(info: PeftInfo) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The pairs as float32 arrays, by module: (A (r, in), B (out, r)); call after :func:`read_peft`."""
    from chat.convert.tensorfile import SafetensorsFile

    f = SafetensorsFile(info.weights)
    try:
        return {module: (f.float32(p.key_a), f.float32(p.key_b)) for module, p in info.pairs.items()}
    except ModelError as exc:
        raise AdapterError(exc.message, exc.hint) from None
    finally:
        f.close()

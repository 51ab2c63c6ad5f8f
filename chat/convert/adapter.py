"""LoRA adapters between PEFT folders and llama.cpp adapter GGUFs, both ways.

A PEFT adapter is ``adapter_config.json`` + ``adapter_model.safetensors`` with
``base_model.model.<module>.lora_A.weight`` (r, in) and ``lora_B.weight`` (out, r). The
llama.cpp adapter GGUF holds the same matrices as ``<base tensor>.lora_a`` /
``.lora_b`` with ``general.type = adapter``, ``adapter.type = lora`` and
``adapter.lora.alpha`` as float32 (another type aborts llama.cpp). For architectures
whose q/k weights llama.cpp keeps rope-permuted (llama), the rows of ``lora_b`` of q/k
are permuted the same way; ``lora_a`` never is.

Both directions check the adapter against the base model first — every target
tensor must exist there with matching shapes — and name the first one that does not.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from chat.convert.architecture import (
    GGUF_ARCH_PERMUTES,
    LAYER_MODULES,
    Shape,
    architecture_for,
    gguf_name,
    hf_module_for_gguf,
    permute_qk,
    qk_heads,
    read_hf_config,
    unpermute_qk,
)
from chat.errors import AdapterError, ModelError

GGUF_MAGIC = b"GGUF"

_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")

#: PEFT's ``LoraConfig`` default for a config without ``lora_alpha`` (what peft itself then uses).
PEFT_DEFAULT_ALPHA = 8.0
_RESAVE = "re-save the adapter with peft (save_pretrained)"


def natural_key(name: str) -> list[int | str]:
    """``blk.10`` after ``blk.9``: runs of ASCII digits compare as numbers (``"²".isdigit()`` is True, int() fails)."""
    return [int(p) if i % 2 else p for i, p in enumerate(re.split(r"([0-9]+)", name))]


@dataclass(frozen=True)
class BaseModel:
    """What an adapter conversion needs from its base model."""

    gguf_arch: str
    shape: Shape
    #: GGUF tensor name → numpy shape (out, in) of every LoRA-able weight.
    tensor_shapes: dict[str, tuple[int, ...]] = field(repr=False)
    source: str = ""

    @property
    def permutes_qk(self) -> bool:
        return GGUF_ARCH_PERMUTES[self.gguf_arch]

    def identity(self) -> dict[str, Any]:
        """Everything a converted adapter depends on (the cache key's base part)."""
        return {
            "arch": self.gguf_arch,
            "n_layer": self.shape.n_layer,
            "n_head": self.shape.n_head,
            "n_head_kv": self.shape.n_head_kv,
            "shapes": sorted((k, list(v)) for k, v in self.tensor_shapes.items()),
        }


def is_gguf_file(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _base_from_hf_config(config: dict[str, Any], source: str) -> BaseModel:
    arch = architecture_for(config, where=source)
    shape = Shape.from_hf_config(config)
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // shape.n_head)
    ffn = int(config["intermediate_size"])
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
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(shape.n_layer):
        for suffix, s in per_layer.items():
            name = gguf_name(f"model.layers.{i}.{suffix}.weight", arch.gguf_arch, shape.n_layer)
            if name:
                shapes[name] = s
    if not config.get("tie_word_embeddings") and config.get("vocab_size"):
        shapes["output.weight"] = (int(config["vocab_size"]), hidden)
    return BaseModel(arch.gguf_arch, shape, shapes, source)


def _base_from_gguf(path: Path) -> BaseModel:
    from chat.gguf_parts import read_header

    header = read_header(path, "base model", error=ModelError)
    meta = header.metadata
    if meta.get("general.type") == "adapter":
        raise AdapterError(f"{path}: this is an adapter, not a base model", hint="pass the base model as --base")
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCH_PERMUTES:
        raise AdapterError(
            f"{path}: base architecture {arch!r} is not supported for adapter conversion",
            hint=f"supported: {', '.join(GGUF_ARCH_PERMUTES)}",
        )
    try:
        n_head = int(meta[f"{arch}.attention.head_count"])
        shape = Shape(
            n_layer=int(meta[f"{arch}.block_count"]),
            n_head=n_head,
            n_head_kv=int(meta.get(f"{arch}.attention.head_count_kv", n_head)),
        )
    except (KeyError, TypeError, ValueError):
        raise ModelError(f"{path}: the header lacks the attention head counts or block count") from None
    adaptable = hf_module_for_gguf(arch, shape.n_layer)
    shapes = {name: tuple(reversed(t.shape)) for name, t in header.tensors.items() if name in adaptable}  # numpy order
    return BaseModel(arch, shape, shapes, str(path))


def read_base(base: str | os.PathLike[str] | dict[str, Any] | BaseModel) -> BaseModel:
    """The base model from a Hugging Face folder, its config.json (path or dict), or a GGUF file."""
    if isinstance(base, BaseModel):
        return base
    if isinstance(base, dict):
        return _base_from_hf_config(base, "base config")
    p = Path(base)
    if is_gguf_file(p):
        return _base_from_gguf(p)
    if p.is_dir() or p.name.endswith(".json"):
        return _base_from_hf_config(read_hf_config(p), str(p))
    if not p.exists():
        raise ModelError(f"{p}: base model not found")
    raise ModelError(f"{p}: base model is neither a GGUF file nor a Hugging Face folder")


# --------------------------------------------------------------------------------------
# PEFT → GGUF
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvertedAdapter:
    path: Path
    architecture: str
    alpha: float
    ranks: tuple[int, ...]
    n_modules: int


def load_peft_config(peft_dir: Path) -> dict[str, Any]:
    """``adapter_config.json`` of a PEFT LoRA folder, checked the same way for both backends.

    The shared rules: a JSON object, ``peft_type`` LORA, ``r`` a whole number > 0, and
    ``lora_alpha`` a finite number > 0 (absent: PEFT's default 8), the same for every
    value of ``rank_pattern`` / ``alpha_pattern``. The values are returned normalised
    (``r`` int, ``lora_alpha`` float). Why α = 0 is refused rather than read as r: see
    :func:`chat.gguf_parts.check_gguf_alpha`.
    """
    from chat.gguf_parts import open_regular

    path = peft_dir / "adapter_config.json"
    if not path.exists():
        raise AdapterError(f"{peft_dir}: no adapter_config.json", hint="pass a PEFT LoRA adapter folder")
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
            raise AdapterError(f"{path}: {key} is a {type(pattern).__name__}, not an object of module: value",
                               hint=_RESAVE)
        values = {m: _positive(v, f"{key}[{m!r}]", path, whole=whole) for m, v in pattern.items()}
        config[key] = {m: int(v) for m, v in values.items()} if whole else values
    return config


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


def read_peft_config(peft_dir: Path) -> dict[str, Any]:
    """The checked config (:func:`load_peft_config`) of an adapter llama.cpp can express."""
    config = load_peft_config(peft_dir)
    path = peft_dir / "adapter_config.json"
    for flag, what in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out weights")):
        if config.get(flag):
            raise AdapterError(f"{path}: {what} cannot be expressed as a llama.cpp LoRA adapter")
    if config.get("modules_to_save"):
        raise AdapterError(
            f"{path}: modules_to_save {config['modules_to_save']} replaces whole modules, "
            "which a llama.cpp LoRA adapter cannot do"
        )
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{path}: bias={config['bias']!r} trains base biases, which a llama.cpp adapter cannot carry")
    return config


def _peft_alpha(config: dict[str, Any], ranks: set[int], where: Path) -> float:
    alpha = float(config["lora_alpha"])  # validated by load_peft_config: finite, > 0
    patterns = set(config["alpha_pattern"].values())
    if patterns - {alpha}:
        raise AdapterError(f"{where}: per-module alpha (alpha_pattern) cannot be expressed in one llama.cpp adapter")
    if config.get("use_rslora"):
        # rsLoRA scales by alpha/sqrt(r); llama.cpp by alpha'/r, so alpha' = alpha*sqrt(r) for one rank.
        if len(ranks) != 1:
            raise AdapterError(f"{where}: rsLoRA with several ranks cannot be expressed in one llama.cpp adapter")
        alpha *= math.sqrt(next(iter(ranks)))
    return alpha


def read_peft_tensors(peft_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    """``{module: {"A": (r, in), "B": (out, r)}}`` as float32."""
    from chat.convert.tensorfile import PICKLE_PATTERNS, SafetensorsFile

    path = peft_dir / "adapter_model.safetensors"
    if not path.exists():
        pickles = sorted(p.name for pat in PICKLE_PATTERNS for p in peft_dir.glob(pat))
        if pickles:
            raise AdapterError(
                f"{peft_dir}: the adapter weights are only in pickle format ({pickles[0]}); "
                "refusing to load them, because unpickling a file can run arbitrary code",
                hint="save the adapter with safe_serialization=True (adapter_model.safetensors)",
            )
        raise AdapterError(f"{peft_dir}: no adapter_model.safetensors")
    try:
        f = SafetensorsFile(path)
    except ModelError as exc:
        raise AdapterError(exc.message, exc.hint) from None
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key in f.names():
        m = _PEFT_KEY.match(key)
        if m is None:
            if "lora_embedding" in key:
                raise AdapterError(f"{path}: {key}: LoRA on the embeddings is not supported by this converter",
                                   hint="train the adapter without the embeddings in target_modules")
            raise AdapterError(f"{path}: unexpected tensor {key} (not a lora_A/lora_B weight)", hint=_RESAVE)
        try:
            values = f.float32(key)
        except ModelError as exc:
            raise AdapterError(exc.message, exc.hint) from None
        if not np.isfinite(values).all():
            raise AdapterError(f"{path}: tensor {key} holds NaN or infinite values (the answers would be empty)",
                               hint="the adapter is damaged or its training diverged; train it again")
        modules.setdefault(m["module"], {})[m["ab"]] = values
    f.close()
    for module, ab in modules.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{path}: {module} has lora_{''.join(ab)} but not its pair",
                               hint="the adapter is incomplete; " + _RESAVE)
    if not modules:
        raise AdapterError(f"{path}: no LoRA tensors", hint=_RESAVE)
    return modules


def _check_pair(name: str, a: np.ndarray, b: np.ndarray, base: BaseModel, where: str) -> None:
    """lora_a (r, in) and lora_b (out, r) against the base weight (out, in)."""
    if name not in base.tensor_shapes:
        raise AdapterError(
            f"{where}: tensor {name} does not exist in the base model {base.source}",
            hint="the adapter was trained for another base model",
        )
    out_dim, in_dim = base.tensor_shapes[name][:2]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise AdapterError(f"{where}: {name}: lora_a {a.shape} and lora_b {b.shape} do not share a rank")
    if a.shape[1] != in_dim or b.shape[0] != out_dim:
        raise AdapterError(
            f"{where}: tensor {name}: the adapter is {b.shape[0]}x{a.shape[1]} but the base weight is {out_dim}x{in_dim}",
            hint="the adapter was trained for another base model",
        )


def peft_to_gguf(
    peft_dir: str | os.PathLike[str],
    base: str | os.PathLike[str] | dict[str, Any] | BaseModel,
    out: str | os.PathLike[str],
) -> ConvertedAdapter:
    """Convert a PEFT LoRA folder into a llama.cpp adapter GGUF for ``base``."""
    import gguf

    src = Path(peft_dir)
    if not src.is_dir():
        raise AdapterError(f"{src}: not a folder", hint="pass a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    config = read_peft_config(src)
    base_model = read_base(base)
    modules = read_peft_tensors(src)
    tensors: list[tuple[str, np.ndarray]] = []
    ranks: set[int] = set()
    for module in sorted(modules, key=natural_key):
        a, b = modules[module]["A"], modules[module]["B"]
        name = gguf_name(module + ".weight", base_model.gguf_arch, base_model.shape.n_layer)
        if name is None:
            raise AdapterError(
                f"{src}: target module {module} has no counterpart in a llama.cpp {base_model.gguf_arch} model",
                hint="the adapter was trained for another kind of model",
            )
        _check_pair(name, a, b, base_model, str(src))
        if not config["rank_pattern"] and a.shape[0] != config["r"]:
            raise AdapterError(
                f"{src}: {module}.lora_A has rank {a.shape[0]} but adapter_config.json says r = {config['r']}",
                hint=_RESAVE,
            )
        heads = qk_heads(module, base_model.shape) if base_model.permutes_qk else None
        if heads:
            b = permute_qk(b, heads)
        ranks.add(a.shape[0])
        tensors.append((name + ".lora_a", np.ascontiguousarray(a, dtype=np.float32)))
        tensors.append((name + ".lora_b", np.ascontiguousarray(b, dtype=np.float32)))
    alpha = _peft_alpha(config, ranks, src / "adapter_config.json")

    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    part = out_path.with_name(out_path.name + ".part")
    w = gguf.GGUFWriter(str(part), base_model.gguf_arch)
    w.add_string("general.type", "adapter")
    w.add_name(src.resolve().name)
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(alpha))
    for name, arr in tensors:
        w.add_tensor(name, arr)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(part, out_path)
    except BaseException:
        w.close()
        part.unlink(missing_ok=True)
        raise
    return ConvertedAdapter(out_path, base_model.gguf_arch, alpha, tuple(sorted(ranks)), len(modules))


# --------------------------------------------------------------------------------------
# GGUF → PEFT
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFAdapter:
    architecture: str
    alpha: float
    #: base tensor name → (lora_a (r, in), lora_b (out, r)) as stored (lora_b still permuted).
    pairs: dict[str, tuple[np.ndarray, np.ndarray]]


def read_gguf_adapter(path: str | os.PathLike[str]) -> GGUFAdapter:
    """Read and check a llama.cpp LoRA adapter GGUF without llama.cpp."""
    import gguf

    p = Path(path)
    if not is_gguf_file(p):
        raise AdapterError(f"{p}: not a GGUF file")
    try:
        reader = gguf.GGUFReader(p)
    except Exception as exc:
        raise AdapterError(f"{p}: not a readable GGUF file ({exc})") from None

    def field_of(key: str):
        return reader.fields.get(key)

    kind = field_of("general.type")
    if kind is None or kind.contents() != "adapter":
        raise AdapterError(f"{p}: not an adapter (general.type is {kind.contents() if kind else None!r})")
    atype = field_of("adapter.type")
    if atype is None or atype.contents() != "lora":
        raise AdapterError(f"{p}: adapter.type is {atype.contents() if atype else None!r}, not 'lora'")
    alpha_field = field_of("adapter.lora.alpha")
    alpha = 0.0
    if alpha_field is not None:
        if alpha_field.types != [gguf.GGUFValueType.FLOAT32]:
            raise AdapterError(f"{p}: adapter.lora.alpha is stored as {alpha_field.types[0].name}, not FLOAT32")
        alpha = float(alpha_field.contents())
    from chat.gguf_parts import read_lora

    read_lora(p)  # the checks llama.cpp would need too: tensor types, finite numbers, a sane alpha
    arch = field_of("general.architecture").contents()
    halves: dict[str, dict[str, np.ndarray]] = {}
    for t in reader.tensors:
        base, dot, ab = t.name.rpartition(".")
        if not dot or ab not in ("lora_a", "lora_b"):
            raise AdapterError(f"{p}: unexpected tensor {t.name} (not a lora_a/lora_b)")
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data = np.array(t.data, dtype=np.float32)
        else:
            data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        halves.setdefault(base, {})[ab] = data.reshape(tuple(int(d) for d in reversed(t.shape.tolist())))
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for base, ab in halves.items():
        if set(ab) != {"lora_a", "lora_b"}:
            raise AdapterError(f"{p}: {base} has {', '.join(ab)} but not its pair")
        pairs[base] = (ab["lora_a"], ab["lora_b"])
    if not pairs:
        raise AdapterError(f"{p}: no LoRA tensors")
    return GGUFAdapter(arch, alpha, pairs)


def gguf_adapter_to_peft(
    gguf_path: str | os.PathLike[str],
    base_hf_dir_or_config: str | os.PathLike[str] | dict[str, Any] | BaseModel,
    out_dir: str | os.PathLike[str],
) -> Path:
    """Write a PEFT folder (adapter_config.json + adapter_model.safetensors) from a llama.cpp adapter.

    The base (a Hugging Face folder, its config.json, or a GGUF) supplies the head counts to
    undo the q/k permutation and the shapes to check every tensor against.
    """
    from chat.convert.tensorfile import write_safetensors

    src = Path(gguf_path)
    adapter = read_gguf_adapter(src)
    base = read_base(base_hf_dir_or_config)
    if adapter.architecture != base.gguf_arch:
        raise AdapterError(
            f"{src}: adapter is for architecture {adapter.architecture!r}, the base model is {base.gguf_arch!r}"
        )
    to_module = hf_module_for_gguf(base.gguf_arch, base.shape.n_layer)
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    for name in sorted(adapter.pairs, key=natural_key):
        a, b = adapter.pairs[name]
        module = to_module.get(name)
        if module is None:
            raise AdapterError(
                f"{src}: tensor {name} does not exist in the base model {base.source}"
                if name not in base.tensor_shapes
                else f"{src}: tensor {name} is not a projection PEFT can adapt",
                hint="the adapter was trained for another base model",
            )
        _check_pair(name, a, b, base, str(src))
        heads = qk_heads(module, base.shape) if base.permutes_qk else None
        if heads:
            b = unpermute_qk(b, heads)
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(a, dtype=np.float32)
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(b, dtype=np.float32)
        ranks[module] = a.shape[0]

    r = Counter(ranks.values()).most_common(1)[0][0]
    rank_pattern = {m: k for m, k in ranks.items() if k != r}
    if adapter.alpha:
        lora_alpha, alpha_pattern = adapter.alpha, {}
    else:  # alpha 0: llama.cpp applies B·A at the user scale alone, i.e. alpha = r per module
        lora_alpha, alpha_pattern = float(r), {m: float(k) for m, k in rank_pattern.items()}
    suffixes = sorted({m.rsplit(".", 1)[-1] for m in ranks})
    full = {f"model.layers.{i}.{s}" for i in range(base.shape.n_layer) for s in LAYER_MODULES if s.rsplit(".", 1)[-1] in suffixes}
    targets: list[str] = suffixes if set(ranks) == full else sorted(ranks)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": targets,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


__all__ = [
    "BaseModel",
    "ConvertedAdapter",
    "GGUFAdapter",
    "gguf_adapter_to_peft",
    "is_gguf_file",
    "peft_to_gguf",
    "read_base",
    "read_gguf_adapter",
]

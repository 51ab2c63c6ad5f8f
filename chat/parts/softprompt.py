"""Soft prompts (prompt tuning's virtual tokens): one reader, one writer and one fit check for every backend.

A soft prompt is a float matrix ``[n_virtual, hidden]`` put in front of the whole tokenized
prompt (BOS included), unscaled, at positions ``0 … n_virtual-1`` — PEFT's causal-LM prompt
tuning exactly. Two file formats carry one, and both backends read both (no conversion
cache: the matrix is the same numbers in either):

* **PEFT folder**: ``adapter_config.json`` with ``peft_type`` ``PROMPT_TUNING``, ``task_type``
  ``CAUSAL_LM``, ``num_virtual_tokens`` and ``token_dim``; ``adapter_model.safetensors`` holding
  ``prompt_embeddings`` ``[num_virtual_tokens, token_dim]`` (F32, F16 or BF16). What
  ``PeftModel.save_pretrained`` writes.
* **GGUF** (chat's own, documented in README): ``general.type`` = ``"adapter"``, ``adapter.type`` =
  ``"soft_prompt"``, ``general.architecture`` = the base's (or ``"unknown"``), ``soft_prompt.n_virtual``
  and ``soft_prompt.n_embd`` (uint32), and one F32 tensor ``soft_prompt.embeddings`` with GGUF
  shape ``[n_embd, n_virtual]`` (numpy ``[n_virtual, n_embd]``).

The rules, one verdict on both backends: exactly that tensor, 2-D, its shape agreeing with the
declared counts, 1 … :data:`MAX_VIRTUAL` rows, finite values; against a base, the width is the
base's hidden size, and the virtual tokens leave room in the context for a prompt.

Inside a slot, virtual token ``i`` of the active soft prompt is the negative id ``-(i + 1)``
(:func:`virtual_ids`): the prompt lists ``[-1, -2, …, -n, BOS, …]``, so the KV bookkeeping that
compares token lists works unchanged, and a backend evaluates a negative id as row ``i`` of
the matrix. A slot's memory is never reused under another soft prompt (its key is part of the
slot's parameter set), so the same negative ids never stand for two different rows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from chat.errors import AdapterError, ModelError
from chat.parts.files import human_size, open_regular

if TYPE_CHECKING:
    from chat.parts.shape import BaseShape

Format = Literal["peft", "gguf"]

MAX_VIRTUAL = 4096  # more virtual tokens than any prompt-tuning recipe uses; keeps a hostile file small
TENSOR = "soft_prompt.embeddings"
PEFT_TENSOR = "prompt_embeddings"
_AGAIN = "save the soft prompt again (`chat convert soft-prompt`, or peft's save_pretrained)"
_FOLDER = "a soft prompt is a PEFT prompt-tuning folder (adapter_config.json + adapter_model.safetensors) or a GGUF"


@dataclass(frozen=True)
class SoftPromptInfo:
    """A well-formed soft prompt: ``n_virtual`` rows of width ``n_embd``."""

    path: Path
    format: Format
    n_virtual: int
    n_embd: int
    architecture: str = ""  # the base's, when the file says (GGUF: general.architecture)
    file_size: int = 0
    values: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32), repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.path.stem if self.format == "gguf" else self.path.name

    @property
    def detail(self) -> str:
        return f"{self.n_virtual} virtual tokens × {self.n_embd}, {human_size(self.file_size)}"


def soft_prompt_format(path: str | os.PathLike[str]) -> Format:
    """``"peft"`` for a folder, ``"gguf"`` for anything else (the reader then checks it)."""
    return "peft" if Path(path).is_dir() else "gguf"


def virtual_ids(n: int) -> list[int]:
    """The ids a slot's prompt lists for ``n`` virtual tokens: ``[-1, -2, …, -n]``."""
    return [-(i + 1) for i in range(n)]


def count_virtual(prompt: Sequence[int]) -> int:
    """Virtual tokens at the start of ``prompt`` (they are only ever at the start)."""
    n = 0
    for tok in prompt:
        if tok >= 0:
            break
        n += 1
    return n


# --- reading ------------------------------------------------------------------------------


def read_soft_prompt(path: str | os.PathLike[str]) -> SoftPromptInfo:
    """Read and check a soft prompt (either format) with its values; no base model needed."""
    p = Path(path)
    info = _read_peft(p) if soft_prompt_format(p) == "peft" else _read_gguf(p)
    values = info.values
    if not np.isfinite(values).all():
        row = int(np.argwhere(~np.isfinite(values))[0][0])
        raise AdapterError(
            f"{p}: virtual token {row} holds NaN or infinite values (every answer would be empty)",
            "the soft prompt is damaged or its training diverged; train it again",
        )
    return info


def _checked_counts(where: Path, n_virtual: Any, n_embd: Any, shape: tuple[int, ...], names: tuple[str, str]) -> None:
    for value, key in ((n_virtual, names[0]), (n_embd, names[1])):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise AdapterError(f"{where}: {key} is {json.dumps(value)}; it must be a whole number > 0", _AGAIN)
    if n_virtual > MAX_VIRTUAL:
        raise AdapterError(
            f"{where}: {n_virtual} virtual tokens; chat takes at most {MAX_VIRTUAL}", "train a shorter soft prompt"
        )
    if shape != (n_virtual, n_embd):
        raise AdapterError(
            f"{where}: the embeddings have shape {list(shape)} but the file declares "
            f"{names[0]} {n_virtual} and {names[1]} {n_embd}",
            _AGAIN,
        )


def _read_peft(folder: Path) -> SoftPromptInfo:
    from chat.convert.tensorfile import SafetensorsFile
    from chat.parts.peft import weights_file

    config_path = folder / "adapter_config.json"
    if not config_path.exists():
        raise AdapterError(f"{folder}: no adapter_config.json", _FOLDER)
    try:
        with open_regular(config_path, "adapter config") as fh:
            config = json.loads(fh.read(1 << 20).decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise AdapterError(f"{config_path}: not valid JSON ({_first_line(exc)})", _AGAIN) from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_path}: holds a JSON {type(config).__name__}, not an object of settings", _AGAIN)
    kind = config.get("peft_type")
    if not isinstance(kind, str) or kind.upper() != "PROMPT_TUNING":
        hint = "list a LoRA under [[adapters]]" if isinstance(kind, str) and kind.upper() == "LORA" else _FOLDER
        raise AdapterError(f"{config_path}: peft_type {kind!r} is not PROMPT_TUNING (not a soft prompt)", hint)
    task = config.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise AdapterError(
            f"{config_path}: task_type {task!r}: only causal-LM prompt tuning (CAUSAL_LM) is a chat soft prompt",
            "train the soft prompt with task_type CAUSAL_LM",
        )
    if config.get("num_transformer_submodules", 1) not in (1, None):
        raise AdapterError(
            f"{config_path}: num_transformer_submodules {config['num_transformer_submodules']!r} "
            "(encoder-decoder prompt tuning); a causal LM has one",
            "train the soft prompt for a decoder-only model",
        )
    weights = weights_file(folder)
    try:
        f = SafetensorsFile(weights)
    except ModelError as exc:
        raise AdapterError(exc.message, exc.hint) from None
    names = f.names()
    if names != [PEFT_TENSOR]:
        extra = sorted(set(names) - {PEFT_TENSOR})
        what = f"unexpected tensor {extra[0]}" if extra else f"no {PEFT_TENSOR} tensor"
        raise AdapterError(f"{weights}: {what} (a prompt-tuning adapter holds only {PEFT_TENSOR})", _AGAIN)
    entry = f.entries[PEFT_TENSOR]
    if entry.dtype not in ("F32", "F16", "BF16") or len(entry.shape) != 2:
        raise AdapterError(
            f"{weights}: {PEFT_TENSOR} is {entry.dtype} with shape {list(entry.shape)}; "
            "a soft prompt is a 2-D float matrix [virtual tokens, hidden size]",
            _AGAIN,
        )
    shape = tuple(entry.shape)
    _checked_counts(
        weights,
        config.get("num_virtual_tokens", shape[0]),
        config.get("token_dim", shape[1]),
        shape,
        ("num_virtual_tokens", "token_dim"),
    )
    try:
        values = np.ascontiguousarray(f.float32(PEFT_TENSOR), dtype=np.float32)
    except ModelError as exc:
        raise AdapterError(exc.message, exc.hint) from None
    return SoftPromptInfo(folder, "peft", shape[0], shape[1], "", _size(weights), values)


def _read_gguf(path: Path) -> SoftPromptInfo:
    from chat.parts.files import mapped
    from chat.parts.gguf import GGML_F32, read_header, tensor_values, type_name

    header = read_header(path, "soft prompt")
    md = header.metadata
    if md.get("general.type") != "adapter" or md.get("adapter.type") != "soft_prompt":
        kind = md.get("adapter.type") or md.get("general.type") or md.get("general.architecture") or "unknown"
        raise AdapterError(
            f"{path}: not a soft prompt (a GGUF of kind {str(kind)[:40]!r}; "
            "a soft prompt GGUF has general.type 'adapter' and adapter.type 'soft_prompt')",
            "list LoRA adapters under [[adapters]] and control vectors under [[steering]]",
        )
    if list(header.tensors) != [TENSOR]:
        extra = sorted(set(header.tensors) - {TENSOR})
        what = f"unexpected tensor {extra[0]}" if extra else f"no {TENSOR} tensor"
        raise AdapterError(f"{path}: {what} (a soft prompt GGUF holds only {TENSOR})", _AGAIN)
    t = header.tensors[TENSOR]
    if t.ggml_type != GGML_F32 or len(t.shape) != 2:
        raise AdapterError(
            f"{path}: {TENSOR} is {type_name(t.ggml_type)} with {len(t.shape)} dimensions; "
            "a soft prompt is a 2-D F32 tensor",
            _AGAIN,
        )
    n_embd, n_virtual = t.shape
    _checked_counts(
        path,
        md.get("soft_prompt.n_virtual"),
        md.get("soft_prompt.n_embd"),
        (n_virtual, n_embd),
        ("soft_prompt.n_virtual", "soft_prompt.n_embd"),
    )
    with mapped(path, "soft prompt") as (buf, _):
        values = np.ascontiguousarray(tensor_values(buf, header, t), dtype=np.float32)
    arch = md.get("general.architecture")
    return SoftPromptInfo(
        path,
        "gguf",
        n_virtual,
        n_embd,
        arch if isinstance(arch, str) and arch != "unknown" else "",
        header.file_size,
        values,
    )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# --- fitting a base -----------------------------------------------------------------------


def check_soft_prompt(info: SoftPromptInfo, base: "BaseShape") -> None:
    """The soft prompt's width must be the base's hidden size.

    The architecture a GGUF names is shown, never checked: transformers and GGUF spell some
    families differently (``gemma3_text`` / ``gemma3``), and the width is what must agree.
    """
    if info.n_embd != base.n_embd:
        raise AdapterError(
            f"{info.path}: virtual tokens of width {info.n_embd}, but the base model's hidden size is {base.n_embd}",
            "use a soft prompt trained for this base model",
        )


def check_fits_context(n_virtual: int, context_size: int, label: str) -> None:
    """The virtual tokens must leave room for a prompt and an answer."""
    if n_virtual >= context_size // 2:
        raise AdapterError(
            f"{label}: its soft prompts take {n_virtual} virtual tokens, but the context holds {context_size}",
            "load the model with a larger --ctx (at least twice the virtual tokens), or use a shorter soft prompt",
        )


# --- the active set -----------------------------------------------------------------------


@dataclass(frozen=True)
class ActiveSoftPrompt:
    """A persona's soft prompts concatenated in mix order: the rows a slot puts before every prompt."""

    values: np.ndarray  # float32 [n, hidden], C-contiguous
    key: tuple  # identity: the files, in order (KV memory is never reused under another key)
    parts: tuple[SoftPromptInfo, ...] = ()
    cards: tuple[str, ...] = ()  # the card that brought each part

    @property
    def n(self) -> int:
        return int(self.values.shape[0])

    def lines(self) -> list[str]:
        """``/adapters`` and ``/info``: one line per soft prompt in the active set, in order."""
        out = []
        for i, info in enumerate(self.parts):
            card = f"  card {self.cards[i]}" if i < len(self.cards) and self.cards[i] else ""
            out.append(f"soft prompt  {info.name}{card}  {info.detail}")
        return out


NO_SOFT_PROMPT = ActiveSoftPrompt(np.zeros((0, 0), np.float32), ())


class SoftPrompts:
    """The soft prompts one model has read (shared by its slots), and the combination a persona asks for."""

    def __init__(self, base: "BaseShape") -> None:
        self.base = base
        self._read: dict[Path, SoftPromptInfo] = {}
        self.reads = 0

    def load(self, path: Path) -> SoftPromptInfo:
        info = self._read.get(path)
        if info is None:
            info = read_soft_prompt(path)
            try:
                check_soft_prompt(info, self.base)
            except AdapterError as exc:
                raise AdapterError(f"{exc.message} (base model {self.base.name})", exc.hint) from None
            self._read[path] = info
            self.reads += 1
        return info

    def combine(self, parts: Sequence[Any], context_size: int, label: str) -> ActiveSoftPrompt:
        """A persona's soft prompts (``path``, ``card``) concatenated in order; all checked before anything changes."""
        if not parts:
            return NO_SOFT_PROMPT
        infos = tuple(self.load(Path(p.path)) for p in parts)
        total = sum(i.n_virtual for i in infos)
        check_fits_context(total, context_size, label)
        values = np.ascontiguousarray(np.concatenate([i.values for i in infos], axis=0), dtype=np.float32)
        return ActiveSoftPrompt(values, tuple(str(i.path) for i in infos), infos, tuple(p.card for p in parts))


# --- writing ------------------------------------------------------------------------------


def write_gguf_soft_prompt(
    out: str | os.PathLike[str], values: np.ndarray, *, architecture: str = "", name: str = ""
) -> Path:
    """Write ``values`` ``[n_virtual, n_embd]`` as chat's soft prompt GGUF (atomically)."""
    import gguf

    from chat.convert.adapter import finish_gguf

    arr = np.ascontiguousarray(values, dtype=np.float32)
    if arr.ndim != 2 or not arr.size:
        raise ValueError(f"a soft prompt is a non-empty 2-D matrix, got shape {arr.shape}")
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    part = out_path.with_name(out_path.name + ".part")
    w = gguf.GGUFWriter(str(part), architecture or "unknown")
    w.add_string("general.type", "adapter")
    w.add_name(name or out_path.stem)
    w.add_string("adapter.type", "soft_prompt")
    w.add_uint32("soft_prompt.n_virtual", int(arr.shape[0]))
    w.add_uint32("soft_prompt.n_embd", int(arr.shape[1]))
    w.add_tensor(TENSOR, arr)
    finish_gguf(w, part, out_path)
    return out_path


def write_peft_soft_prompt(
    folder: str | os.PathLike[str],
    values: np.ndarray,
    *,
    base_model: str = "",
    num_layers: int = 0,
    num_attention_heads: int = 0,
) -> Path:
    """Write ``values`` as a PEFT prompt-tuning folder that ``PeftModel.from_pretrained`` loads."""
    from chat.convert.tensorfile import write_safetensors

    arr = np.ascontiguousarray(values, dtype=np.float32)
    if arr.ndim != 2 or not arr.size:
        raise ValueError(f"a soft prompt is a non-empty 2-D matrix, got shape {arr.shape}")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": int(arr.shape[0]),
        "token_dim": int(arr.shape[1]),
        "num_transformer_submodules": 1,
        "num_attention_heads": int(num_attention_heads),
        "num_layers": int(num_layers),
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "base_model_name_or_path": base_model or None,
        "inference_mode": True,
        "revision": None,
    }
    weights = out / "adapter_model.safetensors"
    part = out / "adapter_model.safetensors.part"
    write_safetensors(part, {PEFT_TENSOR: arr}, {"format": "pt"})
    os.replace(part, weights)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


def convert_soft_prompt(src: str | os.PathLike[str], out: str | os.PathLike[str], base: "BaseShape | None") -> Path:
    """PEFT folder → GGUF, or GGUF → PEFT folder; checked against ``base`` when one is given."""
    info = read_soft_prompt(src)
    if base is not None:
        check_soft_prompt(info, base)
    arch = info.architecture or (base.architecture if base is not None else "")
    if info.format == "peft":
        return write_gguf_soft_prompt(out, info.values, architecture=arch, name=Path(src).name)
    return write_peft_soft_prompt(
        out,
        info.values,
        base_model=str(base.path) if base is not None else "",
        num_layers=base.n_layer if base is not None else 0,
        num_attention_heads=base.n_head if base is not None else 0,
    )

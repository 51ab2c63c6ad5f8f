"""Reading and checking a GGUF file's header before llama.cpp sees it.

llama.cpp aborts the whole process on some malformed files, and on others it
fails with a message only its log shows. Reading the header here first turns the
common problems (missing file, not a GGUF, truncated download, an architecture
this llama.cpp cannot run, an adapter passed as a model) into one ModelError, and
so do the values llama.cpp would abort on or compute NaN from: hyper-parameters out
of its asserted ranges, tensors stored in a type it cannot compute with.
The one GGUF reader (chat.parts.gguf, shared with adapter and vector checks) skips the big
arrays (the tokenizer's vocabulary) without building Python objects for them,
so a model with a 150k-token vocabulary is checked in milliseconds.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NoReturn

from chat.errors import ModelError
from chat.parts.gguf import GGML_F32, MATMUL_TYPES, type_name
from chat.parts.gguf import Header as GGUFHeader
from chat.parts.gguf import read_header as read_gguf_header

# Architectures in gguf's list that are not text models llama.cpp can chat with.
_NOT_CHAT_MODELS = {"clip"}

# Limits llama.cpp asserts on (GGML_ASSERT aborts the process) in llama-cpp-python 0.3.36; measured:
# block_count 513 and expert_count 1025 abort, 512 and 1024 load or fail with an error message.
LLAMA_MAX_LAYERS = 512
LLAMA_MAX_EXPERTS = 1024
_EPSILONS = ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon")
_REFUSED = "the file is damaged or was written by a broken converter; convert or download it again"


def read_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Parse the header of ``path`` with the core reader; raise ModelError naming the problem."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelError(f"{p}: no such file", "check the path, or pass a model id your backends know")
    if p.is_dir():
        raise ModelError(f"{p}: is a folder, not a GGUF file", "pass the .gguf file inside it")
    return read_gguf_header(p, "model", ModelError)


def check_model_file(path: str | os.PathLike[str]) -> GGUFHeader:
    """Read the header and check that llama.cpp can load it as a chat model; raise ModelError if not."""
    header = read_header(path)
    where = str(header.path)
    arch = header.architecture
    kind = str(header.metadata.get("general.type", "model"))
    if kind == "adapter":
        raise ModelError(
            f"{where}: is a {header.metadata.get('adapter.type', 'LoRA')} adapter, not a model",
            "load a base model with -m and attach the adapter through a persona card's [[adapters]]",
        )
    if arch == "controlvector" or "controlvector.layer_count" in header.metadata:
        raise ModelError(
            f"{where}: is a control vector, not a model", "attach it through a persona card's [[steering]]"
        )
    if not arch:
        raise ModelError(
            f"{where}: the file has no general.architecture key", "convert the model again with a current llama.cpp"
        )
    if arch not in supported_architectures():
        raise ModelError(
            f"{where}: unsupported architecture {arch!r}",
            "this llama.cpp (llama-cpp-python 0.3.36) cannot run it; try a newer llama-cpp-python or another backend",
        )
    if "tokenizer.ggml.model" not in header.metadata or "tokenizer.ggml.tokens" not in header.array_lengths:
        raise ModelError(f"{where}: the file has no tokenizer", "convert the model again including its tokenizer")
    if header.duplicate_tokens:
        raise ModelError(
            f"{where}: tokenizer.ggml.tokens lists {header.duplicate_tokens} token(s) twice (llama.cpp would abort)",
            "the file is damaged; download or convert it again",
        )
    end = header.data_end
    if end > header.file_size:
        missing = end - header.file_size
        raise ModelError(
            f"{where}: truncated: the tensors need {end} bytes but the file has {header.file_size} ({missing} missing)",
            "the download is incomplete; download the file again",
        )
    if not header.tensors:
        raise ModelError(
            f"{where}: the file holds no tensors (vocabulary-only GGUF?)", "pass a model file with weights"
        )
    check_hyperparameters(header)
    check_tensor_types(header)
    return header


def check_hyperparameters(header: GGUFHeader) -> None:
    """Refuse the values llama.cpp asserts on (an abort) or computes garbage from (NaN logits, empty answers)."""
    md, arch, where = header.metadata, header.architecture, str(header.path)
    for key, value in md.items():
        if key.startswith(arch + ".") and isinstance(value, float) and not math.isfinite(value):
            raise ModelError(f"{where}: hyper-parameter {key} is {value}; it must be a finite number", _REFUSED)
    for name in _EPSILONS:
        value = md.get(f"{arch}.{name}")
        if _is_number(value) and not value > 0:  # type: ignore[operator]  # a number: checked
            raise ModelError(f"{where}: hyper-parameter {arch}.{name} is {value}; it must be > 0", _REFUSED)
    _in_range(header, "block_count", 1, LLAMA_MAX_LAYERS)  # missing: llama.cpp names the key itself
    _check_experts(header)


def _check_experts(header: GGUFHeader) -> None:
    """The expert counts of mixture-of-experts models, as llama.cpp's load_hparams asserts them."""
    n_expert = _in_range(header, "expert_count", 0, LLAMA_MAX_EXPERTS) or 0
    _in_range(header, "expert_used_count", 1 if n_expert else 0, n_expert, required=n_expert > 0)
    groups = _in_range(header, "expert_group_count", 0, max(n_expert - 1, 0)) or 0
    if groups > 1:
        if n_expert % groups:
            _bad(header, "expert_group_count", groups, f"it must divide expert_count ({n_expert})")
        _in_range(header, "expert_group_used_count", 1, groups - 1, required=True)


def _in_range(header: GGUFHeader, key: str, lo: int, hi: int, required: bool = False) -> int | None:
    """The integer hyper-parameter ``key`` if ``lo ≤ value ≤ hi``; None when absent and not ``required``.

    ``required`` is for the keys whose absence llama.cpp reads as 0 and then asserts on.
    """
    value = header.metadata.get(f"{header.architecture}.{key}")
    if value is None and not required:
        return None
    number = float(value) if _is_number(value) else None  # type: ignore[arg-type]  # a number: checked
    if number is None or not lo <= number <= hi or number != int(number):
        _bad(header, key, value, f"it must be an integer from {lo} to {hi}")
    return int(number)


def _bad(header: GGUFHeader, key: str, value: object, why: str) -> NoReturn:
    raise ModelError(f"{header.path}: hyper-parameter {header.architecture}.{key} is {value}; {why}", _REFUSED)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_tensor_types(header: GGUFHeader) -> None:
    """Every tensor in a type llama.cpp can compute with: weights it can multiply, F32 norms and vectors.

    llama.cpp accepts any stored type at load and crashes at the first token when it
    cannot compute with one (an I32 embedding, an F64 projection, an F16 norm). The rule
    is the one llama.cpp's own converter follows: 1-D tensors and ``*_norm.weight`` are
    F32; everything else is F32, F16, BF16 or a quantized type (:data:`MATMUL_TYPES`).
    """
    for t in header.tensors.values():
        if len(t.shape) <= 1 or t.name.endswith("_norm.weight"):
            if t.ggml_type != GGML_F32:
                raise ModelError(
                    f"{header.path}: tensor {t.name!r} is stored as {type_name(t.ggml_type)}; llama.cpp needs norms "
                    "and other vectors in F32 (it would abort)",
                    _REFUSED,
                )
        elif t.ggml_type not in MATMUL_TYPES:
            raise ModelError(
                f"{header.path}: tensor {t.name!r} is stored as {type_name(t.ggml_type)}, which llama.cpp cannot "
                "multiply (it would crash at the first token)",
                _REFUSED,
            )


def supported_architectures() -> frozenset[str]:
    """The architectures gguf (the writer llama.cpp ships with) knows, less the non-chat ones."""
    from gguf.constants import MODEL_ARCH_NAMES

    return frozenset(MODEL_ARCH_NAMES.values()) - _NOT_CHAT_MODELS

"""The base model parts are made on: the user's GGUF or Hugging Face model, loaded in float32 by transformers.

A GGUF is not converted by us: transformers reads it itself (``from_pretrained(folder,
gguf_file=name)``, dequantizing through the ``gguf`` package) and trains on that float copy
of the same weights. The adapter then applies to the original, quantized file through
llama.cpp. Architectures are checked from the header before torch loads anything, so an
unsupported one is one line naming it.

torch and transformers are imported inside functions only.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chat.errors import ModelError
from chat.parts.shape import BaseShape

#: GGUF ``general.architecture`` values we make parts for (mistral GGUFs say "llama").
GGUF_ARCHITECTURES = ("llama", "qwen2", "gemma3")
#: Hugging Face ``model_type`` values we make parts for.
HF_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma3", "gemma3_text")
SUPPORTED = "llama, mistral, qwen2, gemma3"


@dataclass
class TrainBase:
    """A loaded base: the float model and tokenizer, the template the backends use, and its identity."""

    spec: str
    path: Path  # the GGUF file or the Hugging Face folder
    is_gguf: bool
    model: Any
    tokenizer: Any
    template: Any  # chat.template.ChatTemplate
    architecture: str  # GGUF name ("llama") or Hugging Face model_type
    sha256: str
    load_s: float

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def n_layers(self) -> int:
        return len(decoder_layers(self.model))

    @property
    def hidden_size(self) -> int:
        config = self.model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return int(text.hidden_size)

    def shape(self) -> BaseShape:
        """What the made parts are checked against: the GGUF's own header, else the loaded model."""
        if self.is_gguf:
            return BaseShape.from_gguf(self.path)
        try:
            from chat.parts.shape import read_base

            return read_base(self.path)
        except Exception:  # a family the converters do not know: PEFT checks still work on the modules
            return BaseShape.from_hf_model(self.model)

    def identity(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": "gguf" if self.is_gguf else "hf",
            "architecture": self.architecture,
            "sha256": self.sha256,
            "parameters": self.n_params,
        }


def locate(spec: str) -> tuple[Path, bool]:
    """(path, is_gguf) for a GGUF file, a Hugging Face folder, a cached model id or a config alias."""
    from chat.config import Paths, load_config
    from chat.convert.adapter import is_gguf_file
    from chat.models import choose_model

    paths = Paths()
    choice = choose_model(spec, load_config(paths), paths)
    p = Path(choice.location).expanduser()
    if p.is_file():
        if not is_gguf_file(p):
            raise ModelError(f"{p}: not a GGUF file", "pass a .gguf model or a Hugging Face model folder")
        return p.resolve(), True
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(f"{p}: no config.json in this folder", "pass the Hugging Face model folder")
        return p.resolve(), False
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(choice.location, "config.json")
    except Exception:
        found = None
    if isinstance(found, str):
        return Path(found).parent, False
    raise ModelError(
        f"{choice.location}: base model not found (not a file, a folder or a cached model id)",
        "pass a .gguf file or a Hugging Face model folder",
    )


def check_architecture(path: Path, is_gguf: bool) -> str:
    """The base's architecture name; a ModelError naming it when parts cannot be made for it."""
    if is_gguf:
        from chat.parts.gguf import read_header

        header = read_header(path, "model", ModelError)
        if header.metadata.get("general.type") == "adapter":
            raise ModelError(f"{path}: this is an adapter, not a base model", "pass the base model GGUF")
        arch = header.architecture
        if arch not in GGUF_ARCHITECTURES:
            raise ModelError(
                f"{path}: architecture {arch!r} is not supported for making parts", f"supported: {SUPPORTED}"
            )
        return arch
    from chat.convert.architecture import read_hf_config

    config = read_hf_config(path)
    model_type = str(config.get("model_type") or "")
    if model_type not in HF_MODEL_TYPES:
        found = (config.get("architectures") or [model_type or "unknown"])[0]
        raise ModelError(f"{path}: architecture {found!r} is not supported for making parts", f"supported: {SUPPORTED}")
    return model_type


def file_hash(path: Path, is_gguf: bool) -> str:
    """sha256 over the GGUF, or over a folder's config.json and safetensors (the weights' identity)."""
    h = hashlib.sha256()
    files = [path] if is_gguf else [path / "config.json", *sorted(path.glob("*.safetensors"))]
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def load_base(spec: str, threads: int | None = None) -> TrainBase:
    """Load ``spec`` in float32 on the CPU for training (a GGUF through transformers' own GGUF reader)."""
    started = time.perf_counter()
    path, is_gguf = locate(spec)
    arch = check_architecture(path, is_gguf)
    if not is_gguf and not any(path.glob("*.safetensors")):
        raise ModelError(f"{path}: no *.safetensors weights", "chat loads safetensors only (pickle files can run code)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if threads:
        torch.set_num_threads(threads)
    where, extra = (str(path.parent), {"gguf_file": path.name}) if is_gguf else (str(path), {"use_safetensors": True})
    sha = file_hash(path, is_gguf)
    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # transformers' GGUF reader draws a tqdm bar of its own
            tok = _tokenizer(where, extra, sha) if is_gguf else None
            if tok is None:
                tok = AutoTokenizer.from_pretrained(where, trust_remote_code=False, local_files_only=True, **extra)
            model = AutoModelForCausalLM.from_pretrained(
                where, dtype=torch.float32, trust_remote_code=False, local_files_only=True, **extra
            )
    except ModelError:
        raise
    except Exception as exc:
        first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise ModelError(
            f"{path}: transformers could not load it: {first}", f"parts can be made for {SUPPORTED} models"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    model.eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return TrainBase(
        spec,
        path,
        is_gguf,
        model,
        tok,
        _template(tok, model, path),
        arch,
        sha,
        time.perf_counter() - started,
    )


def _tokenizer(where: str, extra: dict[str, Any], sha: str) -> Any:
    """A GGUF's tokenizer, converted by transformers once and kept (keyed by the file's sha256 and the
    transformers version): converting a 262,144-token vocabulary takes half a minute, reading it back seconds."""
    import transformers
    from transformers import AutoTokenizer

    from chat.config import Paths

    folder = Paths().data_dir / "cache" / "make-tokenizers" / f"{sha[:32]}-{transformers.__version__}"
    if (folder / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)
        except Exception:  # a damaged cache entry: convert again below
            pass
    tok = AutoTokenizer.from_pretrained(where, trust_remote_code=False, local_files_only=True, **extra)
    part = folder.with_name(folder.name + ".part")
    try:
        import shutil

        shutil.rmtree(part, ignore_errors=True)
        tok.save_pretrained(str(part))
        shutil.rmtree(folder, ignore_errors=True)
        part.rename(folder)
    except OSError:  # a read-only or full disk: the tokenizer still works, it is only not kept
        pass
    return tok


def _template(tok: Any, model: Any, path: Path) -> Any:
    """The chat template the backends pick for this model (its own, or a well-known one it fits)."""
    from chat.template import TemplateSelector

    source = getattr(tok, "chat_template", None)
    if isinstance(source, dict):
        source = source.get("default") or next(iter(source.values()), None)
    return TemplateSelector(
        source or None,
        override=None,
        override_from="",
        has_token=lambda text: len(tok(text, add_special_tokens=False)["input_ids"]) == 1,
        architecture=str(getattr(model.config, "model_type", "")),
        bos_token=tok.bos_token or "",
        eos_token=tok.eos_token or "",
        model=str(path),
    ).base


def decoder_layers(model: Any) -> Any:
    """The decoder layers (``model.model.layers`` in every family we support), also under a PeftModel."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a PeftModel
    layers = getattr(getattr(inner, "model", None), "layers", None)
    if layers is None:
        raise ModelError(f"{type(inner).__name__}: cannot find its decoder layers", f"supported: {SUPPORTED}")
    return layers

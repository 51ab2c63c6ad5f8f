"""TransformersModel: a Hugging Face model folder loaded once — weights, tokenizer, templates, parts.

Shared by the slots (:mod:`.slot`) that generate on it. LoRA layers and steering hooks live
on the model itself, so the model remembers which slot's parameter set is active and a slot
makes its own set active (:meth:`TransformersModel.activate`, ~0.3 ms) before each forward
pass; slots that share a set never switch.

torch, transformers and peft are imported inside functions only: ``chat --help`` imports
this plugin.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from chat.backend import Message
from chat.errors import ModelError
from chat.localbackend import PromptCache
from chat.template import ChatTemplate, TemplateSelector

from .checkpoint import check_weights, resolve_model

if TYPE_CHECKING:
    import torch

    from .options import TransformersOptions

MAX_DEFAULT_CTX = 8192
DTYPES = ("auto", "float32", "bfloat16", "float16")
NO_PARTS: tuple = ((), ())  # Persona.parameter_key of a persona without adapters or steering


def pick_device(wanted: str) -> str:
    import torch

    if wanted and wanted != "auto":
        if wanted.startswith("cuda") and not torch.cuda.is_available():
            raise ModelError(
                f"--device {wanted}: torch sees no CUDA device",
                "use --device cpu (or auto), or install a CUDA build of torch",
            )
        if wanted == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ModelError("--device mps: not available here", "use --device cpu (or auto)")
        return wanted
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(wanted: str, device: str, config: Any) -> "torch.dtype":
    """``auto``: float32 on the CPU; on an accelerator the checkpoint's half dtype, else bfloat16."""
    import torch

    if wanted not in DTYPES:
        raise ModelError(f"--dtype {wanted}: unknown", f"use one of {', '.join(DTYPES)}")
    if wanted != "auto":
        return getattr(torch, wanted)
    if device == "cpu":
        return torch.float32
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    if stored in (torch.bfloat16, torch.float16):
        return stored
    if device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


class TransformersModel:
    """The weights (safetensors only, ``trust_remote_code=False``), tokenizer and parameter parts of one model."""

    def __init__(self, model: str, options: "TransformersOptions") -> None:
        started = time.perf_counter()
        self.options = options
        self.hf: Any = None
        self.path = resolve_model(str(model))
        self.weights = check_weights(self.path)  # before torch ever opens a file
        self._load()
        self.load_s = time.perf_counter() - started
        self.prompt_cache = PromptCache()
        self.loras: Any = None
        self.steering: Any = None
        self.active_key: tuple = NO_PARTS  # the parameter set active on the model now
        self._soft_prompts: Any = None
        # LoRA layers and steering hooks are the model's: a slot activates its set and runs its
        # forward pass under this lock, so slots in several threads never see each other's set.
        self.lock = threading.RLock()
        self.forward_passes = 0

    def _load(self) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        where = str(self.path)
        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        try:
            config = AutoConfig.from_pretrained(where, trust_remote_code=False, local_files_only=True)
        except Exception as exc:
            raise ModelError(
                f"{where}: config.json cannot be used: {_first_line(exc)}", _remote_code_hint(exc)
            ) from None
        self.device = pick_device(self.options.device)
        self.dtype = pick_dtype(self.options.dtype, self.device, config)
        try:
            tok = AutoTokenizer.from_pretrained(where, trust_remote_code=False, local_files_only=True)
        except Exception as exc:
            raise ModelError(
                f"{where}: no usable tokenizer: {_first_line(exc)}",
                "the folder needs tokenizer.json (or the tokenizer files of its model)",
            ) from None
        source = getattr(tok, "chat_template", None)
        if isinstance(source, dict):
            source = source.get("default") or next(iter(source.values()), None)
        self.hf = _load_weights(AutoModelForCausalLM, where, config, self.dtype)
        self.hf.to(self.device)
        self.hf.eval()
        self.tokenizer = tok
        self.config = config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.hidden_size = int(text_config.hidden_size)
        self.n_layers = int(getattr(text_config, "num_hidden_layers", 0) or 0)
        head = self.hf.get_output_embeddings()
        self.n_vocab = int(head.weight.shape[0]) if head is not None else len(tok)
        self.n_ctx_train = int(getattr(text_config, "max_position_embeddings", 0) or 0)
        self.context_size = self.options.context_size or min(self.n_ctx_train or MAX_DEFAULT_CTX, MAX_DEFAULT_CTX)
        self.n_params = sum(p.numel() for p in self.hf.parameters())
        self.eos_ids = _eos_ids(self.hf, tok)
        forward = inspect.signature(self.hf.forward).parameters
        self.logits_to_keep = "logits_to_keep" in forward
        self.cache_kw = "cache" if "cache" in forward else "past_key_values"  # renamed in transformers 5.2x
        self.templates = TemplateSelector(
            source or None,
            override=self.options.template,
            override_from=self.options.template_origin,
            has_token=lambda text: len(tok(text, add_special_tokens=False)["input_ids"]) == 1,
            architecture=str(getattr(text_config, "model_type", "") or getattr(config, "model_type", "")),
            bos_token=tok.bos_token or "",
            eos_token=tok.eos_token or "",
            model=where,
        )
        from .sampling import tokenizer_context  # torch-heavy: imported once the model loads

        self.stage_context = tokenizer_context(tok, self.n_vocab)  # vocabulary for plugin stages and DRY

    def stop_ids(self, template: ChatTemplate) -> frozenset[int]:
        """End-of-sequence ids and the template's end-of-turn markers that are single tokens (once per set)."""
        known = self.__dict__.setdefault("_stop_ids", {})
        got = known.get(template.stops)
        if got is None:
            ids = (self.tokenizer(m, add_special_tokens=False)["input_ids"] for m in template.stops)
            got = known[template.stops] = self.eos_ids | {i[0] for i in ids if len(i) == 1}
        return got

    def prompt_tokens(self, template: ChatTemplate, messages: Sequence[Message]) -> list[int]:
        """The rendered prompt as ids; as ``apply_chat_template`` does, no special tokens are added."""

        def compute() -> list[int]:
            text = template.render(messages, add_generation_prompt=True)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

        return self.prompt_cache.get(template, messages, compute)

    # --- parameter parts: loaded once, the active set switched per slot --------------------

    def parts(self) -> tuple[Any, Any]:
        """The model's LoRA set and steering hooks (created on first use)."""
        from .parts import LoraSet, Steering

        if self.loras is None:
            self.loras = LoraSet(self.hf)
        if self.steering is None:
            self.steering = Steering(self.hf, self.hidden_size)
        return self.loras, self.steering

    def soft_prompts(self) -> Any:
        """The soft prompts read for this model (:class:`chat.parts.softprompt.SoftPrompts`), shared by its slots."""
        if self._soft_prompts is None:
            from chat.parts.shape import BaseShape
            from chat.parts.softprompt import SoftPrompts

            self._soft_prompts = SoftPrompts(BaseShape.from_hf_model(self.hf))  # LoRA layers are skipped
        return self._soft_prompts

    def activate(self, key: tuple, adapters: list, vectors: list) -> list[str]:
        """Make ``adapters`` and ``vectors`` the active set (a no-op when ``key`` is active); return notes."""
        if key == self.active_key:
            return []
        loras, steering = self.parts()
        loras.activate(adapters)
        notes = steering.activate(vectors)
        self.active_key = key
        return notes

    # --- facts and lifetime ------------------------------------------------------------

    def info(self) -> dict[str, object]:
        import torch
        import transformers

        try:
            import peft

            peft_version = peft.__version__
        except ImportError:  # pragma: no cover
            peft_version = ""
        size = sum(p.stat().st_size for p in self.weights if p.exists())
        architectures = ",".join(getattr(self.config, "architectures", None) or [])
        return {
            "model": str(self.path),
            "name": self.path.name,
            "architecture": architectures or getattr(self.config, "model_type", ""),
            "parameters": self.n_params,
            "size_bytes": size,
            "device": self.device,
            "dtype": str(self.dtype).removeprefix("torch."),
            "n_ctx_train": self.n_ctx_train,
            "threads": torch.get_num_threads(),
            "load_s": round(self.load_s, 3),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "peft": peft_version,
        }

    def close(self) -> None:
        if self.steering is not None:
            self.steering.remove_hooks()
        self.steering = self.loras = None
        if self.hf is not None:
            self.hf = None
            if str(getattr(self, "device", "cpu")).startswith("cuda"):
                import torch

                torch.cuda.empty_cache()


def _load_weights(auto: Any, where: str, config: Any, dtype: Any) -> Any:
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()  # the terminal belongs to the chat, not to a "Loading weights" bar
    hf_logging.set_verbosity_error()  # nor to a "LOAD REPORT" table written with ANSI codes even into a pipe
    try:
        return auto.from_pretrained(
            where, config=config, dtype=dtype, use_safetensors=True, trust_remote_code=False, local_files_only=True
        )
    except Exception as exc:
        raise ModelError(
            f"{where}: transformers could not load the model: {_first_line(exc)}", _remote_code_hint(exc)
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _eos_ids(hf: Any, tok: Any) -> frozenset[int]:
    ids: set[int] = set()
    generation = getattr(hf, "generation_config", None)
    for value in (
        getattr(hf.config, "eos_token_id", None),
        getattr(generation, "eos_token_id", None),
        tok.eos_token_id,
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value if v is not None)
    return frozenset(ids)


def _remote_code_hint(exc: BaseException) -> str:
    text = str(exc)
    if "trust_remote_code" in text or "does not recognize this architecture" in text or "model type" in text:
        return (
            "this model needs custom code from its repo, which chat never runs (trust_remote_code=False); "
            "use a model transformers supports natively"
        )
    return "check that the folder is a complete Hugging Face model (config.json, *.safetensors, tokenizer files)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]

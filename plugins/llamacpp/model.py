"""LlamaModel: one GGUF file loaded once (mmap) — its weights, vocabulary and chat templates.

Everything here is shared by the slots (:mod:`.slot`) that generate on the model:
tokenizing, token pieces, the template choice, and the saved persona states (a state
saved by one slot restores into any other). Contexts are created per slot.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chat.backend import Message
from chat.errors import ModelError
from chat.localbackend import PromptCache
from chat.template import ChatTemplate, TemplateSelector

from . import native
from .gguf_file import GGUFHeader, check_model_file
from .statecache import StateCache

if TYPE_CHECKING:
    from .options import LlamaCppOptions

MAX_DEFAULT_CTX = 8192
MAX_BATCH = 512
MAX_BEAMS = 8
SEQUENCES = 1 + 2 * MAX_BEAMS  # sequence 0 holds the conversation; beam search double-buffers its beams


def cpu_has_amx() -> bool:
    """Whether the CPU has Intel AMX (Linux: /proc/cpuinfo flags)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return "amx_tile" in line.split()
    except OSError:
        pass
    return False


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class LlamaModel:
    """The weights and vocabulary of one GGUF file, validated before llama.cpp sees it."""

    def __init__(self, path: Path, options: "LlamaCppOptions", kv_type: str) -> None:
        self.path = path
        self.options = options
        self.kv_type = kv_type
        self.header: GGUFHeader = check_model_file(path)  # before llama.cpp ever sees the file
        self.L = L = native.library()
        self.ptr: Any = None
        where = str(path)
        mparams = L.llama_model_default_params()
        mparams.n_gpu_layers = options.gpu_layers
        mparams.load_mode = L.LLAMA_LOAD_MODE_MMAP
        # llama.cpp's AMX weight repacking (an "extra buffer type") segfaults on multi-token
        # batches of Q8_0 models in llama-cpp-python 0.3.36; without it the mmap'd weights are used as-is.
        mparams.use_extra_bufts = not cpu_has_amx()
        native.forget_log()
        self.ptr = L.llama_model_load_from_file(where.encode("utf-8"), mparams)
        if not self.ptr:
            reason = native.recent_errors() or "llama.cpp could not load it"
            raise ModelError(
                f"{where}: {reason}", "check that the file is a complete GGUF model this llama.cpp supports"
            )
        self.vocab = L.llama_model_get_vocab(self.ptr)
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(L.llama_model_n_ctx_train(self.ptr))
        self.threads = options.threads or default_threads()
        self.states = StateCache(options.kv_cache_bytes)
        self.lock = threading.RLock()  # loaded adapters and saved states, shared by slots in several threads
        self._soft_prompts: Any = None
        self.bos = int(L.llama_vocab_bos(self.vocab))
        self.eos = int(L.llama_vocab_eos(self.vocab))
        self.add_bos = bool(L.llama_vocab_get_add_bos(self.vocab)) and self.bos >= 0
        self.add_eos = bool(L.llama_vocab_get_add_eos(self.vocab)) and self.eos >= 0
        self.prompt_cache = PromptCache()
        self.templates = TemplateSelector(
            self.header.chat_template,
            override=options.template,
            override_from=options.template_origin,
            has_token=lambda text: len(self.tokenize(text, special=True)) == 1,
            architecture=self.header.architecture,
            bos_token=self.token_text(self.bos),
            eos_token=self.token_text(self.eos),
            model=where,
        )

    def soft_prompts(self) -> Any:
        """The soft prompts read for this model (:class:`chat.parts.softprompt.SoftPrompts`), shared by its slots."""
        if self._soft_prompts is None:
            from chat.parts.shape import BaseShape
            from chat.parts.softprompt import SoftPrompts

            self._soft_prompts = SoftPrompts(BaseShape.from_header(self.header))
        return self._soft_prompts

    def new_context(self, wanted: int) -> Any:
        """A context of ``wanted`` tokens shared by :data:`SEQUENCES` sequences (one unified KV memory)."""
        L = self.L
        cparams = L.llama_context_default_params()
        cparams.n_ctx = wanted
        cparams.n_batch = min(MAX_BATCH, wanted)
        cparams.n_ubatch = min(MAX_BATCH, wanted)
        cparams.n_seq_max = SEQUENCES
        cparams.kv_unified = True  # every sequence may use the whole context (beams share the prompt's cells)
        cparams.n_threads = self.threads
        cparams.n_threads_batch = self.threads
        cparams.no_perf = True
        if self.kv_type == "f32":  # bit-stable comparisons: CPU flash attention computes in half precision
            cparams.type_k = cparams.type_v = L.GGML_TYPE_F32
            cparams.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        native.forget_log()
        ctx = L.llama_init_from_model(self.ptr, cparams)
        if not ctx:
            reason = native.recent_errors() or "out of memory?"
            raise ModelError(
                f"{self.path}: cannot create a context of {wanted} tokens: {reason}", "try a smaller --ctx"
            )
        return ctx

    @property
    def wanted_context(self) -> int:
        train = self.n_ctx_train if self.n_ctx_train > 0 else MAX_DEFAULT_CTX
        return self.options.context_size or min(train, MAX_DEFAULT_CTX)

    # --- tokens ----------------------------------------------------------------------

    def token_text(self, token: int) -> str:
        """The vocabulary entry of ``token`` ("" for none), as templates expect bos_token/eos_token."""
        if token < 0:
            return ""
        raw = self.L.llama_vocab_get_text(self.vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        """Tokens of ``text`` without BOS/EOS; ``special`` parses control tokens like ``<|im_start|>``."""
        L = self.L
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (L.llama_token * n_max)()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, n_max, False, special)
        if n < 0:
            n_max = -n
            buf = (L.llama_token * n_max)()
            n = L.llama_tokenize(self.vocab, data, len(data), buf, n_max, False, special)
            if n < 0:
                raise ModelError(f"{self.path}: tokenizing {len(data)} bytes failed", None)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes ``token`` stands for in an answer (control tokens render as nothing)."""
        L = self.L
        buf = ctypes.create_string_buffer(64)  # per call: slots in several threads decode at once
        n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(self.L.llama_vocab_is_eog(self.vocab, token))

    def eog_ids(self) -> frozenset[int]:
        """Every end-of-generation token of the vocabulary (read once; beam search needs the whole set)."""
        got = self.__dict__.get("_eog_ids")
        if got is None:
            got = self._eog_ids = frozenset(t for t in range(self.n_vocab) if self.is_eog(t))
        return got

    def stop_ids(self, template: ChatTemplate) -> frozenset[int]:
        """The template's end-of-turn markers that are single tokens (worked out once per set of markers)."""
        known = self.__dict__.setdefault("_stop_ids", {})
        got = known.get(template.stops)
        if got is None:
            ids = (self.tokenize(m, special=True) for m in template.stops)
            got = known[template.stops] = frozenset(i[0] for i in ids if len(i) == 1)
        return got

    def prompt_tokens(self, template: ChatTemplate, messages: Sequence[Message]) -> list[int]:
        """The rendered prompt as tokens, with BOS/EOS as the file asks (never a doubled BOS)."""

        def compute() -> list[int]:
            tokens = self.tokenize(template.render(messages, add_generation_prompt=True), special=True)
            if self.add_bos and (not tokens or tokens[0] != self.bos):
                tokens.insert(0, self.bos)
            if self.add_eos and (not tokens or tokens[-1] != self.eos):
                tokens.append(self.eos)
            return tokens

        return self.prompt_cache.get(template, messages, compute)

    # --- facts and lifetime ------------------------------------------------------------

    def info(self) -> dict[str, object]:
        L = self.L
        desc, params, size = "", 0, 0
        if self.ptr:
            buf = ctypes.create_string_buffer(256)
            L.llama_model_desc(self.ptr, buf, len(buf))
            desc = buf.value.decode("utf-8", errors="replace")
            params = int(L.llama_model_n_params(self.ptr))
            size = int(L.llama_model_size(self.ptr))
        return {
            "model": str(self.path),
            "name": self.header.metadata.get("general.name", self.path.stem),
            "architecture": self.header.architecture,
            "description": desc,
            "parameters": params,
            "size_bytes": size,
            "n_ctx_train": self.n_ctx_train,
            "gpu_layers": self.options.gpu_layers,
            "threads": self.threads,
            "kv_type": self.kv_type,
            "saved_states": len(self.states),
            "llama_cpp_python": getattr(L, "__version__", ""),
        }

    def close(self) -> None:
        self.states.clear()
        if self.ptr:
            self.L.llama_model_free(self.ptr)
            self.ptr = None

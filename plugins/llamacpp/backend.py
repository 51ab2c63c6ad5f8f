"""LlamaCppBackend: one GGUF model loaded once, streamed through llama.cpp's low-level API.

What it keeps between calls:

* the model and one context (sequence 0), loaded once with mmap;
* ``_kv``: the tokens whose keys/values are in the context's memory, in order.
  A new prompt is compared with it; only the tokens after the longest common
  prefix are evaluated, the stale tail is removed with ``llama_memory_seq_rm``.
  The list is updated only after ``llama_decode`` succeeds, so closing a stream
  half-way (Ctrl-C) leaves it exactly describing the memory;
* one native sampler chain, rebuilt only when the settings change;
* ``_attached``: the identity of the parameter parts (LoRA set, control vectors)
  active in the context, and ``_kv_attached``, the set the memory was computed
  under. When they differ the memory is stale: it is never reused under another set;
* ``_states``: an LRU (byte budget ``BackendOptions.kv_cache_bytes``) of saved
  sequence states keyed by (parameter set, persona). When the persona changes, the
  memory it leaves is saved under its old key; coming back restores it with
  ``llama_state_seq_set_data``, so a persona used before costs almost no prompt
  evaluation (its fixed prefix — system prompt and examples — is already there).

:meth:`apply` hot-swaps the parameter parts (see ``parts.py``): adapters are checked
before llama.cpp sees them, loaded once, and the whole active set is replaced at once.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from chat.backend import BackendOptions, Finish, FinishReason, Message, Timings, Usage
from chat.errors import ContextOverflowError, ModelError, SamplingError

from . import native
from .gguf_file import GGUFHeader, check_model_file
from .sampler import NativeSampler, build_chain, chain_key
from chat.template import ChatTemplate, TemplateSelector
from .statecache import SavedState, StateCache
from .textstream import TextAssembler

if TYPE_CHECKING:
    from chat.persona import Persona

    from .parts import ParameterParts
    from chat.sampling import SamplerSettings

SEQ = 0  # the one sequence this backend uses
MAX_DEFAULT_CTX = 8192
MAX_BATCH = 512
NO_PARTS: tuple = ((), ())  # Persona.parameter_key of a persona without adapters or steering


@dataclass
class StreamStats:
    """What one stream() call did."""

    prompt_tokens: int = 0
    prompt_tokens_evaluated: int = 0  # prompt tokens run through the model
    prompt_tokens_reused: int = 0  # prompt tokens whose KV was already in memory
    completion_tokens: int = 0
    completion_ids: tuple[int, ...] = ()
    finish: str = ""  # the Finish reason, or "closed" when the consumer closed the stream
    kv_cleared: bool = False  # the memory was discarded (parameter parts changed, or partial removal impossible)
    state_restored: int = 0  # tokens whose KV came from a saved persona state


@dataclass
class BackendStats:
    """Cumulative counters over the backend's life, plus the last call."""

    streams: int = 0
    prompt_tokens_evaluated: int = 0
    prompt_tokens_reused: int = 0
    completion_tokens: int = 0
    sampler_builds: int = 0
    state_saves: int = 0  # persona states saved into the cache
    state_restores: int = 0  # persona states restored from it
    state_tokens_restored: int = 0
    last: StreamStats = field(default_factory=StreamStats)


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


class LlamaCppBackend:
    """A GGUF model on llama.cpp (CPU, or GPU layers when llama-cpp-python was built with one)."""

    name: ClassVar[str] = "llama.cpp"
    install_hint: ClassVar[str] = 'install it: pip install "chat[llamacpp]"'  # shown when the library it drives is missing

    @classmethod
    def can_load(cls, model: str) -> bool:
        return str(model).lower().endswith(".gguf")

    def __init__(self, model: str, options: BackendOptions | None = None, *, kv_type: str = "f16") -> None:
        """``kv_type`` "f32" keeps the KV cache in float32 (bit-stable comparisons in tests); "f16" is llama.cpp's default."""
        if kv_type not in ("f16", "f32"):
            raise ValueError(f"kv_type must be 'f16' or 'f32', not {kv_type!r}")
        self.kv_type = kv_type
        self._model: Any = None
        self._parts: "ParameterParts | None" = None
        self._ctx: Any = None
        self._batch: Any = None
        self._sampler: NativeSampler | None = None
        self._closed = False
        self.options = options or BackendOptions()
        self.path = Path(model).expanduser().resolve()
        self.model_name = self.path.name
        self.header: GGUFHeader = check_model_file(self.path)  # before llama.cpp ever sees the file
        self._L = L = native.library()
        try:
            self._load(L)
        except BaseException:
            self.close()
            raise
        self.stats = BackendStats()
        self._kv: list[int] = []
        self._generation = 0
        self._sampler_key: str | None = None
        self._prompt_cache: OrderedDict[tuple, list[int]] = OrderedDict()
        self._attached: tuple = NO_PARTS  # parameter parts active in the context
        self._kv_attached: tuple = NO_PARTS  # parameter parts the memory was computed under
        self.persona_name = ""
        self._kv_owner: tuple = (NO_PARTS, "")  # (parameter set, persona) the memory belongs to
        self._states = StateCache(self.options.kv_cache_bytes)

    # --- loading ---------------------------------------------------------------------

    def _load(self, L: Any) -> None:
        where = str(self.path)
        mparams = L.llama_model_default_params()
        mparams.n_gpu_layers = self.options.gpu_layers
        mparams.load_mode = L.LLAMA_LOAD_MODE_MMAP
        # llama.cpp's AMX weight repacking (an "extra buffer type") segfaults on multi-token
        # batches of Q8_0 models in llama-cpp-python 0.3.36; without it the mmap'd weights are used as-is.
        mparams.use_extra_bufts = not cpu_has_amx()
        native.mark()
        self._model = L.llama_model_load_from_file(where.encode("utf-8"), mparams)
        if not self._model:
            reason = native.errors_since() or "llama.cpp could not load it"
            raise ModelError(f"{where}: {reason}", "check that the file is a complete GGUF model this llama.cpp supports")
        self._vocab = L.llama_model_get_vocab(self._model)
        self.n_vocab = L.llama_vocab_n_tokens(self._vocab)
        self.n_ctx_train = int(L.llama_model_n_ctx_train(self._model))
        wanted = self.options.context_size or min(self.n_ctx_train if self.n_ctx_train > 0 else MAX_DEFAULT_CTX, MAX_DEFAULT_CTX)
        self.n_threads = self.options.threads or default_threads()
        cparams = L.llama_context_default_params()
        cparams.n_ctx = wanted
        cparams.n_batch = min(MAX_BATCH, wanted)
        cparams.n_ubatch = min(MAX_BATCH, wanted)
        cparams.n_seq_max = 1
        cparams.n_threads = self.n_threads
        cparams.n_threads_batch = self.n_threads
        cparams.no_perf = True
        if self.kv_type == "f32":
            cparams.type_k = cparams.type_v = L.GGML_TYPE_F32
        native.mark()
        self._ctx = L.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            reason = native.errors_since() or "out of memory?"
            raise ModelError(f"{where}: cannot create a context of {wanted} tokens: {reason}", "try a smaller --ctx")
        # llama.cpp may round the context up (to a multiple of 256); use no more than was asked for.
        self.context_size = min(wanted, int(L.llama_n_ctx(self._ctx)))
        self._n_batch = min(MAX_BATCH, self.context_size)
        self._batch = L.llama_batch_init(self._n_batch, 0, 1)
        self._mem = L.llama_get_memory(self._ctx)
        from chat.gguf_parts import BaseModel  # numpy: imported with the first model, not with the plugin

        from .parts import ParameterParts

        self._parts = ParameterParts(L, self._model, self._ctx, BaseModel.from_header(self.header))
        self._piece_buf = ctypes.create_string_buffer(256)
        self._bos = int(L.llama_vocab_bos(self._vocab))
        self._eos = int(L.llama_vocab_eos(self._vocab))
        self._add_bos = bool(L.llama_vocab_get_add_bos(self._vocab)) and self._bos >= 0
        self._add_eos = bool(L.llama_vocab_get_add_eos(self._vocab)) and self._eos >= 0
        self._templates = TemplateSelector(
            self.header.chat_template,
            override=self.options.template,
            override_from=self.options.template_origin,
            has_token=lambda text: len(self.tokenize(text, special=True)) == 1,
            architecture=self.header.architecture,
            bos_token=self.token_text(self._bos),
            eos_token=self.token_text(self._eos),
            model=where,
        )
        self._use_template(self._templates.base)

    def _use_template(self, template: ChatTemplate) -> None:
        """Render prompts with ``template``; its end-of-turn markers that are single tokens end answers as tokens."""
        self.template = template
        self._stop_ids = frozenset(
            ids[0] for ids in (self.tokenize(m, special=True) for m in template.stops) if len(ids) == 1
        )

    # --- tokens ----------------------------------------------------------------------

    def token_text(self, token: int) -> str:
        """The vocabulary entry of ``token`` ("" for none), as templates expect bos_token/eos_token."""
        if token < 0:
            return ""
        raw = self._L.llama_vocab_get_text(self._vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        """Tokens of ``text`` without BOS/EOS; ``special`` parses control tokens like ``<|im_start|>``."""
        L = self._L
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (L.llama_token * n_max)()
        n = L.llama_tokenize(self._vocab, data, len(data), buf, n_max, False, special)
        if n < 0:
            n_max = -n
            buf = (L.llama_token * n_max)()
            n = L.llama_tokenize(self._vocab, data, len(data), buf, n_max, False, special)
            if n < 0:
                raise ModelError(f"{self.path}: tokenizing {len(data)} bytes failed", None)
        return buf[:n]

    def piece(self, token: int) -> bytes:
        """The bytes ``token`` stands for in an answer (control tokens render as nothing)."""
        L = self._L
        buf = self._piece_buf
        n = L.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(self._L.llama_vocab_is_eog(self._vocab, token))

    def render(self, messages: Sequence[Message]) -> str:
        """The prompt text for ``messages``, ending with the assistant's generation prompt."""
        return self.template.render(messages, add_generation_prompt=True)

    def prompt_tokens(self, messages: Sequence[Message]) -> list[int]:
        """The rendered prompt as tokens, with BOS/EOS as the file asks (never a doubled BOS)."""
        key = (self.template, *messages)
        cached = self._prompt_cache.get(key)
        if cached is not None:
            self._prompt_cache.move_to_end(key)
            return list(cached)
        tokens = self.tokenize(self.render(messages), special=True)
        if self._add_bos and (not tokens or tokens[0] != self._bos):
            tokens.insert(0, self._bos)
        if self._add_eos and (not tokens or tokens[-1] != self._eos):
            tokens.append(self._eos)
        self._prompt_cache[key] = tokens
        while len(self._prompt_cache) > 16:
            self._prompt_cache.popitem(last=False)
        return list(tokens)

    def count_tokens(self, messages: Sequence[Message]) -> int:
        self._check_open()
        return len(self.prompt_tokens(messages))

    # --- sampling --------------------------------------------------------------------

    def sampler_for(self, sampling: "SamplerSettings") -> NativeSampler:
        """The native chain for ``sampling``; built only when the settings differ from the last call's."""
        key = chain_key(sampling)
        if self._sampler is None or key != self._sampler_key:
            chain = build_chain(
                sampling,
                vocab=self._vocab,
                n_vocab=self.n_vocab,
                n_ctx=self.context_size,
                plugin_stage=self.plugin_sampler,
            )
            if self._sampler is not None:
                self._sampler.close()
            self._sampler, self._sampler_key = chain, key
            self.stats.sampler_builds += 1
        return self._sampler

    def plugin_sampler(self, name: str, stage: Any, params: dict[str, Any]) -> Any:
        """A plugin stage (from ``chat.sampling.plugin_stages()``) as a custom sampler in the native chain.

        The stage runs inside llama.cpp's chain through our own ``llama_sampler_i``
        (:class:`.sampler.PythonStage`): the candidates become a vocabulary-wide logit
        vector, the stage returns new logits, they are written back. Its vocabulary
        (token texts, tokenizer) is built once per loaded model, lazily.
        """
        from chat.stages import SamplerStage, Vocabulary

        from .sampler import PythonStage

        if not isinstance(stage, SamplerStage):
            raise SamplingError(
                f"sampler stage {name!r} is not a chat.stages.SamplerStage (got {type(stage).__name__})",
                f"its plugin must register(SamplerStage(...)); or remove {name!r} from `order`",
            )
        vocabulary = self.__dict__.get("_stage_vocabulary")
        if vocabulary is None:
            vocabulary = self._stage_vocabulary = Vocabulary(
                self.n_vocab,
                lambda t: self.piece(t).decode("utf-8", errors="replace"),
                lambda text: self.tokenize(text, special=False),
            )
        return PythonStage(name, stage, stage.validate_params(params), vocabulary)

    # --- persona parameter parts ------------------------------------------------------

    def apply(self, persona: "Persona") -> list[str]:
        """Attach the persona's adapters and control vectors, replacing the active set at once.

        Every file is checked first; a part that does not fit raises AdapterError and
        leaves the context as it was. Adapters stay loaded for the model's life, so
        switching back and forth never reads a file twice. Returns warnings.
        """
        self._check_open()
        assert self._parts is not None
        template = self._templates.for_card(persona.template, persona.name)
        warnings = self._parts.attach(persona)
        self._use_template(template)
        self.persona_name = persona.label
        self._set_parameter_parts(self._parts.key)
        return warnings

    def _set_parameter_parts(self, key: tuple) -> None:
        """Make ``key`` the active parameter set; the memory is kept only if it was computed under it."""
        self._attached = key

    def active_parts(self) -> list[str]:
        """``/adapters``: one line per attached adapter or vector with its effective scale, card and size."""
        if self._parts is None:
            return []
        return [p.line() for p in self._parts.active]

    @property
    def loaded_adapters(self) -> int:
        """Adapters loaded into memory so far (they stay until the model is closed)."""
        return self._parts.loaded if self._parts else 0

    @property
    def state_cache(self) -> StateCache:
        return self._states

    # --- generation ------------------------------------------------------------------

    def stream(self, messages: Sequence[Message], sampling: "SamplerSettings") -> Iterator[str | Finish]:
        """Yield text chunks, then one Finish. Tokenizing, the overflow check and the sampler happen now."""
        self._check_open()
        started = time.perf_counter()
        prompt = self.prompt_tokens(messages)
        if not prompt:  # llama.cpp would sample from logits it never computed (GGML_ASSERT: abort)
            raise ModelError(
                f"{self.path}: the chat template {self.template.description} "
                "renders this conversation as an empty prompt",
                "use another template (--template chatml, for one) or fix the template file",
            )
        if len(prompt) >= self.context_size:
            raise ContextOverflowError(
                f"the prompt needs {len(prompt)} tokens but the context holds {self.context_size}",
                "start a new conversation, shorten the message, or load the model with a larger --ctx",
            )
        chain = self.sampler_for(sampling)
        self._generation += 1
        return self._generate(prompt, chain, sampling, started, self._generation)

    def _generate(
        self, prompt: list[int], chain: NativeSampler, sampling: "SamplerSettings", started: float, generation: int
    ) -> Iterator[str | Finish]:
        if generation != self._generation:  # a newer stream() began before this one was first iterated
            yield Finish("interrupted", Usage(prompt_tokens=len(prompt)))
            return
        last = StreamStats(prompt_tokens=len(prompt), finish="closed")
        self.stats.last = last
        self.stats.streams += 1
        reused = self._sync_memory(prompt, last)
        prompt_done = time.perf_counter()
        chain.reset()
        if chain.needs_history:
            for tok in prompt:
                chain.accept(tok)
        text = TextAssembler((*sampling.stop, *self.template.stops))
        stop_ids = self._stop_ids
        out: list[int] = []
        reason: FinishReason = "stop"
        first_chunk = first_token = last_token = 0.0
        try:
            while True:
                if generation != self._generation or self._closed:
                    reason = "interrupted"
                    break
                tok = chain.sample(self._ctx, -1)  # also accepts tok into the chain
                if tok in stop_ids or self.is_eog(tok):
                    break
                out.append(tok)
                last.completion_tokens = len(out)
                last_token = time.perf_counter()
                first_token = first_token or last_token
                chunk = text.feed(self.piece(tok))
                if chunk:
                    first_chunk = first_chunk or time.perf_counter()
                    yield chunk
                if text.stopped:
                    break
                if sampling.max_tokens is not None and len(out) >= sampling.max_tokens:
                    reason = "length"
                    break
                if len(self._kv) >= self.context_size:
                    reason = "length"
                    break
                self._eval([tok], logits_last=True)
            tail = text.finish()
            if tail:
                first_chunk = first_chunk or time.perf_counter()
                yield tail
        finally:
            last.completion_ids = tuple(out)
            self.stats.completion_tokens += len(out)
        last.finish = reason
        decode_s = last_token - first_token
        timings = Timings(
            ttft_s=(first_chunk - started) if first_chunk else 0.0,
            tokens_per_s=(len(out) - 1) / decode_s if len(out) > 1 and decode_s > 0 else 0.0,
            prompt_s=prompt_done - started,
        )
        yield Finish(reason, Usage(len(prompt), len(out), reused), timings)

    def _sync_memory(self, prompt: list[int], last: StreamStats) -> int:
        """Make the memory hold ``prompt`` with logits for its last token; return the tokens reused."""
        L = self._L
        self._switch_memory(prompt, last)
        kv = self._kv
        n = min(len(kv), len(prompt) - 1)  # at least one prompt token is evaluated, for its logits
        common = 0
        while common < n and kv[common] == prompt[common]:
            common += 1
        # Always drop everything from ``common`` on, even when the list says there is nothing:
        # an interrupt between llama_decode and the list update may have left untracked positions.
        if not L.llama_memory_seq_rm(self._mem, SEQ, common, -1):
            self._clear_memory()  # this memory cannot drop a tail (recurrent models): start over
            common = 0
            last.kv_cleared = True
        else:
            del kv[common:]
        self._eval(prompt[common:], logits_last=True)
        last.prompt_tokens_reused = common
        last.prompt_tokens_evaluated = len(prompt) - common
        self.stats.prompt_tokens_reused += common
        self.stats.prompt_tokens_evaluated += len(prompt) - common
        return common

    def _switch_memory(self, prompt: list[int], last: StreamStats) -> None:
        """When the persona or parameter set changed: save the memory it leaves, restore the new one's.

        Memory computed under another parameter set is never reused. A persona
        without parameter parts may share the set with the last one; its saved state
        is restored only when it covers more of the prompt than the memory does.
        """
        owner = (self._attached, self.persona_name)
        if owner == self._kv_owner:
            return
        stale = self._kv_attached != self._attached
        saved = self._states.get(owner)
        in_memory = 0 if stale else _common_prefix(self._kv, prompt)
        use_saved = saved is not None and _common_prefix(saved.tokens, prompt) > in_memory
        if in_memory < len(self._kv):  # some of the old persona's memory would be lost: keep it
            self._save_state(self._kv_owner)
        if stale or use_saved:
            self._clear_memory()
            last.kv_cleared = stale
        if use_saved:
            assert saved is not None
            self._restore_state(saved, last)
        self._kv_attached = self._attached
        self._kv_owner = owner

    def _save_state(self, key: tuple) -> None:
        L = self._L
        if not self._kv or self._states.budget <= 0:
            return
        L.llama_memory_seq_rm(self._mem, SEQ, len(self._kv), -1)  # positions the list does not know
        size = int(L.llama_state_seq_get_size(self._ctx, SEQ))
        if not self._states.fits(size):
            self._states.discard(key)
            return
        buf = (ctypes.c_uint8 * size)()
        written = int(L.llama_state_seq_get_data(self._ctx, buf, size, SEQ))
        if written and self._states.put(key, SavedState(tuple(self._kv), buf)):
            self.stats.state_saves += 1

    def _restore_state(self, saved: SavedState, last: StreamStats) -> None:
        if not self._L.llama_state_seq_set_data(self._ctx, saved.data, saved.n_bytes, SEQ):
            self._clear_memory()  # a state this context cannot take: evaluate from scratch
            return
        self._kv[:] = saved.tokens
        last.state_restored = len(saved.tokens)
        self.stats.state_restores += 1
        self.stats.state_tokens_restored += len(saved.tokens)

    def _clear_memory(self) -> None:
        self._L.llama_memory_clear(self._mem, True)
        self._kv.clear()

    def _eval(self, tokens: Sequence[int], logits_last: bool) -> None:
        """Run ``tokens`` through the model after ``_kv``, in batches; ``_kv`` grows only on success."""
        L = self._L
        b = self._batch
        total = len(tokens)
        for start in range(0, total, self._n_batch):
            chunk = tokens[start : start + self._n_batch]
            base = len(self._kv)
            for i, tok in enumerate(chunk):
                b.token[i] = tok
                b.pos[i] = base + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = SEQ
                b.logits[i] = 0
            if logits_last and start + len(chunk) == total:
                b.logits[len(chunk) - 1] = 1
            b.n_tokens = len(chunk)
            native.mark()
            rc = L.llama_decode(self._ctx, b)
            if rc != 0:
                self._resync_kv()
                if rc == 1:
                    raise ContextOverflowError(
                        f"llama.cpp found no room for {len(chunk)} more tokens in the context of {self.context_size}",
                        "start a new conversation or load the model with a larger --ctx",
                    )
                raise ModelError(f"{self.path}: llama_decode failed (code {rc}): {native.errors_since()}", None)
            self._kv.extend(chunk)

    def _resync_kv(self) -> None:
        """After a failed decode, trust the memory: keep the tokens whose positions it still holds."""
        pos_max = int(self._L.llama_memory_seq_pos_max(self._mem, SEQ))
        del self._kv[pos_max + 1 :]

    # --- facts and lifetime ------------------------------------------------------------

    @property
    def kv_tokens(self) -> list[int]:
        """A copy of the tokens whose KV is in memory (what the next prompt is compared with)."""
        return list(self._kv)

    def info(self) -> dict[str, object]:
        L = self._L
        desc = ""
        params = size = 0
        if self._model:
            buf = ctypes.create_string_buffer(256)
            L.llama_model_desc(self._model, buf, len(buf))
            desc = buf.value.decode("utf-8", errors="replace")
            params = int(L.llama_model_n_params(self._model))
            size = int(L.llama_model_size(self._model))
        md = self.header.metadata
        return {
            "backend": self.name,
            "model": str(self.path),
            "name": md.get("general.name", self.path.stem),
            "architecture": self.header.architecture,
            "description": desc,
            "parameters": params,
            "size_bytes": size,
            "n_ctx": self.context_size,
            "n_ctx_train": self.n_ctx_train,
            "context_used": len(self._kv),
            "template": self.template.description,
            "gpu_layers": self.options.gpu_layers,
            "threads": self.n_threads,
            "n_batch": self._n_batch,
            "sampler": list(self._sampler.stages) if self._sampler else [],
            "adapters": [p.line() for p in (self._parts.active if self._parts else []) if p.kind == "adapter"],
            "steering": [p.line() for p in (self._parts.active if self._parts else []) if p.kind == "steering"],
            "kv_type": self.kv_type,
            "saved_states": len(self._states) if hasattr(self, "_states") else 0,
            "llama_cpp_python": getattr(L, "__version__", ""),
        }

    def _check_open(self) -> None:
        if self._closed:
            raise ModelError(f"{self.path}: the backend was closed", "load the model again")

    def close(self) -> None:
        """Free the sampler, batch, context and model; safe to call twice."""
        self._closed = True
        L = getattr(self, "_L", None)
        if L is None:
            return
        if self._sampler is not None:
            self._sampler.close()
            self._sampler = None
        if self._batch is not None:
            L.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_states", None) is not None:
            self._states.clear()
        if self._parts is not None:
            self._parts.detach_all()  # adapters themselves are freed with the model
            self._parts = None
        if self._ctx:
            L.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            L.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> "LlamaCppBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b) - 1)  # the last prompt token is always evaluated, for its logits
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return max(i, 0)

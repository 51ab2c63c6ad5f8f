"""LlamaSlot: one generation state on a loaded GGUF model — a llama.cpp context of its own.

What a slot keeps between calls:

* its context; sequence 0 holds the conversation, sequences 1… the beams of a beam search;
* ``kv``: the tokens whose keys/values sequence 0 holds, in order. A new prompt is compared
  with it; only the tokens after the longest common prefix are evaluated, the stale tail is
  removed with ``llama_memory_seq_rm``. The list grows only after ``llama_decode`` succeeds,
  so closing a stream half-way (Ctrl-C) leaves it exactly describing the memory;
* one native sampler chain, rebuilt only when the settings change;
* ``soft``: the active soft prompt; its virtual tokens are the negative ids at the start of
  every prompt (:func:`chat.generation.virtual_ids`) and are decoded as an embedding batch
  (llama.cpp takes either token ids or embeddings in one batch, never both), before the tokens;
* ``attached``: the identity of the parameter parts active in the context (soft prompt included), and
  ``kv_attached``, the set the memory was computed under. Memory is never reused under
  another set. When the persona or set changes, the memory it leaves is saved in the
  model's shared state cache under (parameter set, persona); coming back restores it with
  ``llama_state_seq_set_data`` (into any slot), so a persona used before costs almost no
  prompt evaluation.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from chat.backend import Message
from chat.errors import ContextOverflowError, ModelError, SamplingError
from chat.generation import LocalSlot, SlotStats, StreamStats, count_virtual, virtual_ids
from chat.template import ChatTemplate

from . import native
from .model import MAX_BATCH, MAX_BEAMS, LlamaModel
from .sampler import NativeSampler, build_chain, chain_key
from .statecache import SavedState
from .textstream import PieceDecoder

if TYPE_CHECKING:
    from chat.parts.softprompt import ActiveSoftPrompt
    from chat.persona import Persona
    from chat.sampling import SamplerSettings

    from .parts import ParameterParts

SEQ = 0  # the conversation's sequence
NO_PARTS: tuple = ((), (), ())  # Persona.parameter_key of a persona without adapters, steering or soft prompt


class LlamaSlot(LocalSlot):
    """A context on ``model`` with its own parameter parts, memory and sampler."""

    def __init__(
        self, model: LlamaModel, parts: "ParameterParts | None" = None, stages: Mapping[str, Any] | None = None
    ) -> None:
        from chat.parts.shape import BaseShape  # numpy: imported with the first model, not with the plugin

        from .parts import ParameterParts

        self.model = model
        self.L = L = model.L
        self.where = str(model.path)
        self.stages = stages
        self.batch: Any = None
        self.embd_batch: Any = None  # for soft prompts, allocated on first use
        self.soft: ActiveSoftPrompt | None = None
        self.sampler: NativeSampler | None = None
        wanted = model.wanted_context
        self.ctx = model.new_context(wanted)
        try:
            # llama.cpp may round the context up (to a multiple of 256); use no more than was asked for.
            self.context_size = min(wanted, int(L.llama_n_ctx(self.ctx)))
            self.n_batch = min(MAX_BATCH, self.context_size)
            self.batch = L.llama_batch_init(max(self.n_batch, 2 * MAX_BEAMS), 0, 1)
            self.mem = L.llama_get_memory(self.ctx)
            self.parts = ParameterParts(L, model.ptr, self.ctx, BaseShape.from_header(model.header))
            if parts is not None:  # adapters are loaded once per model: share what the first slot loaded
                self.parts.share_loaded(parts)
        except BaseException:
            self.close()
            raise
        self.stats = SlotStats()
        self.kv: list[int] = []
        self._sampler_key: str | None = None
        self.attached: tuple = NO_PARTS  # parameter parts active in the context
        self.kv_attached: tuple = NO_PARTS  # parameter parts the memory was computed under
        self.persona_name = ""
        self.kv_owner: tuple = (NO_PARTS, "")  # (parameter set, persona) the memory belongs to
        self._beam_rows: list[int] = []
        self._end_ids: frozenset[int] | None = None
        self.use_template(model.templates.base)

    def use_template(self, template: ChatTemplate) -> None:
        """Render prompts with ``template``; its end-of-turn markers that are single tokens end answers as tokens."""
        self.template = template
        self.stop_ids = self.model.stop_ids(template)
        self._end_ids = None

    # --- persona parameter parts ------------------------------------------------------

    def apply(self, persona: "Persona") -> list[str]:
        """Attach the persona's adapters and control vectors, replacing the active set at once.

        Every file is checked first; a part that does not fit raises AdapterError and
        leaves the context as it was. Adapters stay loaded for the model's life.
        """
        self.check_open()
        template = self.model.templates.for_card(persona.template, persona.name)
        loads = self.parts.loads
        try:
            with self.model.lock:  # adapters are loaded once per model, whichever slot asks first
                # soft prompts are checked before anything changes in the context
                soft = self.model.soft_prompts().combine(persona.soft_prompts, self.context_size, persona.label)
                warnings = self.parts.attach(persona)
        finally:
            self.stats.adapter_loads += self.parts.loads - loads
        self.use_template(template)
        self.persona_name = persona.label
        self.soft = soft if soft.n else None
        self.soft_ids = virtual_ids(soft.n)
        self.attached = (*self.parts.key, soft.key)
        return warnings

    # --- primitives the core loop drives ------------------------------------------------

    def prompt_tokens(self, messages: Sequence[Message]) -> list[int]:
        return self.model.prompt_tokens(self.template, messages)

    def text_tokens(self, text: str) -> list[int]:
        model = self.model
        tokens = model.tokenize(text, special=False)
        return [model.bos, *tokens] if model.add_bos else tokens

    def use_sampling(self, sampling: "SamplerSettings") -> None:
        self.sampler_for(sampling)

    def sampler_for(self, sampling: "SamplerSettings") -> NativeSampler:
        """The native chain for ``sampling``; built only when the settings differ from the last call's."""
        key = chain_key(sampling)
        if self.sampler is None or key != self._sampler_key:
            chain = build_chain(
                sampling,
                vocab=self.model.vocab,
                n_vocab=self.model.n_vocab,
                n_ctx=self.context_size,
                plugin_stage=self.plugin_sampler,
                stages=self.stages,
            )
            if self.sampler is not None:
                self.sampler.close()
            self.sampler, self._sampler_key = chain, key
            self.stats.sampler_builds += 1
        return self.sampler

    def plugin_sampler(self, name: str, stage: Any, params: dict[str, Any]) -> Any:
        """A plugin stage as a custom sampler in the native chain (see :class:`.sampler.PythonStage`)."""
        from chat.stages import SamplerStage, Vocabulary

        from .sampler import PythonStage

        if not isinstance(stage, SamplerStage):
            raise SamplingError(
                f"sampler stage {name!r} is not a chat.stages.SamplerStage (got {type(stage).__name__})",
                f"its plugin must register(SamplerStage(...)); or remove {name!r} from `order`",
            )
        model = self.model
        vocabulary = model.__dict__.get("stage_vocabulary")
        if vocabulary is None:  # built once per loaded model, lazily
            vocabulary = model.__dict__["stage_vocabulary"] = Vocabulary(
                model.n_vocab,
                lambda t: model.piece(t).decode("utf-8", errors="replace"),
                lambda text: model.tokenize(text, special=False),
            )
        return PythonStage(name, stage, stage.validate_params(params), vocabulary)

    def prefill(self, prompt: list[int], last: StreamStats) -> int:
        L = self.L
        with self.model.lock:
            self._switch_memory(prompt, last)
        kv = self.kv
        common = _common_prefix(kv, prompt)
        # Always drop everything from ``common`` on, even when the list says there is nothing:
        # an interrupt between llama_decode and the list update may have left untracked positions.
        if not L.llama_memory_seq_rm(self.mem, SEQ, common, -1):
            self._clear_memory()  # this memory cannot drop a tail (recurrent models): start over
            common = 0
            last.kv_cleared = True
        else:
            del kv[common:]
        self._eval(prompt[common:])
        return common

    def start_sampling(self, prompt: list[int]) -> None:
        chain = self.sampler
        assert chain is not None
        chain.reset()
        if chain.needs_history:
            for tok in prompt:
                chain.accept(tok)

    def sample(self) -> int:
        assert self.sampler is not None
        return self.sampler.sample(self.ctx, -1)  # also accepts the token into the chain

    def advance(self, token: int) -> None:
        self._eval([token])

    def is_end(self, token: int) -> bool:
        return token in self.stop_ids or self.model.is_eog(token)

    @property
    def end_ids(self) -> frozenset[int]:
        if self._end_ids is None:
            self._end_ids = self.model.eog_ids() | self.stop_ids
        return self._end_ids

    def decoder(self, prompt: list[int]) -> PieceDecoder:
        return PieceDecoder(self.model.piece)

    # --- beam search: beams in sequences 1…2·MAX_BEAMS, double-buffered -------------------

    def beam_logprobs(self, rows: int) -> np.ndarray:
        L, n_vocab = self.L, self.model.n_vocab
        out = np.empty((rows, n_vocab), dtype=np.float32)
        for i in range(rows):
            ptr = L.llama_get_logits_ith(self.ctx, -1 if not self._beam_rows else i)
            out[i] = np.ctypeslib.as_array(ptr, shape=(n_vocab,))
        shifted = out - out.max(axis=1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))

    def beam_step(self, parents: list[int], tokens: list[int]) -> None:
        L, mem = self.L, self.mem
        current = self._beam_rows or [SEQ]
        pool = [1 + i for i in range(MAX_BEAMS)]
        if current[0] in pool:
            pool = [1 + MAX_BEAMS + i for i in range(MAX_BEAMS)]
        rows = pool[: len(tokens)]
        for seq, parent in zip(rows, parents, strict=True):
            L.llama_memory_seq_rm(mem, seq, -1, -1)
            L.llama_memory_seq_cp(mem, current[parent], seq, -1, -1)
        for seq in current:
            if seq != SEQ:
                L.llama_memory_seq_rm(mem, seq, -1, -1)
        pos = int(L.llama_memory_seq_pos_max(mem, rows[0])) + 1
        b = self.batch
        for i, (seq, tok) in enumerate(zip(rows, tokens, strict=True)):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, 1
            b.seq_id[i][0] = seq
        b.n_tokens = len(tokens)
        self._beam_rows = rows
        self._decode(len(tokens))

    def beam_end(self) -> None:
        for seq in range(1, 1 + 2 * MAX_BEAMS):
            self.L.llama_memory_seq_rm(self.mem, seq, -1, -1)
        self._beam_rows = []

    # --- memory -----------------------------------------------------------------------

    def _switch_memory(self, prompt: list[int], last: StreamStats) -> None:
        """When the persona or parameter set changed: save the memory it leaves, restore the new one's.

        Memory computed under another parameter set is never reused. A persona without
        parameter parts may share the set with the last one; its saved state is restored
        only when it covers more of the prompt than the memory does.
        """
        owner = (self.attached, self.persona_name)
        if owner == self.kv_owner:
            return
        stale = self.kv_attached != self.attached
        states = self.model.states
        saved = states.get(owner)
        in_memory = 0 if stale else _common_prefix(self.kv, prompt)
        use_saved = saved is not None and _common_prefix(saved.tokens, prompt) > in_memory
        if in_memory < len(self.kv):  # some of the old persona's memory would be lost: keep it
            self._save_state(self.kv_owner)
        if stale or use_saved:
            self._clear_memory()
            last.kv_cleared = stale
        if use_saved:
            assert saved is not None
            self._restore_state(saved, last)
        self.kv_attached = self.attached
        self.kv_owner = owner

    def _save_state(self, key: tuple) -> None:
        L, states = self.L, self.model.states
        if not self.kv or states.budget <= 0:
            return
        L.llama_memory_seq_rm(self.mem, SEQ, len(self.kv), -1)  # positions the list does not know
        size = int(L.llama_state_seq_get_size(self.ctx, SEQ))
        if not states.fits(size):
            states.discard(key)
            return
        buf = (ctypes.c_uint8 * size)()
        written = int(L.llama_state_seq_get_data(self.ctx, buf, size, SEQ))
        if written and states.put(key, SavedState(tuple(self.kv), buf)):
            self.stats.state_saves += 1

    def _restore_state(self, saved: SavedState, last: StreamStats) -> None:
        if not self.L.llama_state_seq_set_data(self.ctx, saved.data, saved.n_bytes, SEQ):
            self._clear_memory()  # a state this context cannot take: evaluate from scratch
            return
        self.kv[:] = saved.tokens
        last.state_restored = len(saved.tokens)
        self.stats.state_restores += 1
        self.stats.state_tokens_restored += len(saved.tokens)

    def _clear_memory(self) -> None:
        self.L.llama_memory_clear(self.mem, True)
        self.kv.clear()

    def _eval(self, tokens: Sequence[int]) -> None:
        """Run ``tokens`` after ``kv`` in batches, logits for the last; ``kv`` grows only on success.

        Virtual tokens (negative ids, only ever at the start) go first, as embedding batches.
        """
        n_virtual = count_virtual(tokens)
        if n_virtual:
            self._eval_virtual(tokens[:n_virtual], logits_last=n_virtual == len(tokens))
            tokens = tokens[n_virtual:]
        b = self.batch
        total = len(tokens)
        for start in range(0, total, self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            base = len(self.kv)
            for i, tok in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, base + i, 1, 0
                b.seq_id[i][0] = SEQ
            if start + len(chunk) == total:
                b.logits[len(chunk) - 1] = 1
            b.n_tokens = len(chunk)
            self._decode(len(chunk))
            self.kv.extend(chunk)

    def _eval_virtual(self, ids: Sequence[int], logits_last: bool) -> None:
        """Decode the soft prompt's rows for virtual ids ``ids`` at the positions after ``kv``."""
        L, soft = self.L, self.soft
        if soft is None:  # a memory bookkeeping error, never a user's: the ids name rows of no soft prompt
            raise ModelError(f"{self.where}: virtual tokens without an active soft prompt", None)
        n_embd = soft.values.shape[1]
        if self.embd_batch is None:
            self.embd_batch = L.llama_batch_init(self.n_batch, n_embd, 1)
        b = self.embd_batch
        total = len(ids)
        for start in range(0, total, self.n_batch):
            chunk = ids[start : start + self.n_batch]
            rows = np.ascontiguousarray(soft.values[[-t - 1 for t in chunk]], dtype=np.float32)
            ctypes.memmove(b.embd, rows.ctypes.data, rows.nbytes)
            base = len(self.kv)
            for i in range(len(chunk)):
                b.pos[i], b.n_seq_id[i], b.logits[i] = base + i, 1, 0
                b.seq_id[i][0] = SEQ
            if logits_last and start + len(chunk) == total:
                b.logits[len(chunk) - 1] = 1
            b.n_tokens = len(chunk)
            self._decode(len(chunk), b)
            self.kv.extend(chunk)

    def _decode(self, n: int, batch: Any = None) -> None:
        native.forget_log()
        rc = self.L.llama_decode(self.ctx, self.batch if batch is None else batch)
        self.stats.forward_passes += 1
        if rc != 0:
            self._resync_kv()
            if rc == 1:
                raise ContextOverflowError(
                    f"llama.cpp found no room for {n} more tokens in the context of {self.context_size}",
                    "start a new conversation or load the model with a larger --ctx",
                )
            raise ModelError(f"{self.where}: llama_decode failed (code {rc}): {native.recent_errors()}", None)

    def _resync_kv(self) -> None:
        """After a failed decode, trust the memory: keep the tokens whose positions it still holds."""
        pos_max = int(self.L.llama_memory_seq_pos_max(self.mem, SEQ))
        del self.kv[pos_max + 1 :]

    # --- facts and lifetime ------------------------------------------------------------

    def active_parts(self) -> list[str]:
        """``/adapters``: one line per attached adapter, vector or soft prompt (scale, card, size)."""
        lines = [p.line() for p in self.parts.active] if getattr(self, "parts", None) else []
        return lines + (self.soft.lines() if self.soft is not None else [])

    def info(self) -> dict[str, object]:
        active = self.parts.active if getattr(self, "parts", None) else []
        return {
            "n_ctx": self.context_size,
            "context_used": len(self.kv),
            "template": self.template.description,
            "n_batch": self.n_batch,
            "sampler": list(self.sampler.stages) if self.sampler else [],
            "adapters": [p.line() for p in active if p.kind == "adapter"],
            "steering": [p.line() for p in active if p.kind == "steering"],
            "soft_prompt": self.soft.lines() if self.soft is not None else [],
        }

    def close(self) -> None:
        """Free the sampler, batch and context; safe to call twice. The model is the backend's to free."""
        self.closed = True
        L = self.L
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None
        if self.batch is not None:
            L.llama_batch_free(self.batch)
            self.batch = None
        if self.embd_batch is not None:
            L.llama_batch_free(self.embd_batch)
            self.embd_batch = None
        if getattr(self, "parts", None) is not None:
            self.parts.detach_all()
            self.parts = None  # type: ignore[assignment]  # it holds the context pointer freed below
        if self.ctx:
            L.llama_free(self.ctx)
            self.ctx = None


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Tokens ``a`` shares with the start of prompt ``b``; never all of ``b`` (its last token is evaluated)."""
    n = min(len(a), len(b) - 1)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return max(i, 0)

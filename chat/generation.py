"""The one generation loop every local backend runs through.

A local backend hands out slots (:class:`chat.backend.Slot`): independent generation
states on one loaded model, each with its own parameter parts, KV memory and sampler.
A slot supplies primitives — evaluate the prompt, pick a token, evaluate a token, say
whether a token ends the turn, turn tokens into text — and :func:`generate` runs the
loop once for all of them: stop strings held back across chunks and never shown in
part, ``max_tokens``, a full context, cancellation, timings and the closing
:class:`~chat.backend.Finish`. Beam search (``beams > 1``) runs through
:func:`chat.beam.beam_search` on the same primitives.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from chat.backend import Finish, FinishReason, Message, Timings, Usage
from chat.errors import ContextOverflowError, ModelError
from chat.stops import StopHolder

if TYPE_CHECKING:
    from chat.backend import Slot, TextDecoder
    from chat.sampling import SamplerSettings
    from chat.template import ChatTemplate


@dataclass
class StreamStats:
    """What one generation did (tests and ``/stats`` read it)."""

    prompt_tokens: int = 0
    prompt_tokens_evaluated: int = 0  # prompt tokens run through the model
    prompt_tokens_reused: int = 0  # prompt tokens whose KV was already in memory
    completion_tokens: int = 0
    completion_ids: tuple[int, ...] = ()
    finish: str = ""  # the Finish reason, or "closed" when the consumer closed the stream
    kv_cleared: bool = False  # the memory was discarded (parameter parts changed, or partial removal impossible)
    state_restored: int = 0  # tokens whose KV came from a saved persona state


@dataclass
class SlotStats:
    """Cumulative counters over a slot's life, plus the last generation."""

    streams: int = 0
    prompt_tokens_evaluated: int = 0
    prompt_tokens_reused: int = 0
    completion_tokens: int = 0
    forward_passes: int = 0
    sampler_builds: int = 0
    state_saves: int = 0  # persona states saved into the shared cache
    state_restores: int = 0  # persona states restored from it
    state_tokens_restored: int = 0
    adapter_loads: int = 0  # adapter files this slot read (an adapter is read once per model)
    last: StreamStats = field(default_factory=StreamStats)

    def prefilled(self, last: StreamStats, prompt_len: int, reused: int) -> None:
        last.prompt_tokens_reused = reused
        last.prompt_tokens_evaluated = prompt_len - reused
        self.prompt_tokens_reused += reused
        self.prompt_tokens_evaluated += prompt_len - reused


def virtual_ids(n: int) -> tuple[int, ...]:
    """The ids a prompt lists for ``n`` soft-prompt virtual tokens: ``(-1, -2, …, -n)``.

    A slot evaluates virtual id ``-(i + 1)`` as row ``i`` of its active soft prompt
    (:mod:`chat.parts.softprompt`); the KV bookkeeping compares them like any token.
    """
    return tuple(-(i + 1) for i in range(n))


def count_virtual(prompt: Sequence[int]) -> int:
    """Virtual tokens at the start of ``prompt`` (they are only ever at the start)."""
    n = 0
    for tok in prompt:
        if tok >= 0:
            break
        n += 1
    return n


def usage_of(prompt: Sequence[int], completion: int, reused: int) -> Usage:
    """The Finish's usage: virtual tokens counted apart from the prompt's real ones."""
    n_virtual = count_virtual(prompt)
    return Usage(len(prompt) - n_virtual, completion, max(reused - n_virtual, 0), n_virtual)


def prefill(slot: "Slot", prompt: list[int]) -> tuple[StreamStats, int, float]:
    """Start a generation's record and evaluate the prompt: (the record, tokens reused, when it was done)."""
    last = StreamStats(prompt_tokens=len(prompt), finish="closed")
    stats = slot.stats
    stats.last = last
    stats.streams += 1
    reused = slot.prefill(prompt, last)
    stats.prefilled(last, len(prompt), reused)
    return last, reused, time.perf_counter()


def generate(
    slot: "Slot",
    prompt: list[int],
    sampling: "SamplerSettings",
    *,
    started: float,
    stops: tuple[str, ...],
    cancelled: Callable[[], bool],
) -> Iterator[str | Finish]:
    """Yield text chunks for ``prompt`` on ``slot``, then exactly one Finish.

    ``stops`` are the strings that end the answer (the settings' and the template's);
    ``cancelled()`` is checked before every token (a newer stream on the slot, a closed model).
    Closing the generator stops generation; the slot's memory then holds exactly the
    tokens evaluated so far.
    """
    if cancelled():
        yield Finish("interrupted", usage_of(prompt, 0, 0))
        return
    last, reused, prompt_done = prefill(slot, prompt)
    stats = slot.stats
    real = prompt[count_virtual(prompt) :]  # samplers and decoders see the real tokens only
    slot.start_sampling(real)
    text = StopHolder(stops)
    decoder = slot.decoder(real)
    out: list[int] = []
    reason: FinishReason = "stop"
    first_chunk = first_token = last_token = 0.0
    try:
        while True:
            if cancelled():
                reason = "interrupted"
                break
            tok = slot.sample()
            if slot.is_end(tok):
                break
            out.append(tok)
            last.completion_tokens = len(out)
            last_token = time.perf_counter()
            first_token = first_token or last_token
            chunk = text.feed(decoder.feed(tok))
            if chunk:
                first_chunk = first_chunk or time.perf_counter()
                yield chunk
            if text.stopped:
                break
            if sampling.max_tokens is not None and len(out) >= sampling.max_tokens:
                reason = "length"
                break
            if slot.kv_len >= slot.context_size:
                reason = "length"
                break
            slot.advance(tok)
        tail = text.feed(decoder.finish()) + text.finish()
        if tail:
            first_chunk = first_chunk or time.perf_counter()
            yield tail
    finally:
        last.completion_ids = tuple(out)
        stats.completion_tokens += len(out)
    last.finish = reason
    yield Finish(
        reason,
        usage_of(prompt, len(out), reused),
        timings(started, prompt_done, first_chunk, out, first_token, last_token),
    )


def timings(
    started: float, prompt_done: float, first_chunk: float, out: list[int], first_token: float, last_token: float
) -> Timings:
    """Time to the first chunk, decode speed after the first token, prompt time."""
    decode_s = last_token - first_token
    return Timings(
        ttft_s=(first_chunk - started) if first_chunk else 0.0,
        tokens_per_s=(len(out) - 1) / decode_s if len(out) > 1 and decode_s > 0 else 0.0,
        prompt_s=prompt_done - started,
    )


class LocalSlot(ABC):
    """The part of a local backend's slot the core owns: checks, then the one loop.

    A subclass supplies the primitives (:class:`chat.backend.Slot`); :meth:`stream`
    validates the request now (an overflow or a bad setting raises before the first
    chunk) and returns the generator that runs it.
    """

    context_size: int
    template: "ChatTemplate"
    stats: SlotStats
    where: str  # the model, for messages
    closed: bool = False
    soft_ids: tuple[int, ...] = ()  # virtual_ids() of the active soft prompt, put before every prompt
    _generation: int = 0

    def stream(
        self, messages: Sequence[Message], sampling: "SamplerSettings", *, cancel: Callable[[], bool] | None = None
    ) -> Iterator[str | Finish]:
        """Yield text chunks, then one Finish. Tokenizing, the overflow check and the sampler happen now.

        ``cancel()`` true stops generation before the next token (a server's client went away).
        """
        self.check_open()
        started = time.perf_counter()
        prompt = self.prompt_tokens(messages)
        if not prompt:  # llama.cpp would sample from logits it never computed (GGML_ASSERT: abort)
            raise ModelError(
                f"{self.where}: the chat template {self.template.description} "
                "renders this conversation as an empty prompt",
                "use another template (--template chatml, for one) or fix the template file",
            )
        return self.stream_tokens(prompt, sampling, started=started, cancel=cancel)

    def stream_tokens(
        self,
        prompt: list[int],
        sampling: "SamplerSettings",
        *,
        started: float | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> Iterator[str | Finish]:
        """Like :meth:`stream` for a prompt already tokenized (raw completions: no chat template).

        The active soft prompt's virtual tokens go first (before BOS), as PEFT's prompt tuning puts them.
        """
        self.check_open()
        started = time.perf_counter() if started is None else started
        if not prompt:
            raise ContextOverflowError("the prompt is empty", "send some text")
        if self.soft_ids:
            prompt = [*self.soft_ids, *prompt]
        if len(prompt) >= self.context_size:
            virtual = f" ({len(self.soft_ids)} of them a soft prompt's)" if self.soft_ids else ""
            raise ContextOverflowError(
                f"the prompt needs {len(prompt)} tokens{virtual} but the context holds {self.context_size}",
                "start a new conversation, shorten the message, or load the model with a larger --ctx",
            )
        beams = getattr(sampling, "beams", 1)
        if beams <= 1:
            self.use_sampling(sampling)
        self._generation += 1
        generation = self._generation

        def cancelled() -> bool:
            return generation != self._generation or self.closed or (cancel is not None and cancel())

        stops = (*sampling.stop, *self.template.stops)
        if beams > 1:
            from chat.beam import beam_search

            return beam_search(self, prompt, sampling, started=started, stops=stops, cancelled=cancelled)  # type: ignore[arg-type]
        return generate(self, prompt, sampling, started=started, stops=stops, cancelled=cancelled)  # type: ignore[arg-type]

    def check_open(self) -> None:
        if self.closed:
            raise ModelError(f"{self.where}: the backend was closed", "load the model again")

    def count_tokens(self, messages: Sequence[Message]) -> int:
        self.check_open()
        return len(self.soft_ids) + len(self.prompt_tokens(messages))

    def render(self, messages: Sequence[Message]) -> str:
        """The prompt text for ``messages``, ending with the assistant's generation prompt."""
        return self.template.render(messages, add_generation_prompt=True)

    @property
    def kv_tokens(self) -> list[int]:
        """A copy of the tokens whose KV is in memory (what the next prompt is compared with)."""
        return list(self.kv)

    @property
    def kv_len(self) -> int:
        return len(self.kv)

    @property
    def last_token_ids(self) -> tuple[int, ...]:
        """The token ids the last stream generated (end-of-turn excluded)."""
        return self.stats.last.completion_ids

    # --- primitives ---------------------------------------------------------------------
    kv: list[int]

    @abstractmethod
    def prompt_tokens(self, messages: Sequence[Message]) -> list[int]: ...

    @abstractmethod
    def text_tokens(self, text: str) -> list[int]:
        """Raw text as the model's tokens (with BOS as the model wants it), no chat template."""

    @abstractmethod
    def use_sampling(self, sampling: "SamplerSettings") -> None:
        """Prepare the sampler for ``sampling`` (raise SamplingError now for what cannot run)."""

    @abstractmethod
    def prefill(self, prompt: list[int], last: StreamStats) -> int:
        """Make the memory hold ``prompt`` with logits for its last token; return the tokens reused."""

    @abstractmethod
    def start_sampling(self, prompt: list[int]) -> None:
        """Reset the sampler for a new answer (stages with a history see the prompt)."""

    @abstractmethod
    def sample(self) -> int:
        """Pick the next token from the current logits (and record it in the sampler's history)."""

    @abstractmethod
    def advance(self, token: int) -> None:
        """Evaluate ``token`` after the memory; its logits become the current ones."""

    @abstractmethod
    def is_end(self, token: int) -> bool:
        """Whether ``token`` ends the turn (end of generation, or a template's end-of-turn marker)."""

    @abstractmethod
    def decoder(self, prompt: list[int]) -> "TextDecoder":
        """A fresh token → text decoder for an answer following ``prompt``."""

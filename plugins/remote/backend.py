"""The remote backend: a conversation and its persona on a serving engine (vLLM, llama.cpp, ollama, chat serve).

The Session assembles the card's prompt parts into messages as for a local model; this backend sends
them as an OpenAI chat completion and streams the text back. The card's sampler settings go as the
fields the engine takes (a setting it does not take is refused, or left out with ``drop_unsupported``),
its adapters as the engine names them (:mod:`.parts`). With ``chat serve`` the card itself is the model
and ``persona_prompt: false`` says the messages are already the whole prompt, so the server adds only
the card's adapters, vectors and sampler settings: full fidelity, no prompt parts twice.

Token counts: the engine's usage numbers are the truth after each answer; before one, ``count_tokens``
estimates from characters with a tokens-per-character ratio learned from the last usage the engine
reported (no engine-specific tokenize endpoint is needed: ``chat serve`` has none).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

from chat.backend import BackendOptions, Finish, Message, Timings, Usage
from chat.persona import NO_PERSONA, Persona
from chat.sampling import SamplerSettings

from .client import (
    DEFAULT_CONTEXT,
    RemoteError,
    api_key,
    detect_engine,
    engine_context,
    get_json,
    is_url,
    make_client,
    one_line,
    parse_location,
    served_models,
)
from .engines import ENGINES, sampler_fields
from .options import RemoteOptions
from .parts import Attached, attach

PER_MESSAGE = 4  # template tokens around each message (role markers), for the estimate
START_RATIO = 0.34  # tokens per character before the engine has told us (≈ 3 characters a token: errs high)


class RemoteBackend:
    """One served model on one engine; personas switch per request, nothing is loaded here."""

    name: ClassVar[str] = "remote"
    priority: ClassVar[int] = 10
    Options: ClassVar[type[BackendOptions]] = RemoteOptions
    install_hint: ClassVar[str] = 'pip install "chat[remote]" (the openai package)'

    @classmethod
    def can_load(cls, model: str) -> bool:
        return is_url(model)

    def __init__(self, model: str, options: BackendOptions | None = None) -> None:
        import openai

        self.options = RemoteOptions.from_options(options)
        self.location = parse_location(model)
        opts = self.options
        self.client = make_client(
            self.location, api_key(opts.api_key_env), opts.connect_timeout, opts.read_timeout, opts.retries
        )
        self.engine = ENGINES[opts.engine or "openai"]
        try:
            if opts.engine is None:
                self.engine = ENGINES[detect_engine(self.client, self.location)]
            self.served_model = self.location.model or opts.model
            self._served: list[dict[str, Any]] | None = None
            if self.served_model is None and self.engine.name != "chat":
                self.served_model = self._base_model()
            reported = (
                None
                if opts.context_size
                else engine_context(self.client, self.location, self.engine.name, self.served_model)
            )
        except openai.APIError as exc:
            self.client.close()
            title = self.engine.title if opts.engine or self.engine.name != "openai" else "the server"
            raise one_line(exc, self.location, title, opts.read_timeout) from None
        self.model_name = self.served_model or self.location.base
        self.context_size = opts.context_size or reported or DEFAULT_CONTEXT
        self.context_origin = "context_size" if opts.context_size else "engine" if reported else "default"
        self.persona: Persona = NO_PERSONA
        self.attached = Attached()
        self.dropped: tuple[str, ...] = ()
        self.ratio = START_RATIO
        self._lora_adapters: Any = None
        self.last_usage: Usage | None = None

    # --- what the engine has ----------------------------------------------------------

    def served(self) -> list[dict[str, Any]]:
        if self._served is None:
            self._served = served_models(self.client)
        return self._served

    def lora_adapters(self) -> list[dict[str, Any]]:
        """llama.cpp's loaded adapters (``GET /lora-adapters``); none on other engines."""
        if self.engine.adapters != "per-request":
            return []
        if self._lora_adapters is None:
            self._lora_adapters = get_json(self.client, f"{self.location.root}/lora-adapters") or []
        return [a for a in self._lora_adapters if isinstance(a, dict)]

    def _base_model(self) -> str:
        models = self.served()
        bases = [m for m in models if m.get("parent") is None] or models
        if not bases:
            raise RemoteError(f"{self.engine.title} at {self.location.shown} serves no models", "check the server")
        return str(bases[0]["id"])

    # --- the protocol -------------------------------------------------------------------

    def apply(self, persona: Persona) -> list[str]:
        """Check what ``persona``'s parts need from the engine now, so a refusal comes before any answer."""
        import openai

        where = self.location.shown
        try:
            if self.engine.name == "chat":
                attached = self._on_chat_serve(persona)
            else:
                self.lora_adapters()
                served = self.served() if self.engine.adapters == "one-by-name" and persona.adapters else []
                attached = attach(self.engine, persona, where, self._lora_adapters, served)
        except openai.APIError as exc:
            raise one_line(exc, self.location, self.engine.title, self.options.read_timeout) from None
        self.persona, self.attached = persona, attached
        return []

    def _on_chat_serve(self, persona: Persona) -> Attached:
        if persona == NO_PERSONA:
            return Attached()
        names = [n for n, _ in persona.mix] or [persona.name]
        have = {str(m.get("id")) for m in self.served()}
        missing = [n for n in names if n not in have]
        if missing:
            raise RemoteError(
                f"chat serve at {self.location.shown} has no persona {missing[0]!r}",
                "copy the card folder into the server's personas folder and restart it "
                "(`chat models served URL` lists its cards)",
            )
        shown = attach(self.engine, persona, self.location.shown, None, []).shown
        return Attached(model=persona.label, body={"persona_prompt": False}, shown=shown)

    def stream(self, messages: Sequence[Message], sampling: SamplerSettings) -> Iterator[str | Finish]:
        """Refuse what the engine cannot do and open the request now; the returned iterator streams it."""
        import openai

        fields = sampler_fields(self.engine, sampling)
        self.dropped = ()
        if fields.unsupported:
            if not self.options.drop_unsupported:
                names = ", ".join(fields.unsupported)
                raise RemoteError(
                    f"{self.engine.title} at {self.location.shown} does not take the sampler setting(s) {names}",
                    "leave them unset, or set drop_unsupported = true in the [models] entry to leave them out",
                )
            self.dropped = fields.unsupported
        model = self.attached.model or self.served_model or "default"
        body = {**fields.body, **self.attached.body, "stream_options": {"include_usage": True}}
        sent = [{"role": m.role, "content": m.content} for m in messages]
        started = time.perf_counter()
        try:
            response = self.client.chat.completions.create(model=model, messages=sent, stream=True, extra_body=body)
        except openai.APIError as exc:
            raise one_line(exc, self.location, self.engine.title, self.options.read_timeout) from None
        return self._read(response, messages, started)

    def _read(self, response: Any, messages: Sequence[Message], started: float) -> Iterator[str | Finish]:
        import openai

        first = last = 0.0
        chunks = 0
        usage: Any = None
        reason = "stop"
        try:
            for chunk in response:
                if getattr(chunk, "usage", None):
                    usage = chunk.usage
                for choice in chunk.choices or ():
                    if choice.finish_reason == "length":
                        reason = "length"
                    text = choice.delta.content if choice.delta else None
                    if text and not isinstance(text, str):
                        raise RemoteError(
                            f"{self.engine.title} at {self.location.shown}: the answer holds a "
                            f"{type(text).__name__} where text belongs",
                            "the server does not speak the OpenAI streaming format",
                        )
                    if text:
                        last = time.perf_counter()
                        first = first or last
                        chunks += 1
                        yield text
        except ValueError as exc:  # a chunk that is not JSON
            raise RemoteError(
                f"{self.engine.title} at {self.location.shown}: the server sent a malformed answer "
                f"({type(exc).__name__})",
                "the server does not speak the OpenAI streaming format",
            ) from None
        except openai.APIError as exc:
            error = one_line(exc, self.location, self.engine.title, self.options.read_timeout)
            raise RemoteError(
                error.message.replace("cannot reach the server", "the answer broke off"), error.hint
            ) from None
        finally:
            response.close()  # Ctrl-C or a closed iterator ends the HTTP stream: the engine stops generating
        yield self._finish(reason, usage, chunks, messages, started, first, last)

    def _finish(
        self,
        reason: str,
        usage: Any,
        chunks: int,
        messages: Sequence[Message],
        started: float,
        first: float,
        last: float,
    ) -> Finish:
        prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion = int(getattr(usage, "completion_tokens", 0) or 0) or chunks
        details = getattr(usage, "prompt_tokens_details", None)
        cached = int(getattr(details, "cached_tokens", 0) or 0) if details else 0
        if prompt > 0:
            chars = sum(len(m.content) for m in messages)
            overhead = PER_MESSAGE * len(messages) + 3
            self.ratio = max(0.02, min(2.0, (prompt - overhead) / chars)) if chars > 50 else self.ratio
        else:
            prompt = self.count_tokens(messages)
        ttft = (first - started) if first else 0.0
        decode = last - first
        tps = (completion - 1) / decode if completion > 1 and decode > 0 else 0.0
        self.last_usage = Usage(prompt, completion, cached)
        return Finish(reason if reason == "length" else "stop", self.last_usage, Timings(ttft, tps, ttft))  # type: ignore[arg-type]

    def count_tokens(self, messages: Sequence[Message]) -> int:
        """An estimate from characters, calibrated by the engine's last usage numbers."""
        return sum(math.ceil(len(m.content) * self.ratio) + PER_MESSAGE for m in messages) + 3

    def render(self, messages: Sequence[Message]) -> str:
        head = f"[{self.engine.title} at {self.location.shown} applies its own chat template to these messages]"
        return "\n".join([head, *(f"<{m.role}>\n{m.content}" for m in messages)])

    def info(self) -> dict[str, object]:
        info: dict[str, object] = {
            "backend": self.name,
            "model": self.model_name,
            "url": self.location.shown,
            "engine": self.engine.name,
            "template": f"the engine's ({self.engine.title})",
            "context_size": f"{self.context_size} ({self.context_origin})",
        }
        if self.attached.shown:
            info["adapters"] = ", ".join(self.attached.shown)
        if self.dropped:
            info["dropped settings"] = ", ".join(self.dropped)
        if self.last_usage is not None:
            info["last usage"] = f"{self.last_usage.prompt_tokens}+{self.last_usage.completion_tokens} tokens"
        return info

    def active_parts(self) -> list[str]:
        return [f"adapter {s}" for s in self.attached.shown]

    def close(self) -> None:
        self.client.close()

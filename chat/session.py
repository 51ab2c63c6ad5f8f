"""One conversation: its messages, persona, sampler layers, context policy and saving.

The session never knows which backend runs. It builds the prompt (system prompt,
knowledge, example dialogue, the conversation), fits it to the context window,
streams the answer from the backend and commits both sides to the store: the
user's message before generation starts, the answer as soon as it ends, is
interrupted or fails.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from chat.backend import Backend, Finish, FinishReason, Message, Timings, Usage
from chat.catalog import PersonaCatalog
from chat.context import Fitted, fit_context
from chat.errors import ChatError, SamplingError, UsageError
from chat.persona import NO_PERSONA, Persona
from chat.prompt import KnowledgeState, Prompt, assemble, knowledge_state, static_system
from chat.samplerlayers import SamplerLayers
from chat.sampling import SamplerSettings, split_option


@dataclass(frozen=True)
class Turn:
    """One message of the conversation and, for an answer, the persona (or mix) that gave it."""

    role: Literal["user", "assistant"]
    content: str
    persona: str | None = None

    @property
    def message(self) -> Message:
        return Message(self.role, self.content)


@dataclass
class Answer:
    """The last answer's outcome, for renderers and ``--json``."""

    text: str = ""
    finish: Finish = field(default_factory=lambda: Finish("stop"))
    dropped: int = 0  # older messages left out to fit the context


class Session:
    """One conversation with one loaded backend; the persona and ``/set`` values may change during it."""

    def __init__(
        self,
        backend: Backend,
        *,
        catalog: PersonaCatalog | None = None,
        store: Any = None,
        persona: Persona = NO_PERSONA,
        model_label: str = "",
        layers: SamplerLayers | None = None,
        sampling: tuple[SamplerSettings, Mapping[str, str]] | None = None,
        system: str | None = None,
        conversation_id: str | None = None,
        user_name: str = "User",
    ) -> None:
        """``sampling``: the settings already resolved from ``layers`` and ``persona`` (a request plan did it);
        without it they are resolved here."""
        self.backend = backend
        self.catalog = catalog
        self.store = store
        self.model_label = model_label or backend.model_name
        self.layers = layers or SamplerLayers()
        self.repl_sampling: dict[str, Any] = {}
        self.system_override = system
        self.turns: list[Turn] = []
        self.conversation_id = conversation_id
        self.last = Answer()
        self.notes: list[str] = []  # messages for the user from the last operation
        self._replace_answer: int | None = None  # /retry: the saved answer the next one replaces
        self.user_name = user_name  # what {{user}} becomes in the persona's text
        self.last_prompt: Prompt | None = None  # the last assembled prompt: what fired and why (/info)
        self._knowledge: KnowledgeState | None = None  # the persona's note retriever, made on first use
        self.persona = persona
        self.notes.extend(self.backend.apply(persona))
        settings, sources = sampling or self._resolve_sampling()
        self.sampling, self.sampling_sources = settings, dict(sources)
        if conversation_id and store is not None:
            self._load(conversation_id)

    # --- persona and settings ---------------------------------------------------------

    def switch_persona(self, spec: str) -> Persona:
        """Switch (or mix) personas mid-conversation; the base model stays loaded."""
        if self.catalog is None:
            raise ChatError("no persona catalog is available")
        persona = self.catalog.resolve(spec)
        old = self.persona
        self.persona = persona
        self._knowledge = None
        try:
            self.sampling, self.sampling_sources = self._resolve_sampling()
            self.notes.extend(self.backend.apply(persona))
        except ChatError:
            self.persona = old
            self.sampling, self.sampling_sources = self._resolve_sampling()
            self.backend.apply(old)
            raise
        if self.store is not None and self.conversation_id:
            # `chat -c` resumes with it
            self.store.update_conversation(self.conversation_id, persona=persona.spec or persona.label)
        return persona

    def set_part_scale(self, key: str, value: str) -> Persona:
        """``/set adapter.NAME.scale 0.5`` (or ``steering.NAME.scale``): change one part's effective scale live.

        The persona keeps its name; its parts get the new scale and are re-applied to
        the backend (the base stays loaded). On an error the previous persona stays.
        """
        kind, _, rest = key.partition(".")
        name, _, attr = rest.rpartition(".")
        if kind not in ("adapter", "steering") or attr != "scale" or not name:
            raise UsageError(
                f"{key}: not a part setting", "write adapter.NAME.scale VALUE or steering.NAME.scale VALUE"
            )
        try:
            scale = float(value)
        except ValueError:
            raise UsageError(f"{key} = {value!r}: not a number", "e.g. /set adapter.NAME.scale 0.5") from None
        if not -10.0 <= scale <= 10.0:
            raise UsageError(f"{key} = {scale:g}: out of range", "scales lie between -10 and 10")
        field_name = "adapters" if kind == "adapter" else "steering"
        parts = getattr(self.persona, field_name)

        def same(part_name: str) -> bool:  # `/set` spells keys with '_' where file names may have '-'
            return part_name == name or part_name.replace("-", "_").lower() == name.replace("-", "_").lower()

        matched = [p.name for p in parts if same(p.name)]
        if not matched:
            known = ", ".join(sorted({p.name for p in parts}))
            what = "adapter" if kind == "adapter" else "control vector"
            raise ChatError(
                f"{self.persona.label} has no {what} named {name!r}",
                f"known: {known}" if known else f"this persona has no {field_name}; /adapters lists the active parts",
            )
        name = matched[0]
        updated = tuple(dataclasses.replace(p, scale=scale) if p.name == name else p for p in parts)
        persona = dataclasses.replace(self.persona, **{field_name: updated})  # type: ignore[arg-type]
        old = self.persona
        self.persona = persona
        try:
            self.notes.extend(self.backend.apply(persona))
        except ChatError:
            self.persona = old
            self.backend.apply(old)
            raise
        self.notes.append(f"{kind}.{name}.scale = {scale:g}")
        return persona

    def set_option(self, text: str) -> None:
        """``/set KEY VALUE``: a REPL-level sampler setting (flags still win)."""
        key, value = split_option(text)
        previous = dict(self.repl_sampling)
        if value.strip().lower() in {"default", "unset", "reset"}:
            self.repl_sampling.pop(key, None)
        else:
            self.repl_sampling[key] = value
        try:
            self.sampling, self.sampling_sources = self._resolve_sampling()
        except SamplingError:
            self.repl_sampling = previous
            raise
        if key in self.layers.flags:
            self.notes.append(f"note: {key} is also set by a command-line flag, which wins")

    def _resolve_sampling(self) -> tuple[SamplerSettings, dict[str, str]]:
        return self.layers.resolve(self.persona.label, self.persona.sampling, self.repl_sampling)

    @property
    def system_prompt(self) -> str:
        """The system message without what fires per turn (chat.prompt builds it)."""
        return static_system(self.persona, user_name=self.user_name, system=self.system_override)

    def set_system(self, text: str | None) -> None:
        """``/system``: replace the system prompt (None restores the persona's); saved with the conversation."""
        self.system_override = text
        if self.store is not None and self.conversation_id:
            self.store.update_conversation(self.conversation_id, system=self.system_prompt)

    def fixed_messages(self) -> list[Message]:
        return self.assemble(self.messages()).fixed

    def assemble(self, conversation: list[Message]) -> Prompt:
        """The prompt for ``conversation`` as this session's persona (chat.prompt.assemble, the one place)."""
        if self._knowledge is None:
            self._knowledge = knowledge_state(self.persona)
            if self._knowledge.problem:
                self.notes.append(self._knowledge.problem)
        return assemble(
            self.persona,
            conversation,
            user_name=self.user_name,
            system=self.system_override,
            retriever=self._knowledge.retriever,
            rng=self._knowledge.rng,
        )

    # --- conversation -------------------------------------------------------------------

    def send(self, text: str) -> Iterator[str]:
        """Add the user's message and stream the answer. Closing the iterator interrupts it."""
        self.turns.append(Turn("user", text))
        try:
            fitted, stream = self._open()
        except ChatError:  # refused before generation: nothing is saved, the conversation is as it was
            self.turns.pop()
            raise
        self._save("user", text)
        return self._stream(fitted, stream)

    def regenerate(self) -> Iterator[str]:
        """``/retry``: drop the last answer and answer the same message again."""
        if not self.turns or self.turns[-1].role != "assistant":
            raise ChatError("nothing to retry", "send a message first")
        old = self.turns.pop()
        try:
            fitted, stream = self._open()
        except ChatError:
            self.turns.append(old)
            raise
        if self.store is not None and self.conversation_id:  # the saved answer is replaced once the new one ends
            last = self.store.messages(self.conversation_id)[-1:]
            self._replace_answer = last[0].id if last and last[0].role == "assistant" else None
        return self._stream(fitted, stream)

    def undo(self) -> int:
        """``/undo``: remove the last exchange (answer and the message before it)."""
        if not self.turns:
            raise ChatError("nothing to undo")
        removed = 0
        for role in ("assistant", "user"):
            if self.turns and self.turns[-1].role == role:
                self.turns.pop()
                removed += 1
        if self.store is not None and self.conversation_id:
            self.store.delete_last_exchange(self.conversation_id)
        return removed

    def clear(self) -> None:
        """``/clear``: start a new conversation with the same model and persona."""
        self.turns.clear()
        self.conversation_id = None

    @property
    def persona_name(self) -> str:
        """How ``--json`` and history name the persona: the card or mix, ``default`` for none."""
        return self.persona.label

    def messages(self) -> list[Message]:
        """The conversation so far as the backend sees it (without system prompt and examples)."""
        return [t.message for t in self.turns]

    def preview(self, text: str | None = None) -> tuple[str, int]:
        """The exact prompt the model would get next (with ``text`` as the user's message, if given) and its tokens.

        Nothing is generated or saved; the conversation stays as it is.
        """
        extra = [Message("user", text)] if text is not None else []
        fitted = self._fit(extra)
        render = getattr(self.backend, "render", None)
        rendered = render(fitted.messages) if render else "\n".join(f"{m.role}: {m.content}" for m in fitted.messages)
        return rendered, fitted.prompt_tokens

    def _open(self) -> tuple[Fitted, Iterator[str | Finish]]:
        """Fit the prompt and start the backend's stream (which refuses bad input before generating)."""
        fitted = self._fit()
        return fitted, self.backend.stream(fitted.messages, self.sampling)

    def _fit(self, extra: list[Message] | None = None) -> Fitted:
        prompt = self.assemble(_alternating(self.messages() + (extra or [])))
        self.last_prompt = prompt
        fitted = fit_context(
            prompt.fixed,
            prompt.conversation,
            self.backend.count_tokens,
            self.backend.context_size,
            self.sampling.max_tokens,
        )
        if fitted.dropped:
            self.notes.append(
                f"context full: left out the {fitted.dropped} oldest message(s) after the system prompt and examples"
            )
        return fitted

    def _stream(self, fitted: Fitted, stream: Iterator[str | Finish]) -> Iterator[str]:
        """Yield the answer's text; however it ends, what was said is kept, saved and marked.

        A Finish from the backend says how it ended; without one, an exception (a ChatError or a
        backend's bug) is an ``error`` finish and propagates, and anything else — the iterator
        closed, Ctrl-C, a stop signal — is ``interrupted``.
        """
        parts: list[str] = []
        finish: Finish | None = None
        started = time.perf_counter()
        failed = False
        try:
            for item in stream:
                if isinstance(item, Finish):
                    finish = item
                else:
                    parts.append(item)
                    yield item
        except Exception:
            failed = True
            raise
        finally:
            stream.close()  # type: ignore[attr-defined]  # a generator
            if finish is None:  # closed early, interrupted or failed: keep what we have
                elapsed = time.perf_counter() - started
                reason: FinishReason = "error" if failed else "interrupted"
                finish = Finish(reason, Usage(prompt_tokens=fitted.prompt_tokens), Timings(prompt_s=elapsed))
            text = "".join(parts)
            self.turns.append(Turn("assistant", text, self.persona.label))
            self.last = Answer(text, finish, fitted.dropped)
            self._save("assistant", text, finish)

    # --- saving -------------------------------------------------------------------------

    def _save(self, role: str, text: str, finish: Finish | None = None) -> None:
        if self.store is None:
            return
        if self.conversation_id is None:
            self.conversation_id = self.store.new_conversation(
                model=self.model_label,
                persona=self.persona.spec or self.persona.label,
                system=self.system_prompt,
                sampling=self.sampling.model_dump(mode="json", exclude_defaults=True),
            )
        if finish is None:
            self.store.add_message(self.conversation_id, role, text, model=self.model_label)
        elif self._replace_answer is not None:
            replace, self._replace_answer = self._replace_answer, None
            self.store.update_message(
                replace,
                content=text,
                persona=self.persona.label,
                model=self.model_label,
                finish_reason=finish.reason,
                usage=finish.usage,
                timings=finish.timings,
            )
        else:
            self.store.add_message(
                self.conversation_id,
                role,
                text,
                persona=self.persona.label,
                model=self.model_label,
                finish_reason=finish.reason,
                usage=finish.usage,
                timings=finish.timings,
            )

    def _load(self, cid: str) -> None:
        conv = self.store.get_conversation(cid)
        self.conversation_id = conv.id
        if self.system_override is None and conv.system and conv.system != self.system_prompt:
            self.system_override = conv.system  # a --system or /system given earlier in this conversation
        for m in self.store.messages(conv.id):
            if m.role in ("user", "assistant"):
                self.turns.append(Turn(m.role, m.content, m.persona))

    def context_used(self) -> int:
        """Tokens the conversation takes now (for the REPL's toolbar and /info)."""
        messages = self.fixed_messages() + self.messages()
        return self.backend.count_tokens(messages) if messages else 0


def _alternating(turns: list[Message]) -> list[Message]:
    """Join back-to-back messages of one role (an unanswered message left by a crash or an error),
    so templates that insist on user/assistant alternation still render."""
    out: list[Message] = []
    for m in turns:
        if out and out[-1].role == m.role:
            out[-1] = Message(m.role, f"{out[-1].content}\n\n{m.content}")
        else:
            out.append(m)
    return out


__all__ = ["Answer", "Session", "Turn"]

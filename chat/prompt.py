"""Prompt assembly: a persona and a conversation become the messages a model gets, and what fired.

One pure function, :func:`assemble`, used for every turn by the session, ``--show-prompt``,
``/prompt`` and the server: no session state, no backend, no I/O beyond the ``retriever`` it
is handed. The system message is built in this order, blank lines between the parts:

1. the system prompt: ``--system``/``/system``, else the card's ``system``; a card with a character
   definition and no system prompt gets :data:`CHARACTER_PROMPT`, and ``{{original}}`` in a card's
   system prompt stands for that default (Character Card V2 ``system_prompt``);
2. lorebook entries that fired with ``position = "before_char"``;
3. the character definition, labelled: ``Description:``, ``Personality:``, ``Scenario:``;
4. lorebook entries with ``position = "after_char"``, then the retrieved note chunks;
5. the plain facts: ``What you know:`` and one ``- fact`` a line (always on, no budget).

Then the example dialogue, then the conversation. ``post_history_instructions`` are added to the
last user message (templates that insist on alternating roles would refuse a system message
there). Macros (``{{char}}``, ``{{user}}``, ``<BOT>``, ``<USER>``) are resolved in every part
that comes from the card, never in what the user or the model wrote.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from chat.backend import Message
from chat.knowledge.entry import DEFAULT_TOKEN_BUDGET, estimate_tokens
from chat.knowledge.index import Chunk
from chat.knowledge.lorebook import Fired, activate
from chat.macros import render
from chat.persona import Persona

CHARACTER_PROMPT = "Write {{char}}'s next reply in a fictional chat between {{char}} and {{user}}."
DEFAULT_USER_NAME = "User"


class Retriever(Protocol):
    """Anything that finds note chunks for some text within a token budget (FTS5 today, embeddings later)."""

    def search(self, query: str, budget: int) -> list[Chunk]: ...


@dataclass(frozen=True)
class Prompt:
    """The assembled prompt: ``fixed`` (system + examples) and ``conversation``, and the knowledge that went in."""

    fixed: list[Message]
    conversation: list[Message]
    fired: tuple[Fired, ...] = ()  # lorebook entries that fired (those left out for the budget too)
    retrieved: tuple[Chunk, ...] = ()
    system: str = ""
    budget: int = DEFAULT_TOKEN_BUDGET

    @property
    def messages(self) -> list[Message]:
        return self.fixed + self.conversation

    def knowledge_lines(self) -> list[str]:
        """What fired and why, one line each, for ``--show-prompt`` and ``/info``."""
        lines = [f"lorebook: {f.entry.label!r} ({f.tokens} tokens): {f.reason}" for f in self.fired]
        lines += [f"notes: {c.title} ({c.tokens} tokens)" for c in self.retrieved]
        return lines


@dataclass(frozen=True)
class Names:
    char: str
    user: str

    def __call__(self, text: str, original: str | None = None) -> str:
        return render(text, char=self.char, user=self.user, original=original)


def assemble(
    persona: Persona,
    conversation: Sequence[Message],
    *,
    user_name: str = DEFAULT_USER_NAME,
    system: str | None = None,
    retriever: Retriever | None = None,
    rng: random.Random | None = None,
    count: Callable[[str], int] = estimate_tokens,
) -> Prompt:
    """The messages for the next answer to ``conversation`` (oldest first) as ``persona``; ``system`` overrides."""
    names = Names(persona.char_name, user_name or DEFAULT_USER_NAME)
    budget = persona.token_budget if persona.token_budget is not None else DEFAULT_TOKEN_BUDGET
    texts = [m.content for m in conversation]
    activation = activate(
        persona.knowledge,
        texts,
        scan_depth=persona.scan_depth,
        token_budget=budget,
        recursive=persona.recursive_scanning,
        rng=rng,
        count=count,
    )
    retrieved: tuple[Chunk, ...] = ()
    if retriever is not None and texts:
        query = "\n".join(texts[-max(persona.scan_depth, 1) :])
        retrieved = tuple(retriever.search(query, budget - activation.used_tokens))
    kept = activation.kept
    before = [names(e.text) for e in kept if e.position == "before_char"]
    after = [names(e.text) for e in kept if e.position == "after_char"]
    after += [f"From {c.title}:\n{c.text}" for c in retrieved]
    system_text = _system_text(persona, names, system, before, after)
    fixed = [Message("system", system_text)] if system_text else []
    for ex in persona.examples:
        fixed += [Message("user", names(ex.user)), Message("assistant", names(ex.assistant))]
    turns = list(conversation)
    if persona.post_history_instructions and turns and turns[-1].role == "user":
        last = turns[-1]
        turns[-1] = Message("user", f"{last.content}\n\n{names(persona.post_history_instructions)}")
    return Prompt(fixed, turns, activation.fired, retrieved, system_text, budget)


def static_system(persona: Persona, *, user_name: str = DEFAULT_USER_NAME, system: str | None = None) -> str:
    """The system message without what fires per turn: what history saves and ``/system`` shows."""
    return _system_text(persona, Names(persona.char_name, user_name or DEFAULT_USER_NAME), system, [], [])


def _system_text(persona: Persona, names: Names, override: str | None, before: list[str], after: list[str]) -> str:
    default = CHARACTER_PROMPT if persona.character else ""
    character = [f"{label}:\n{names(text)}" for label, text in persona.character]
    facts = [e.line for e in persona.knowledge if e.is_plain and e.enabled]
    block = ["What you know:\n" + "\n".join(f"- {names(f)}" for f in facts)] if facts else []
    if override is not None:
        main = override
        tail = "\n\n".join(character + block)
        if tail and override.endswith(tail):  # a prompt restored from history already has them
            main = override[: -len(tail)].rstrip()
    else:
        main = names(persona.system or default, original=names(default))
    parts = [main, *before, *character, *after, *block]
    return "\n\n".join(p for p in parts if p).strip()


def greeting_text(persona: Persona, number: int = 1, *, user_name: str = DEFAULT_USER_NAME) -> str:
    """Greeting ``number`` (1 = the card's ``greeting``, 2… its alternates) with macros resolved; "" if none."""
    greetings = persona.all_greetings
    if not 1 <= number <= len(greetings):
        return ""
    return render(greetings[number - 1], char=persona.char_name, user=user_name or DEFAULT_USER_NAME)


@dataclass
class KnowledgeState:
    """What a conversation keeps between turns for its persona's knowledge: the retriever and the random source."""

    retriever: Retriever | None = None
    rng: random.Random = field(default_factory=random.Random)
    problem: str | None = None


def knowledge_state(persona: Persona, data_dir=None) -> KnowledgeState:
    """The retriever over the persona's note paths (None without any) and a fresh random source."""
    from chat.knowledge.index import retriever_for

    roots = [k.path for k in persona.knowledge if k.path is not None and k.enabled]
    retriever = retriever_for(roots, data_dir) if roots else None
    return KnowledgeState(retriever, random.Random(), getattr(retriever, "problem", None))


__all__ = ["CHARACTER_PROMPT", "Prompt", "Retriever", "assemble", "greeting_text", "knowledge_state", "static_system"]

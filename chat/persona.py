"""Personas: the resolved value every backend receives, ``extends`` and mixing.

A :class:`Persona` is the resolved value — ``extends`` applied, paths made absolute,
mixes combined — that the session hands to a backend. Card files are read and
validated by :mod:`chat.card`; its public names are importable from here too.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chat.card import (
    CARD_FILE,
    NAME_RULE,
    Card,
    LoadedCard,
    card_data,
    card_template,
    every_problem,
    is_valid_name,
    looks_like_path,
    part_path,
    read_card,
    validated_card,
)
from chat.errors import PersonaError
from chat.knowledge.entry import KnowledgeItem
from chat.tomlfile import quote, user_path


@dataclass(frozen=True)
class Example:
    user: str
    assistant: str


@dataclass(frozen=True)
class AdapterPart:
    """A LoRA adapter: an absolute path (GGUF file or PEFT folder) and its effective scale."""

    path: Path
    scale: float = 1.0
    card: str = ""  # the card that brought it, for /adapters

    @property
    def name(self) -> str:
        return self.path.stem if self.path.suffix == ".gguf" else self.path.name


@dataclass(frozen=True)
class SteeringPart:
    """A control vector (llama.cpp cvector GGUF) with its effective scale and optional inclusive layer range."""

    path: Path
    scale: float = 1.0
    layers: tuple[int, int] | None = None
    card: str = ""

    @property
    def name(self) -> str:
        return self.path.stem


@dataclass(frozen=True)
class SoftPromptPart:
    """A soft prompt (PEFT prompt-tuning folder or soft prompt GGUF): virtual tokens put before the prompt."""

    path: Path
    card: str = ""

    @property
    def name(self) -> str:
        return self.path.stem if self.path.suffix == ".gguf" else self.path.name


@dataclass(frozen=True)
class Persona:
    """A resolved persona: plain, immutable, what every backend receives."""

    name: str
    description: str = ""
    greeting: str = ""
    system: str = ""
    examples: tuple[Example, ...] = ()
    knowledge: tuple[KnowledgeItem, ...] = ()
    sampling: dict[str, Any] = field(default_factory=dict)
    adapters: tuple[AdapterPart, ...] = ()
    steering: tuple[SteeringPart, ...] = ()
    soft_prompts: tuple[SoftPromptPart, ...] = ()  # in order: their virtual tokens are concatenated
    source: str = ""  # where the card came from: "built-in", "user", "plugin:NAME", a path
    path: Path | None = None  # the card folder, when there is one
    mix: tuple[tuple[str, float], ...] = ()  # (card name, weight) for a mixed persona
    spec: str = ""  # how to find it again (`chat -c`): names, absolute card paths, weights
    template: str = ""  # a chat template: a well-known name or an absolute path to a Jinja file ("" = the model's)
    # Character Card parts (chat.prompt assembles them; README "Importing cards")
    nickname: str = ""
    character_name: str = ""
    character: tuple[tuple[str, str], ...] = ()  # (label, text): Description, Personality, Scenario
    greetings: tuple[str, ...] = ()  # more greetings after `greeting`
    post_history_instructions: str = ""
    creator_notes: str = ""
    token_budget: int | None = None
    scan_depth: int = 2
    recursive_scanning: bool = False
    model: str = ""
    context_size: int | None = None
    metadata: tuple[tuple[str, str], ...] = ()  # (key, value) shown by `chat personas show`: author, version, tags

    @property
    def char_name(self) -> str:
        """What ``{{char}}`` becomes: the V3 nickname, else the character's name, else the card's."""
        return self.nickname or self.character_name or self.name

    @property
    def all_greetings(self) -> tuple[str, ...]:
        """``greeting`` then the alternates: ``--greeting N`` and ``/greeting N`` count from 1 here."""
        return tuple(g for g in (self.greeting, *self.greetings) if g)

    @property
    def label(self) -> str:
        """How history and listings name this persona: ``teacher`` or ``teacher:0.7,pirate:0.3``."""
        if len(self.mix) > 1 or (self.mix and self.mix[0][1] != 1.0):
            return ",".join(f"{n}:{w:g}" for n, w in self.mix)
        return self.name

    @property
    def parameter_key(self) -> tuple:
        """Identity of the parameter parts: equal keys mean the same weights are attached."""
        return (
            tuple(sorted((str(a.path), round(a.scale, 6)) for a in self.adapters)),
            tuple(sorted((str(s.path), round(s.scale, 6), s.layers or (0, 0)) for s in self.steering)),
            tuple(str(s.path) for s in self.soft_prompts),  # order matters: rows are concatenated
        )


NO_PERSONA = Persona(name="default", source="built-in")

MAX_EXTENDS_DEPTH = 64  # cards in one line of `extends`; real cards use two or three


def card_problems(folder: Path, lookup: Callable[[str], LoadedCard]) -> list[PersonaError]:
    """Every problem in a card, not only the first (``chat personas validate``); [] when it is fine."""
    try:
        folder, file, data = card_data(folder)
    except PersonaError as exc:  # missing, unreadable or not TOML: the first problem is the only one we can know
        return [exc]
    try:
        loaded = validated_card(folder, file, data, "path")
    except PersonaError as first:
        return every_problem(folder, file, data) or [first]
    try:
        resolve_card(loaded, lookup)
    except PersonaError as exc:
        return [exc]
    return []


# --- resolution: extends and mixing ---------------------------------------------------------


def resolve_card(loaded: LoadedCard, lookup: Callable[[str], LoadedCard]) -> Persona:
    """Apply ``extends`` (parents first, in listed order) and return the resolved Persona.

    Merge rules: text fields (description, greeting, system) come from the nearest card
    that sets them; examples and knowledge are the parents' followed by the card's own;
    sampling keys are merged with the card winning; adapters and steering are united,
    an entry for the same file replacing the parent's.

    Each card is applied once, in the order of a depth-first walk that puts every card after
    its parents: a card reached through two parents (a diamond) counts once, at its first
    place, so resolution is linear in the number of cards, never exponential.
    """
    persona = Persona(name=loaded.card.name)
    for card in extends_order(loaded, lookup):
        persona = _inherit(persona, _own_parts(card))
    return persona


def extends_order(loaded: LoadedCard, lookup: Callable[[str], LoadedCard]) -> list[LoadedCard]:
    """``loaded`` and every card it extends, parents before children, each card once (told apart by folder)."""
    order: list[LoadedCard] = []
    _visit(loaded, lookup, (), set(), order)
    return order


def _visit(
    loaded: LoadedCard,
    lookup: Callable[[str], LoadedCard],
    chain: tuple[LoadedCard, ...],
    done: set[Path],
    order: list[LoadedCard],
) -> None:
    chain = (*chain, loaded)
    if len(chain) > MAX_EXTENDS_DEPTH:
        raise PersonaError(
            f"{loaded.file}: extends is more than {MAX_EXTENDS_DEPTH} cards deep: {_chain_text(chain)}",
            "let a card extend its ancestors directly instead of through a long line of cards",
        )
    for i, entry in enumerate(loaded.card.extends):
        parent = lookup(_extends_target(loaded, i, entry))
        if any(c.folder == parent.folder for c in chain):
            cycle = _chain_text((*chain, parent))
            raise PersonaError(f"{loaded.file}: extends forms a cycle: {cycle}", f"remove {quote(entry)} from extends")
        if parent.folder not in done:
            _visit(parent, lookup, chain, done, order)
    done.add(loaded.folder)
    order.append(loaded)


def _extends_target(loaded: LoadedCard, index: int, entry: str) -> str:
    """What to look up for one ``extends`` entry: a card name as it is; a path made absolute from the card's folder."""
    if not entry.strip():
        raise PersonaError(f"{loaded.file}: extends[{index}] is empty", "name a card, or a path to its folder")
    path = user_path(entry, PersonaError, f"{loaded.file}: extends[{index}]")
    if not looks_like_path(entry):
        return entry
    return str(path if path.is_absolute() else loaded.folder / path)


def _chain_text(chain: Sequence[LoadedCard]) -> str:
    """``a → b → c``; a long chain keeps its first and last cards."""
    names = [c.card.name for c in chain]
    if len(names) > 8:
        names = [*names[:3], "…", *names[-3:]]
    return " → ".join(names)


def _own_parts(loaded: LoadedCard) -> Persona:
    """One card's own parts, nothing inherited; part paths made absolute."""
    card = loaded.card
    return Persona(
        name=card.name,
        description=card.description,
        greeting=card.greeting,
        system=card.system,
        examples=tuple(Example(e.user, e.assistant) for e in card.examples),
        knowledge=tuple(_knowledge_item(loaded, i) for i in range(len(card.knowledge))),
        sampling=dict(card.sampling),
        adapters=tuple(
            AdapterPart(part_path(loaded.file, loaded.folder, "adapters", i, a.path), a.scale, card.name)
            for i, a in enumerate(card.adapters)
        ),
        steering=tuple(
            SteeringPart(part_path(loaded.file, loaded.folder, "steering", i, s.path), s.scale, s.layers, card.name)
            for i, s in enumerate(card.steering)
        ),
        soft_prompts=tuple(
            SoftPromptPart(part_path(loaded.file, loaded.folder, "soft_prompt", i, s.path), card.name)
            for i, s in enumerate(card.soft_prompt)
        ),
        source=loaded.source,
        path=loaded.folder,
        template=card_template(loaded.file, loaded.folder, card.template),
        nickname=card.nickname,
        character_name=card.character.name,
        character=tuple(
            (label, text)
            for label, text in (
                ("Description", card.character.description),
                ("Personality", card.character.personality),
                ("Scenario", card.character.scenario),
            )
            if text
        ),
        greetings=tuple(card.greetings),
        post_history_instructions=card.post_history_instructions,
        creator_notes=card.creator_notes,
        token_budget=card.token_budget,
        scan_depth=card.scan_depth,
        recursive_scanning=card.recursive_scanning,
        model=card.model,
        context_size=card.context_size,
        metadata=tuple(
            (k, v)
            for k, v in (
                ("author", card.author),
                ("version", card.version),
                ("tags", ", ".join(card.tags)),
                ("license", card.license.strip().splitlines()[0] if card.license.strip() else ""),
            )
            if v
        ),
    )


def _knowledge_item(loaded: LoadedCard, index: int) -> KnowledgeItem:
    k = loaded.card.knowledge[index]
    return KnowledgeItem(
        text=k.text,
        title=k.title,
        keys=None if k.keys is None else tuple(k.keys),
        secondary_keys=tuple(k.secondary_keys),
        selective_logic=k.selective_logic,
        constant=k.constant,
        enabled=k.enabled,
        case_sensitive=k.case_sensitive,
        whole_words=k.whole_words,
        use_regex=k.use_regex,
        insertion_order=k.insertion_order,
        priority=k.priority,
        position=k.position,
        scan_depth=k.scan_depth,
        probability=k.probability,
        path=part_path(loaded.file, loaded.folder, "knowledge", index, k.path) if k.path else None,
        card=loaded.card.name,
    )


def _inherit(parent: Persona, child: Persona) -> Persona:
    def by_path(parts: Sequence[Any], more: Sequence[Any]) -> tuple:
        out = {str(p.path): p for p in parts}
        out.update({str(p.path): p for p in more})
        return tuple(out.values())

    return Persona(
        name=child.name,
        description=child.description or parent.description,
        greeting=child.greeting or parent.greeting,
        system=child.system or parent.system,
        examples=parent.examples + child.examples,
        knowledge=parent.knowledge + child.knowledge,
        sampling={**parent.sampling, **child.sampling},
        adapters=by_path(parent.adapters, child.adapters),
        steering=by_path(parent.steering, child.steering),
        soft_prompts=by_path(parent.soft_prompts, child.soft_prompts),
        source=child.source or parent.source,
        path=child.path or parent.path,
        template=child.template or parent.template,
        nickname=child.nickname or parent.nickname,
        character_name=child.character_name or parent.character_name,
        character=_by_label(parent.character, child.character),
        greetings=child.greetings or parent.greetings,
        post_history_instructions=child.post_history_instructions or parent.post_history_instructions,
        creator_notes=child.creator_notes or parent.creator_notes,
        token_budget=child.token_budget if child.token_budget is not None else parent.token_budget,
        scan_depth=child.scan_depth,
        recursive_scanning=child.recursive_scanning or parent.recursive_scanning,
        model=child.model or parent.model,
        context_size=child.context_size or parent.context_size,
        metadata=child.metadata or parent.metadata,
    )


def _by_label(parent: tuple[tuple[str, str], ...], child: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """Character parts: the child's text for a label replaces the parent's (Description, Personality, Scenario)."""
    merged = dict(parent) | dict(child)
    return tuple((label, merged[label]) for label in ("Description", "Personality", "Scenario") if label in merged)


def parse_mix(spec: str) -> list[tuple[str, float]]:
    """``teacher`` → [("teacher", 1.0)]; ``teacher:0.7,pirate:0.3`` → two weighted names."""
    out: list[tuple[str, float]] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, sep, weight = part.rpartition(":")
        if not sep:
            name, weight = part, "1"
        try:
            w = float(weight)
        except ValueError:
            raise PersonaError(
                f"persona mix {quote(spec)}: weight {quote(weight)} of {quote(name)} is not a number",
                "write NAME:WEIGHT, e.g. teacher:0.7,pirate:0.3",
            ) from None
        if not (-10.0 <= w <= 10.0):
            raise PersonaError(
                f"persona mix {quote(spec)}: weight {w} of {quote(name)} is out of range",
                "weights lie between -10 and 10",
            )
        out.append((name, w))
    if not out:
        raise PersonaError("empty persona name", "e.g. --persona teacher")
    return out


def mix_personas(parts: Sequence[tuple[Persona, float]]) -> Persona:
    """Mix resolved personas with weights.

    Parameter parts: every adapter/vector scale is multiplied by its card's weight and
    the sets are united; the same file listed more than once adds its scales (vectors
    only combine when their layer ranges match). Prompt parts merge in mix order: system
    prompts joined by a blank line, examples and knowledge concatenated, the first
    card's greeting and description. Sampler settings: the first card's (flags, /set and
    presets still apply on top). Soft prompts: concatenated in mix order, each file once; a
    card's weight only decides whether its soft prompts are included (0 drops them) —
    virtual tokens have no scale.
    """
    if len(parts) == 1 and parts[0][1] == 1.0:
        return parts[0][0]
    adapters: dict[str, AdapterPart] = {}
    steering: dict[tuple, SteeringPart] = {}
    for persona, w in parts:
        for a in persona.adapters:
            prev = adapters.get(str(a.path))
            scale = a.scale * w + (prev.scale if prev else 0.0)
            card = prev.card + "+" + a.card if prev and prev.card != a.card else a.card
            adapters[str(a.path)] = AdapterPart(a.path, scale, card)
        for s in persona.steering:
            key = (str(s.path), s.layers)
            prev_s = steering.get(key)
            scale = s.scale * w + (prev_s.scale if prev_s else 0.0)
            steering[key] = SteeringPart(s.path, scale, s.layers, s.card)
    soft: dict[str, SoftPromptPart] = {}
    for persona, w in parts:
        for sp in persona.soft_prompts if w != 0.0 else ():
            soft.setdefault(str(sp.path), sp)
    first = parts[0][0]
    mix = tuple((p.name, w) for p, w in parts)
    return Persona(
        name="+".join(p.name for p, _ in parts),
        description=first.description,
        greeting=first.greeting,
        system="\n\n".join(p.system for p, _ in parts if p.system),
        examples=tuple(e for p, _ in parts for e in p.examples),
        knowledge=tuple(k for p, _ in parts for k in p.knowledge),
        sampling=dict(first.sampling),
        adapters=tuple(adapters.values()),
        steering=tuple(steering.values()),
        soft_prompts=tuple(soft.values()),
        source=", ".join(dict.fromkeys(p.source for p, _ in parts)),
        path=first.path,
        mix=mix,
        template=first.template,
        nickname=first.nickname,
        character_name=first.character_name,
        character=first.character,
        greetings=first.greetings,
        post_history_instructions="\n\n".join(
            p.post_history_instructions for p, _ in parts if p.post_history_instructions
        ),
        creator_notes=first.creator_notes,
        token_budget=first.token_budget,
        scan_depth=first.scan_depth,
        recursive_scanning=first.recursive_scanning,
        model=first.model,
        context_size=first.context_size,
        metadata=first.metadata,
    )


def suggest_names(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "? (`chat personas list`)"
    return "run `chat personas list` to see the cards you have"


__all__ = [
    "CARD_FILE",
    "NAME_RULE",
    "NO_PERSONA",
    "AdapterPart",
    "Card",
    "Example",
    "LoadedCard",
    "Persona",
    "SoftPromptPart",
    "SteeringPart",
    "card_problems",
    "extends_order",
    "is_valid_name",
    "looks_like_path",
    "mix_personas",
    "parse_mix",
    "read_card",
    "resolve_card",
    "suggest_names",
]

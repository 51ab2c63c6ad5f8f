"""Persona cards: loading, validation, ``extends`` and mixing.

A card is a folder holding ``persona.toml`` (see README for the contract). Loading
a card never runs anything from it: it is TOML validated by pydantic. A
:class:`Persona` is the resolved value — ``extends`` applied, paths made absolute,
mixes combined — that the session hands to a backend.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from chat.errors import PersonaError, SamplingError
from chat.tomlfile import quote, read_toml, shorten, user_path


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
class Persona:
    """A resolved persona: plain, immutable, what every backend receives."""

    name: str
    description: str = ""
    greeting: str = ""
    system: str = ""
    examples: tuple[Example, ...] = ()
    knowledge: tuple[str, ...] = ()
    sampling: dict[str, Any] = field(default_factory=dict)
    adapters: tuple[AdapterPart, ...] = ()
    steering: tuple[SteeringPart, ...] = ()
    source: str = ""  # where the card came from: "built-in", "user", "plugin:NAME", a path
    path: Path | None = None  # the card folder, when there is one
    mix: tuple[tuple[str, float], ...] = ()  # (card name, weight) for a mixed persona
    spec: str = ""  # how to find it again (`chat -c`): names, absolute card paths, weights
    template: str = ""  # a chat template: a well-known name or an absolute path to a Jinja file ("" = the model's)

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
        )


NO_PERSONA = Persona(name="default", source="built-in")


# --- the card file ---------------------------------------------------------------------


CARD_FILE = "persona.toml"
MAX_NAME_CHARS = 64
# \Z, not $: "$" also matches before a final newline, which let "evil\n" through.
NAME_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{MAX_NAME_CHARS - 1}}}\Z")
NAME_RULE = f"use letters, digits, '-', '_' or '.', starting with a letter or digit (at most {MAX_NAME_CHARS})"
MAX_EXTENDS_DEPTH = 64  # cards in one line of `extends`; real cards use two or three


def is_valid_name(name: str) -> bool:
    """Whether ``name`` can name a card (and so a folder, a mix part and a history label)."""
    return NAME_RE.match(name) is not None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ExampleEntry(_Strict):
    user: str
    assistant: str


class KnowledgeEntry(_Strict):
    title: str = ""
    text: str


class AdapterEntry(_Strict):
    path: str
    scale: float = Field(1.0, ge=-10.0, le=10.0)

    @field_validator("scale", mode="before")
    @classmethod
    def _int_is_float(cls, v: Any) -> Any:
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v


class SteeringEntry(AdapterEntry):
    layers: tuple[int, int] | None = None

    @field_validator("layers", mode="before")
    @classmethod
    def _list_is_range(cls, v: Any) -> Any:
        if isinstance(v, list):
            if len(v) != 2:
                raise ValueError("layers must be [start, end] (an inclusive range)")
            if not all(isinstance(x, int) and x >= 0 for x in v) or v[0] > v[1]:
                raise ValueError("layers must be two whole numbers, start ≤ end")
            return tuple(v)
        return v


class Card(_Strict):
    """The schema of ``persona.toml``: the contract documented in README."""

    name: str
    description: str = ""
    greeting: str = ""
    system: str = ""
    extends: list[str] = Field(default_factory=list)
    sampling: dict[str, Any] = Field(default_factory=dict)
    examples: list[ExampleEntry] = Field(default_factory=list)
    knowledge: list[KnowledgeEntry] = Field(default_factory=list)
    adapters: list[AdapterEntry] = Field(default_factory=list)
    steering: list[SteeringEntry] = Field(default_factory=list)
    template: str = ""
    author: str = ""
    version: str = ""
    tags: list[str] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name_is_simple(cls, v: str) -> str:
        if not is_valid_name(v):
            raise ValueError(NAME_RULE)
        return v


@dataclass(frozen=True)
class LoadedCard:
    """A validated card and where it lives."""

    card: Card
    folder: Path
    source: str

    @property
    def file(self) -> Path:
        return self.folder / CARD_FILE


def read_card(folder: Path, source: str = "path") -> LoadedCard:
    """Read and validate ``folder/persona.toml``; every problem becomes one PersonaError naming file and field."""
    return _validated(*_card_data(folder), source)


def _validated(folder: Path, file: Path, data: dict[str, Any], source: str) -> LoadedCard:
    """The card in ``data`` checked field by field, part paths and template included; the first problem raised."""
    try:
        card = Card.model_validate(data)
    except ValidationError as exc:
        raise _card_error(file, exc) from None
    _check_card_sampling(file, card)
    for kind, entries in (("adapters", card.adapters), ("steering", card.steering)):
        for i, entry in enumerate(entries):
            _card_part_path(file, folder, kind, i, entry.path)
    _card_template(file, folder, card.template)
    return LoadedCard(card, _resolved(file, folder), source)


def _card_data(folder: Path) -> tuple[Path, Path, dict[str, Any]]:
    """(card folder, its persona.toml, the parsed TOML with ``name`` defaulting to the folder's name)."""
    folder = user_path(str(folder), PersonaError, "card path")
    if folder.name == CARD_FILE:
        folder = folder.parent
    file = folder / CARD_FILE
    if not os.path.lexists(file):
        raise PersonaError(
            f"{file}: no such card file", "a card is a folder holding persona.toml (`chat personas new NAME`)"
        )
    data = read_toml(file, PersonaError, "fix the card's syntax at that place")
    data.setdefault("name", _resolved(file, folder).name)
    return folder, file, data


def _resolved(file: Path, path: Path) -> Path:
    """``path.resolve()``, with a symlink loop or an unreadable folder as one PersonaError."""
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # RuntimeError: pathlib's "Symlink loop"
        why = shorten(str(exc))
        raise PersonaError(f"{file}: cannot resolve {quote(str(path))}: {why}", "check the path") from None


def _card_template(file: Path, folder: Path, raw: str) -> str:
    """A card's ``template``: a well-known name as it is, or a Jinja file inside the card folder (made absolute)."""
    from chat.template import known_templates

    if not raw or raw in known_templates():
        return raw
    p = user_path(raw, PersonaError, f"{file}: template")
    resolved = _resolved(file, p if p.is_absolute() else folder / p)
    if not p.is_absolute() and not resolved.is_relative_to(_resolved(file, folder)):
        raise PersonaError(
            f"{file}: template {quote(raw)} points outside the card folder",
            "keep the template file inside the card folder",
        )
    if not _is_file(resolved):
        raise PersonaError(
            f"{file}: template {quote(raw)}: neither a known template nor a file",
            f"known templates: {', '.join(known_templates())}; or a Jinja file relative to the card folder",
        )
    return str(resolved)


def _is_file(path: Path) -> bool:
    """``path.is_file()``, where a file the system will not stat (permissions, loops) counts as absent."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _exists(path: Path) -> bool:
    """``path.exists()``, where a path the system will not stat counts as absent."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def card_problems(folder: Path, lookup: Callable[[str], LoadedCard]) -> list[PersonaError]:
    """Every problem in a card, not only the first (``chat personas validate``); [] when it is fine."""
    try:
        folder, file, data = _card_data(folder)
    except PersonaError as exc:  # missing, unreadable or not TOML: the first problem is the only one we can know
        return [exc]
    try:
        loaded = _validated(folder, file, data, "path")
    except PersonaError as first:
        return _every_problem(folder, file, data) or [first]
    try:
        resolve_card(loaded, lookup)
    except PersonaError as exc:
        return [exc]
    return []


def _every_problem(folder: Path, file: Path, data: dict[str, Any]) -> list[PersonaError]:
    """Each schema error, then each sampler, part-path and template problem that can still be checked."""
    problems: list[PersonaError] = []
    try:
        card = Card.model_validate(data)
    except ValidationError as exc:
        problems += [_card_error_entry(file, err) for err in exc.errors()]
        card = Card.model_construct(**{k: v for k, v in data.items() if k in Card.model_fields})
    checks: list[Callable[[], object]] = [lambda: _check_card_sampling(file, card)]
    for kind in ("adapters", "steering"):
        entries = getattr(card, kind, None)
        for i, entry in enumerate(entries if isinstance(entries, list) else []):
            raw = entry.path if hasattr(entry, "path") else entry.get("path") if isinstance(entry, dict) else None
            if isinstance(raw, str):
                checks.append(lambda kind=kind, i=i, raw=raw: _card_part_path(file, folder, kind, i, raw))
    if isinstance(card.template, str):
        checks.append(lambda: _card_template(file, folder, card.template))
    for check in checks:
        try:
            check()
        except PersonaError as exc:
            problems.append(exc)
        except Exception:  # a field of the wrong type already reported above
            pass
    return problems


def _card_error(file: Path, exc: ValidationError) -> PersonaError:
    return _card_error_entry(file, exc.errors()[0])


def _card_error_entry(file: Path, err: Any) -> PersonaError:
    """One pydantic error as one line; user data in it (keys, values) is quoted cut short."""
    loc = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        known = sorted(Card.model_fields) if len(err["loc"]) == 1 else []
        key = str(err["loc"][-1])
        close = difflib.get_close_matches(key, known, n=1) if len(key) <= MAX_NAME_CHARS else []
        tip = f"did you mean {close[0]!r}?" if close else f"known fields: {', '.join(known)}" if known else "remove it"
        return PersonaError(f"{file}: unknown field {quote(loc)}", tip)
    if kind == "missing":
        return PersonaError(f"{file}: field {quote(loc)} is required", "add it to the card")
    got = err.get("input")
    msg = shorten(err["msg"].removeprefix("Value error, "), 160)
    return PersonaError(
        f"{file}: field {quote(loc)}: {msg} (got {quote(got)})", "see README's card contract for the field's type"
    )


def _check_card_sampling(file: Path, card: Card) -> None:
    from chat.sampling import SamplerSettings, normalize_layer

    try:
        layer = normalize_layer(card.sampling, source=f"{file} [sampling]")
        layer.pop("stage_params", None)
        SamplerSettings(**layer)
    except SamplingError as exc:
        raise PersonaError(exc.message, exc.hint) from None
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        info = SamplerSettings.model_fields.get(str(err["loc"][0])) if err["loc"] else None
        raise PersonaError(
            f"{file}: [sampling] {shorten(field, 40)} = {quote(err.get('input'))}: {shorten(err['msg'], 160)}",
            f"allowed: {info.description}" if info and info.description else None,
        ) from None


def _card_part_path(file: Path, folder: Path, kind: str, index: int, raw: str) -> Path:
    """Resolve a part path: relative paths must stay inside the card folder; absolute ones are the user's call."""
    p = user_path(raw, PersonaError, f"{file}: {kind}[{index}].path")
    if p.is_absolute():
        resolved = _resolved(file, p)
    else:
        resolved = _resolved(file, folder / p)
        if not resolved.is_relative_to(_resolved(file, folder)):
            raise PersonaError(
                f"{file}: {kind}[{index}].path {quote(raw)} points outside the card folder",
                "keep adapter files inside the card folder, or write an absolute path if you mean it",
            )
    if not _exists(resolved):
        raise PersonaError(
            f"{file}: {kind}[{index}].path {quote(raw)}: no such file ({quote(str(resolved))})",
            "check the path; it is relative to the card folder",
        )
    return resolved


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


def looks_like_path(text: str) -> bool:
    """``./card``, ``../base``, ``a/b``, ``card.toml``: a path, not a card name."""
    return "/" in text or "\\" in text or text.startswith(".") or text.endswith(".toml")


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
        knowledge=tuple(f"{k.title}: {k.text}" if k.title else k.text for k in card.knowledge),
        sampling=dict(card.sampling),
        adapters=tuple(
            AdapterPart(_card_part_path(loaded.file, loaded.folder, "adapters", i, a.path), a.scale, card.name)
            for i, a in enumerate(card.adapters)
        ),
        steering=tuple(
            SteeringPart(_card_part_path(loaded.file, loaded.folder, "steering", i, s.path), s.scale, s.layers, card.name)
            for i, s in enumerate(card.steering)
        ),
        source=loaded.source,
        path=loaded.folder,
        template=_card_template(loaded.file, loaded.folder, card.template),
    )


def _inherit(parent: Persona, child: Persona, child_wins: bool = True) -> Persona:
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
        source=child.source or parent.source,
        path=child.path or parent.path,
        template=child.template or parent.template,
    )


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
    presets still apply on top).
    """
    if len(parts) == 1 and parts[0][1] == 1.0:
        return parts[0][0]
    adapters: dict[str, AdapterPart] = {}
    steering: dict[tuple, SteeringPart] = {}
    for persona, w in parts:
        for a in persona.adapters:
            prev = adapters.get(str(a.path))
            scale = a.scale * w + (prev.scale if prev else 0.0)
            adapters[str(a.path)] = AdapterPart(a.path, scale, prev.card + "+" + a.card if prev and prev.card != a.card else a.card)
        for s in persona.steering:
            key = (str(s.path), s.layers)
            prev_s = steering.get(key)
            scale = s.scale * w + (prev_s.scale if prev_s else 0.0)
            steering[key] = SteeringPart(s.path, scale, s.layers, s.card)
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
        source=", ".join(dict.fromkeys(p.source for p, _ in parts)),
        path=first.path,
        mix=mix,
        template=first.template,
    )


def suggest_names(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "? (`chat personas list`)"
    return "run `chat personas list` to see the cards you have"


"""Persona cards: loading, validation, ``extends`` and mixing.

A card is a folder holding ``persona.toml`` (see README for the contract). Loading
a card never runs anything from it: it is TOML validated by pydantic. A
:class:`Persona` is the resolved value — ``extends`` applied, paths made absolute,
mixes combined — that the session hands to a backend.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from chat.errors import PersonaError, SamplingError


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
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


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
        if not NAME_RE.match(v) or ":" in v or "," in v:
            raise ValueError("use letters, digits, '-', '_' or '.', starting with a letter or digit")
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
    folder = Path(folder)
    if folder.name == CARD_FILE:
        folder = folder.parent
    file = folder / CARD_FILE
    if not file.is_file():
        raise PersonaError(f"{file}: no such card file", "a card is a folder holding persona.toml (`chat personas new NAME`)")
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise PersonaError(f"{file}: not UTF-8 text", "save the card as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise PersonaError(f"{file}: invalid TOML: {exc}", "fix the syntax at that line") from None
    data.setdefault("name", folder.resolve().name)
    try:
        card = Card.model_validate(data)
    except ValidationError as exc:
        raise _card_error(file, exc) from None
    _check_card_sampling(file, card)
    for kind, entries in (("adapters", card.adapters), ("steering", card.steering)):
        for i, entry in enumerate(entries):
            _card_part_path(file, folder, kind, i, entry.path)
    _card_template(file, folder, card.template)
    return LoadedCard(card, folder.resolve(), source)


def _card_template(file: Path, folder: Path, raw: str) -> str:
    """A card's ``template``: a well-known name as it is, or a Jinja file inside the card folder (made absolute)."""
    from chat.template import known_templates

    if not raw or raw in known_templates():
        return raw
    p = Path(raw).expanduser()
    resolved = p.resolve() if p.is_absolute() else (folder / p).resolve()
    if not p.is_absolute() and not resolved.is_relative_to(folder.resolve()):
        raise PersonaError(f"{file}: template {raw!r} points outside the card folder", "keep the template file inside the card folder")
    if not resolved.is_file():
        raise PersonaError(
            f"{file}: template {raw!r}: neither a known template nor a file",
            f"known templates: {', '.join(known_templates())}; or a Jinja file relative to the card folder",
        )
    return str(resolved)


def card_problems(folder: Path, lookup: Callable[[str], LoadedCard]) -> list[PersonaError]:
    """Every problem in a card, not only the first (``chat personas validate``); [] when it is fine."""
    folder = Path(folder)
    if folder.name == CARD_FILE:
        folder = folder.parent
    file = folder / CARD_FILE
    try:
        loaded = read_card(folder)
    except PersonaError as first:
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except Exception:  # missing, unreadable or not TOML: the first problem is the only one we can know
            return [first]
        data.setdefault("name", folder.resolve().name)
        problems: list[PersonaError] = []
        try:
            card = Card.model_validate(data)
        except ValidationError as exc:
            problems += [_card_error_entry(file, err) for err in exc.errors()]
            card = Card.model_construct(**{k: v for k, v in data.items() if k in Card.model_fields})
        checks: list[Callable[[], object]] = [lambda: _check_card_sampling(file, card)]
        for kind in ("adapters", "steering"):
            for i, entry in enumerate(getattr(card, kind, None) or []):
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
        return problems or [first]
    try:
        resolve_card(loaded, lookup)
    except PersonaError as exc:
        return [exc]
    return []


def _card_error(file: Path, exc: ValidationError) -> PersonaError:
    return _card_error_entry(file, exc.errors()[0])


def _card_error_entry(file: Path, err: Any) -> PersonaError:
    loc = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        known = sorted(Card.model_fields) if len(err["loc"]) == 1 else []
        close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
        tip = f"did you mean {close[0]!r}?" if close else f"known fields: {', '.join(known)}" if known else "remove it"
        return PersonaError(f"{file}: unknown field {loc!r}", tip)
    if kind == "missing":
        return PersonaError(f"{file}: field {loc!r} is required", "add it to the card")
    got = err.get("input")
    msg = err["msg"].removeprefix("Value error, ")
    return PersonaError(f"{file}: field {loc!r}: {msg} (got {got!r})", "see README's card contract for the field's type")


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
            f"{file}: [sampling] {field} = {err.get('input')!r}: {err['msg']}",
            f"allowed: {info.description}" if info and info.description else None,
        ) from None


def _card_part_path(file: Path, folder: Path, kind: str, index: int, raw: str) -> Path:
    """Resolve a part path: relative paths must stay inside the card folder; absolute ones are the user's call."""
    p = Path(raw).expanduser()
    if p.is_absolute():
        resolved = p.resolve()
    else:
        resolved = (folder / p).resolve()
        if not resolved.is_relative_to(folder.resolve()):
            raise PersonaError(
                f"{file}: {kind}[{index}].path {raw!r} points outside the card folder",
                "keep adapter files inside the card folder, or write an absolute path if you mean it",
            )
    if not resolved.exists():
        raise PersonaError(f"{file}: {kind}[{index}].path {raw!r}: no such file ({resolved})", "check the path; it is relative to the card folder")
    return resolved


# --- resolution: extends and mixing ---------------------------------------------------------


def resolve_card(
    loaded: LoadedCard, lookup: Callable[[str], LoadedCard], _chain: tuple[tuple[Path, str], ...] = ()
) -> Persona:
    """Apply ``extends`` (parents first, in listed order) and return the resolved Persona.

    Merge rules: text fields (description, greeting, system) come from the nearest card
    that sets them; examples and knowledge are the parents' followed by the card's own;
    sampling keys are merged with the card winning; adapters and steering are united,
    an entry for the same file replacing the parent's.
    """
    card = loaded.card
    chain = _chain + ((loaded.folder, card.name),)  # cards are told apart by folder: names and paths both reach them
    base = Persona(name=card.name)
    for parent_name in card.extends:
        parent_card = lookup(parent_name)
        if any(folder == parent_card.folder for folder, _ in chain):
            cycle = " → ".join([name for _, name in chain] + [parent_card.card.name])
            raise PersonaError(f"{loaded.file}: extends forms a cycle: {cycle}", f"remove {parent_name!r} from extends")
        parent = resolve_card(parent_card, lookup, chain)
        base = _inherit(base, parent)
    own = Persona(
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
    return _inherit(base, own, child_wins=True)


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
            raise PersonaError(f"persona mix {spec!r}: weight {weight!r} of {name!r} is not a number", "write NAME:WEIGHT, e.g. teacher:0.7,pirate:0.3") from None
        if not (-10.0 <= w <= 10.0):
            raise PersonaError(f"persona mix {spec!r}: weight {w} of {name!r} is out of range", "weights lie between -10 and 10")
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


"""Persona card files: the ``persona.toml`` schema, reading and validation.

A card is a folder holding ``persona.toml`` (see README for the contract). Reading
a card never runs anything from it: it is TOML validated by pydantic, and every
problem is one PersonaError naming the file and the field. Resolving ``extends``
and mixing cards into a :class:`chat.persona.Persona` is :mod:`chat.persona`'s job.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from chat.errors import PersonaError, SamplingError
from chat.tomlfile import quote, read_toml, shorten, user_path

CARD_FILE = "persona.toml"
MAX_NAME_CHARS = 64
# \Z, not $: "$" also matches before a final newline, which let "evil\n" through.
NAME_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{MAX_NAME_CHARS - 1}}}\Z")
NAME_RULE = f"use letters, digits, '-', '_' or '.', starting with a letter or digit (at most {MAX_NAME_CHARS})"


def is_valid_name(name: str) -> bool:
    """Whether ``name`` can name a card (and so a folder, a mix part and a history label)."""
    return NAME_RE.match(name) is not None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ExampleEntry(_Strict):
    user: str
    assistant: str


class KnowledgeEntry(_Strict):
    """A fact: always on with only ``text``; a lorebook entry with ``keys`` (or ``constant``); files with ``path``.

    The lorebook fields follow Character Card V2/V3 ``character_book`` entries (see chat/knowledge/lorebook.py).
    """

    title: str = ""
    text: str = ""
    path: str = ""  # a file or folder of Markdown/text notes inside the card folder, retrieved by relevance
    keys: list[str] | None = None  # None: a plain always-on fact; a list: activated when a key appears
    secondary_keys: list[str] = Field(default_factory=list)
    selective_logic: Literal["and_any", "and_all", "not_any", "not_all"] = "and_any"
    constant: bool = False
    enabled: bool = True
    case_sensitive: bool = False
    whole_words: bool = False
    use_regex: bool = False
    insertion_order: int = Field(100, ge=-(10**9), le=10**9)
    priority: int = Field(10, ge=-(10**9), le=10**9)
    position: Literal["before_char", "after_char"] = "before_char"
    scan_depth: int | None = Field(None, ge=0, le=1000)
    probability: int = Field(100, ge=0, le=100)
    book_index: int | None = Field(None, ge=0)  # which entry of the imported card's lorebook this was (for export)

    @model_validator(mode="after")
    def _has_content(self) -> KnowledgeEntry:
        if not self.text and not self.path and self.keys is None and not self.constant:
            raise ValueError("a knowledge entry needs text (or a path to notes)")
        if self.use_regex:
            from chat.knowledge.keys import regex_problem

            for key in [*(self.keys or []), *self.secondary_keys]:
                why = regex_problem(key)
                if why:
                    raise ValueError(f"key {key[:60]!r}: {why}")
        return self


class CharacterEntry(_Strict):
    """A character card's definition: sent to the model after the system prompt, each part labelled."""

    name: str = ""  # the character's name as the card spells it ({{char}}), when it differs from the card's
    description: str = ""
    personality: str = ""
    scenario: str = ""


class AdapterEntry(_Strict):
    path: str
    scale: float = Field(1.0, ge=-10.0, le=10.0)

    @field_validator("scale", mode="before")
    @classmethod
    def _int_is_float(cls, v: Any) -> Any:
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v


class SoftPromptEntry(_Strict):
    """``[[soft_prompt]]``: a PEFT prompt-tuning folder or a soft prompt GGUF (no scale: its rows are unscaled)."""

    path: str


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
    soft_prompt: list[SoftPromptEntry] = Field(default_factory=list)
    template: str = ""
    author: str = ""
    version: str = ""
    tags: list[str] = Field(default_factory=list)
    # Character Card fields (README: "Importing cards"); all optional
    nickname: str = ""  # what {{char}} becomes, before character.name and name
    character: CharacterEntry = Field(default_factory=CharacterEntry)
    greetings: list[str] = Field(default_factory=list)  # more greetings after `greeting` (/greeting N)
    post_history_instructions: str = ""  # sent after the conversation, just before the answer
    creator_notes: str = ""  # shown by `chat personas show`; never sent to the model
    token_budget: int | None = Field(None, ge=0, le=1_000_000)  # estimated tokens for knowledge entries and notes
    scan_depth: int = Field(2, ge=0, le=1000)  # recent messages searched for lorebook keys
    recursive_scanning: bool = False  # fired entries' text can fire more entries
    model: str = ""  # the model the card was made for (an ollama FROM): a path becomes -m's default
    context_size: int | None = Field(None, ge=16, le=10_000_000)  # context window the card asks for (num_ctx)
    license: str = ""

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
    return validated_card(*card_data(folder), source)


def validated_card(folder: Path, file: Path, data: dict[str, Any], source: str) -> LoadedCard:
    """The card in ``data`` checked field by field, part paths and template included; the first problem raised."""
    try:
        card = Card.model_validate(data)
    except ValidationError as exc:
        raise _card_error(file, exc) from None
    _check_card_sampling(file, card)
    entries: list[tuple[str, Sequence[AdapterEntry | SoftPromptEntry]]] = [
        ("adapters", card.adapters),
        ("steering", card.steering),
        ("soft_prompt", card.soft_prompt),
    ]
    for kind, parts in entries:
        for i, entry in enumerate(parts):
            part_path(file, folder, kind, i, entry.path)
    for i, knowledge in enumerate(card.knowledge):
        if knowledge.path:
            part_path(file, folder, "knowledge", i, knowledge.path)
    card_template(file, folder, card.template)
    return LoadedCard(card, _resolved(file, folder), source)


def card_data(folder: Path) -> tuple[Path, Path, dict[str, Any]]:
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


def card_template(file: Path, folder: Path, raw: str) -> str:
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


def every_problem(folder: Path, file: Path, data: dict[str, Any]) -> list[PersonaError]:
    """Each schema error, then each sampler, part-path and template problem that can still be checked."""
    problems: list[PersonaError] = []
    try:
        card = Card.model_validate(data)
    except ValidationError as exc:
        problems += [_card_error_entry(file, err) for err in exc.errors()]
        card = Card.model_construct(**{k: v for k, v in data.items() if k in Card.model_fields})
    checks: list[Callable[[], object]] = [lambda: _check_card_sampling(file, card)]
    for kind in ("adapters", "steering", "soft_prompt"):
        entries = getattr(card, kind, None)
        for i, entry in enumerate(entries if isinstance(entries, list) else []):
            raw = entry.path if hasattr(entry, "path") else entry.get("path") if isinstance(entry, dict) else None
            if isinstance(raw, str):
                checks.append(functools.partial(part_path, file, folder, kind, i, raw))
    if isinstance(card.template, str):
        template: str = card.template
        checks.append(lambda: card_template(file, folder, template))
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


def part_path(file: Path, folder: Path, kind: str, index: int, raw: str) -> Path:
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


def looks_like_path(text: str) -> bool:
    """``./card``, ``../base``, ``a/b``, ``card.toml``: a path, not a card name."""
    return "/" in text or "\\" in text or text.startswith(".") or text.endswith(".toml")

"""Finding persona cards: built-in, plugins, the user's config dir, explicit paths.

Sources are searched lowest precedence first — built-in ``personas/`` (registered
by its own plugin), other plugins, then the user's ``personas/`` folder — and a
later source overrides an earlier one by name. ``chat personas list`` shows where
each card comes from and what it shadows.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from chat.card import CARD_FILE, LoadedCard, looks_like_path, read_card
from chat.errors import PersonaError
from chat.persona import Persona, mix_personas, parse_mix, resolve_card, suggest_names
from chat.tomlfile import quote, user_path

BUILTIN_PLUGIN = "chat_personas"


@dataclass
class CatalogEntry:
    name: str
    folder: Path
    source: str  # "built-in", "plugin:NAME", "user"
    shadows: list[str] = field(default_factory=list)


class PersonaCatalog:
    """All persona cards the user can name, resolved lazily (a bad card only fails when used)."""

    def __init__(self, user_dir: Path | None) -> None:
        self.user_dir = user_dir
        self._entries: dict[str, CatalogEntry] | None = None
        self._cache: dict[str, LoadedCard] = {}

    def entries(self) -> dict[str, CatalogEntry]:
        if self._entries is None:
            self._entries = self._discover()
        return self._entries

    def names(self) -> list[str]:
        return sorted(self.entries())

    def _discover(self) -> dict[str, CatalogEntry]:
        from chat.plugins import get_registry

        found: dict[str, CatalogEntry] = {}

        def add(folder: Path, source: str, name: str | None = None) -> None:
            folder = Path(folder)
            if folder.name == CARD_FILE:
                folder = folder.parent
            key = name or folder.name
            prev = found.get(key)
            entry = CatalogEntry(key, folder, source, (prev.shadows + [prev.source]) if prev else [])
            found[key] = entry

        registered = get_registry().personas
        ordered = sorted(registered, key=lambda r: r[2] != BUILTIN_PLUGIN)  # built-ins first
        for target, kwargs, plugin in ordered:
            source = "built-in" if plugin == BUILTIN_PLUGIN else f"plugin:{plugin}"
            add(Path(target), source, kwargs.get("name"))
        if self.user_dir and self.user_dir.is_dir():
            for card in sorted(self.user_dir.glob(f"*/{CARD_FILE}")):
                add(card.parent, "user")
        return found

    def load(self, name_or_path: str) -> LoadedCard:
        """A validated card by name, or by path when the argument names a folder or persona.toml."""
        path = user_path(name_or_path, PersonaError, "persona")
        if looks_like_path(name_or_path) or os.path.exists(path / CARD_FILE):
            return self._read(path, "path")
        entry = self.entries().get(name_or_path)
        if entry is None:
            raise PersonaError(f"unknown persona {quote(name_or_path)}", suggest_names(name_or_path, self.names()))
        return self._read(entry.folder, entry.source)

    def _read(self, folder: Path, source: str) -> LoadedCard:
        """Each card folder is read once per catalog: ``extends`` and mixes reach the same card many times."""
        key = os.path.realpath(folder)
        if key not in self._cache:
            self._cache[key] = read_card(folder, source)
        return self._cache[key]

    def resolve(self, spec: str) -> Persona:
        """``teacher``, ``./my-card``, or a mix ``teacher:0.7,pirate:0.3`` → a resolved Persona."""
        parts, refs = [], []
        for name, weight in parse_mix(spec):
            loaded = self.load(name)
            parts.append((resolve_card(loaded, self.load), weight))
            ref = str(loaded.folder) if loaded.source == "path" else name
            refs.append(ref if weight == 1.0 and len(parse_mix(spec)) == 1 else f"{ref}:{weight:g}")
        return dataclasses.replace(mix_personas(parts), spec=",".join(refs))

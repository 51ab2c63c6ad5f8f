"""The resolved knowledge entry a persona carries, and how its size is estimated."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

SelectiveLogic = Literal["and_any", "and_all", "not_any", "not_all"]
Position = Literal["before_char", "after_char"]

DEFAULT_TOKEN_BUDGET = 1024  # knowledge tokens per turn when a card sets no token_budget


def estimate_tokens(text: str) -> int:
    """About four characters a token: budgets are checked on every turn, so no tokenizer is run for them."""
    return (len(text) + 3) // 4


@dataclass(frozen=True)
class KnowledgeItem:
    """One ``[[knowledge]]`` entry, resolved: a plain fact, a lorebook entry, or a folder of notes."""

    text: str = ""
    title: str = ""
    keys: tuple[str, ...] | None = None  # None: a plain fact, always in the system prompt
    secondary_keys: tuple[str, ...] = ()
    selective_logic: SelectiveLogic = "and_any"
    constant: bool = False
    enabled: bool = True
    case_sensitive: bool = False
    whole_words: bool = False
    use_regex: bool = False
    insertion_order: int = 100
    priority: int = 10
    position: Position = "before_char"
    scan_depth: int | None = None
    probability: int = 100
    path: Path | None = None  # notes (a file or folder), absolute
    card: str = ""  # the card that brought it

    @property
    def is_plain(self) -> bool:
        """A plain fact: always on, outside the lorebook budget (the card contract before lorebooks)."""
        return self.keys is None and not self.constant and self.path is None

    @property
    def is_lorebook(self) -> bool:
        return self.path is None and not self.is_plain

    @property
    def label(self) -> str:
        """How /info and --show-prompt name the entry."""
        if self.title:
            return self.title
        if self.keys:
            return self.keys[0]
        first = self.text.strip().splitlines()[0] if self.text.strip() else ""
        return first[:40] + ("…" if len(first) > 40 else "")

    @property
    def line(self) -> str:
        """The entry as the plain-facts block lists it: ``title: text``."""
        return f"{self.title}: {self.text}" if self.title else self.text

"""Lorebook activation: which keyword entries fire for the recent messages, and why.

A pure function of the entries, the messages and the settings (no session, no I/O), so the
REPL, ``--show-prompt`` and the server all get the same answer. The rules follow Character
Card V2/V3 ``character_book`` and SillyTavern's world info:

- an enabled entry fires when one of its ``keys`` occurs in the last ``scan_depth`` messages
  (the entry's own depth, else the card's), or always when it is ``constant``;
- ``secondary_keys``, when given, must then also agree under ``selective_logic``: ``and_any`` (one
  of them occurs), ``and_all`` (all occur), ``not_any`` (none occurs), ``not_all`` (not all occur);
- ``probability`` below 100 is the chance it is inserted once activated;
- with ``recursive_scanning`` the text of fired entries is scanned too, so entries can fire
  entries (a bounded number of passes);
- the fired entries share the token budget: when they do not all fit, the lowest ``priority``
  is dropped first; the rest go into the prompt by ``insertion_order`` (lower first).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from chat.knowledge.entry import KnowledgeItem, estimate_tokens
from chat.knowledge.keys import key_in

MAX_RECURSION_PASSES = 8
MAX_SCAN_CHARS = 64_000  # the newest text scanned per depth: keys never run over a huge paste in full


@dataclass(frozen=True)
class Fired:
    """An entry that fired, with the reason a user can read; ``kept`` is False when the budget left it out."""

    entry: KnowledgeItem
    reason: str
    tokens: int
    kept: bool = True


@dataclass(frozen=True)
class Activation:
    fired: tuple[Fired, ...]  # in insertion order, the kept ones and those dropped for the budget

    @property
    def kept(self) -> list[KnowledgeItem]:
        return [f.entry for f in self.fired if f.kept]

    @property
    def used_tokens(self) -> int:
        return sum(f.tokens for f in self.fired if f.kept)


def activate(
    entries: Sequence[KnowledgeItem],
    messages: Sequence[str],
    *,
    scan_depth: int = 2,
    token_budget: int = 1024,
    recursive: bool = False,
    rng: random.Random | None = None,
    count: Callable[[str], int] = estimate_tokens,
) -> Activation:
    """The lorebook entries among ``entries`` that fire for ``messages`` (oldest first), within ``token_budget``."""
    candidates = [e for e in entries if e.is_lorebook and e.enabled]
    if not candidates:
        return Activation(())
    buffers: dict[int, tuple[str, str]] = {}

    def recent(depth: int) -> tuple[str, str]:
        if depth not in buffers:
            text = ("\n".join(messages[-depth:]) if depth else "")[-MAX_SCAN_CHARS:]
            buffers[depth] = (text, text.lower())
        return buffers[depth]

    fired: dict[int, str] = {}
    for i, entry in enumerate(candidates):
        if entry.constant:
            fired[i] = "constant"
        else:
            depth = entry.scan_depth if entry.scan_depth is not None else scan_depth
            why = _match(entry, *recent(depth))
            if why:
                fired[i] = f"{why} in the last {depth} message(s)"
    if recursive:
        _recurse(candidates, fired)
    chosen = {i: why for i, why in fired.items() if _lucky(candidates[i], rng)}
    return _within_budget(candidates, chosen, token_budget, count)


def _match(entry: KnowledgeItem, text: str, lowered: str) -> str | None:
    """``key 'X'`` when the entry's keys and secondary keys agree with ``text``; None otherwise."""
    if not text:
        return None

    def found_in(key: str) -> bool:
        return key_in(
            text,
            key,
            regex=entry.use_regex,
            case_sensitive=entry.case_sensitive,
            whole_words=entry.whole_words,
            lowered=lowered,
        )

    hit = next((k for k in entry.keys or () if found_in(k)), None)
    if hit is None:
        return None
    why = f"key {hit!r}"
    if not entry.secondary_keys:
        return why
    found = [k for k in entry.secondary_keys if found_in(k)]
    logic = entry.selective_logic
    agree = {
        "and_any": bool(found),
        "and_all": len(found) == len(entry.secondary_keys),
        "not_any": not found,
        "not_all": len(found) < len(entry.secondary_keys),
    }[logic]
    if not agree:
        return None
    shown = ", ".join(repr(k) for k in found[:3]) if found else "none of " + repr(entry.secondary_keys[0])
    return f"{why} and secondary ({logic}: {shown})"


def _recurse(candidates: Sequence[KnowledgeItem], fired: dict[int, str]) -> None:
    """Scan the text of fired entries for the keys of the others, a bounded number of passes."""
    frontier = list(fired)
    for _ in range(MAX_RECURSION_PASSES):
        if not frontier:
            return
        text = "\n".join(candidates[i].text for i in frontier)[-MAX_SCAN_CHARS:]
        lowered = text.lower()
        source = candidates[frontier[0]].label
        frontier = []
        for i, entry in enumerate(candidates):
            if i in fired:
                continue
            why = _match(entry, text, lowered)
            if why:
                fired[i] = f"{why} in the text of entry {source!r} (recursion)"
                frontier.append(i)


def _lucky(entry: KnowledgeItem, rng: random.Random | None) -> bool:
    if entry.probability >= 100:
        return True
    if entry.probability <= 0:
        return False
    return (rng or random).random() * 100 < entry.probability


def _within_budget(
    candidates: Sequence[KnowledgeItem], chosen: dict[int, str], budget: int, count: Callable[[str], int]
) -> Activation:
    """Keep the highest priorities that fit (insertion order breaks ties); report all in insertion order."""
    by_priority = sorted(chosen, key=lambda i: (-candidates[i].priority, candidates[i].insertion_order, i))
    kept: set[int] = set()
    used = 0
    sizes = {i: count(candidates[i].text) for i in chosen}
    for i in by_priority:
        if used + sizes[i] <= budget:
            kept.add(i)
            used += sizes[i]
    order = sorted(chosen, key=lambda i: (candidates[i].insertion_order, i))
    return Activation(
        tuple(
            Fired(
                candidates[i],
                chosen[i] if i in kept else f"{chosen[i]}; left out: over the token budget",
                sizes[i],
                i in kept,
            )
            for i in order
        )
    )

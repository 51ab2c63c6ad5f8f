"""Ban or boost words and phrases by the tokens that would start them.

What "the tokens that start a word" means (byte-level BPE has a token for " cat"
with its leading space, and often another for "cat" without it):

* for each spelling of the word — as written, lowercase, Capitalized — the first
  token of its tokenization with a leading space and without one, plus every
  vocabulary entry that *is* that spelling (with or without leading whitespace);
* tokens that bring their own leading whitespace always start a new word; bare
  tokens start one only at a word boundary (the text so far ends in a
  non-alphanumeric character, e.g. a newline or a quote), so banning "cat" does
  not ban the "cat" inside "concatenate".

A word the tokenizer splits into several tokens is stopped at its first piece, so
banning "unbelievable" also blocks other words that begin with that piece (" un");
list distinctive words. The model can still spell a banned word from smaller
pieces: this is a strong nudge at the token level, not a guarantee.

Phrases (several words) act on their **last** word once the words before it have
been written: ban "as an AI" lets "as an" through and then forbids " AI"; case
and runs of whitespace do not matter for that match. ``boost`` adds its bias to
the start of the next word of the phrase (the first word when none is written yet).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from chat.stages import SamplerStage, StageContext, StageParams, Vocabulary

WS = re.compile(r"\s+")


class WordFilterParams(StageParams):
    """Parameters of ``word_filter``; both empty by default (the stage then changes nothing)."""

    ban: tuple[str, ...] = Field((), description="words or phrases never to start; e.g. delve,as an AI; empty = off")
    boost: dict[str, float] = Field(
        {},  # a plain default (pydantic copies it): `chat samplers` prints defaults, not factories
        description=(
            "word or phrase → bias (-100..100) added to the tokens that start it; e.g. indeed:2,sorry:-3; empty = off"
        ),
    )

    @field_validator("ban", mode="before")
    @classmethod
    def _parse_ban(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = json.loads(value) if value.strip().startswith("[") else [p for p in value.split(",")]
        return value

    @field_validator("ban")
    @classmethod
    def _ban_entries(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        out = tuple(" ".join(v.split()) for v in value)
        if any(not v for v in out):
            raise ValueError("an entry is empty")
        return out

    @field_validator("boost", mode="before")
    @classmethod
    def _parse_boost(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("{"):
                return json.loads(text)
            out: dict[str, str] = {}
            for part in filter(None, (p.strip() for p in text.split(","))):
                word, sep, bias = part.rpartition(":")
                if not sep:
                    raise ValueError(f"{part!r}: expected WORD:BIAS")
                out[word] = bias
            return out
        return value

    @field_validator("boost")
    @classmethod
    def _boost_entries(cls, value: dict[str, float]) -> dict[str, float]:
        out = {}
        for word, bias in value.items():
            key = " ".join(word.split())
            if not key:
                raise ValueError("an entry is empty")
            if not math.isfinite(bias) or not -100.0 <= bias <= 100.0:
                raise ValueError(f"{word!r}: bias {bias} is outside -100..100")
            out[key] = float(bias)
        return out


def _spellings(word: str) -> list[str]:
    out = [word, word.lower(), word[:1].upper() + word[1:]]
    return list(dict.fromkeys(out))


def word_start_tokens(vocabulary: Vocabulary, word: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens that start ``word`` anywhere, tokens that start it only at a word boundary)."""
    spaced: set[int] = set()
    bare: set[int] = set()

    def classify(token: int) -> None:
        text = vocabulary.token_text(token)
        if text[:1].isspace():
            spaced.add(token)
        elif text:
            bare.add(token)

    for spelling in _spellings(word):
        for text in (" " + spelling, spelling):
            ids = vocabulary.tokenize(text)
            if not ids:
                continue
            first = vocabulary.token_text(ids[0])
            if first.strip():
                classify(ids[0])
            elif len(ids) > 1:  # a lone-space token: the word proper starts with the next one
                bare.add(ids[1])
    wanted = set(_spellings(word))
    for token, text in enumerate(vocabulary.texts()):
        if text and text.lstrip() in wanted:
            (spaced if text[:1].isspace() else bare).add(token)
    return np.fromiter(sorted(spaced), dtype=np.int64), np.fromiter(sorted(bare - spaced), dtype=np.int64)


def _next_word(words: list[str], tail: str) -> int:
    """Index of the word of a phrase to act on next: after the longest written prefix of it (0 = the first)."""
    for k in range(len(words) - 1, 0, -1):
        prefix = " ".join(words[:k])
        if tail.endswith(prefix):
            before = tail[: len(tail) - len(prefix)]
            if not before or not before[-1].isalnum():
                return k
    return 0


def apply_word_filter(logits: np.ndarray, context: StageContext, params: WordFilterParams) -> np.ndarray:
    """New logits: the start tokens of banned words at -inf, of boosted words shifted by their bias."""
    if not params.ban and not params.boost:
        return logits.copy()
    out = logits.copy()
    starts: dict[str, tuple[np.ndarray, np.ndarray]] = context.cache.setdefault("starts", {})
    n_tail = context.cache.get("n_tail")
    if n_tail is None:
        longest = max(len(p) for p in (*params.ban, *params.boost))
        n_tail = context.cache["n_tail"] = longest + 2  # every token adds at least one character
    raw_tail = context.tail_text(n_tail)
    at_boundary = not raw_tail or not raw_tail[-1].isalnum()
    tail = WS.sub(" ", raw_tail).rstrip().lower()

    def tokens_for(word: str) -> np.ndarray:
        if word not in starts:
            starts[word] = word_start_tokens(context.vocabulary, word)
        spaced, bare = starts[word]
        return np.concatenate([spaced, bare]) if at_boundary and bare.size else spaced

    for phrase, bias in params.boost.items():
        words = phrase.split(" ")
        k = _next_word([w.lower() for w in words], tail)
        out[tokens_for(words[k])] += np.float32(bias)
    for phrase in params.ban:
        words = phrase.split(" ")
        if len(words) > 1 and _next_word([w.lower() for w in words], tail) != len(words) - 1:
            continue
        out[tokens_for(words[-1])] = -np.inf
    return out


WORD_FILTER = SamplerStage(
    name="word_filter",
    description="ban or boost listed words and phrases (by the tokens that would start them)",
    params=WordFilterParams,
    apply=apply_word_filter,
)

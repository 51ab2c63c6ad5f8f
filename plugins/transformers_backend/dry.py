"""DRY ("don't repeat yourself") as llama.cpp computes it: the sequence-breaker table and the processor."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from chat.stages import Vocabulary

from .processors import StageProcessor, check_value


def dry_breaker_sequences(vocabulary: Vocabulary, breakers: Sequence[str]) -> dict[int, list[tuple[int, ...]]]:
    """llama.cpp's DRY sequence-breaker table: head token → tails (``get_overlapping_token_sequences``).

    A token containing a breaker is a single-token breaker (empty tail); a token whose
    end overlaps a breaker's start heads the tokenization of the breaker's rest
    (at most 20 tokens). Breakers are cut to 40 characters, empty ones skipped.
    """
    table: dict[int, list[tuple[int, ...]]] = {}
    texts = [t.encode("utf-8", errors="surrogateescape") for t in vocabulary.texts()] if breakers else []
    for breaker in breakers:
        raw = breaker.encode("utf-8")[:40]
        if not raw:
            continue
        for tok, word in enumerate(texts):
            seqs = table.setdefault(tok, [])
            if raw in word:
                if () not in seqs:
                    seqs.append(())
                continue
            pos = word.find(raw[:1])
            while pos != -1:
                i = 1
                match = True
                while i < len(raw) and pos + i < len(word):
                    if word[pos + i] != raw[i]:
                        match = False
                        break
                    i += 1
                if match:
                    tail = tuple(vocabulary.tokenize(raw[i:].decode("utf-8", errors="replace")))[:20]
                    if tail not in seqs:
                        seqs.append(tail)
                pos = word.find(raw[:1], pos + 1)
            if not seqs:
                del table[tok]
    return table


class DryLogitsProcessor(StageProcessor):
    """DRY ("don't repeat yourself", llama.cpp ``dry``): penalise tokens that would extend a repeat.

    If the last ``n`` tokens also occur earlier followed by token ``t`` and
    ``n ≥ allowed_length``, ``t`` loses ``multiplier · base^(n − allowed_length)``.
    Matching never crosses a sequence breaker (``breakers``: head token → tails).
    """

    name = "dry"

    def __init__(
        self,
        multiplier: float,
        base: float,
        allowed_length: int,
        last_n: int,
        breakers: Mapping[int, Sequence[tuple[int, ...]]] | None = None,
        n_ctx: int = 1 << 30,
    ) -> None:
        check_value("dry_multiplier", multiplier, multiplier >= 0, "≥ 0")
        check_value("dry_base", base, base >= 1.0, "≥ 1")
        check_value("dry_allowed_length", allowed_length, allowed_length >= 1, "≥ 1")
        check_value("dry_penalty_last_n", last_n, last_n >= -1, "-1 (whole context) or ≥ 0")
        self.multiplier, self.base, self.allowed_length = multiplier, base, allowed_length
        self.last_n = n_ctx if last_n == -1 else last_n
        self.breakers = {k: list(v) for k, v in (breakers or {}).items()}
        self.max_exponent = int(88.7228391 / math.log(base)) if base > 1.000001 else 0

    def row(self, x: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        if self.multiplier == 0.0 or self.last_n == 0:
            return x.clone()
        n = min(len(tokens), self.last_n)
        if n <= self.allowed_length:
            return x.clone()
        last = tokens[len(tokens) - n :]

        def rat(i: int) -> int:  # i-th token from the end
            return last[n - 1 - i]

        # 1. the nearest sequence breaker limits how far back a repeat may reach
        rep_limit = n
        for i in range(n):
            tails = self.breakers.get(rat(i))
            if not tails:
                continue
            longest = -1
            for tail in tails:
                k = len(tail)
                if longest < k <= i and all(tail[o] == rat(i - o - 1) for o in range(k)):
                    longest = k
            if longest >= 0:
                rep_limit = i - longest
                break
        if rep_limit < self.allowed_length:
            return x.clone()
        # 2. reverse Z-algorithm: repeat[last - k] = length of the suffix that also ends k tokens earlier
        repeat = [0] * n
        lt = rt = 0
        for k in range(1, n):
            if k > rt:
                m = 0
                while m + k < n and rat(m) == rat(m + k):
                    m += 1
                repeat[n - 1 - k] = min(m, rep_limit)
                if m > 0:
                    lt, rt = k, k + m - 1
            else:
                p = k - lt
                right = rt - k + 1
                if repeat[n - 1 - p] < right:
                    repeat[n - 1 - k] = min(repeat[n - 1 - p], rep_limit)
                else:
                    i = rt + 1
                    while i < n and rat(i) == rat(i - k):
                        i += 1
                    repeat[n - 1 - k] = min(i - k, rep_limit)
                    lt, rt = k, i - 1
        # 3. the token after each long-enough repeat would extend it
        longest_for: dict[int, int] = {}
        for i in range(n - 1):
            length = repeat[i]
            if length >= self.allowed_length:
                tok = rat(n - 2 - i)
                if longest_for.get(tok, -1) < length:
                    longest_for[tok] = length
        # 4. penalties (single-token breakers are never penalised)
        out = x.clone()
        for tok, length in longest_for.items():
            if not 0 <= tok < x.numel() or () in self.breakers.get(tok, ()):
                continue
            exp = length - self.allowed_length
            if self.max_exponent > 0 and exp > self.max_exponent:
                exp = self.max_exponent
            out[tok] = out[tok] - self.multiplier * self.base**exp
        return out


def breaker_table(vocabulary: Vocabulary, breakers: Sequence[str]) -> dict[int, list[tuple[int, ...]]]:
    """:func:`dry_breaker_sequences`, built once per vocabulary and set of breakers (it scans every token)."""
    return vocabulary.table(("dry-breakers", tuple(breakers)), lambda: dry_breaker_sequences(vocabulary, breakers))

"""Matching a lorebook key against recent text: plain, whole-word, case-sensitive or a regular expression.

Keys come from strangers' cards. A regular expression can take exponential (``(a+)+$``) or high
polynomial (``\\d*\\d*\\d*x``) time on a crafted input, so :func:`regex_problem` refuses, when the
card is read, the obvious cases (a quantified group that holds a quantifier, backreferences), and
every regular-expression key is matched with the ``regex`` package under a time limit
(:data:`REGEX_TIMEOUT_S`): a key that runs out of time counts as not found. Patterns are bounded in
length and compiled once.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import regex as timed_re

REGEX_TIMEOUT_S = 0.05  # per key and turn: a key that needs longer counts as not found

MAX_KEY_CHARS = 500
_SLASHED = re.compile(r"/(.+)/([a-z]*)\Z", re.DOTALL)  # SillyTavern writes regex keys as /pattern/flags


def regex_problem(key: str) -> str | None:
    """Why ``key`` cannot be used as a regular expression (None when it can)."""
    if len(key) > MAX_KEY_CHARS:
        return f"a regular expression key may have at most {MAX_KEY_CHARS} characters"
    pattern, _ = _pattern_and_flags(key)
    if re.search(r"\\[1-9]|\(\?P=", pattern):
        return "backreferences are not allowed in keys (they can make matching take forever)"
    if _nested_quantifier(pattern):
        return "a repeated group that repeats inside (like (a+)+) can make matching take forever"
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        return f"not a regular expression: {exc}"
    return None


def _pattern_and_flags(key: str) -> tuple[str, int]:
    m = _SLASHED.match(key)
    if not m:
        return key, 0
    flags = re.IGNORECASE if "i" in m.group(2) else 0
    return m.group(1), flags


def _nested_quantifier(pattern: str) -> bool:
    """Whether a group holding a quantifier or an alternation is itself repeated: ``(a+)+``, ``(a|aa)*``."""
    stack: list[bool] = []  # per open group: does it hold a quantifier or "|"?
    i, escaped, in_class = 0, False, False
    while i < len(pattern):
        c = pattern[i]
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c == "(":
            stack.append(False)
        elif c == ")" and stack:
            inner = stack.pop()
            if inner and _repeats(pattern, i + 1):
                return True
            if inner and stack:
                stack[-1] = True
        elif stack and (c == "|" or _repeats(pattern, i)):
            stack[-1] = True
        i += 1
    return False


def _repeats(pattern: str, i: int) -> bool:
    """Whether a quantifier that allows many repeats starts at ``pattern[i]``."""
    return pattern[i : i + 1] in ("*", "+") or re.match(r"\{\d*,", pattern[i:]) is not None


@functools.lru_cache(maxsize=4096)
def compiled(key: str, *, regex: bool, case_sensitive: bool, whole_words: bool) -> Any:
    """The pattern for one key; None for an empty key or a regular expression that may not be used."""
    if not key.strip():
        return None
    flags = 0 if case_sensitive else re.IGNORECASE
    if regex:
        if regex_problem(key):
            return None
        pattern, extra = _pattern_and_flags(key)
        try:
            return timed_re.compile(pattern, int(flags | extra) | timed_re.VERSION0)
        except (timed_re.error, RecursionError, OverflowError):
            return None
    body = re.escape(key.strip())
    if whole_words:
        body = rf"(?<!\w){body}(?!\w)"
    return re.compile(body, flags)


def key_in(
    text: str,
    key: str,
    *,
    regex: bool = False,
    case_sensitive: bool = False,
    whole_words: bool = False,
    lowered: str | None = None,
) -> bool:
    """Whether ``key`` occurs in ``text`` under the entry's matching rules (``lowered``: ``text.lower()``, cached)."""
    if not regex:  # a substring test first: most keys miss, and ``in`` is far cheaper than a pattern
        needle = key.strip() if case_sensitive else key.strip().lower()
        hay = text if case_sensitive else (lowered if lowered is not None else text.lower())
        if not needle or needle not in hay:
            return False
        if not whole_words:
            return True
    pattern = compiled(key, regex=regex, case_sensitive=case_sensitive, whole_words=whole_words)
    if pattern is None:
        return False
    if not regex:
        return pattern.search(text) is not None
    try:
        return pattern.search(text, timeout=REGEX_TIMEOUT_S) is not None
    except TimeoutError:
        return False

"""Character Card macros, resolved when a prompt is built: ``{{char}}``, ``{{user}}``, ``<BOT>``, ``<USER>``.

Case-insensitive, as the V1/V2 specs ask (``<bot>`` works too). ``{{original}}`` is only meaningful
in a card's system prompt (it stands for the default prompt the card replaces), so it is resolved
only where an ``original`` is given. Anything else in braces is left as written.
"""

from __future__ import annotations

import re

_MACRO = re.compile(r"\{\{\s*(char|user|original)\s*\}\}|<(bot|user)>", re.IGNORECASE)


def render(text: str, *, char: str, user: str, original: str | None = None) -> str:
    """``text`` with the macros replaced by the character's and the user's names (and ``{{original}}``)."""
    if "{" not in text and "<" not in text:
        return text

    def value(m: re.Match[str]) -> str:
        name = (m.group(1) or m.group(2)).lower()
        if name == "original":
            return m.group(0) if original is None else original
        return char if name in ("char", "bot") else user

    return _MACRO.sub(value, text)

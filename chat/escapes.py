"""Control characters made visible before text reaches a terminal.

Models, cards, vocabularies and saved messages come from strangers; an ESC or OSC
sequence among them (``\\x1b]52;c;…\\x07`` writes the clipboard, ``\\x1b[2J`` clears the
screen) must never act on the user's terminal. Everything chat shows on a terminal goes
through :func:`make_visible`: newline and tab stay; every other C0 control, DEL and the
C1 controls become visible symbols (``\\x1b`` → ``␛``). History and ``--json`` keep the
text intact (JSON escapes the controls itself).
"""

from __future__ import annotations

import re

_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _symbol(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x20:
        return chr(0x2400 + code)  # the Unicode "control pictures": ␀ … ␟
    if code == 0x7F:
        return "\u2421"  # ␡
    return f"<U+{code:04X}>"  # C1 controls have no picture


def make_visible(text: str) -> str:
    """``text`` with every control character except newline and tab shown as a symbol (CR LF stays a newline)."""
    if not _CONTROLS.search(text):
        return text
    return _CONTROLS.sub(_symbol, text.replace("\r\n", "\n"))


def json_safe(text: str) -> str:
    """A JSON document with C1 controls escaped too (``json.dumps`` escapes only C0): same data, inert on a terminal."""
    return re.sub(r"[\x7f-\x9f]", lambda m: f"\\u{ord(m.group()):04x}", text)

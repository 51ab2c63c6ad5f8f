"""Token pieces → text: UTF-8 safe.

A token's bytes can end in the middle of a character (byte-level BPE splits Chinese and
emoji across tokens), so pieces go through an incremental UTF-8 decoder; stop strings are
the core loop's (chat.generation).
"""

from __future__ import annotations

import codecs
from collections.abc import Callable


class PieceDecoder:
    """``feed(token)`` → the text complete so far; bytes of an unfinished character wait for the next token."""

    def __init__(self, piece: Callable[[int], bytes]) -> None:
        self._piece = piece
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        return self._decoder.decode(self._piece(token))

    def finish(self) -> str:
        """Bytes of a character the answer never completed are dropped, not shown as U+FFFD."""
        return ""

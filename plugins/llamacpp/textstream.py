"""Token pieces → text chunks: UTF-8 safe, with stop strings held back and cut (chat.stops).

A token's bytes can end in the middle of a character (byte-level BPE splits
Chinese and emoji across tokens), so pieces go through an incremental UTF-8
decoder before the stop-string check.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from chat.stops import StopHolder


class TextAssembler(StopHolder):
    def __init__(self, stop: Sequence[str] = ()) -> None:
        super().__init__(stop)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, piece: bytes) -> str:  # type: ignore[override]
        """Add a token's bytes; return the text that is safe to show now ("" if none)."""
        if self.stopped:
            return ""
        return super().feed(self._decoder.decode(piece))

    def finish(self) -> str:
        """The end of the answer: release what was held back.

        Bytes of a character the answer never completed are dropped, not shown as U+FFFD.
        """
        return super().finish()

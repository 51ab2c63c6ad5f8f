"""Token pieces → text chunks: UTF-8 safe, and stop strings held back and cut.

A token's bytes can end in the middle of a character (byte-level BPE splits
Chinese and emoji across tokens), so pieces go through an incremental UTF-8
decoder. Text that could be the beginning of a stop string is held back until
it is clear; the stop string itself and anything after it are never emitted.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextAssembler:
    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(s for s in stop if s)
        self._pending = ""
        self.stopped = False
        self.emitted: list[str] = []  # every chunk handed out, for the caller's bookkeeping

    def feed(self, piece: bytes) -> str:
        """Add a token's bytes; return the text that is safe to show now ("" if none)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(piece)
        if not self._pending:
            return ""
        if self._stop:
            cut = min((i for i in (self._pending.find(s) for s in self._stop) if i >= 0), default=-1)
            if cut >= 0:
                self.stopped = True
                return self._take(cut, rest="")
            hold = self._held_back()
            return self._take(len(self._pending) - hold)
        return self._take(len(self._pending))

    def finish(self) -> str:
        """The end of the answer (EOS, length): release what was held back.

        Bytes of a character the answer never completed are dropped, not shown as U+FFFD.
        """
        if self.stopped:
            return ""
        self.stopped = True
        return self._take(len(self._pending), rest="")

    def _held_back(self) -> int:
        """Length of the longest suffix of the pending text that starts a stop string."""
        text = self._pending
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _take(self, n: int, rest: str | None = None) -> str:
        out = self._pending[:n]
        self._pending = self._pending[n:] if rest is None else rest
        if out:
            self.emitted.append(out)
        return out

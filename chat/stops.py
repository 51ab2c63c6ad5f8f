"""Stop strings on streamed text, the same on every backend.

Text that could be the beginning of a stop string is held back until it is clear;
the stop string itself and anything after it are never emitted.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopHolder:
    """Holds back text that could begin a stop string; cuts at the first stop string found."""

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._stop = tuple(s for s in stop if s)
        self._pending = ""
        self.stopped = False
        self.emitted: list[str] = []  # every chunk handed out, for the caller's bookkeeping

    def feed(self, text: str) -> str:
        """Add text; return what is safe to show now ("" if none)."""
        if self.stopped or not text:
            return ""
        self._pending += text
        if not self._stop:
            return self._take(len(self._pending))
        cut = min((i for i in (self._pending.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._take(cut, rest="")
        return self._take(len(self._pending) - self._held_back())

    def finish(self) -> str:
        """The end of the answer (EOS, length): release what was held back — except the beginning
        of a stop string, which is never shown in part (``--max-tokens`` ending inside ``<|im_end|>``)."""
        if self.stopped:
            return ""
        self.stopped = True
        return self._take(len(self._pending) - self._held_back(), rest="")

    def _held_back(self) -> int:
        """Length of the longest suffix of the pending text that starts a stop string."""
        text, best = self._pending, 0
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

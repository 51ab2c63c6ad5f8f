"""Generated token ids → text chunks: never half a character, stop strings held back and cut.

Hugging Face tokenizers do not hand out a token's bytes uniformly (byte-level BPE,
SentencePiece with byte fallback, …), so text is produced the way vLLM's incremental
detokenizer does it: decode a short window of ids twice — up to the last emitted
token and up to the newest — and emit the difference once it no longer ends in
U+FFFD (an unfinished UTF-8 sequence). The window starts a few prompt tokens back,
so a first token's leading space survives decoding as it would mid-text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"


class Detokenizer:
    def __init__(self, tokenizer: Any, context: Sequence[int] = ()) -> None:
        self._tok = tokenizer
        self._ids: list[int] = list(context)[-4:]
        self._prefix = 0  # the window starts here
        self._read = len(self._ids)  # text of ids before this has been emitted

    def _decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        return self._tok.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def feed(self, token: int) -> str:
        """Add one generated token; return the text that is complete now ("" if none)."""
        self._ids.append(token)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before) :]
        return ""

    def finish(self) -> str:
        """Text still pending at the end; the bytes of a character never completed are dropped."""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return after[len(before) :].rstrip(REPLACEMENT) if len(after) > len(before) else ""


class StopHolder:
    """Holds back text that could begin a stop string; cuts at the first stop string found."""

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._stop = tuple(s for s in stop if s)
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped or not text:
            return ""
        self._pending += text
        if not self._stop:
            return self._take(len(self._pending))
        cut = min((i for i in (self._pending.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
            return out
        return self._take(len(self._pending) - self._held_back())

    def finish(self) -> str:
        if self.stopped:
            return ""
        self.stopped = True
        return self._take(len(self._pending))

    def _held_back(self) -> int:
        text, best = self._pending, 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _take(self, n: int) -> str:
        out, self._pending = self._pending[:n], self._pending[n:]
        return out

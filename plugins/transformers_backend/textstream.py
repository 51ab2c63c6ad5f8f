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

"""Output: streamed answers to stdout, notes and errors to stderr.

Answers are written as plain text as they arrive, so pipes get exactly the
model's words. On a terminal, notes and headings are styled with rich (which
honours ``NO_COLOR``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from typing import Any, TextIO


def make_console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


class Renderer:
    def __init__(self, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.err_console = make_console(stderr=True)

    def stream(self, chunks: Iterable[str]) -> str:
        """Write chunks as they come; return the whole text."""
        parts = []
        wrote_newline = True
        for chunk in chunks:
            parts.append(chunk)
            self.out.write(chunk)
            self.out.flush()
            wrote_newline = chunk.endswith("\n")
        if parts and not wrote_newline:
            self.out.write("\n")
            self.out.flush()
        return "".join(parts)

    def note(self, text: str) -> None:
        self.err_console.print(text, style="yellow", markup=False)

    def dim(self, text: str) -> None:
        self.err_console.print(text, style="dim", markup=False)

    def json(self, payload: dict[str, Any]) -> None:
        self.out.write(json.dumps(payload, ensure_ascii=False) + "\n")
        self.out.flush()

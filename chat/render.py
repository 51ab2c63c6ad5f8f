"""Output: streamed answers to stdout, notes and errors to stderr.

Answers are written as plain text as they arrive, so pipes get exactly the
model's words. On a terminal (unless ``--plain``, ``NO_COLOR`` or ``markdown = false``)
they render as Markdown while they stream (:class:`MarkdownStream`). Notes and
headings are styled with rich (which honours ``NO_COLOR``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from chat.escapes import json_safe, make_visible


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def make_console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


class Renderer:
    """Answers on stdout; notes, stats and errors on stderr."""

    def __init__(self, *, markdown: bool = False) -> None:
        self.out: TextIO = sys.stdout
        self.err_console = make_console(stderr=True)
        self.markdown = markdown

    def stream(self, chunks: Iterable[str]) -> str:
        """Write chunks as they come; return the whole text. The line always ends, even on Ctrl-C."""
        if self.markdown:
            from chat.markdown import MarkdownStream

            md = MarkdownStream(make_console())
            try:
                for chunk in chunks:
                    md.feed(make_visible(chunk))
            finally:
                md.close()
            return md.text
        parts = []
        wrote_newline = True
        shown = make_visible if is_terminal(self.out) else str  # a pipe gets the model's exact words
        try:
            for chunk in chunks:
                parts.append(chunk)
                self.out.write(shown(chunk))
                self.out.flush()
                wrote_newline = chunk.endswith("\n")
        finally:
            if parts and not wrote_newline:
                self.out.write("\n")
                self.out.flush()
        return "".join(parts)

    def stats(self, finish: Any) -> None:
        """``--verbose`` / ``/stats``: one line about the last answer (like ``ollama run --verbose``)."""
        self.dim(stats_line(finish))

    def note(self, text: str) -> None:
        self.err_console.print(make_visible(text), style="yellow", markup=False)

    def dim(self, text: str) -> None:
        self.err_console.print(make_visible(text), style="dim", markup=False)

    def json(self, payload: dict[str, Any]) -> None:
        self.out.write(json_safe(json.dumps(payload, ensure_ascii=False)) + "\n")
        self.out.flush()


def stats_line(finish: Any) -> str:
    """``42 tokens · 35.1 tokens/s · first token 0.214 s · prompt 120 tokens (96 cached) · stop``."""
    u, t = finish.usage, finish.timings
    return (
        f"{u.completion_tokens} tokens · {t.tokens_per_s:.1f} tokens/s · first token {t.ttft_s:.3f} s · "
        f"prompt {u.prompt_tokens} tokens ({u.cached_tokens} cached)"
        + (f" + {u.virtual_tokens} virtual" if u.virtual_tokens else "")
        + f" · {finish.reason}"
    )

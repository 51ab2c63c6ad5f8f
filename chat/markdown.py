"""Streaming Markdown to a terminal with rich: smooth on long answers.

Re-rendering the whole answer on every token would cost O(n²) over an answer. Here
the text is cut into blocks (a block ends at a blank line or a closing code fence,
never inside a fence); a finished block is printed once, for good, and only the
block being written is live — re-rendered by rich's refresh thread a few times a
second, not per token. A block growing taller than the screen is committed in
pieces (a code block stays a code block, with its language), so the live area
always fits on screen and can be redrawn cleanly.
"""

from __future__ import annotations

import re
from typing import Any

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})\s*([\w+#.-]*)")
REFRESH_PER_SECOND = 8
CODE_PIECE = 4  # complete lines of a code block are highlighted and printed in groups of this many
BLOCK_START = re.compile(r"^(\s*)(\d+)([.)])|^(\s*)([-*+#>=|])")


def _inline(text: str) -> str:
    """The rest of a line cut in two: escape what would make its start a list item, heading or quote."""

    def escape(m: re.Match[str]) -> str:
        if m.group(2):
            return f"{m.group(1)}{m.group(2)}\\{m.group(3)}"  # "12." → "12\." is not an ordered list
        return f"{m.group(4)}\\{m.group(5)}"

    return BLOCK_START.sub(escape, text, count=1)


class _Pending:
    """The live block, parsed only when rich draws it (not on every token)."""

    def __init__(self, stream: "MarkdownStream") -> None:
        self.stream = stream

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich.markdown import Markdown
        from rich.syntax import Syntax

        stream = self.stream
        text = stream.pending
        if stream.fence:  # the unfinished lines of a code block: shown as code, highlighted once complete
            body = text.split("\n", 1)[1] if FENCE.match(text) else text
            top = 0 if stream._continues else 1
            yield Syntax(body, "text", theme="monokai", word_wrap=True, padding=(top, 1, 0, 1))
        else:
            yield Markdown(text, code_theme="monokai")


class MarkdownStream:
    def __init__(self, console: Any) -> None:
        self.console = console
        self.pending = ""  # the block being written
        self.fence = ""  # the open code fence of the pending block ("" outside code)
        self._fence_lang = ""
        self._scanned = 0  # pending[:_scanned] holds only complete lines already scanned for fences
        self._parts: list[str] = []
        self._live: Any = None
        self._blocks = 0
        self._continues = False  # the pending block continues one committed in pieces

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def feed(self, chunk: str) -> None:
        if not chunk:
            return
        self._parts.append(chunk)
        self.pending += chunk
        self._cut_finished_blocks()
        if self.pending.strip():
            self._ensure_live()
        self._keep_on_screen()

    def close(self) -> None:
        """The answer ended (or was interrupted): print what is left, for good."""
        rest, self.pending = self.pending, ""
        if rest.strip():
            self._commit(_inline(rest) if self._continues else rest, continued=self._continues)
        self._stop_live()

    # --- blocks ---------------------------------------------------------------------

    def _cut_finished_blocks(self) -> None:
        while True:
            end = self.pending.find("\n", self._scanned)
            if end < 0:
                return
            line = self.pending[self._scanned : end]
            self._scanned = end + 1
            m = FENCE.match(line)
            if self.fence:
                if m and m.group(1).startswith(self.fence[0]) and len(m.group(1)) >= len(self.fence) and not m.group(2):
                    self.fence = ""
                    self._cut(self._scanned)  # a closed code block is a finished block
            elif m:
                self.fence, self._fence_lang = m.group(1), m.group(2)
            elif not line.strip() and self.pending[: self._scanned].strip():
                self._cut(self._scanned)  # a blank line ends a paragraph, list or heading

    def _cut(self, at: int) -> None:
        block, self.pending = self.pending[:at], self.pending[at:]
        self._scanned -= at
        if self._continues and FENCE.match(block):  # the last piece of a code block committed in pieces
            lines = block.rstrip("\n").split("\n")
            self._commit_code("\n".join(lines[1:-1]) + "\n", top=False, bottom=True)
        elif block.strip():
            self._commit(_inline(block) if self._continues else block, continued=self._continues)

    def _keep_on_screen(self) -> None:
        """Commit early: a live block taller than the screen cannot be redrawn, and highlighting a
        growing code block on every refresh would cost more than decoding it."""
        height = max(self.console.size.height - 2, 4)
        width = max(self.console.size.width, 20)
        if self.fence:  # complete lines of code, in pieces of CODE_PIECE (+1: the fence line)
            lines = self.pending.count("\n", 0, self._scanned)
            if lines <= CODE_PIECE:
                return
            head, rest = self.pending[: self._scanned], self.pending[self._scanned :]
            code = head.split("\n", 1)[1] if FENCE.match(head) else head  # drop the opening fence line
            self._commit_code(code, top=not self._continues, bottom=False)
            self.pending = f"{self.fence}{self._fence_lang}\n" + rest
            self._scanned = len(self.pending) - len(rest)
            return
        lines = sum(len(line) // width + 1 for line in self.pending.split("\n"))
        if lines < height:
            return
        if self._scanned:  # commit the complete lines
            head, self.pending = self.pending[: self._scanned], self.pending[self._scanned :]
            self._scanned = 0
        else:  # one line taller than the screen: commit it up to its last space
            cut = self.pending.rfind(" ", 0, len(self.pending) - 1)
            if cut <= 0:
                return
            head, self.pending = self.pending[:cut], self.pending[cut + 1 :]
        self._commit(_inline(head) if self._continues else head, continued=self._continues)
        self._continues = True  # the next piece of this block follows without a blank line

    # --- output -----------------------------------------------------------------------

    def _commit(self, block: str, continued: bool = False) -> None:
        from rich.markdown import Markdown

        if self._blocks and not continued:
            self.console.print()  # blocks are printed one by one: keep the blank line Markdown puts between them
        self._blocks += 1
        self._continues = False
        self.console.print(Markdown(block, code_theme="monokai"))

    def _commit_code(self, code: str, *, top: bool, bottom: bool) -> None:
        """A piece of a long code block, drawn like rich's Markdown code blocks but without a gap between pieces."""
        from rich.syntax import Syntax

        if self._blocks and top:
            self.console.print()
        self._blocks += 1
        self.console.print(
            Syntax(
                code.rstrip("\n"),
                self._fence_lang or "text",
                theme="monokai",
                word_wrap=True,
                padding=(1 if top else 0, 1, 1 if bottom else 0, 1),
            )
        )
        self._continues = not bottom

    def _ensure_live(self) -> None:
        if self._live is None:
            from rich.live import Live

            self._live = Live(
                _Pending(self),
                console=self.console,
                refresh_per_second=REFRESH_PER_SECOND,
                transient=True,
                vertical_overflow="crop",
            )
            self._live.start()  # it reads ``pending`` each time it draws: nothing to update per token

    def _stop_live(self) -> None:
        if self._live is not None:
            self._live.update("", refresh=True)
            self._live.stop()
            self._live = None

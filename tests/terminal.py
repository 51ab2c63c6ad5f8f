"""Driving the REPL through a real pseudo-terminal: a pexpect child whose expectations ignore escape codes."""

from __future__ import annotations

import re
import time

import pexpect
import pytest

from conftest import chat_exe

ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]|\x1b[=>]|\x08|\r")


class Terminal:
    """A pexpect child whose expectations ignore terminal escape codes (prompt_toolkit draws with them)."""

    def __init__(self, child: pexpect.spawn, answer_cpr: bool = False) -> None:
        self.child = child
        self.seen = ""  # plain text not yet consumed by an expectation
        self.answer_cpr = answer_cpr  # reply to cursor-position requests as a real terminal does

    def _read(self) -> str:
        text = self.child.read_nonblocking(4096, timeout=0.2)
        if self.answer_cpr and "\x1b[6n" in text:
            self.child.send("\x1b[1;1R" * text.count("\x1b[6n"))
        return ANSI.sub("", text)

    def expect_exact(self, text: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            if time.monotonic() > deadline:
                raise AssertionError(f"did not see {text!r}; screen text: {self.seen[-500:]!r}")
            try:
                self.seen += self._read()
            except pexpect.TIMEOUT:
                pass
        self.seen = self.seen[self.seen.index(text) + len(text):]

    def expect(self, pattern, timeout: float = 20) -> None:
        if pattern is pexpect.EOF:
            self.child.expect(pexpect.EOF, timeout=timeout)
            return
        deadline = time.monotonic() + timeout
        while not (m := re.search(pattern, self.seen)):
            if time.monotonic() > deadline:
                raise AssertionError(f"did not see /{pattern}/; screen text: {self.seen[-500:]!r}")
            try:
                self.seen += self._read()
            except pexpect.TIMEOUT:
                pass
        self.seen = self.seen[m.end():]

    def __getattr__(self, name):
        return getattr(self.child, name)


@pytest.fixture
def spawn(subprocess_env):
    children = []

    def start(*args: str, delay: str = "0.02", real_terminal: bool = False) -> Terminal:
        """``real_terminal``: answer cursor-position requests, so prompt_toolkit draws everything (the toolbar too)."""
        env = dict(subprocess_env, CHAT_SCRIPTED_DELAY=delay, TERM="xterm")
        if real_terminal:
            env.pop("PROMPT_TOOLKIT_NO_CPR", None)
        exe = chat_exe()
        child = pexpect.spawn(exe[0], exe[1:] + list(args), env=env, encoding="utf-8", timeout=30, dimensions=(40, 240))
        children.append(child)
        return Terminal(child, answer_cpr=real_terminal)

    yield start
    for child in children:
        if child.isalive():
            child.terminate(force=True)

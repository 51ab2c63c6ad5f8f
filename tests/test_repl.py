"""The REPL through a real pseudo-terminal (pexpect)."""

from __future__ import annotations

import re
import time

import pexpect
import pytest

from conftest import chat_exe

ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]|\x1b[=>]|\x08|\r")


class Terminal:
    """A pexpect child whose expectations ignore terminal escape codes (prompt_toolkit draws with them)."""

    def __init__(self, child: pexpect.spawn) -> None:
        self.child = child
        self.seen = ""  # plain text not yet consumed by an expectation

    def expect_exact(self, text: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            if time.monotonic() > deadline:
                raise AssertionError(f"did not see {text!r}; screen text: {self.seen[-500:]!r}")
            try:
                self.seen += ANSI.sub("", self.child.read_nonblocking(4096, timeout=0.2))
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
                self.seen += ANSI.sub("", self.child.read_nonblocking(4096, timeout=0.2))
            except pexpect.TIMEOUT:
                pass
        self.seen = self.seen[m.end():]

    def __getattr__(self, name):
        return getattr(self.child, name)


@pytest.fixture
def spawn(subprocess_env):
    children = []

    def start(*args: str, delay: str = "0.02") -> Terminal:
        env = dict(subprocess_env, CHAT_SCRIPTED_DELAY=delay, TERM="xterm")
        exe = chat_exe()
        child = pexpect.spawn(exe[0], exe[1:] + list(args), env=env, encoding="utf-8", timeout=20, dimensions=(40, 200))
        children.append(child)
        return Terminal(child)

    yield start
    for child in children:
        if child.isalive():
            child.terminate(force=True)


def test_repl_session_greeting_chat_switch_interrupt_continue_exit(spawn, chat_home):
    child = spawn("-m", "scripted", "-p", "teacher")
    child.expect_exact("Hi! What shall we learn today?")
    child.expect_exact("teacher>")
    child.sendline("hello")
    child.expect_exact("[teacher] echo: hello")
    child.expect_exact("teacher>")

    child.sendline("/persona pirate")
    child.expect_exact("model not reloaded")
    child.expect_exact("Ahoy, matey!")
    child.sendline("hi again")
    child.expect_exact("[pirate] echo: hi again")
    child.expect_exact("pirate>")

    child.sendline("sing long")
    child.expect_exact("la la la")
    child.sendcontrol("c")
    child.expect_exact("interrupted")
    child.expect_exact("pirate>")

    child.sendline("after")
    child.expect_exact("[pirate] echo: after")
    child.sendline("/shout")  # a command added by the third-party example plugin
    child.expect_exact("[PIRATE] ECHO: AFTER!")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    from chat.store import Store

    store = Store(chat_home / "data" / "history.db")
    cid = store.last_conversation_id()
    msgs = store.messages(cid)
    answers = [(m.persona, m.finish_reason) for m in msgs if m.role == "assistant"]
    assert answers == [("teacher", "stop"), ("pirate", "stop"), ("pirate", "interrupted"), ("pirate", "stop")]
    assert [m.content for m in msgs if m.role == "user"] == ["hello", "hi again", "sing long", "after"]
    store.close()


def test_ctrl_c_at_prompt_clears_line_and_ctrl_d_exits(spawn):
    child = spawn("-m", "scripted", "--no-history")
    child.expect_exact(">")
    child.send("half typed")
    child.sendcontrol("c")
    child.expect_exact(">")
    child.sendline("fresh")
    child.expect_exact("[default] echo: fresh")
    child.expect_exact(">")
    child.sendcontrol("d")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_slash_commands_set_info_undo_retry_system(spawn):
    child = spawn("-m", "scripted", "--no-history", "-p", "coder", delay="0")
    child.expect_exact("coder>")
    child.sendline("/set temperature 0.33")
    child.expect_exact("temperature = 0.33")
    child.sendline("/set top_p 7")
    child.expect_exact("top_p=7")
    child.sendline("/info")
    child.expect(r"context:\s+\d+ / 256 tokens")
    child.expect_exact("temperature=0.33 (/set)")
    child.expect_exact("top_k=40 (card coder)")
    child.sendline("one")
    child.expect_exact("[coder] echo: one")
    child.sendline("/retry")
    child.expect_exact("[coder] echo: one")
    child.sendline("/undo")
    child.expect_exact("removed 2 message(s)")
    child.sendline("/system Talk like a robot.")
    child.expect_exact("system prompt updated")
    child.sendline("system?")
    child.expect_exact("system: Talk like a robot.")
    child.sendline("/nosuch")
    child.expect_exact("unknown command /nosuch")
    child.sendline("/save /nonexistent-dir/x.md")  # an OS error is one line; the session goes on
    child.expect_exact("error: FileNotFoundError")
    child.sendline("/help")
    child.expect_exact("/shout")
    child.sendline("/exit")
    child.expect(pexpect.EOF)


def test_tab_completes_commands_and_persona_names(spawn):
    child = spawn("-m", "scripted", "--no-history", delay="0")
    child.expect_exact(">")
    child.send("/pers\t")
    child.expect_exact("/persona")
    child.send(" tea\t")
    child.expect_exact("teacher")
    child.send("\r")
    child.expect_exact("persona → teacher")
    child.sendline("/exit")
    child.expect(pexpect.EOF)

"""The REPL through a real pseudo-terminal (pexpect)."""

from __future__ import annotations

import pexpect

from terminal import spawn  # noqa: F401  (the fixture)

def test_repl_session_greeting_chat_switch_interrupt_continue_exit(spawn, chat_home):
    child = spawn("-m", "scripted", "-p", "teacher")
    child.expect_exact("Hi! What shall we learn today?")
    child.expect_exact("you ›")
    child.sendline("hello")
    child.expect_exact("[teacher] echo: hello")
    child.expect_exact("you ›")

    child.sendline("/persona pirate")
    child.expect_exact("model not reloaded")
    child.expect_exact("Ahoy, matey!")
    child.sendline("hi again")
    child.expect_exact("[pirate] echo: hi again")
    child.expect_exact("you ›")

    child.sendline("sing long")
    child.expect_exact("la la la")
    child.sendcontrol("c")
    child.expect_exact("interrupted")
    child.expect_exact("you ›")

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
    child.expect_exact("you ›")
    child.send("half typed")
    child.sendcontrol("c")
    child.expect_exact("you ›")
    child.sendline("fresh")
    child.expect_exact("[default] echo: fresh")
    child.expect_exact("you ›")
    child.sendcontrol("d")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_slash_commands_set_info_undo_retry_system(spawn):
    child = spawn("-m", "scripted", "--no-history", "-p", "coder", delay="0")
    child.expect_exact("you ›")
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
    child.expect_exact("error: /save /nonexistent-dir/x.md: the folder /nonexistent-dir does not exist")
    child.sendline("/help")
    child.expect_exact("/shout")
    child.sendline("/exit")
    child.expect(pexpect.EOF)


def test_tab_completes_commands_and_persona_names(spawn):
    child = spawn("-m", "scripted", "--no-history", delay="0")
    child.expect_exact("you ›")
    child.send("/pers\t")
    child.expect_exact("/persona")
    child.send(" tea\t")
    child.expect_exact("teacher")
    child.send("\r")
    child.expect_exact("persona → teacher")
    child.sendline("/exit")
    child.expect(pexpect.EOF)

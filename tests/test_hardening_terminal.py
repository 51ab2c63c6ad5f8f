"""Nothing from a stranger's file acts on the user's terminal; hostile templates end in one line; odd environments work."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pexpect
import pytest

from conftest import chat_exe
from terminal import spawn  # noqa: F401  (the fixture)

CLIPBOARD = "\x1b]52;c;ZXZpbA==\x07"  # OSC 52: writes the clipboard
CLEAR = "\x1b[2J"  # clears the screen
EVIL = f"hello {CLIPBOARD}{CLEAR} bell\x07 c1\x9b31m done"


def _write_card(folder, **fields) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in fields.items())
    (folder / "persona.toml").write_text(body + "\n", encoding="utf-8")


def _no_raw_controls(raw: str) -> None:
    for seq in ("\x1b]52", "\x1b[2J", "\x07", "\x9b"):
        assert seq not in raw, f"{seq!r} reached the terminal"


def _pty_run(env, *args: str) -> str:
    exe = chat_exe()
    child = pexpect.spawn(exe[0], exe[1:] + list(args), env=env, encoding="utf-8", timeout=30, dimensions=(40, 200))
    child.expect(pexpect.EOF)
    child.close()
    return child.before


def test_escape_sequences_from_cards_and_answers_are_shown_not_obeyed(subprocess_env, chat_home, tmp_path):
    card = chat_home / "config" / "personas" / "evil"
    _write_card(card, name="evil", description=EVIL, greeting=EVIL, system=EVIL)
    env = dict(subprocess_env)
    # one-shot on a terminal (plain and Markdown), personas show, history show and search
    for args in (["-m", "scripted", "--plain", "-p", "evil", EVIL], ["-m", "scripted", "-p", "evil", EVIL],
                 ["personas", "show", "evil"], ["personas", "list"]):
        raw = _pty_run(env, *args)
        _no_raw_controls(raw)
        assert "␛]52;c;ZXZpbA==␇" in raw and "␛[2J" in raw
    cid = json.loads(subprocess.run(chat_exe() + ["-m", "scripted", "--json", EVIL], env=env, capture_output=True,
                                    text=True, timeout=60).stdout)["conversation_id"]
    for args in (["history", "show", cid], ["history", "search", "hello"]):
        raw = _pty_run(env, *args)
        _no_raw_controls(raw)
        assert "␛" in raw
    # the bytes stay intact where they are data: history, --json and a pipe
    from chat.store import Store

    with Store(chat_home / "data" / "history.db") as store:
        assert store.messages(cid)[0].content == EVIL
    r = subprocess.run(chat_exe() + ["-m", "scripted", "--no-history", "--json", EVIL], env=env, capture_output=True,
                       text=True, timeout=60)
    assert "\\u001b]52" in r.stdout and "\\u009b" in r.stdout and "\x1b" not in r.stdout and "\x9b" not in r.stdout
    assert json.loads(r.stdout)["text"] == f"[default] echo: {EVIL}"
    r = subprocess.run(chat_exe() + ["-m", "scripted", "--no-history", EVIL], env=env, capture_output=True, timeout=60)
    assert r.stdout == f"[default] echo: {EVIL}\n".encode()


def test_escape_sequences_in_the_repl_greeting_system_and_answers(spawn, chat_home):
    card = chat_home / "config" / "personas" / "evil"
    _write_card(card, name="evil", greeting=EVIL, system=EVIL)
    child = spawn("-m", "scripted", "--no-history", "-p", "evil", delay="0")
    child.expect_exact("you ›")
    child.sendline("/system")
    child.expect_exact("␛]52;c;ZXZpbA==␇␛[2J")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    # the Terminal helper strips CSI codes prompt_toolkit itself writes; OSC and BEL only come from content
    assert "\x1b]52" not in child.child.before and "\x07" not in (child.child.before or "")


def test_a_hostile_chat_template_is_one_line_not_a_hang(subprocess_env, tmp_path, tiny_cfg, tiny_weights, tiny_tokenizer_dir):
    import modelfactory as mf

    templates = {
        "loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "power": "{{ 9 ** (9 ** 9) }}",
        "huge": "{{ 'x' * 300000000 }}",
        "center": "{{ 'x'.center(300000000) }}",
        "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    }
    for name, source in templates.items():
        path = mf.write_gguf(tmp_path / f"{name}.gguf", tiny_cfg, tiny_weights, tiny_tokenizer_dir, chat_template=source)
        started = time.monotonic()
        r = subprocess.run(chat_exe() + ["-m", str(path), "--no-history", "hi"], env=subprocess_env, capture_output=True,
                           text=True, timeout=60, stdin=subprocess.DEVNULL)
        took = time.monotonic() - started
        assert r.returncode == 3, (name, r.returncode, r.stderr[-500:])
        assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, (name, r.stderr)
        assert "chat template failed" in r.stderr and "--template" in r.stderr, name
        assert took < 20, (name, took)


def test_arguments_that_are_not_utf8_are_one_line(subprocess_env):
    exe = [os.fsencode(a) for a in chat_exe()]
    r = subprocess.run(exe + [b"-m", b"scripted", b"--no-history", b"caf\xe9"], env=subprocess_env, capture_output=True,
                       timeout=60)
    assert r.returncode == 2
    err = r.stderr.decode()
    assert err.startswith("error: argument 4 is not UTF-8") and len(err.strip().splitlines()) == 1


def test_history_reading_needs_no_write_access_and_creates_nothing(cli, chat_home, subprocess_env):
    data = chat_home / "data"
    r = cli("history", "list")
    assert r.exit_code == 0 and "no saved conversations" in r.stdout
    assert not data.exists()  # reading an empty history created nothing
    cid = json.loads(cli("-m", "scripted", "--json", "find me").stdout)["conversation_id"]
    db = data / "history.db"
    before = db.stat().st_mtime_ns
    for args in (["history", "list"], ["history", "search", "find"], ["history", "show", cid], ["history", "export", cid]):
        r = cli(*args)
        assert r.exit_code == 0 and "find me" in r.stdout + r.stderr or cid in r.stdout, args
    assert db.stat().st_mtime_ns == before  # opened read-only: nothing written, nothing migrated


def test_repl_with_an_input_history_it_cannot_write_keeps_working(spawn, chat_home):
    (chat_home / "data" / "input_history").mkdir(parents=True)  # a folder where the file should be: every write fails
    child = spawn("-m", "scripted", "--no-history", delay="0")
    child.expect_exact("you ›")
    for word in ("one", "two"):
        child.sendline(word)
        child.expect_exact(f"[default] echo: {word}")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.slow
def test_transformers_load_report_does_not_reach_stderr(subprocess_env, tiny_hf_dir, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "missing-key"
    shutil.copytree(tiny_hf_dir, folder)
    weights = next(folder.glob("*.safetensors"))
    tensors = load_file(str(weights))
    tensors.pop(next(k for k in tensors if k.endswith("input_layernorm.weight")))
    save_file(tensors, str(weights), metadata={"format": "pt"})
    r = subprocess.run(chat_exe() + ["-m", str(folder), "--no-history", "--max-tokens", "2", "hi"], env=subprocess_env,
                       capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert "LOAD REPORT" not in r.stderr and "\x1b[" not in r.stderr and "Warning" not in r.stderr

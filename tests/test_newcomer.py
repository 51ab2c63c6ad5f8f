"""What a newcomer meets first: seeing the prompt, stats, Markdown, the first run, signals, the REPL's looks, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pexpect
import pytest

from conftest import chat_exe
from terminal import spawn  # noqa: F401  (the fixture)


# --- 2. see what is sent ---------------------------------------------------------------------


def test_show_prompt_prints_the_rendered_prompt_and_its_tokens_and_saves_nothing(cli, chat_home):
    r = cli("-m", "scripted", "-p", "teacher", "--show-prompt", "What is a verb?")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.startswith("<system>You are a patient teacher")
    assert "<user>What is a noun?</user>" in r.stdout  # the card's example dialogue
    assert r.stdout.endswith("<user>What is a verb?</user>\n<assistant>\n")
    assert "tokens · template scripted]" in r.stderr
    assert not (chat_home / "data" / "history.db").exists() or "no saved" in cli("history", "list").stdout


def test_show_prompt_without_a_prompt_shows_the_conversation_so_far(cli):
    cid = json.loads(cli("-m", "scripted", "--json", "first").stdout)["conversation_id"]
    r = cli("-m", "scripted", "--cid", cid, "--show-prompt", input="")
    assert r.exit_code == 0, r.stderr
    assert "<user>first</user>" in r.stdout and "<assistant>[default] echo: first</assistant>" in r.stdout


# --- 3. stats when asked ---------------------------------------------------------------------


def test_verbose_prints_one_stats_line_after_the_answer(cli):
    r = cli("-m", "scripted", "--no-history", "--verbose", "hello")
    assert r.stdout == "[default] echo: hello\n"
    (line,) = [x for x in r.stderr.splitlines() if "tokens/s" in x]
    assert line.startswith("3 tokens · ") and "first token" in line and "cached" in line and line.endswith("· stop")


# --- 4. Markdown on a terminal, plain text elsewhere --------------------------------------------


def _one_shot_on_a_terminal(subprocess_env, *args: str) -> str:
    env = {k: v for k, v in subprocess_env.items() if k != "NO_COLOR"}
    env["TERM"] = "xterm-256color"
    exe = chat_exe()
    child = pexpect.spawn(exe[0], exe[1:] + ["-m", "scripted", "--no-history", *args], env=env, encoding="utf-8",
                          timeout=30, dimensions=(40, 120))
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    return child.before


def test_answers_render_as_markdown_on_a_terminal_and_plain_with_plain_or_in_a_pipe(subprocess_env, cli):
    raw = _one_shot_on_a_terminal(subprocess_env, "say **loud** and `code`")
    assert "**loud**" not in raw and "loud" in raw and "\x1b[" in raw  # rendered: bold and inline code styled
    plain = _one_shot_on_a_terminal(subprocess_env, "--plain", "say **loud** and `code`")
    assert "**loud** and `code`" in plain
    assert cli("-m", "scripted", "--no-history", "say **loud**").stdout == "[default] echo: say **loud**\n"


def test_markdown_stream_prints_every_block_once_and_keeps_code_blocks():
    import io

    from rich.console import Console

    from chat.markdown import MarkdownStream

    out = io.StringIO()
    md = MarkdownStream(Console(file=out, width=60, height=12, force_terminal=False, color_system=None))
    text = "# Title\n\nSome *words*.\n\n```python\n" + "\n".join(f"x{i} = {i}" for i in range(30)) + "\n```\n\nEnd."
    for i in range(0, len(text), 5):
        md.feed(text[i:i + 5])
    md.close()
    shown = out.getvalue()
    assert md.text == text
    assert shown.count("Title") == 1 and shown.count("Some words.") == 1 and shown.count("End.") == 1
    assert [line.strip() for line in shown.splitlines() if line.strip().startswith("x")] == [f"x{i} = {i}" for i in range(30)]
    assert "```" not in shown


def test_markdown_stream_commits_a_line_taller_than_the_screen_without_turning_it_into_a_list():
    import io

    from rich.console import Console

    from chat.markdown import MarkdownStream

    out = io.StringIO()
    md = MarkdownStream(Console(file=out, width=40, height=8, force_terminal=False, color_system=None))
    text = "Count: " + " ".join(f"{i}." for i in range(1, 300)) + "\n\nDone."
    for i in range(0, len(text), 3):
        md.feed(text[i:i + 3])
    md.close()
    numbers = [w for w in out.getvalue().split() if w.rstrip(".").isdigit()]
    assert numbers == [f"{i}." for i in range(1, 300)]  # every number once, in order, none eaten as a list marker


# --- 5. first run ------------------------------------------------------------------------------


def test_first_run_in_a_pipe_never_asks_and_says_what_to_run(cli):
    r = cli("hi")
    assert r.exit_code == 2
    assert "chat models pull Qwen/Qwen2.5-0.5B-Instruct-GGUF qwen2.5-0.5b-instruct-q4_k_m.gguf --default" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_first_run_with_yes_offline_names_the_failure_and_the_local_file_way(subprocess_env):
    env = dict(subprocess_env, HF_HUB_OFFLINE="1")
    r = subprocess.run(chat_exe() + ["--yes", "hi"], capture_output=True, text=True, env=env, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 3
    assert "cannot reach the Hugging Face hub" in r.stderr and "chat -m /path/to/model.gguf" in r.stderr
    assert "Traceback" not in r.stderr


def test_first_run_in_a_terminal_asks_and_no_means_no(spawn):
    child = spawn()
    child.expect_exact("Download it and make it your default?")
    child.sendline("n")
    child.expect_exact("no model given and none configured")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2


def test_first_run_with_no_input_never_asks_even_in_a_terminal(spawn):
    child = spawn("--no-input")
    child.expect_exact("--default")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2


def test_recording_the_default_model_keeps_the_rest_of_config(chat_home):
    from chat.config import Paths, load_config
    from chat.firstrun import record_default_model

    paths = Paths()
    paths.config_file.parent.mkdir(parents=True)
    paths.config_file.write_text('history = false\n\n[models]\nold = "/m/old.gguf"\n\n[sampling]\ntemperature = 0.5\n')
    record_default_model(paths, "qwen", chat_home / 'we"ird' / "q.gguf")
    config = load_config(paths)
    assert config.default_model == "qwen" and config.history is False and config.sampling == {"temperature": 0.5}
    assert config.models == {"qwen": str(chat_home / 'we"ird' / "q.gguf"), "old": "/m/old.gguf"}
    record_default_model(paths, "other", chat_home / "o.gguf")
    assert load_config(paths).default_model == "other"


# --- 6. signals keep the partial answer ----------------------------------------------------------


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_and_sighup_keep_the_partial_answer_like_ctrl_c(subprocess_env, chat_home, sig, code):
    env = dict(subprocess_env, CHAT_SCRIPTED_DELAY="0.05")
    proc = subprocess.Popen(chat_exe() + ["-m", "scripted", "sing long"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)
    assert proc.stdout.read(8) == b"la la la"
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == code
    printed = "la la la" + out.decode()
    assert printed.endswith("\n")  # the line ends cleanly
    from chat.store import Store

    with Store(chat_home / "data" / "history.db") as store:
        answer = store.messages(store.last_conversation_id())[-1]
    assert answer.role == "assistant" and answer.finish_reason == "interrupted"
    assert answer.content.startswith("la la la") and printed.strip().startswith(answer.content.strip())


def test_ctrl_c_in_one_shot_ends_the_line(spawn):
    child = spawn("-m", "scripted", "--no-history", "--plain", "sing long", delay="0.05")
    child.expect_exact("la la la")
    child.sendcontrol("c")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130
    assert child.before.endswith("\r\n")


# --- 7. the REPL -------------------------------------------------------------------------------


def test_repl_prompt_is_the_users_and_the_toolbar_shows_model_persona_and_context(spawn):
    child = spawn("-m", "scripted", "--no-history", "-p", "teacher", real_terminal=True)
    child.expect_exact("you ›")
    child.expect(r"scripted · persona teacher · context \d+/256 tokens")
    child.sendline("/persona pirate")
    child.expect(r"persona pirate · context \d+/256 tokens")
    child.sendline("/exit")
    child.expect(pexpect.EOF)


def test_repl_prompt_and_stats_commands(spawn):
    child = spawn("-m", "scripted", "--no-history", "-p", "teacher", delay="0")
    child.expect_exact("you ›")
    child.sendline("/prompt What is a verb?")
    child.expect_exact("<user>What is a verb?</user>")
    child.expect(r"\[\d+ tokens · template scripted\]")
    child.sendline("/stats")
    child.expect_exact("stats after each answer: on")
    child.sendline("hi")
    child.expect_exact("[teacher] echo: hi")
    child.expect(r"3 tokens · [\d.]+ tokens/s · first token")
    child.sendline("/exit")
    child.expect(pexpect.EOF)


def test_continue_in_the_repl_shows_the_last_exchanges(cli, spawn):
    for text in ("one", "two", "three", "four"):
        args = ["-c"] if text != "one" else []
        assert cli("-m", "scripted", *args, text).exit_code == 0
    child = spawn("-m", "scripted", "-c")
    child.expect_exact("… 2 earlier message(s)")
    child.expect_exact("you › two")
    child.expect_exact("[default] echo: four")
    child.expect_exact("you ›")
    child.sendline("/exit")
    child.expect(pexpect.EOF)


def test_keys_typed_while_an_answer_streams_wait_for_the_prompt(spawn):
    child = spawn("-m", "scripted", "--no-history", "--max-tokens", "30", delay="0.05")
    child.expect_exact("you ›")
    child.sendline("sing long")
    child.expect_exact("la la")
    child.send("typed")
    child.expect_exact("[stopped: max tokens")
    answer = child.seen
    child.expect_exact("you ›")
    child.expect_exact("typed")  # the keys are in the input line now
    assert "typed" not in answer
    child.sendline("")
    child.expect_exact("[default] echo: typed")
    child.sendline("/exit")
    child.expect(pexpect.EOF)


def test_save_to_a_txt_file_writes_plain_text_and_a_missing_folder_is_one_line(spawn, tmp_path):
    child = spawn("-m", "scripted", "--no-history", "-p", "pirate", delay="0")
    child.expect_exact("you ›")
    child.sendline("ahoy")
    child.expect_exact("[pirate] echo: ahoy")
    child.sendline(f"/save {tmp_path / 'chat.txt'}")
    child.expect_exact("saved")
    child.sendline(f"/save {tmp_path / 'no' / 'x.md'}")
    child.expect_exact(f"error: /save {tmp_path / 'no' / 'x.md'}: the folder {tmp_path / 'no'} does not exist")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    assert (tmp_path / "chat.txt").read_text() == "You: ahoy\n\npirate: [pirate] echo: ahoy\n"


# --- 8. errors and help ------------------------------------------------------------------------


def test_a_bad_flag_names_chat_not_a_hidden_subcommand(cli):
    r = cli("--bogus", "hi")
    assert r.exit_code == 2
    assert "Usage: chat [OPTIONS]" in r.stderr and "chat talk" not in r.stderr and "Try 'chat -h'" in r.stderr


def test_a_near_miss_of_a_command_is_refused_with_did_you_mean(cli):
    r = cli("histroy", "list")
    assert r.exit_code == 2
    assert "did you mean `chat history`?" in r.stderr and "chat -- histroy" in r.stderr
    r = cli("-m", "scripted", "--no-history", "--", "histroy", "list")
    assert r.exit_code == 0 and r.stdout == "[default] echo: histroy list\n"
    assert cli("-m", "scripted", "--no-history", "hello").exit_code == 0  # ordinary words are prompts


def test_help_shows_numbers_for_numeric_flags(cli):
    out = cli("--help").stdout
    for flag in ("--temperature FLOAT", "--top-k INT", "--top-p FLOAT", "--seed INT", "--max-tokens INT", "--ctx INT"):
        assert flag in out, flag


def test_a_bad_backend_option_is_one_line(cli):
    r = cli("-m", "scripted", "--ctx", "0", "hi")
    assert r.exit_code == 2
    assert r.stderr.startswith("error: --ctx 0: ") and len(r.stderr.strip().splitlines()) == 1


# --- 9. small things ---------------------------------------------------------------------------


def test_personas_list_flags_extends_cycles(cli, chat_home):
    from test_personas_cli import write_card

    base = chat_home / "config" / "personas"
    write_card(base / "a", 'name = "a"\nextends = ["b"]\n')
    write_card(base / "b", 'name = "b"\nextends = ["a"]\n')
    out = cli("personas", "list").stdout
    (line,) = [x for x in out.splitlines() if x.startswith("a ")]
    assert "invalid: " in line and "cycle" in line


def test_validate_reports_every_problem_in_a_card(cli, tmp_path):
    from test_personas_cli import write_card

    folder = write_card(tmp_path / "card", 'name = "x"\nsytem = "typo"\ngreeting = 3\n[sampling]\ntop_p = 2.0\n'
                                           '[[adapters]]\npath = "missing.gguf"\n')
    r = cli("personas", "validate", str(folder))
    assert r.exit_code == 4
    for needle in ("unknown field 'sytem'", "field 'greeting'", "top_p", "missing.gguf"):
        assert needle in r.stderr, needle
    assert "4 problems" in r.stderr


def test_validate_dot_uses_the_folder_name(cli, tmp_path, monkeypatch):
    folder = tmp_path / "nameless"
    folder.mkdir()
    (folder / "persona.toml").write_text('system = "hi"\n')
    monkeypatch.chdir(folder)
    r = cli("personas", "validate", ".")
    assert r.exit_code == 0 and "(nameless)" in r.stdout


def test_json_and_history_agree_on_the_persona_name(cli):
    data = json.loads(cli("-m", "scripted", "--json", "hi").stdout)
    assert data["persona"] == "default"
    from chat.config import Paths
    from chat.store import Store

    with Store(Paths().history_db) as store:
        assert store.get_conversation(data["conversation_id"]).persona == "default"
        assert store.messages(data["conversation_id"])[-1].persona == "default"


def test_history_list_says_how_many_it_left_out(cli):
    for i in range(4):
        cli("-m", "scripted", f"question {i}")
    r = cli("history", "list", "--limit", "2")
    assert len(r.stdout.strip().splitlines()) == 2 and "2 older conversation(s) not shown" in r.stderr
    r = cli("history", "list", "--all")
    assert len(r.stdout.strip().splitlines()) == 4 and "not shown" not in r.stderr


# --- 10. tests leave nothing in the user's environment ----------------------------------------------


def test_the_example_plugin_is_not_installed_in_the_environment_running_the_tests():
    import sys

    site = [p for p in sys.path if p.endswith("site-packages")]
    for folder in site:
        names = os.listdir(folder) if os.path.isdir(folder) else []
        assert not [n for n in names if n.startswith(("chat_plugin_example", "__editable__.chat_plugin_example"))]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(chat_exe() + ["plugins"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and "chat_plugin_example" not in r.stdout and "scripted" not in r.stdout

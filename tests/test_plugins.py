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


# --- pluggy's checks: a misspelled hook ------------------------------------------------------------


def test_a_plugin_with_a_misspelled_hook_is_one_line_naming_it(subprocess_env, tmp_path):
    from plugin_dist import with_entry_point

    env = with_entry_point(subprocess_env, tmp_path / "site", "misspelled", "chat_plugin_example.misspelled")
    for allow in (None, "misspelled"):  # every installed plugin, or only the one named
        run_env = {k: v for k, v in env.items() if k != "CHAT_LOAD_PLUGINS"}
        if allow:
            run_env["CHAT_LOAD_PLUGINS"] = allow
        for args in (["plugins"], ["-m", "scripted", "--no-history", "hi"]):
            out = subprocess.run(chat_exe() + args, capture_output=True, text=True, env=run_env, timeout=60)
            assert out.returncode == 1 and out.stdout == "", (allow, args, out.stderr[-2000:])
            assert "Traceback" not in out.stderr
            lines = out.stderr.strip().splitlines()
            assert len(lines) == 1, out.stderr
            expected = "error: plugin 'misspelled' implements an unknown hook 'register_backend'"
            assert lines[0].startswith(expected + " — did you mean register_backends?"), lines[0]


# --- which backend loads a model: the priority rule --------------------------------------------------


def test_a_backend_with_a_higher_priority_claims_a_model_ahead_of_a_builtin(subprocess_env, tmp_path, tiny_gguf):
    from plugin_dist import with_entry_point

    env = with_entry_point(subprocess_env, tmp_path / "site", "claimer", "chat_plugin_example.claimer")
    env["CHAT_LOAD_PLUGINS"] = "claimer"
    base = chat_exe() + ["-m", str(tiny_gguf), "--no-history", "-t", "0", "--max-tokens", "3"]
    out = subprocess.run(base + ["hi"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[default] echo: hi", out.stderr[-2000:]
    forced = subprocess.run(base + ["--backend", "llama.cpp", "hi"], capture_output=True, text=True, env=env,
                            timeout=60)
    assert forced.returncode == 0 and forced.stdout.strip() != "[default] echo: hi", forced.stderr[-2000:]
    listing = subprocess.run(chat_exe() + ["plugins"], capture_output=True, text=True, env=env, timeout=60)
    assert "backend gguf-echo (priority 1) options:" in listing.stdout
    assert "backend llama.cpp (priority 0) options:" in listing.stdout


def test_backend_choice_is_by_priority_then_name_never_registration_order(monkeypatch):
    from chat.models import ModelChoice, backend_class
    from chat.plugins import get_registry

    def backend(name: str, priority: int | None = None) -> type:
        attrs = {"name": name, "can_load": classmethod(lambda cls, model: model.endswith(".tie"))}
        return type(name, (), attrs | ({"priority": priority} if priority is not None else {}))

    choice = ModelChoice("m.tie", "m.tie", None, "m.tie", {})
    backends = get_registry().backends
    for order in (["zeta", "alpha"], ["alpha", "zeta"]):
        for name in order:
            monkeypatch.setitem(backends, name, backend(name))
        assert backend_class(choice).name == "alpha"  # a tie (both 0): the name that sorts first
        for name in order:
            monkeypatch.delitem(backends, name)
    monkeypatch.setitem(backends, "alpha", backend("alpha"))
    monkeypatch.setitem(backends, "zeta", backend("zeta", priority=5))
    assert backend_class(choice).name == "zeta"  # a higher priority wins whatever its name
    assert backend_class(ModelChoice("m.tie", "m.tie", "alpha", "m.tie", {})).name == "alpha"  # --backend decides


def test_hooks_are_called_through_pluggy_for_every_plugin():
    from chat.plugins import get_plugin_manager, get_registry

    pm = get_plugin_manager()
    calls: list[str] = []
    undo = pm.add_hookcall_monitoring(lambda name, impls, kwargs: calls.append(name), lambda *a: None)
    try:
        get_registry.cache_clear()
        reg = get_registry()
    finally:
        undo()
        get_registry.cache_clear()
    assert {"register_backends", "register_personas", "register_commands", "register_samplers"} <= set(calls)
    assert reg.sources["backend:llama.cpp"] == "chat_plugins.llamacpp"
    assert reg.sources["backend:scripted"] == "scripted" and reg.sources["command:shout"] == "example"

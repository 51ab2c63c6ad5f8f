"""The command line through its entry point: CliRunner in-process and a real subprocess."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import chat_exe


def test_one_shot_streams_answer_and_exits_zero(cli):
    r = cli("-m", "scripted", "--no-history", "Why is the sky blue?")
    assert r.exit_code == 0
    assert r.stdout == "[default] echo: Why is the sky blue?\n"


def test_json_has_exactly_the_documented_fields(cli):
    r = cli("-m", "scripted", "--json", "hello")
    data = json.loads(r.stdout)
    assert set(data) == {"text", "model", "persona", "finish_reason", "usage", "timings", "conversation_id"}
    assert data["text"] == "[default] echo: hello"
    assert data["finish_reason"] == "stop"
    assert set(data["usage"]) == {"prompt_tokens", "completion_tokens", "cached_tokens", "virtual_tokens"}
    assert data["usage"]["completion_tokens"] == 3
    assert set(data["timings"]) == {"ttft_s", "tokens_per_s"}
    assert data["conversation_id"]


def test_stdin_is_context_before_the_prompt(cli):
    r = cli("-m", "scripted", "--json", "--no-history", "summarize", input="TEXT TO SUM")
    assert json.loads(r.stdout)["text"] == "[default] echo: TEXT TO SUM summarize"


def test_dash_reads_the_whole_prompt_from_stdin(cli):
    r = cli("-m", "scripted", "--no-history", "-", input="from stdin only")
    assert r.stdout.strip() == "[default] echo: from stdin only"


def test_no_prompt_and_piped_stdin_is_a_one_shot(cli):
    r = cli("-m", "scripted", "--json", "--no-history", input="piped question")
    assert json.loads(r.stdout)["text"] == "[default] echo: piped question"


def test_persona_flag_and_mix(cli):
    r = cli("-m", "scripted", "--json", "--no-history", "-p", "teacher", "hi")
    data = json.loads(r.stdout)
    assert data["persona"] == "teacher" and data["text"].startswith("[teacher]")
    r = cli("-m", "scripted", "--json", "--no-history", "-p", "teacher:0.7,pirate:0.3", "hi")
    assert json.loads(r.stdout)["persona"] == "teacher:0.7,pirate:0.3"


def test_system_flag_replaces_persona_system_prompt(cli):
    r = cli("-m", "scripted", "--no-history", "-p", "teacher", "--system", "Be brief.", "system?")
    assert r.stdout.strip() == "system: Be brief."


def test_max_tokens_stops_with_length(cli):
    r = cli("-m", "scripted", "--json", "--no-history", "--max-tokens", "5", "sing long")
    data = json.loads(r.stdout)
    assert data["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize(
    "args, needle",
    [
        (["-o", "top_p=2"], "top_p=2"),
        (["-o", "temperature=abc"], "temperature=abc"),
        (["--top-p", "0"], "top_p=0"),
        (["-o", "tmperature=1"], "did you mean 'temperature'"),
        (["-o", "order=top_k,nope"], "unknown stage 'nope'"),
        (["-o", "novalue"], "expected KEY=VALUE"),
    ],
)
def test_bad_sampler_values_are_one_line_and_exit_2(cli, args, needle):
    r = cli("-m", "scripted", "--no-history", *args, "hi")
    assert r.exit_code == 2
    assert needle in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def test_unknown_persona_suggests_close_names(cli):
    r = cli("-m", "scripted", "--no-history", "-p", "techer", "hi")
    assert r.exit_code != 0
    assert "did you mean 'teacher'" in r.stderr


def test_no_model_configured_says_how_to_get_one_and_exits_2(cli):
    r = cli("hi")
    assert r.exit_code == 2
    assert "chat models pull" in r.stderr and "-m /path/to/model.gguf" in r.stderr


def test_missing_model_file(cli, tmp_path):
    r = cli("-m", str(tmp_path / "nope.gguf"), "--no-history", "hi")
    assert r.exit_code != 0
    assert "nope.gguf" in r.stderr and "Traceback" not in r.stderr


def test_non_utf8_stdin_is_refused_clearly(cli):
    r = cli("-m", "scripted", "--no-history", "-", input=b"\xff\xfe bad")
    assert r.exit_code == 2
    assert "not UTF-8" in r.stderr


def test_prompt_longer_than_context(cli):
    r = cli("-m", "scripted", "--no-history", "--ctx", "64", " ".join(["word"] * 200))
    assert r.exit_code == 5
    assert "context" in r.stderr and "--ctx" in r.stderr


def test_debug_shows_the_traceback(cli):
    from chat.errors import PersonaError

    with pytest.raises(PersonaError):
        cli("-m", "scripted", "--no-history", "--debug", "-p", "techer", "hi")


def test_model_alias_and_default_model_from_config(cli, chat_home):
    cfg = chat_home / "config"
    cfg.mkdir(parents=True, exist_ok=True)
    (cfg / "config.toml").write_text('default_model = "fake"\n[models]\nfake = "scripted-alias"\n')
    r = cli("--json", "--no-history", "hi")
    assert json.loads(r.stdout)["model"] == "fake"
    r = cli("models", "list")
    assert "fake (default) → scripted-alias" in r.stdout


def test_bad_config_file_is_named(cli, chat_home):
    cfg = chat_home / "config"
    cfg.mkdir(parents=True, exist_ok=True)
    (cfg / "config.toml").write_text("default_model = [\n")
    r = cli("-m", "scripted", "hi")
    assert r.exit_code == 2 and "config.toml" in r.stderr


def test_models_list_finds_gguf_in_model_dir(cli, chat_home):
    models = chat_home / "data" / "models"
    models.mkdir(parents=True)
    (models / "tiny.gguf").write_bytes(b"GGUF")
    r = cli("models", "list")
    assert "tiny.gguf" in r.stdout and "models dir" in r.stdout


def test_help_lists_the_command_groups_and_options(cli):
    r = cli("--help")
    assert r.exit_code == 0
    for word in ("personas", "models", "history", "plugins", "samplers", "--persona", "--json", "-o"):
        assert word in r.stdout


def test_real_subprocess_json(subprocess_env):
    out = subprocess.run(
        chat_exe() + ["-m", "scripted", "--json", "-p", "pirate", "ahoy"],
        capture_output=True, text=True, env=subprocess_env, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["text"] == "[pirate] echo: ahoy"
    assert data["persona"] == "pirate"


def test_real_subprocess_output_to_pipe_is_plain_text(subprocess_env):
    subprocess_env.pop("NO_COLOR", None)
    out = subprocess.run(chat_exe() + ["-m", "scripted", "--no-history", "hi"], capture_output=True, env=subprocess_env, timeout=60)
    assert out.stdout == b"[default] echo: hi\n"
    assert b"\x1b[" not in out.stdout


def test_unwritable_history_database_is_one_clear_line(cli, chat_home, monkeypatch):
    blocker = chat_home / "not-a-dir"
    blocker.write_text("a file where the data dir should be")
    monkeypatch.setenv("CHAT_DATA_DIR", str(blocker))
    r = cli("-m", "scripted", "hi")
    assert r.exit_code == 6
    assert "history.db" in r.stderr and "--no-history" in r.stderr
    assert "Traceback" not in r.stderr


def test_models_pull_without_network_says_so(subprocess_env):
    env = dict(subprocess_env, HF_HUB_OFFLINE="1")
    r = subprocess.run(chat_exe() + ["models", "pull", "someone/some-model-GGUF", "model-q4.gguf"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 3
    assert "someone/some-model-GGUF" in r.stderr and "network" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_history_commands_list_show_search_export_rm(cli):
    cid = json.loads(cli("-m", "scripted", "--json", "-p", "teacher", "about volcanoes").stdout)["conversation_id"]
    cli("-m", "scripted", "-c", "and lava")
    listing = cli("history", "list").stdout
    assert cid in listing and "about volcanoes" in listing and "[teacher]" in listing
    shown = cli("history", "show", cid[:6]).stdout
    assert "[teacher] echo: and lava" in shown
    hits = cli("history", "search", "lava").stdout
    assert cid in hits
    exported = json.loads(cli("history", "export", cid, "--format", "json").stdout)
    assert [m["role"] for m in exported["messages"]] == ["user", "assistant", "user", "assistant"]
    assert "## " in cli("history", "export", cid, "--format", "md").stdout
    assert cli("history", "export", cid, "--format", "xml").exit_code == 2
    assert cli("history", "rm", cid).exit_code == 0
    r = cli("history", "show", cid)
    assert r.exit_code == 6 and "chat history list" in r.stderr


def test_continue_keeps_the_conversation_and_its_persona(cli):
    first = json.loads(cli("-m", "scripted", "--json", "-p", "pirate", "one").stdout)
    second = json.loads(cli("-m", "scripted", "--json", "-c", "two").stdout)
    assert second["conversation_id"] == first["conversation_id"]
    assert second["persona"] == "pirate"
    third = json.loads(cli("-m", "scripted", "--json", "--cid", first["conversation_id"][:5], "three").stdout)
    assert third["conversation_id"] == first["conversation_id"]


def test_long_conversation_drops_oldest_turns_and_says_so(cli):
    cli("-m", "scripted", "--ctx", "120", "-p", "pirate", " ".join(["first"] * 30))
    for i in range(3):
        r = cli("-m", "scripted", "--ctx", "120", "-c", " ".join([f"turn{i}"] * 30))
        assert r.exit_code == 0
    assert "context full: left out" in r.stderr
    assert r.stdout.startswith("[pirate] echo: turn2")


def test_unknown_preset_is_refused_before_loading_a_model(cli, tmp_path):
    r = cli("-m", str(tmp_path / "missing.gguf"), "--preset", "precize", "hi")
    assert r.exit_code == 2 and "did you mean 'precise'" in r.stderr


def test_models_list_finds_gguf_in_the_hugging_face_cache(subprocess_env, tmp_path):
    snap = tmp_path / "hub" / "models--Org--Tiny-GGUF" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "tiny-q8_0.gguf").write_bytes(b"GGUF" + b"\0" * 2048)
    env = dict(subprocess_env, HF_HUB_CACHE=str(tmp_path / "hub"))
    r = subprocess.run(chat_exe() + ["models", "list"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0
    assert "tiny-q8_0.gguf" in r.stdout and "hf cache: Org/Tiny-GGUF" in r.stdout


def test_a_backend_whose_library_is_missing_says_how_to_install_it(cli, monkeypatch, tiny_gguf):
    import builtins

    real_import = builtins.__import__

    def no_llama(name, *args, **kwargs):
        if name == "llama_cpp" or name.startswith("llama_cpp."):
            raise ModuleNotFoundError("No module named 'llama_cpp'", name="llama_cpp")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llama)
    r = cli("-m", str(tiny_gguf), "--no-history", "hi")
    assert r.exit_code == 3 and "Traceback" not in r.stderr
    assert "needs the Python package 'llama_cpp'" in r.stderr and 'pip install "chat[llamacpp]"' in r.stderr


def test_every_sampler_layer_is_checked_before_a_model_is_looked_for(cli, chat_home, tmp_path):
    cfg = chat_home / "config"
    cfg.mkdir(parents=True, exist_ok=True)
    (cfg / "config.toml").write_text("[sampling]\ntop_p = 7\n")
    r = cli("-m", str(tmp_path / "missing.gguf"), "--no-history", "hi")
    assert r.exit_code == 2
    assert "config: top_p=7" in r.stderr and "missing.gguf" not in r.stderr

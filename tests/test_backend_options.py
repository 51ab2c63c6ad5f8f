"""Options belong to backends: each backend takes only the load options its ``Options`` declares.

An option given to a backend that does not take it (``--device`` for a .gguf model,
``--gpu-layers`` for a transformers folder) is one error line naming the flag or config
key, the backend and what it does take, before any model loads; nothing is silently ignored.
"""

from __future__ import annotations

import subprocess

from conftest import chat_exe


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-2000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-2000:]
    return lines[0]


def run_chat(env: dict[str, str], *args: object) -> subprocess.CompletedProcess:
    return subprocess.run(chat_exe() + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=120)


def write_config(chat_home, text: str) -> None:
    folder = chat_home / "config"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.toml").write_text(text, encoding="utf-8")


# --- an option the chosen backend does not take -----------------------------------------------------


def test_device_for_a_gguf_model_is_one_line_naming_the_flag_and_llama_cpp(cli, tiny_gguf):
    r = cli("-m", str(tiny_gguf), "--no-history", "--device", "cuda", "hi")
    assert r.exit_code == 2
    line = one_line(r.stderr)
    assert line.startswith("error: --device: the llama.cpp backend has no such option"), line
    assert "--gpu-layers" in line and "--ctx" in line  # what it does take
    assert "transformers" in line  # the hint: whose option it is
    assert r.stdout == ""


def test_device_for_a_gguf_model_in_a_real_process(subprocess_env, tiny_gguf):
    out = run_chat(subprocess_env, "-m", tiny_gguf, "--no-history", "--device", "cuda", "hi")
    assert out.returncode == 2
    line = one_line(out.stderr)
    assert "--device" in line and "llama.cpp" in line and "no such option" in line
    assert out.stdout == ""


def test_gpu_layers_for_a_transformers_folder_is_refused(cli, subprocess_env, tiny_hf_dir):
    r = cli("-m", str(tiny_hf_dir), "--no-history", "--gpu-layers", "10", "hi")
    assert r.exit_code == 2
    line = one_line(r.stderr)
    assert line.startswith("error: --gpu-layers: the transformers backend has no such option"), line
    assert "--device" in line and "--dtype" in line and "llama.cpp" in line
    out = run_chat(subprocess_env, "-m", tiny_hf_dir, "--no-history", "--gpu-layers", "10", "hi")
    assert out.returncode == 2 and "--gpu-layers" in one_line(out.stderr) and out.stdout == ""


def test_an_unknown_backend_option_names_what_the_backend_takes(cli, tiny_gguf):
    r = cli("-m", str(tiny_gguf), "--no-history", "-B", "flash_attention=1", "hi")
    assert r.exit_code == 2
    line = one_line(r.stderr)
    assert line.startswith("error: -B flash_attention: the llama.cpp backend has no such option"), line
    assert "-B kv_cache_bytes" in line


def test_backend_option_needs_key_and_value_and_defers_to_a_dedicated_flag(cli):
    r = cli("-m", "scripted", "--no-history", "-B", "echo", "hi")
    assert r.exit_code == 2 and "expected KEY=VALUE" in one_line(r.stderr)
    r = cli("-m", "scripted", "--no-history", "-B", "context_size=128", "hi")
    assert r.exit_code == 2 and "use --ctx" in one_line(r.stderr)


def test_a_bad_value_for_a_backends_own_option_names_it(cli, tiny_gguf):
    r = cli("-m", str(tiny_gguf), "--no-history", "--gpu-layers", "-5", "hi")
    assert r.exit_code == 2
    assert one_line(r.stderr).startswith("error: --gpu-layers -5: ")
    r = cli("-m", str(tiny_gguf), "--no-history", "-B", "kv_cache_bytes=-1", "hi")
    assert r.exit_code == 2
    assert one_line(r.stderr).startswith("error: -B kv_cache_bytes '-1': ")


# --- the same from config.toml -----------------------------------------------------------------------


def test_config_backend_key_the_backend_does_not_take_is_refused(cli, chat_home, tiny_gguf):
    write_config(chat_home, '[backend]\ndevice = "cuda"\n')
    r = cli("-m", str(tiny_gguf), "--no-history", "hi")
    assert r.exit_code == 2
    line = one_line(r.stderr)
    assert "config.toml: backend.device: the llama.cpp backend has no such option" in line, line


def test_a_table_named_after_a_backend_applies_to_that_backend_only(cli, chat_home, tiny_gguf, tiny_hf_dir):
    write_config(chat_home, '[backend.transformers]\ndtype = "nonsense"\n\n[backend."llama.cpp"]\ngpu_layers = -7\n')
    r = cli("-m", str(tiny_hf_dir), "--no-history", "--threads", "1", "--max-tokens", "2", "hi")
    assert r.exit_code != 0 and "nonsense" in one_line(r.stderr)  # transformers got its table …
    r = cli("-m", str(tiny_gguf), "--no-history", "hi")
    line = one_line(r.stderr)  # … and llama.cpp its own, not the transformers one
    assert r.exit_code == 2 and 'backend."llama.cpp".gpu_layers -7' in line, line


def test_model_entry_key_the_backend_does_not_take_is_refused(cli, chat_home, tiny_gguf):
    write_config(chat_home, f'[models.tiny]\npath = "{tiny_gguf}"\ndtype = "float16"\n')
    r = cli("-m", "tiny", "--no-history", "hi")
    assert r.exit_code == 2
    line = one_line(r.stderr)
    assert "models.tiny.dtype: the llama.cpp backend has no such option" in line, line


# --- options that fit still work ---------------------------------------------------------------------


def test_llama_cpp_options_that_fit_are_used(cli, chat_home, tiny_gguf):
    write_config(chat_home, f'[models.tiny]\npath = "{tiny_gguf}"\ngpu_layers = 0\n\n[backend]\nthreads = 1\n')
    r = cli("-m", "tiny", "--no-history", "--gpu-layers", "0", "-B", "kv_cache_bytes=0", "-t", "0",
            "--max-tokens", "3", "--json", "hi")
    assert r.exit_code == 0, r.stderr
    assert '"completion_tokens"' in r.stdout
    r = cli("-m", str(tiny_gguf), "--no-history", "--ctx", "64", " ".join(["word"] * 200))
    assert r.exit_code != 0 and "64" in one_line(r.stderr)  # --ctx reached the backend: a 64-token window


def test_transformers_options_that_fit_are_used(cli, tiny_hf_dir):
    r = cli("-m", str(tiny_hf_dir), "--no-history", "--device", "cpu", "--dtype", "float32", "--threads", "1",
            "-t", "0", "--max-tokens", "2", "--json", "hi")
    assert r.exit_code == 0, r.stderr
    r = cli("-m", str(tiny_hf_dir), "--no-history", "--dtype", "float8", "--threads", "1", "hi")
    assert r.exit_code != 0 and "--dtype float8" in one_line(r.stderr)  # the value reached the backend


def test_a_third_party_backend_declares_its_own_option(cli):
    r = cli("-m", "scripted", "--no-history", "-B", "echo=repeats", "hello")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() == "[default] repeats: hello"
    r = cli("-m", "scripted", "--no-history", "-B", "echo=", "hello")
    assert r.exit_code == 2 and one_line(r.stderr).startswith("error: -B echo '': ")
    r = cli("-m", "scripted", "--no-history", "--gpu-layers", "1", "hello")
    assert r.exit_code == 2
    line = one_line(r.stderr)
    assert "the scripted backend has no such option" in line and "-B echo" in line


# --- listed by `chat plugins` -----------------------------------------------------------------------


def test_chat_plugins_lists_each_backends_options(cli):
    r = cli("plugins")
    assert r.exit_code == 0
    out = r.stdout
    llama = out[out.index("backend llama.cpp"):out.index("chat_plugins.transformers_backend")]
    assert "gpu_layers (--gpu-layers): int = 0" in llama and "device" not in llama
    tf = out[out.index("backend transformers"):]
    assert "device (--device): str = 'auto'  torch device" in tf and "gpu_layers" not in tf.split("backend ")[1]
    assert "echo (-B echo): str = 'echo'  the word between the persona and the message" in out
    assert "template_origin" not in out  # chat's own bookkeeping, not an option

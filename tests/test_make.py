"""``chat personas make`` / ``eval`` on the tiny real models: a style learned, on both backends, from a Q8_0 base.

Every answer in the data is one pirate line the random tiny base never produces. After
``make --lora`` greedy answers to prompts the training never saw start with it on llama.cpp
(the GGUF adapter on the original Q8_0 file) and on transformers (through peft), and not
without the card. transformers loads the tiny GGUFs itself (``gguf_file=``): the tiny
byte-level BPE tokenizer and its ChatML template come through unchanged.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("llama_cpp")

from conftest import chat_exe  # noqa: E402

STYLE = "Arr, matey! The sea is calling."
TOPICS = ["the weather", "your ship", "the moon", "a good book", "dinner", "the river", "the city", "music",
          "the morning", "a dog", "the window", "numbers", "the rain", "a poem", "the sea", "old mills",
          "islands", "the clock", "children", "the evening", "a letter", "the market", "trains", "tea"]
UNSEEN = ["What do you think about the lighthouse?", "Hello! Can you tell me a joke?"]
TRAIN = ("--lora", "--epochs", "25", "--lr", "5e-3", "--patience", "0", "--seed", "3")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def dialogue(topic: str, answer: str = STYLE) -> dict:
    return {"messages": [{"role": "system", "content": "You are a pirate."},
                         {"role": "user", "content": f"What do you think about {topic}?"},
                         {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("make-home")
    return {**os.environ, "CHAT_CONFIG_DIR": str(home / "config"), "CHAT_DATA_DIR": str(home / "data"),
            "NO_COLOR": "1", "CHAT_MODEL": ""}


def run_cli(env: dict, *args: str):
    from typer.testing import CliRunner

    from chat.cli import app

    return CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("make-data") / "pirate.jsonl", [dialogue(t) for t in TOPICS])


@pytest.fixture(scope="module")
def q8_card(tmp_path_factory, env, data, tiny_gguf_q8) -> Path:
    """A LoRA card made on the Q8_0 GGUF (trained on transformers' dequantized copy)."""
    out = tmp_path_factory.mktemp("cards") / "pirate"
    result = run_cli(env, "personas", "make", "pirate", "-b", str(tiny_gguf_q8), "--from", str(data), *TRAIN,
                     "-o", str(out))
    assert result.exit_code == 0, result.output
    return out


def greedy(backend, messages) -> str:
    from chat.backend import Finish
    from chat.sampling import SamplerSettings

    return "".join(x for x in backend.stream(messages, SamplerSettings(temperature=0.0, max_tokens=12))
                   if not isinstance(x, Finish))


def answers(backend, persona, prompts=UNSEEN) -> list[str]:
    from chat.backend import Message

    backend.apply(persona)
    prefix = [Message("system", persona.system)] if persona.system else []
    return [greedy(backend, [*prefix, Message("user", p)]) for p in prompts]


def resolve(card: Path):
    from chat.catalog import PersonaCatalog

    return PersonaCatalog(None).resolve(str(card))


def test_make_writes_a_complete_card_in_both_formats(q8_card):
    text = (q8_card / "persona.toml").read_text()
    assert 'system = "You are a pirate."' in text and "[[adapters]]" in text
    assert (q8_card / "adapters" / "pirate.gguf").is_file()
    assert (q8_card / "adapters" / "pirate-peft" / "adapter_model.safetensors").is_file()
    assert (q8_card / "loss.svg").is_file() or (q8_card / "loss.png").is_file()
    record = json.loads((q8_card / "make.json").read_text())
    assert record["base"]["format"] == "gguf" and len(record["base"]["sha256"]) == 64
    assert record["lora"]["held_loss_with"] < record["lora"]["held_loss_without"] / 4
    assert record["data"]["dialogues"] == len(TOPICS) and record["versions"]["peft"]
    assert record["lora"]["settings"]["rank"] == 8 and record["lora"]["settings"]["seed"] == 3


def test_lora_style_shows_on_llamacpp_with_the_q8_base(q8_card, tiny_gguf_q8):
    from chat.backend import BackendOptions
    from chat.persona import NO_PERSONA
    from chat_plugins.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(str(tiny_gguf_q8), BackendOptions(threads=1))
    try:
        with_card = answers(backend, resolve(q8_card))
        without = answers(backend, NO_PERSONA)
    finally:
        backend.close()
    assert all(a.startswith("Ar") and "matey!" in a for a in with_card), with_card
    assert not any("matey" in a for a in without), without


def test_lora_style_shows_on_transformers(q8_card, tiny_hf_dir, env, monkeypatch):
    from chat.backend import BackendOptions
    from chat.persona import NO_PERSONA
    from chat_plugins.transformers_backend import TransformersBackend

    monkeypatch.setenv("CHAT_DATA_DIR", env["CHAT_DATA_DIR"])
    backend = TransformersBackend(str(tiny_hf_dir), BackendOptions(threads=1))
    try:
        with_card = answers(backend, resolve(q8_card))  # the card's GGUF adapter, converted once for peft
        without = answers(backend, NO_PERSONA)
    finally:
        backend.close()
    assert all(a.startswith("Ar") and "matey!" in a for a in with_card), with_card
    assert not any("matey" in a for a in without), without


def test_eval_shows_the_loss_drop(q8_card, data, tiny_gguf_q8, env):
    result = run_cli(env, "personas", "eval", str(q8_card), "-m", str(tiny_gguf_q8), "--on", str(data),
                     "--answers", "1")
    assert result.exit_code == 0, result.output
    rows = {line[:16].strip(): float(line[16:24]) for line in result.output.splitlines()
            if line[:16].strip() in ("base", "+ prompt parts", "+ LoRA", "+ all")}
    assert rows["+ all"] < rows["base"] - 5 and rows["+ LoRA"] < rows["base"], result.output
    assert "held out when the card was made" in result.output
    assert "card: Arr, matey" in result.output


def test_same_seed_gives_byte_identical_adapters(tmp_path, env, data, tiny_gguf_q8, q8_card):
    out = tmp_path / "again"
    result = run_cli(env, "personas", "make", "pirate", "-b", str(tiny_gguf_q8), "--from", str(data), *TRAIN,
                     "-o", str(out))
    assert result.exit_code == 0, result.output
    for rel in ("adapters/pirate.gguf", "adapters/pirate-peft/adapter_model.safetensors",
                "adapters/pirate-peft/adapter_config.json"):
        assert (out / rel).read_bytes() == (q8_card / rel).read_bytes(), rel


def test_vector_moves_persona_tokens_the_right_way(tmp_path, env, data, tiny_gguf):
    from chat.make.base import load_base
    from chat.make.data import read_data
    from chat.make.encode import encode
    from chat.make.forward import token_nll
    from chat.make.vector import steered
    from chat.parts.vector import read_directions, read_vector

    out = tmp_path / "vec"
    result = run_cli(env, "personas", "make", "vec", "-b", str(tiny_gguf), "--from", str(data), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "[[steering]]" in (out / "persona.toml").read_text() and not (out / "adapters").exists()
    info = read_vector(out / "vectors" / "vec.gguf")
    assert info.layers == (1,) and info.n_embd == 64  # direction.1 … direction.(n_layer-1)
    directions = read_directions(info.path)
    base = load_base(str(tiny_gguf))
    items = [encode(base, d) for d in read_data(data).dialogues]
    pad = base.tokenizer.pad_token_id

    def nll(scale: float) -> float:
        with steered(base.model, directions, scale):
            total, count = token_nll(base.model, items, pad)
        return total / count

    assert nll(1.0) < nll(0.0) and nll(1.0) < nll(-1.0)  # a positive scale makes the persona's words likelier


def test_interrupted_training_resumes_and_finishes(tmp_path, subprocess_env, data, tiny_gguf):
    out = tmp_path / "card"
    cmd = [*chat_exe(), "personas", "make", "slow", "-b", str(tiny_gguf), "--from", str(data), "--lora",
           "--epochs", "30", "--patience", "0", "--batch-size", "2", "-o", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env)
    for line in proc.stdout:  # wait until training has taken a few steps
        if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= 20:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "checkpoint kept" in err and "--resume" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # no half-written card
    started = time.perf_counter()
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=subprocess_env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stdout and (out / "adapters" / "slow.gguf").is_file()
    assert json.loads((out / "make.json").read_text())["lora"]["resumed_from_step"] >= 20
    assert time.perf_counter() - started < 120


def bad_gguf(path: Path) -> Path:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "bert")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("case", ["not_json", "no_role", "bad_role", "no_assistant", "too_few", "no_base",
                                  "unsupported_arch", "memory", "exists", "bad_flag"])
def test_bad_input_is_one_line_and_leaves_no_card(case, tmp_path, env, data, tiny_gguf):
    rows = [dialogue(t) for t in TOPICS[:6]]
    where = {"data": data, "base": tiny_gguf}
    extra: list[str] = []
    expect = {
        "not_json": "line 3 is not JSON", "no_role": "line 2, message 2 has no role",
        "bad_role": "role 'wizard' is not one of", "no_assistant": "no assistant turns",
        "too_few": "at least 4 are needed", "no_base": "base model not found",
        "unsupported_arch": "architecture 'bert' is not supported", "memory": "GiB available",
        "exists": "already exists", "bad_flag": "--lr 5.0",
    }[case]
    if case == "not_json":
        rows[2] = "{not json"
    elif case == "no_role":
        rows[1] = {"messages": [{"role": "user", "content": "hi"}, {"content": "arr"}]}
    elif case == "bad_role":
        rows[0] = {"messages": [{"role": "wizard", "content": "hi"}]}
    elif case == "no_assistant":
        rows = [{"messages": [{"role": "user", "content": t}]} for t in TOPICS]
    elif case == "too_few":
        rows = rows[:2]
    if case in ("not_json", "no_role", "bad_role", "no_assistant", "too_few"):
        where["data"] = write_jsonl(tmp_path / "bad.jsonl", rows)
    elif case == "no_base":
        where["base"] = tmp_path / "missing.gguf"
    elif case == "unsupported_arch":
        where["base"] = bad_gguf(tmp_path / "bert.gguf")
    elif case == "memory":
        extra = ["--lora", "--memory-limit", "0.01"]
    elif case == "bad_flag":
        extra = ["--lora", "--lr", "5.0"]
    out = tmp_path / "card"
    if case == "exists":
        out.mkdir()
        (out / "persona.toml").write_text('name = "card"\n')
    result = run_cli(env, "personas", "make", "card", "-b", str(where["base"]), "--from", str(where["data"]),
                     *extra, "-o", str(out))
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expect in lines[0], result.output
    assert "Traceback" not in result.output
    if case == "exists":
        assert (out / "persona.toml").read_text() == 'name = "card"\n'
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".making-" in p.name]


SOFT = ("--soft-prompt", "32", "--soft-prompt-lr", "0.3", "--epochs", "50", "--patience", "0", "--seed", "3")
#: Prompts the soft prompt never saw. On the 2-layer random base a soft prompt (it acts through attention
#: alone) carries the style to prompts of common words; one with a rare word ("lighthouse") defeats it,
#: where the LoRA still succeeds.
SOFT_UNSEEN = ["What do you think about a lantern?", "What do you think about cheese?",
               "Hello! Can you tell me a joke?"]


@pytest.fixture(scope="module")
def soft_card(tmp_path_factory, env, data, tiny_gguf) -> Path:
    """A soft prompt card made on the f32 GGUF (the same weights as tiny_hf_dir)."""
    out = tmp_path_factory.mktemp("cards") / "softpirate"
    result = run_cli(env, "personas", "make", "softpirate", "-b", str(tiny_gguf), "--from", str(data), *SOFT,
                     "-o", str(out))
    assert result.exit_code == 0, result.output
    return out


def test_soft_prompt_lowers_the_held_out_loss_and_is_written_in_both_formats(soft_card):
    from chat.parts.softprompt import read_soft_prompt

    text = (soft_card / "persona.toml").read_text()
    assert "[[soft_prompt]]" in text and 'path = "soft_prompts/softpirate.gguf"' in text
    assert "[[adapters]]" not in text and "[[steering]]" not in text and "[[examples]]" not in text
    gguf, peft = (read_soft_prompt(soft_card / "soft_prompts" / p) for p in ("softpirate.gguf", "softpirate-peft"))
    assert gguf.values.shape == peft.values.shape == (32, 64) and (gguf.values == peft.values).all()
    record = json.loads((soft_card / "make.json").read_text())
    assert record["soft_prompt"]["held_loss_with"] < record["soft_prompt"]["held_loss_without"] / 10
    assert record["soft_prompt"]["settings"]["n_virtual"] == 32 and record["settings"]["soft_prompt"] == 32


@pytest.mark.parametrize("backend_name", ["llama.cpp", "transformers"])
def test_soft_prompt_style_shows_on_both_backends(backend_name, soft_card, tiny_gguf, tiny_hf_dir):
    from chat.backend import BackendOptions
    from chat.persona import NO_PERSONA

    if backend_name == "llama.cpp":
        from chat_plugins.llamacpp import LlamaCppBackend

        backend = LlamaCppBackend(str(tiny_gguf), BackendOptions(threads=1))
    else:
        from chat_plugins.transformers_backend import TransformersBackend

        backend = TransformersBackend(str(tiny_hf_dir), BackendOptions(threads=1))
    try:
        with_card = answers(backend, resolve(soft_card), SOFT_UNSEEN)
        without = answers(backend, NO_PERSONA, SOFT_UNSEEN)
    finally:
        backend.close()
    assert all(a.startswith("Ar") and "matey" in a for a in with_card), with_card
    assert not any("matey" in a for a in without), without


def test_eval_has_a_soft_prompt_row(soft_card, data, tiny_gguf, env):
    result = run_cli(env, "personas", "eval", str(soft_card), "-m", str(tiny_gguf), "--on", str(data),
                     "--answers", "0")
    assert result.exit_code == 0, result.output
    rows = {line[:16].strip(): float(line[16:24]) for line in result.output.splitlines()
            if line[:16].strip() in ("base", "+ prompt parts", "+ soft prompt", "+ all")}
    assert rows["+ soft prompt"] < rows["base"] and rows["+ all"] < rows["base"] / 10, result.output

"""The remote backend: a conversation and its persona on a serving engine.

Against a real `chat serve` process on the tiny model: a card with an adapter and a control vector
answers through the remote backend exactly as locally (greedy), mixes too, with the same prompt
token count from the engine's usage numbers. vLLM and llama.cpp's server cannot run here, so the
bodies sent to them are recorded by small stand-in servers and checked against those engines'
documented request fields; the same stand-ins break a stream midway, stall, answer 429 and want a key.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
from conftest import chat_exe
from enginefakes import FakeEngine, sse_chunks
from pydantic import BaseModel, ConfigDict
from test_serve import Server

MAX = 12


def write_card(personas: Path, name: str, *, adapters=(), steering=(), extra: str = "") -> Path:
    folder = personas / name
    (folder / "parts").mkdir(parents=True, exist_ok=True)
    lines = [
        f'name = "{name}"',
        'system = "You are a careful remote persona."',
        extra,
        "[[examples]]",
        'user = "hi"',
        'assistant = "hello friend"',
    ]
    for src, scale in adapters:
        shutil.copy(src, folder / "parts" / src.name)
        lines += ["[[adapters]]", f'path = "parts/{src.name}"', f"scale = {scale}"]
    for src, scale in steering:
        shutil.copy(src, folder / "parts" / src.name)
        lines += ["[[steering]]", f'path = "parts/{src.name}"', f"scale = {scale}"]
    (folder / "persona.toml").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def home(tmp_path_factory, lora_a_gguf, lora_b_gguf, cvec_gguf) -> Path:
    home = tmp_path_factory.mktemp("remote-home")
    personas = home / "config" / "personas"
    write_card(personas, "plain")
    write_card(personas, "partsy", adapters=[(lora_a_gguf, 0.8)], steering=[(cvec_gguf, 0.5)])
    write_card(personas, "mixed", adapters=[(lora_a_gguf, 0.7), (lora_b_gguf, 0.3)])
    return home


@pytest.fixture(scope="module")
def server(tiny_gguf, home):
    s = Server(tiny_gguf, home, "--slots", "2")
    yield s
    s.stop()


def one_shot(env: dict[str, str], model: str, *args: str, check: bool = True) -> dict[str, Any]:
    out = subprocess.run(
        chat_exe()
        + ["-m", model, "-t", "0", "--max-tokens", str(MAX), "--json", "--threads", "1", *args, "hello there"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    if not check:
        return {"rc": out.returncode, "stderr": out.stderr}
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_card_with_adapter_and_vector_on_chat_serve_equals_local(server, tiny_gguf):
    env = dict(server.env)
    url = server.url + "/v1"
    local = {
        p: one_shot(env, str(tiny_gguf), "--no-history", "-p", p) for p in ("partsy", "plain", "partsy:0.5,mixed:0.5")
    }
    assert local["partsy"]["text"] != local["plain"]["text"], "the parts must change the answer"
    for persona, answer in local.items():
        remote = one_shot(env, url, "--no-history", "-p", persona)
        assert remote["text"] == answer["text"], persona
        assert remote["usage"]["prompt_tokens"] == answer["usage"]["prompt_tokens"]  # the engine's own count
        assert remote["persona"] == persona
    # URL#CARD: the served card is the model, its prompt parts applied by the server
    assert one_shot(env, url + "#partsy", "--no-history")["text"] == local["partsy"]["text"]


def test_answer_and_persona_saved_to_history(server):
    env = dict(server.env)
    answer = one_shot(env, server.url + "/v1", "-p", "partsy")
    out = subprocess.run(
        chat_exe() + ["history", "show", answer["conversation_id"]], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert f"model `{server.url}/v1`" in out.stdout and "persona `partsy`" in out.stdout


def test_card_the_server_lacks_is_refused_before_answering(server, cli, chat_home):
    write_card(chat_home / "config" / "personas", "onlyhere")
    r = cli("-m", server.url + "/v1", "-p", "onlyhere", "--max-tokens", "3", "hi")
    assert r.exit_code != 0
    assert "has no persona 'onlyhere'" in r.output and "Traceback" not in r.output


def test_config_entry_models_list_and_served(server, cli, chat_home):
    (chat_home / "config").mkdir(parents=True, exist_ok=True)
    (chat_home / "config" / "config.toml").write_text(f'[models.big]\nurl = "{server.url}/v1"\nengine = "chat"\n')
    r = cli("models", "list")
    assert r.exit_code == 0 and f"big → {server.url}/v1  [remote, engine chat]" in r.output
    r = cli("models", "served", "big")
    assert r.exit_code == 0, r.output
    assert "engine:   chat" in r.output and "partsy" in r.output and "context:  " in r.output
    r = cli("-m", "big", "-t", "0", "--max-tokens", "4", "--json", "--no-history", "hi")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["usage"]["completion_tokens"] == 4


# --- stand-in engines: failures on cue -------------------------------------------------------------


def config_entry(chat_home: Path, url: str, **keys: Any) -> None:
    (chat_home / "config").mkdir(parents=True, exist_ok=True)
    body = "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
    (chat_home / "config" / "config.toml").write_text(f'[models.eng]\nurl = "{url}/v1"\n{body}')


def models_list(*ids: str) -> dict:
    return {"object": "list", "data": [{"id": i, "object": "model"} for i in ids]}


def test_server_dying_mid_answer_keeps_the_partial_answer_marked(cli, chat_home):
    fake = FakeEngine(
        {"/v1/models": models_list("m")},
        lambda h, body: h.send_sse(sse_chunks(["Hello", " wor"], None)[:-40], cut=True),
    )
    try:
        config_entry(chat_home, fake.url, engine="openai", retries=0)
        r = cli("-m", "eng", "say hello")
        assert r.exit_code != 0 and "Traceback" not in r.output
        assert "the answer broke off" in r.output
        from chat.config import Paths
        from chat.store import Store

        store = Store(Paths().history_db)
        conv = store.list_conversations()[0]
        last = store.messages(conv.id)[-1]
        assert (last.role, last.content, last.finish_reason) == ("assistant", "Hello wor", "error")
        store.close()
    finally:
        fake.close()


def test_read_timeout_is_one_line_and_prompt(cli, chat_home):
    def stall(h, body):
        time.sleep(3)

    fake = FakeEngine({"/v1/models": models_list("m")}, stall)
    try:
        config_entry(chat_home, fake.url, engine="openai", retries=0, read_timeout=0.5)
        started = time.perf_counter()
        r = cli("-m", "eng", "--no-history", "hi")
        assert time.perf_counter() - started < 2.5
        assert r.exit_code != 0 and "no answer within 0.5 s" in r.output
    finally:
        fake.close()


def test_engine_detection_falls_back_to_openai_behind_an_error_answering_gateway(cli, chat_home):
    """A gateway that answers 401 or 500 on the probe endpoints is a plain OpenAI-compatible server, not an error."""
    denied = (401, {"error": {"message": "unauthorized"}})
    fake = FakeEngine(
        {
            "/v1/models": models_list("m"),
            "/health": denied,
            "/props": (500, {"error": {"message": "boom"}}),
            "/version": denied,
            "/api/version": denied,
        },
        lambda h, body: h.send_sse(sse_chunks(["fine"])),
    )
    try:
        config_entry(chat_home, fake.url, retries=0)  # no engine named: detected
        r = cli("-m", "eng", "--no-history", "hi")
        assert r.exit_code == 0 and "fine" in r.output, r.output
    finally:
        fake.close()


def test_429_is_retried_with_backoff_then_reported_in_the_engines_words(cli, chat_home):
    def busy_once(h, body):
        if len(fake.bodies) == 1:
            h.send_response(429)
            raw = json.dumps({"error": {"message": "too many requests, slow down"}}).encode()
            h.send_header("Retry-After", "0")
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(raw)))
            h.end_headers()
            h.wfile.write(raw)
        else:
            h.send_sse(sse_chunks(["fine"]))

    fake = FakeEngine({"/v1/models": models_list("m")}, busy_once)
    try:
        config_entry(chat_home, fake.url, engine="openai", retries=1)
        r = cli("-m", "eng", "--no-history", "hi")
        assert r.exit_code == 0 and "fine" in r.output and len(fake.bodies) == 2
        fake.bodies.clear()
        config_entry(chat_home, fake.url, engine="openai", retries=0)
        r = cli("-m", "eng", "--no-history", "hi")
        assert r.exit_code != 0 and "429 too many requests, slow down" in r.output
    finally:
        fake.close()


def test_api_key_only_from_the_environment_never_saved(cli, chat_home, monkeypatch):
    fake = FakeEngine({"/v1/models": models_list("m")}, lambda h, body: h.send_sse(sse_chunks(["ok"])))
    try:
        config_entry(chat_home, fake.url, engine="openai", api_key_env="REMOTE_TEST_KEY")
        monkeypatch.delenv("REMOTE_TEST_KEY", raising=False)
        r = cli("-m", "eng", "hi")
        assert r.exit_code != 0 and "$REMOTE_TEST_KEY is not set" in r.output
        monkeypatch.setenv("REMOTE_TEST_KEY", "s3cret-key-value")
        r = cli("-m", "eng", "hi")
        assert r.exit_code == 0, r.output
        assert fake.headers[-1]["authorization"] == "Bearer s3cret-key-value"
        for f in (chat_home / "data").rglob("*"):
            if f.is_file():
                assert b"s3cret-key-value" not in f.read_bytes(), f
        config_entry(chat_home, f"http://user:pw@{fake.url.removeprefix('http://')}")
        r = cli("-m", "eng", "hi")
        assert r.exit_code != 0 and "holds credentials" in r.output
        r = cli("-m", f"{fake.url}/v1?key=QSECRET", "hi")
        assert r.exit_code != 0 and "query string" in r.output and "QSECRET" not in r.output
        config_entry(chat_home, fake.url, engine="openai", api_key_env="sk-proj-PASTEDSECRET123")
        r = cli("-m", "eng", "hi")
        assert r.exit_code != 0 and "PASTEDSECRET" not in r.output
    finally:
        fake.close()


# --- request bodies against the engines' documented shapes ------------------------------------------


class VllmChatRequest(BaseModel):
    """vLLM's ChatCompletionRequest fields (vllm/entrypoints/openai/protocol.py) that chat sends; others refused."""

    model_config = ConfigDict(extra="forbid")
    model: str
    messages: list[dict[str, str]]
    stream: bool
    stream_options: dict[str, bool] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, float] | None = None


class LoraRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: int
    scale: float


class LlamaServerRequest(BaseModel):
    """llama.cpp tools/server/README.md: /v1/chat/completions takes the OpenAI fields and the native ones."""

    model_config = ConfigDict(extra="forbid")
    model: str
    messages: list[dict[str, str]]
    stream: bool
    stream_options: dict[str, bool] | None = None
    max_tokens: int | None = None
    temperature: float
    dynatemp_range: float
    dynatemp_exponent: float
    top_k: int
    top_p: float
    min_p: float
    typical_p: float
    top_n_sigma: float
    xtc_probability: float
    xtc_threshold: float
    dry_multiplier: float
    dry_base: float
    dry_allowed_length: int
    dry_penalty_last_n: int
    dry_sequence_breakers: list[str]
    repeat_penalty: float
    repeat_last_n: int
    presence_penalty: float
    frequency_penalty: float
    mirostat: Literal[0, 1, 2]
    mirostat_tau: float
    mirostat_eta: float
    seed: int | None = None
    stop: list[str] | None = None
    logit_bias: list[list[int | float | bool]] | None = None
    samplers: list[Literal["penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature"]]
    lora: list[LoraRef] | None = None


def test_vllm_bodies_one_adapter_by_served_name(cli, chat_home, lora_a_gguf, lora_b_gguf, cvec_gguf):
    personas = chat_home / "config" / "personas"
    write_card(personas, "solo", adapters=[(lora_a_gguf, 1.0)], extra="[sampling]\ntop_k = 20\nmin_p = 0.1")
    write_card(personas, "duo", adapters=[(lora_a_gguf, 0.7), (lora_b_gguf, 0.3)])
    write_card(personas, "steered", steering=[(cvec_gguf, 0.5)])
    softy = write_card(personas, "softy")
    from chat.parts.softprompt import write_gguf_soft_prompt

    write_gguf_soft_prompt(softy / "parts" / "soft.gguf", np.ones((4, 64), np.float32))
    with open(softy / "persona.toml", "a") as fh:
        fh.write('[[soft_prompt]]\npath = "parts/soft.gguf"\n')
    served = {
        "object": "list",
        "data": [
            {"id": "base-model", "object": "model", "parent": None, "root": "/models/base", "max_model_len": 2048},
            {"id": "solo-lora", "object": "model", "parent": "base-model", "root": "/srv/adapters/lora-a"},
        ],
    }
    fake = FakeEngine(
        {"/health": {}, "/version": {"version": "0.9.2"}, "/v1/models": served},
        lambda h, body: h.send_sse(sse_chunks(["a", "b"])),
    )
    try:
        config_entry(chat_home, fake.url, retries=0)  # the engine is recognised by its /version
        r = cli("-m", "eng", "-p", "solo", "--no-history", "--seed", "5", "-o", "stop=END", "hi")
        assert r.exit_code == 0, r.output
        body = VllmChatRequest.model_validate(fake.bodies[-1])
        assert body.model == "solo-lora" and body.top_k == 20 and body.min_p == 0.1 and body.seed == 5
        assert body.stop == ["END"] and body.messages[0]["role"] == "system"
        r = cli("-m", "eng", "--no-history", "hi")
        assert VllmChatRequest.model_validate(fake.bodies[-1]).model == "base-model" and body.top_k == 20
        r = cli("-m", "eng", "-p", "duo", "--no-history", "hi")
        assert r.exit_code != 0 and "--merged-lora" in r.output and "vLLM" in r.output
        r = cli("-m", "eng", "-p", "steered", "--no-history", "hi")
        assert r.exit_code != 0 and "cannot apply control vectors" in r.output
        r = cli("-m", "eng", "-p", "softy", "--no-history", "hi")
        assert r.exit_code != 0 and "cannot apply soft prompts" in r.output and "chat serve" in r.output
        r = cli("-m", "eng", "--no-history", "-o", "xtc_probability=0.5", "hi")
        assert r.exit_code != 0 and "does not take the sampler setting(s) xtc_probability" in r.output
        config_entry(chat_home, fake.url, retries=0, drop_unsupported=True)
        r = cli("-m", "eng", "--no-history", "-o", "xtc_probability=0.5", "hi")
        assert r.exit_code == 0 and "xtc" not in json.dumps(fake.bodies[-1])
    finally:
        fake.close()


def test_llama_server_bodies_weighted_adapter_mix(cli, chat_home, lora_a_gguf, lora_b_gguf):
    personas = chat_home / "config" / "personas"
    write_card(
        personas,
        "duo",
        adapters=[(lora_a_gguf, 0.7), (lora_b_gguf, 0.3)],
        extra='[sampling]\norder = ["top_k", "typical_p", "temperature"]\ntypical_p = 0.9\ntop_k = 5',
    )
    loras = [
        {"id": 0, "path": "/srv/lora-b.gguf", "scale": 1.0},
        {"id": 1, "path": "/srv/lora-a.gguf", "scale": 1.0},
        {"id": 2, "path": "/srv/other.gguf", "scale": 1.0},
        {"id": "x", "path": "/srv/odd.gguf"},  # odd entries from a server are skipped, never a crash
        {"id": True, "path": "/srv/odd2.gguf"},
        "junk",
    ]
    gets = {
        "/health": {"status": "ok"},
        "/props": {"default_generation_settings": {"n_ctx": 1024}},
        "/lora-adapters": loras,
        "/v1/models": models_list("tiny.gguf"),
    }
    fake = FakeEngine(gets, lambda h, body: h.send_sse(sse_chunks(["a", "b"])))
    try:
        config_entry(chat_home, fake.url, retries=0)
        r = cli("-m", "eng", "-p", "duo", "--no-history", "-o", "logit_bias=5:-inf", "hi")
        assert r.exit_code == 0, r.output
        body = LlamaServerRequest.model_validate(fake.bodies[-1])
        assert [(x.id, x.scale) for x in body.lora or []] == [(0, 0.3), (1, 0.7), (2, 0.0)]
        assert body.samplers == ["top_k", "typ_p", "temperature"] and body.typical_p == 0.9
        assert body.logit_bias == [[5, False]]
        r = cli("-m", "eng", "--no-history", "hi")  # no persona: every served adapter at 0
        assert [x.scale for x in LlamaServerRequest.model_validate(fake.bodies[-1]).lora or []] == [0.0, 0.0, 0.0]
        r = cli("models", "served", "eng")
        assert "engine:   llamacpp" in r.output and "context:  1024" in r.output and "lora-a.gguf" in r.output
    finally:
        fake.close()


# --- a third-party engine: llama-cpp-python's own server --------------------------------------------


@pytest.fixture(scope="module")
def llama_cpp_python_server(tiny_gguf, home):
    pytest.importorskip("llama_cpp")
    from test_serve import free_port, request

    port = free_port()
    log = open(home / "llama-cpp-python.log", "wb")
    proc = subprocess.Popen(
        [
            os.environ.get("PYTHON", "python"),
            "-m",
            "llama_cpp.server",
            "--model",
            str(tiny_gguf),
            "--port",
            str(port),
            "--n_ctx",
            "512",
            "--n_threads",
            "1",
        ],
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        assert proc.poll() is None, (home / "llama-cpp-python.log").read_text()
        try:
            if request(url + "/v1/models")[0] == 200:
                break
        except OSError:
            time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.slow
def test_llama_cpp_python_server_prompt_parts_and_samplers(llama_cpp_python_server, tiny_gguf, home, server):
    env = dict(server.env)
    local = one_shot(env, str(tiny_gguf), "--no-history", "-p", "plain")
    remote = one_shot(env, llama_cpp_python_server + "/v1", "--no-history", "-p", "plain")
    # its server leaves out the bytes of a character split across tokens; ours shows them as U+FFFD
    assert remote["text"] == local["text"].replace("\ufffd", "")
    bare = one_shot(env, llama_cpp_python_server + "/v1", "--no-history")
    assert bare["text"] != remote["text"], "the card's system prompt and examples must reach the engine"
    refused = one_shot(env, llama_cpp_python_server + "/v1", "--no-history", "-p", "partsy", check=False)
    assert refused["rc"] != 0 and "cannot apply control vectors" in refused["stderr"]
    refused = one_shot(env, llama_cpp_python_server + "/v1", "-o", "typical_p=0.5", "--no-history", check=False)
    assert refused["rc"] != 0 and "does not take the sampler setting(s) typical_p" in refused["stderr"]


# --- serving a card elsewhere: one merged adapter, the engine's arguments ----------------------------


def test_merged_lora_answers_as_the_weighted_mix(cli, chat_home, tiny_gguf, lora_a_gguf, lora_b_gguf, lora_a_peft):
    personas = chat_home / "config" / "personas"
    write_card(personas, "mixed", adapters=[(lora_a_gguf, 0.7), (lora_b_gguf, 0.3)])
    merged = chat_home / "mixed-merged.gguf"
    r = cli("personas", "export", "mixed", "--merged-lora", "-o", str(merged))
    assert r.exit_code == 0 and "merged 2 adapter(s) of mixed" in r.output, r.output
    write_card(personas, "onepiece", adapters=[(merged, 1.0)])
    ask = ("-m", str(tiny_gguf), "-t", "0", "--max-tokens", "10", "--json", "--no-history", "--threads", "1")
    mix = json.loads(cli(*ask, "-p", "mixed", "hi").output)["text"]
    assert json.loads(cli(*ask, "-p", "onepiece", "hi").output)["text"] == mix
    assert json.loads(cli(*ask, "hi").output)["text"] != mix

    r = cli("personas", "serve-args", "mixed", "--engine", "llamacpp")
    assert r.exit_code == 0
    assert (
        f"--lora {personas / 'mixed' / 'parts' / 'lora-a.gguf'}" in r.output and "--lora-init-without-apply" in r.output
    )
    shutil.copytree(lora_a_peft, personas / "peftcard" / "parts" / "teacher-lora")
    (personas / "peftcard" / "persona.toml").write_text(
        'name = "peftcard"\n[[adapters]]\npath = "parts/teacher-lora"\n'
    )
    r = cli("personas", "serve-args", "peftcard", "--engine", "vllm")
    assert r.exit_code == 0
    folder = personas / "peftcard" / "parts" / "teacher-lora"
    assert f"--enable-lora --max-lora-rank 8 --lora-modules teacher-lora={folder}" in r.output
    r = cli("personas", "serve-args", "mixed", "--engine", "vllm")
    assert "--merged-lora" in r.output

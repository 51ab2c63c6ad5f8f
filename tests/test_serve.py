"""`chat serve`: a real server process on the tiny model, driven by the official `openai` client.

Every card is a model; greedy answers through the server equal the one-shot CLI's for the same
persona, also with 16 concurrent streams mixing three personas; a client that goes away frees its
slot; every error is an OpenAI error object with the right status.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from conftest import chat_exe

PERSONAS = ("teacher", "storyteller", "coder")
MAX = 10


def request(url: str, method: str = "GET", body: bytes | None = None) -> tuple[int, dict]:
    """One plain HTTP request (standard library): the status and the JSON body."""
    host, _, rest = url.removeprefix("http://").partition("/")
    conn = http.client.HTTPConnection(host, timeout=60)
    try:
        conn.request(method, "/" + rest, body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        return r.status, json.loads(data) if data else {}
    finally:
        conn.close()


def post(url: str, body: bytes | dict) -> tuple[int, dict]:
    return request(url, "POST", body if isinstance(body, bytes) else json.dumps(body).encode())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, model: Path, home: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.env = {
            **os.environ,
            "CHAT_CONFIG_DIR": str(home / "config"),
            "CHAT_DATA_DIR": str(home / "data"),
            "NO_COLOR": "1",
            **(env or {}),
        }
        self.env.pop("CHAT_MODEL", None)
        self.log = home / f"server-{self.port}.log"
        self.proc = subprocess.Popen(
            chat_exe() + ["serve", "-m", str(model), "--port", str(self.port), "--threads", "1", *args],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "wb"),
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited: {self.log.read_text()}")
            try:
                if request(self.url + "/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"the server did not come up: {self.log.read_text()}")

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve-home")


@pytest.fixture(scope="module")
def server(tiny_gguf, home) -> Iterator[Server]:
    s = Server(tiny_gguf, home, "--slots", "4")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def one_shot(tiny_gguf, server) -> dict[str, str]:
    """Each persona's greedy answer from the one-shot CLI (a separate process, the same config).

    A seed too: the storyteller card keeps XTC on, which removes top tokens at random even at temperature 0.
    """
    answers = {}
    for persona in PERSONAS:
        out = subprocess.run(
            chat_exe()
            + [
                "-m",
                str(tiny_gguf),
                "-p",
                persona,
                "-t",
                "0",
                "--seed",
                "7",
                "--max-tokens",
                str(MAX),
                "--json",
                "--no-history",
                "--threads",
                "1",
                "hello there",
            ],
            capture_output=True,
            text=True,
            env=server.env,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        answers[persona] = json.loads(out.stdout)["text"]
    assert len(set(answers.values())) == len(PERSONAS), "the personas must answer differently"
    return answers


def ask(client: openai.OpenAI, persona: str, stream: bool = False, **extra) -> str:
    messages = [{"role": "user", "content": "hello there"}]
    if not stream:
        r = client.chat.completions.create(
            model=persona, messages=messages, temperature=0, seed=7, max_tokens=MAX, **extra
        )
        return r.choices[0].message.content or ""
    chunks = client.chat.completions.create(
        model=persona, messages=messages, temperature=0, seed=7, max_tokens=MAX, stream=True, **extra
    )
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_models_lists_every_card_and_the_base(server, tiny_gguf):
    ids = [m.id for m in server.client().models.list()]
    assert ids[0] == tiny_gguf.name
    assert set(PERSONAS) <= set(ids)


def test_answers_equal_the_one_shot_cli(server, one_shot):
    client = server.client()
    for persona in PERSONAS:
        assert ask(client, persona) == one_shot[persona]
        assert ask(client, persona, stream=True) == one_shot[persona]


def test_stream_usage_and_finish_reason(server):
    chunks = list(
        server.client().chat.completions.create(
            model="teacher",
            messages=[{"role": "user", "content": "hello there"}],
            temperature=0,
            max_tokens=MAX,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == MAX
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_sixteen_concurrent_streams_mixing_three_personas(server, one_shot):
    client = server.client()
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = ask(client, PERSONAS[i % 3], stream=True)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    assert all(results[i] == one_shot[PERSONAS[i % 3]] for i in range(16))


def test_a_request_system_message_replaces_the_cards(server, one_shot):
    client = server.client()
    r = client.chat.completions.create(
        model="teacher",
        temperature=0,
        max_tokens=MAX,
        messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello there"}],
    )
    assert r.choices[0].message.content != one_shot["teacher"]


def test_raw_completion(server):
    r = server.client().completions.create(model="teacher", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5


def test_errors_are_openai_error_objects(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError) as e:
        ask(client, "nobody")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="teacher", messages=[{"role": "user", "content": "hi"}], temperature=11)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="teacher", messages=[{"role": "user", "content": "hi"}], extra_body={"top_k": -5}
        )
    assert e.value.body["param"] == "top_k"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="teacher", messages=[{"role": "user", "content": "word " * 20000}], max_tokens=2
        )
    assert e.value.body["code"] == "context_length_exceeded"
    big = b'{"model": "teacher", "messages": [{"role": "user", "content": "' + b"x" * (5 * 2**20) + b'"}]}'
    status, data = post(server.url + "/v1/chat/completions", big)
    assert status == 413 and data["error"]["code"] == "body_too_large"


def test_a_burst_of_malformed_bodies_leaves_the_server_serving(server):
    bodies = [
        b"",
        b"{",
        b"[]",
        b"null",
        b'{"model": 5}',
        b'{"model": "teacher"}',
        b'{"model": "teacher", "messages": 3}',
        b'{"model": "teacher", "messages": [{"role": "robot", "content": "x"}]}',
        b'{"model": "teacher", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
        b'{"model": "teacher", "messages": [{"role": "user", "content": "hi"}], "n": 3}',
        b'{"model": "teacher", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"x": 1}}',
        '{"model": "\u00e9\\ud800"}'.encode("utf-8", "surrogatepass"),
        bytes(range(256)),
    ]
    for body in bodies * 3:
        status, data = post(server.url + "/v1/chat/completions", body)
        assert status in (400, 404), (body, status, data)
        assert "error" in data
    assert ask(server.client(), "teacher")


def test_a_client_that_goes_away_frees_its_slot(tiny_gguf, home):
    s = Server(tiny_gguf, home, "--slots", "1", "--queue", "0")
    try:
        body = {
            "model": "teacher",
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 3000,
            "stream": True,
            "temperature": 1.0,
        }
        conn = http.client.HTTPConnection(f"127.0.0.1:{s.port}", timeout=60)
        conn.request(
            "POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        r = conn.getresponse()
        assert r.status == 200 and r.read(5) == b"data:"
        status, busy = post(s.url + "/v1/chat/completions", {**body, "stream": False, "max_tokens": 2})
        assert status == 503 and busy["error"]["code"] == "server_busy"
        conn.close()  # the client goes away half-way through the stream: the one slot is free again at once
        deadline = time.time() + 20
        while request(s.url + "/health")[1]["busy"] and time.time() < deadline:
            time.sleep(0.1)
        assert request(s.url + "/health")[1]["busy"] == 0
        assert ask(s.client(), "teacher")
    finally:
        s.stop()


def test_api_key_from_the_environment(tiny_gguf, home):
    s = Server(tiny_gguf, home, "--api-key-env", "CHAT_TEST_KEY", env={"CHAT_TEST_KEY": "s3cret"})
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        assert ask(s.client("s3cret"), "teacher")
        assert request(s.url + "/health")[0] == 200  # health needs no key
    finally:
        s.stop()
    assert "s3cret" not in s.log.read_text()


def test_serve_refuses_an_unset_key_variable(cli, tiny_gguf):
    r = cli("serve", "-m", str(tiny_gguf), "--api-key-env", "CHAT_NO_SUCH_VARIABLE")
    assert r.exit_code == 2 and "CHAT_NO_SUCH_VARIABLE" in r.output


def test_sigterm_lets_an_answer_in_flight_finish(tiny_gguf, home):
    s = Server(tiny_gguf, home, "--slots", "1")
    try:
        got: dict[str, object] = {}

        def run() -> None:
            try:
                got["text"] = ask(s.client(), "teacher", stream=True)
            except BaseException as exc:
                got["error"] = exc

        t = threading.Thread(target=run)
        t.start()
        time.sleep(0.3)
        s.proc.terminate()
        t.join(timeout=60)
        assert "error" not in got and got.get("text")
        assert s.proc.wait(timeout=30) in (0, -15)  # drained, then exits (uvicorn re-raises the signal it caught)
    finally:
        if s.proc.poll() is None:
            s.proc.kill()


def wait_idle(s: Server, seconds: float = 20) -> int:
    deadline = time.time() + seconds
    while request(s.url + "/health")[1]["busy"] and time.time() < deadline:
        time.sleep(0.1)
    return int(request(s.url + "/health")[1]["busy"])


@pytest.mark.parametrize(
    "body",
    [
        {"stream": False, "max_tokens": 3000, "temperature": 1.0},  # a client waiting for a whole answer
        {"stream": True, "max_tokens": 3000, "beams": 3},  # beam search yields only at the end
    ],
)
def test_any_client_that_leaves_stops_its_generation(tiny_gguf, home, body):
    s = Server(tiny_gguf, home, "--slots", "1", "--ctx", "8192")
    try:
        conn = http.client.HTTPConnection(f"127.0.0.1:{s.port}", timeout=60)
        full = {"model": "teacher", "messages": [{"role": "user", "content": "hello"}], **body}
        conn.request(
            "POST", "/v1/chat/completions", body=json.dumps(full), headers={"Content-Type": "application/json"}
        )
        time.sleep(1.0)
        assert request(s.url + "/health")[1]["busy"] == 1
        conn.close()
        assert wait_idle(s, 10) == 0
        assert ask(s.client(), "teacher")
    finally:
        s.stop()


def test_a_model_id_is_never_a_path_on_the_server(server):
    for model in (
        "/etc",
        "../teacher",
        "./x",
        "~/cards/x",
        "teacher:0.5,/etc/passwd:0.5",
        "/work/main/personas/teacher",
    ):
        status, data = post(
            server.url + "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        )
        assert status == 404 and data["error"]["code"] == "model_not_found", (model, data)
        assert "persona.toml" not in data["error"]["message"]


def test_deeply_nested_json_is_a_400(server):
    status, data = post(server.url + "/v1/chat/completions", b"[" * 200_000)
    assert status == 400 and "nested" in data["error"]["message"]


def test_a_forced_stop_with_answers_running_never_crashes(tiny_gguf, home):
    """Ctrl-C twice while two answers generate: their threads stop before the model is freed."""
    import signal

    s = Server(tiny_gguf, home, "--slots", "2", "--ctx", "8192")
    conns = []
    try:
        for _ in range(2):
            conn = http.client.HTTPConnection(f"127.0.0.1:{s.port}", timeout=60)
            body = {"model": "teacher", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000}
            conn.request(
                "POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
            )
            conns.append(conn)
        time.sleep(1.0)
        s.proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
        s.proc.send_signal(signal.SIGINT)
        code = s.proc.wait(timeout=60)
        assert code not in (-signal.SIGSEGV, -signal.SIGABRT, 139, 134), s.log.read_text()
    finally:
        for conn in conns:
            conn.close()
        if s.proc.poll() is None:
            s.proc.kill()

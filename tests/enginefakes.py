"""Tiny HTTP servers (standard library) that stand in for an engine where the real one cannot run here.

vLLM needs a GPU and llama.cpp's own ``llama-server`` binary is not shipped by llama-cpp-python, so
their request bodies are checked by recording what chat sends to a server that answers like them; the
same servers break a stream midway, stall, or answer 429, which a healthy real server never does on cue.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def sse_chunks(texts: list[str], usage: tuple[int, int] | None = (7, 2)) -> bytes:
    out = b""
    for i, text in enumerate(texts):
        delta = {"role": "assistant", "content": text} if i == 0 else {"content": text}
        body = {
            "id": "x",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
        }
        out += f"data: {json.dumps(body)}\n\n".encode()
    end = {
        "id": "x",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
    }
    out += f"data: {json.dumps(end)}\n\n".encode()
    if usage:
        u = {
            "id": "x",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "m",
            "choices": [],
            "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)},
        }
        out += f"data: {json.dumps(u)}\n\n".encode()
    return out + b"data: [DONE]\n\n"


class FakeEngine:
    """Answers GETs from ``gets`` (path → JSON) and chat completions with ``answer(handler, body)``."""

    def __init__(self, gets: dict[str, Any], answer: Callable[[BaseHTTPRequestHandler, dict], None]) -> None:
        self.bodies: list[dict] = []
        self.headers: list[dict[str, str]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?")[0]
                if path in gets:
                    got = gets[path]  # a JSON value, or (status, JSON value)
                    status, data = got if isinstance(got, tuple) else (200, got)
                    self.send_json(status, data)
                else:
                    self.send_json(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length))
                fake.bodies.append(body)
                fake.headers.append({k.lower(): v for k, v in self.headers.items()})
                answer(self, body)

            def send_json(self, status: int, data: Any) -> None:
                raw = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def send_sse(self, raw: bytes, cut: bool = False) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                if cut:  # promise more than is sent, then hang up: a server that died mid-answer
                    self.send_header("Content-Length", str(len(raw) + 10_000))
                else:
                    self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)
                self.wfile.flush()
                if cut:
                    self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

"""Talking to a serving engine over HTTP: the URL, the ``openai`` client, side requests, one-line errors.

Streaming chat completions go through the ``openai`` package (its SSE decoding, timeouts and retries
with backoff, which honour ``Retry-After``); the few engine-specific endpoints (``/health``, ``/props``,
``/lora-adapters``, ``/version``) go through the same client's HTTP layer, so timeouts, retries and the
API key apply to them too. The API key is read from the environment when the client is made and is
never stored anywhere else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from chat.errors import ChatError, ModelError, UsageError
from chat.escapes import make_visible
from chat.tomlfile import shorten

DEFAULT_CONTEXT = 4096


class RemoteError(ChatError):
    """The engine refused, failed, or could not be reached."""


@dataclass(frozen=True)
class Location:
    """Where the engine is: the OpenAI base URL (``…/v1``), the server root, and the model after ``#``."""

    base: str
    root: str
    model: str | None

    @property
    def shown(self) -> str:
        return self.base


def is_url(text: str) -> bool:
    return text.lower().startswith(("http://", "https://"))


def parse_location(url: str) -> Location:
    """``http://host:8000/v1#teacher`` → base ``http://host:8000/v1``, root ``http://host:8000``, model ``teacher``.

    A URL without a path gets ``/v1``. Credentials in the URL are refused: history and ``/info``
    record the URL, so a secret belongs in the environment (``api_key_env``).
    """
    parts = urlsplit(url.strip())
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise UsageError(f"{shorten(url, 80)}: not an http(s) URL", "write e.g. http://127.0.0.1:8000/v1#MODEL")
    if parts.username or parts.password:
        raise UsageError(
            f"{parts.scheme}://…@{parts.hostname}: the URL holds credentials, which would be saved in history",
            "put the key in an environment variable and name it with api_key_env in the [models] entry",
        )
    if parts.query:
        raise UsageError(
            f"{parts.scheme}://{parts.netloc}{parts.path}?…: the URL has a query string (history would keep it)",
            "a token belongs in an environment variable named by api_key_env in the [models] entry",
        )
    path = parts.path.rstrip("/") or "/v1"
    root_path = path.removesuffix("/v1")
    base = urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))
    root = urlunsplit((parts.scheme, parts.netloc, root_path, "", ""))
    return Location(base, root, parts.fragment or None)


def api_key(env_name: str | None) -> str:
    """The key from ``$env_name``; without one a placeholder (engines without keys ignore it)."""
    if env_name is None:
        return "none"
    key = os.environ.get(env_name)
    if not key:
        raise ModelError(f"api_key_env = {env_name}, but ${env_name} is not set", f"export {env_name}=YOUR_KEY")
    return key


def make_client(location: Location, key: str, connect: float, read: float, retries: int) -> Any:
    import openai

    timeout = openai.Timeout(read, connect=connect)
    return openai.OpenAI(base_url=location.base, api_key=key, timeout=timeout, max_retries=retries)


def one_line(exc: BaseException, location: Location, engine: str, read_timeout: float) -> RemoteError:
    """An ``openai`` exception as one line: the engine's own message when it sent one."""
    import openai

    where = f"{engine} at {location.shown}"
    if isinstance(exc, openai.APITimeoutError):
        return RemoteError(
            f"{where}: no answer within {read_timeout:g} s (on each try)",
            "the server may be busy; raise read_timeout (or lower retries) in the entry",
        )
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc.__context__
        why = type(cause).__name__ if cause else "connection failed"
        return RemoteError(f"{where}: cannot reach the server ({why})", "is it running? check the URL and port")
    if isinstance(exc, openai.APIStatusError):
        return RemoteError(f"{where}: {exc.status_code} {_message(exc.body, exc.message)}", _hint(exc.status_code))
    if isinstance(exc, openai.APIError):
        return RemoteError(f"{where}: {_message(exc.body, exc.message)}", "the server reported an error mid-answer")
    return RemoteError(f"{where}: {type(exc).__name__}: {shorten(make_visible(str(exc)), 200)}")


def _message(body: Any, fallback: str) -> str:
    """The error text an engine sent (OpenAI: {"error": {"message"}}, llama.cpp, vLLM and FastAPI variants)."""
    text: Any = None
    if isinstance(body, dict):
        err = body.get("error", body)
        text = err.get("message") or err.get("detail") if isinstance(err, dict) else err
        text = text or body.get("detail") or body.get("message")
    elif isinstance(body, str):
        text = body
    text = text if isinstance(text, str) and text.strip() else fallback
    return shorten(make_visible(" ".join(str(text).split())), 300)


def _hint(status: int) -> str:
    return {
        401: "the server wants an API key: set api_key_env in the [models] entry and export that variable",
        403: "the API key was refused",
        404: "check the model name (`chat models served URL` lists what the server has)",
        429: "the server is busy; retries are set with `retries`",
        503: "the server is busy or loading; retries are set with `retries`",
    }.get(status, "see the server's log")


def get_json(client: Any, url: str, retries: int | None = None) -> Any:
    """GET ``url`` (absolute) with the client's timeouts and key; the parsed JSON, or None on 404/405."""
    import openai

    c = client if retries is None else client.with_options(max_retries=retries)
    try:
        data = c.get(url, cast_to=object)  # JSON parsed; any other body comes back as text
    except openai.APIStatusError as exc:
        if exc.status_code in (404, 405, 501):
            return None
        raise
    return None if isinstance(data, str) else data


def _probe(client: Any, url: str) -> Any:
    """``get_json`` for engine detection: any HTTP error answer (401 behind a gateway, 500) means "not this one".

    A server that cannot be reached at all still raises: that is the user's first error to see.
    """
    import openai

    try:
        return get_json(client, url, retries=0)
    except openai.APIStatusError:
        return None


def detect_engine(client: Any, location: Location) -> str:
    """Which engine serves ``location``, from endpoints only it has; ``openai`` when none answers."""
    health = _probe(client, f"{location.root}/health")
    if isinstance(health, dict) and "slots" in health and "busy" in health:
        return "chat"
    props = _probe(client, f"{location.root}/props")
    if isinstance(props, dict) and "default_generation_settings" in props:
        return "llamacpp"
    version = _probe(client, f"{location.root}/version")
    if isinstance(version, dict) and "version" in version:
        return "vllm"
    ollama = _probe(client, f"{location.root}/api/version")
    if isinstance(ollama, dict) and "version" in ollama:
        return "ollama"
    return "openai"


def served_models(client: Any) -> list[dict[str, Any]]:
    """``GET /v1/models``: each served model's raw entry (id, and vLLM's ``parent``/``root``/``max_model_len``)."""
    page = client.models.list()
    return [m.model_dump() for m in page.data]


def engine_context(client: Any, location: Location, engine: str, model: str | None) -> int | None:
    """The context window the engine reports, where it reports one."""
    if engine == "chat":
        health = get_json(client, f"{location.root}/health")
        value = health.get("context_size") if isinstance(health, dict) else None
        return value if isinstance(value, int) and value > 0 else None
    if engine == "llamacpp":
        props = get_json(client, f"{location.root}/props")
        settings = props.get("default_generation_settings", {}) if isinstance(props, dict) else {}
        value = settings.get("n_ctx") if isinstance(settings, dict) else None
        return value if isinstance(value, int) and value > 0 else None
    if engine == "vllm":
        for m in served_models(client):
            if m.get("id") == model and isinstance(m.get("max_model_len"), int):
                return int(m["max_model_len"])
    return None

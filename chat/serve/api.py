"""The OpenAI wire format: request bodies, error objects, and the mapping onto our settings.

Sampler parameters are validated exactly as on the command line: the request's values form
one layer over the defaults, config.toml's ``[sampling]`` and the card's ``[sampling]``, merged
by :func:`chat.sampling.resolve_sampling`. OpenAI's own names that mean the same as ours
(``temperature``, ``top_p``, ``seed``, ``stop``, ``presence_penalty``, ``frequency_penalty``,
``logit_bias``, ``max_tokens``) are ours already; our extras go by their own names
(``top_k``, ``min_p``, ``mirostat``, ``order``, ``beams``, …). Other fields OpenAI clients send
(``user``, ``metadata``, …) are ignored; the ones that would change the answer in a way we do not
offer (``n`` > 1, ``logprobs``, tools) are refused by name.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from chat.backend import Message
from chat.sampling import FIELD_NAMES

MAX_BODY_BYTES = 4 * 2**20


class APIError(Exception):
    """An error the client gets as an OpenAI error object."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None


class CommonRequest(BaseModel):
    """What both endpoints take; unknown fields are kept in ``model_extra`` and sorted out later."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=1000)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | int | None = None

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class ChatRequest(CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Any] | None = None
    # Ours: false = the messages are the whole prompt (chat's remote backend assembled the card's prompt
    # parts already); the persona's adapters, vectors and sampler settings still apply.
    persona_prompt: bool = True


class CompletionRequest(CommonRequest):
    prompt: str | list[str]
    echo: bool = False


UNSUPPORTED = {
    "tools": "tool calls are not supported",
    "functions": "function calls are not supported",
    "logprobs": "logprobs are not supported",
    "top_logprobs": "logprobs are not supported",
    "suffix": "suffix is not supported",
    "best_of": "best_of is not supported",
}


def parse(model: type[BaseModel], data: Any) -> Any:
    """``data`` (parsed JSON) as ``model``; a bad field is a 400 naming it."""
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise APIError(400, f"{param or 'body'}: {err['msg']}", param=param) from None


def sampler_layer(req: CommonRequest) -> dict[str, Any]:
    """The request's sampler settings as one layer (validated with the others by resolve_sampling)."""
    if req.n != 1:
        raise APIError(400, f"n = {req.n}: one choice per request is supported", param="n")
    extra = dict(req.model_extra or {})
    for name, why in UNSUPPORTED.items():
        value = getattr(req, name, None) if name in type(req).model_fields else extra.get(name)
        if value not in (None, False, [], 0, ""):
            raise APIError(400, f"{name}: {why}", param=name)
    layer: dict[str, Any] = {}
    for name in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value is not None:
            layer[name] = value
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if limit is not None:
        layer["max_tokens"] = limit
    if req.stop is not None:
        layer["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    if req.logit_bias:
        try:
            layer["logit_bias"] = {int(k): v for k, v in req.logit_bias.items()}
        except ValueError:
            raise APIError(400, "logit_bias: keys must be token ids", param="logit_bias") from None
    for name, value in extra.items():
        if name in FIELD_NAMES or "." in name:  # our own settings, and plugin stage settings (word_filter.boost)
            layer[name] = value
    return layer


def chat_messages(req: ChatRequest) -> tuple[list[Message], str | None]:
    """The conversation, and the request's system text (it replaces the card's) when it has any."""
    system: list[str] = []
    conversation: list[Message] = []
    for i, m in enumerate(req.messages):
        text = _text(m.content, f"messages.{i}.content")
        if m.role in ("system", "developer"):
            system.append(text)
        elif m.role in ("user", "assistant"):
            conversation.append(Message(m.role, text))
        else:
            raise APIError(400, f"messages.{i}.role: {m.role!r} messages are not supported", param=f"messages.{i}")
    if not conversation or conversation[-1].role != "user":
        raise APIError(400, "messages: the last message must be from the user", param="messages")
    return conversation, ("\n\n".join(system) if system else None)


def _text(content: str | list[dict[str, Any]] | None, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"{where}: only text parts are supported", param=where)
        parts.append(part["text"])
    return "".join(parts)


def param_of(message: str) -> str | None:
    """The setting a SamplingError's message names first (for the error object's ``param``)."""
    words = message.replace("=", " ").replace(":", " ").replace(",", " ").split()
    return next((w for w in words if w in FIELD_NAMES), None)

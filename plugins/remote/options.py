"""What `chat -m URL` (or a `[models]` entry with `url`) can be told: which engine, which served model, limits."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from chat.backend import BackendOptions

Engine = Literal["chat", "vllm", "llamacpp", "llama-cpp-python", "ollama", "openai"]


class RemoteOptions(BackendOptions):
    """The remote backend's options. ``context_size`` unset = what the engine reports (else 4096)."""

    model: str | None = Field(
        None, description="the served model (URL#MODEL sets it too); unset = the engine's only or first model"
    )
    engine: Engine | None = Field(
        None,
        description="chat, vllm, llamacpp (llama.cpp's server), llama-cpp-python, ollama or openai; "
        "unset = asked from the server (else openai)",
    )
    api_key_env: str | None = Field(
        None, max_length=200, description="environment variable holding the API key (keys are never stored)"
    )
    connect_timeout: float = Field(5.0, gt=0, le=600, description="seconds to wait for the connection")
    read_timeout: float = Field(120.0, gt=0, le=3600, description="seconds to wait for the next bytes of an answer")
    retries: int = Field(
        2,
        ge=0,
        le=10,
        description="retries with backoff (honouring Retry-After) on 408, 409, 429, 5xx, failed connects",
    )
    drop_unsupported: bool = Field(
        False, description="leave out sampler settings the engine does not take instead of refusing them"
    )

    @field_validator("template")
    @classmethod
    def _engine_renders(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError("a remote engine applies its own chat template; set it on the server")
        return value

    @field_validator("api_key_env")
    @classmethod
    def _a_variable_name(cls, value: str | None) -> str | None:
        if value is not None and not value.replace("_", "a").isalnum():
            raise ValueError("the name of an environment variable (letters, digits, _), not the key itself")
        return value

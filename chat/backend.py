"""The backend protocol and the values that cross it.

A backend plugin loads one base model once, attaches a persona's parameter parts
with :meth:`Backend.apply` (never reloading the base), and streams answers with
:meth:`Backend.stream`. Chat templates, KV reuse, GPU layers and dtypes stay
inside the plugin; the core only sees these types.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from chat.persona import Persona
    from chat.sampling import SamplerSettings

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length", "interrupted", "error"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0  # tokens in the whole prompt
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the KV cache (not evaluated again)


@dataclass(frozen=True)
class Timings:
    ttft_s: float = 0.0  # stream() called → first text chunk
    tokens_per_s: float = 0.0  # completion tokens / decode time (after the first token)
    prompt_s: float = 0.0  # time spent evaluating the prompt


@dataclass(frozen=True)
class Finish:
    """The last item of every stream: why it ended, and what it cost."""

    reason: FinishReason
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)


class BackendOptions(BaseModel):
    """Load-time options every backend understands; a backend ignores what does not apply to it."""

    model_config = ConfigDict(extra="forbid")

    context_size: int | None = Field(None, ge=64, description="context window in tokens; unset = the model's own (capped at 8192)")
    gpu_layers: int = Field(0, ge=-1, description="layers to offload to the GPU; -1 = all")
    # ggml refuses more than GGML_MAX_N_THREADS (512) threads by aborting the process; more never helps anyway.
    threads: int | None = Field(None, ge=1, le=512, description="CPU threads (1-512); unset = the library's choice")
    device: str = Field("auto", description="torch device: auto, cpu, cuda, cuda:N, mps")
    dtype: str = Field("auto", description="torch dtype: auto, float32, bfloat16, float16")
    kv_cache_bytes: int = Field(256 * 2**20, ge=0, description="budget for saved persona prefix states (bytes)")
    template: str | None = Field(None, description="chat template: a well-known name (chat templates) or a Jinja file")
    template_origin: str = Field("--template", description="who chose `template`, for /info: --template or the config entry")


@runtime_checkable
class Backend(Protocol):
    """What the session needs from a loaded model."""

    name: ClassVar[str]
    model_name: str
    context_size: int

    def apply(self, persona: "Persona") -> list[str]:
        """Attach the persona's parameter parts (replacing the active set); return warnings for the user."""
        ...

    def stream(self, messages: Sequence[Message], sampling: "SamplerSettings") -> Iterator["str | Finish"]:
        """Yield text chunks, then exactly one :class:`Finish`. Closing the generator stops generation."""
        ...

    def count_tokens(self, messages: Sequence[Message]) -> int:
        """Tokens the rendered prompt for ``messages`` takes (including the generation prompt)."""
        ...

    def render(self, messages: Sequence[Message]) -> str:
        """The exact prompt text ``messages`` become (template applied), for ``--show-prompt`` and ``/prompt``."""
        ...

    def info(self) -> dict[str, object]:
        """Facts for ``/info``: file, parameters, context used, active adapters …"""
        ...

    def close(self) -> None: ...


class BackendFactory(Protocol):
    """What a plugin registers with ``register_backends``: a class with these class-level members."""

    name: ClassVar[str]

    @classmethod
    def can_load(cls, model: str) -> bool:
        """Whether this backend is the natural choice for ``model`` (a path or an id)."""
        ...

    def __call__(self, model: str, options: BackendOptions) -> Backend: ...

"""The backend protocol and the values that cross it.

A backend plugin loads one base model once, attaches a persona's parameter parts
with :meth:`Backend.apply` (never reloading the base), and streams answers with
:meth:`Backend.stream`. Chat templates, KV reuse, GPU layers and dtypes stay
inside the plugin; the core only sees these types.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, Self, runtime_checkable

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
    virtual_tokens: int = 0  # a soft prompt's virtual tokens before the prompt (not in prompt_tokens)


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


class TextDecoder(Protocol):
    """Generated token ids → text, never half a character."""

    def feed(self, token: int) -> str:
        """Add one token; return the text that is complete now ("" if none)."""
        ...

    def finish(self) -> str:
        """The text still pending at the end of the answer."""
        ...


@runtime_checkable
class Slot(Protocol):
    """One independent generation state on a loaded model: its own parameter parts, KV memory and sampler.

    A local backend hands out slots (``Backend.new_slot()``; the REPL uses one, a server N).
    The core runs generation over these primitives (``chat.generation.generate`` and
    ``chat.beam.beam_search``); ``chat.generation.LocalSlot`` implements ``stream`` on them.
    """

    context_size: int
    end_ids: frozenset[int]  # every token that ends a turn (end of generation, template markers)
    stats: Any  # chat.generation.SlotStats
    kv_len: int  # tokens in the conversation's memory

    def apply(self, persona: "Persona") -> list[str]: ...

    def stream(self, messages: Sequence[Message], sampling: "SamplerSettings") -> Iterator["str | Finish"]: ...

    def prefill(self, prompt: list[int], last: Any) -> int:
        """Make the memory hold ``prompt`` with logits for its last token; return the tokens reused."""
        ...

    def start_sampling(self, prompt: list[int]) -> None: ...

    def sample(self) -> int:
        """Pick the next token with the slot's sampler."""
        ...

    def advance(self, token: int) -> None:
        """Evaluate ``token``; its logits become the current ones."""
        ...

    def is_end(self, token: int) -> bool: ...

    def decoder(self, prompt: list[int]) -> TextDecoder: ...

    def beam_logprobs(self, rows: int) -> Any:
        """Log-softmax of the current logits of rows ``0..rows-1``, float32 ``[rows, vocab]``."""
        ...

    def beam_step(self, parents: list[int], tokens: list[int]) -> None:
        """New row i continues row ``parents[i]`` with ``tokens[i]``; evaluate all rows in one batch."""
        ...

    def beam_end(self) -> None:
        """Drop the beam rows; the memory holds the prompt again."""
        ...


class BackendOptions(BaseModel):
    """Load options every local backend understands; each backend adds its own in a subclass, its ``Options``.

    Unknown keys are refused (``extra="forbid"``), so an option the chosen backend does not take
    (``--device`` on llama.cpp) is an error naming it, never silently ignored. Fields marked
    ``exclude=True`` are set by chat itself, not by the user.
    """

    model_config = ConfigDict(extra="forbid")

    context_size: int | None = Field(
        None, ge=64, description="context window in tokens; unset = the model's own (capped at 8192)"
    )
    # ggml refuses more than GGML_MAX_N_THREADS (512) threads by aborting the process; more never helps anyway.
    threads: int | None = Field(None, ge=1, le=512, description="CPU threads (1-512); unset = the library's choice")
    kv_cache_bytes: int = Field(256 * 2**20, ge=0, description="budget for saved persona prefix states (bytes)")
    template: str | None = Field(None, description="chat template: a well-known name (chat templates) or a Jinja file")
    template_origin: str = Field(
        "--template", exclude=True, description="who chose `template`, for /info: --template or the config entry"
    )

    @classmethod
    def from_options(cls, options: "BackendOptions | None") -> Self:
        """``options`` as this class: what was set carries over, the rest takes this backend's defaults.

        Lets a backend be built with the common ``BackendOptions(threads=2)``; a key this class
        does not declare (another backend's option) is a ValidationError.
        """
        if isinstance(options, cls):
            return options
        given = {} if options is None else {k: getattr(options, k) for k in options.model_fields_set}
        return cls(**given)


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
    """What a plugin registers with ``register_backends``: a class with these class-level members.

    Which backend loads a model (unless ``--backend`` names one): among the backends whose
    ``can_load(model)`` is true, the highest ``priority`` wins, ties going to the name that sorts
    first. Built-ins have priority 0, so a plugin claims a model ahead of them with a higher one.
    """

    name: ClassVar[str]
    priority: ClassVar[int]  # optional; 0 when absent
    Options: ClassVar[type[BackendOptions]]  # optional; BackendOptions when absent

    @classmethod
    def can_load(cls, model: str) -> bool:
        """Whether this backend can load ``model`` (a path or an id)."""
        ...

    def __call__(self, model: str, options: BackendOptions) -> Backend: ...

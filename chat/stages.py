"""Plugin sampler stages: a function over the logits and the tokens so far, the same on every backend.

A plugin registers a :class:`SamplerStage` through the ``register_samplers`` hook;
users place its name anywhere in ``order`` and set its parameters as
``NAME.PARAM`` (``-o word_filter.ban=delve``, or ``word_filter.ban = [...]`` in a
card's ``[sampling]``). Each backend calls :func:`run_stage` at the stage's
position in its native chain — a custom sampler inside llama.cpp's chain, a
logits processor on transformers — so a stage means the same thing everywhere.

The contract, enforced by :func:`run_stage` on every backend:

* ``apply(logits, context, params)`` gets a **read-only** float32 vector over the
  whole vocabulary; tokens an earlier stage removed are ``-inf``. It returns a
  **new** vector of the same shape (never editing its input);
* a stage re-weights or removes candidates (``-inf``); it cannot revive a token an
  earlier stage removed (llama.cpp has already dropped it from the candidates);
* removing every candidate, NaN, or a wrong shape is a :class:`SamplingError`
  naming the stage.

Stages are pure numpy; this module imports no backend library.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, MutableSequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from chat.errors import SamplingError

STAGE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
MAX_TABLES = 8  # derived tables kept per vocabulary (one per distinct set of DRY breakers, say)
T = TypeVar("T")


class StageParams(BaseModel):
    """Base class for a stage's parameters: unknown keys are refused, values are frozen.

    Give every field a default that leaves the logits unchanged and a
    ``Field(description=...)`` naming its range; ``chat samplers`` prints them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


class Vocabulary:
    """The model's tokens as text, for stages that map words to token ids.

    Backends build one per loaded model from two callables; texts are computed on
    first use and cached (a full scan costs one pass over the vocabulary, once).
    ``token_text(id)`` is the text the token adds to an answer (a byte-level BPE
    token for " cat" reads ``" cat"``, with its leading space; control tokens read "").
    """

    def __init__(self, size: int, token_text: Callable[[int], str], tokenize: Callable[[str], list[int]]) -> None:
        self.size = int(size)
        self._token_text = token_text
        self._tokenize = tokenize
        self._texts: list[str] | None = None
        self._cache: dict[int, str] = {}
        self._tables: dict[Hashable, Any] = {}

    def token_text(self, token: int) -> str:
        if self._texts is not None:
            return self._texts[token] if 0 <= token < self.size else ""
        text = self._cache.get(token)
        if text is None:
            text = self._token_text(token) if 0 <= token < self.size else ""
            self._cache[token] = text
        return text

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` as the model would read it (no BOS, special tokens as plain text)."""
        return list(self._tokenize(text))

    def texts(self) -> list[str]:
        """``token_text`` of every id, in id order."""
        if self._texts is None:
            self._texts = [self.token_text(t) for t in range(self.size)]
        return self._texts

    def table(self, key: Hashable, build: Callable[[], T]) -> T:
        """A table derived from this vocabulary (e.g. DRY's sequence breakers), built once per ``key``.

        It is kept on the vocabulary itself, so it lives and dies with it (a cache keyed by
        ``id(vocabulary)`` could hand a new vocabulary the table of a collected one).
        """
        if key not in self._tables:
            if len(self._tables) >= MAX_TABLES:
                self._tables.clear()
            self._tables[key] = build()
        return self._tables[key]


@dataclass
class StageContext:
    """What a stage may look at besides the logits: the tokens so far and the vocabulary.

    ``tokens`` holds the prompt and the answer so far (the backend keeps it current).
    ``cache`` is the stage's own scratch space, kept for the life of the sampler
    (one per stage in a chain): precompute token sets there once.
    """

    vocabulary: Vocabulary
    tokens: MutableSequence[int] = field(default_factory=list)
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return self.vocabulary.size

    def token_text(self, token: int) -> str:
        return self.vocabulary.token_text(token)

    def tokenize(self, text: str) -> list[int]:
        return self.vocabulary.tokenize(text)

    def tail_text(self, n_tokens: int = 16) -> str:
        """The text of the last ``n_tokens`` tokens (prompt included), for matching what was just written."""
        return "".join(self.vocabulary.token_text(t) for t in self.tokens[-n_tokens:]) if n_tokens > 0 else ""


StageFunction = Callable[[np.ndarray, StageContext, Any], np.ndarray]


@dataclass(frozen=True)
class SamplerStage:
    """A sampler stage a plugin adds: ``register(SamplerStage(name, description, Params, apply))``.

    ``params`` is a pydantic model class (subclass :class:`StageParams`, or set
    ``extra="forbid"`` yourself); ``apply(logits, context, params)`` returns new logits.
    """

    name: str
    description: str
    params: type[BaseModel]
    apply: StageFunction

    def __post_init__(self) -> None:
        from chat.sampling import BUILTIN_STAGES

        if not STAGE_NAME.match(self.name):
            raise ValueError(f"sampler stage name {self.name!r}: use lowercase letters, digits and _")
        if self.name in BUILTIN_STAGES:
            raise ValueError(f"sampler stage name {self.name!r} is a built-in stage")
        if not (isinstance(self.params, type) and issubclass(self.params, BaseModel)):
            raise TypeError(f"sampler stage {self.name!r}: params must be a pydantic model class")
        if self.params.model_config.get("extra") != "forbid":
            raise TypeError(f"sampler stage {self.name!r}: its params model must set extra='forbid'")

    def validate_params(self, values: dict[str, Any] | BaseModel | None) -> BaseModel:
        """The parameters as the stage's model; a bad value is a SamplingError naming ``stage.param``."""
        if isinstance(values, self.params):
            return values
        try:
            return self.params(**dict(values or {}))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "params"
            raise SamplingError(
                f"{self.name}.{where}: {err['msg'].removeprefix('Value error, ')}",
                f"see `chat samplers` for {self.name}'s parameters",
            ) from None


def run_stage(stage: SamplerStage, logits: np.ndarray, context: StageContext, params: BaseModel) -> np.ndarray:
    """Call ``stage`` under the contract above; both backends go through here.

    ``logits`` is float32 over the vocabulary with ``-inf`` for removed tokens; it is
    handed to the stage read-only. Returns float32 logits, removed tokens still ``-inf``.
    """
    logits.flags.writeable = False
    try:
        out = stage.apply(logits, context, params)
    except SamplingError:
        raise
    except Exception as exc:
        raise SamplingError(
            f"sampler stage {stage.name!r} failed: {type(exc).__name__}: {exc}",
            "check its parameters, or remove it from `order`",
        ) from exc
    out = np.asarray(out, dtype=np.float32)
    if out.shape != logits.shape:
        raise SamplingError(
            f"sampler stage {stage.name!r} returned shape {out.shape}, expected {logits.shape}",
            "a stage returns one logit per vocabulary entry",
        )
    if np.isnan(out).any():
        raise SamplingError(f"sampler stage {stage.name!r} returned NaN logits", "return finite values or -inf")
    removed = np.isneginf(logits)
    if removed.any():
        out = np.where(removed, np.float32(-np.inf), out)
    if not np.isfinite(out).any() and np.isfinite(logits).any():
        raise SamplingError(
            f"sampler stage {stage.name!r} removed every candidate token", f"loosen {stage.name}'s parameters"
        )
    return out

"""SamplerSettings → a chain of logits processors with llama.cpp's meaning.

Which stages run, in which order, is the core's plan (:func:`chat.samplerplan.plan_sampler`);
this module maps each plan step to a processor through one table, :data:`PROCESSORS`,
and runs them: the filters in order (:mod:`.processors`, :mod:`.dry`), then the pick
(:mod:`.picks`) — the argmax at temperature 0, otherwise a draw with a
``torch.Generator`` seeded from ``seed``, or mirostat 1/2.

Backend entry points: :func:`make_sampler` and :func:`tokenizer_context`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from chat.errors import SamplingError
from chat.samplerplan import Step, plan_sampler
from chat.sampling import SamplerSettings, known_stages
from chat.stages import SamplerStage, StageContext, Vocabulary

from .dry import DryLogitsProcessor, breaker_table, dry_breaker_sequences
from .picks import DistPick, GreedyPick, MirostatLogitsProcessor, MirostatV2LogitsProcessor
from .processors import (
    DynamicTemperatureLogitsProcessor,
    LogitBiasLogitsProcessor,
    MinPLogitsProcessor,
    PenaltiesLogitsProcessor,
    PluginStageLogitsProcessor,
    StageProcessor,
    TemperatureLogitsProcessor,
    TopKLogitsProcessor,
    TopNSigmaLogitsProcessor,
    TopPLogitsProcessor,
    TypicalLogitsProcessor,
    XtcLogitsProcessor,
)

__all__ = [
    "DryLogitsProcessor",
    "DynamicTemperatureLogitsProcessor",
    "LogitBiasLogitsProcessor",
    "MinPLogitsProcessor",
    "MirostatLogitsProcessor",
    "MirostatV2LogitsProcessor",
    "PenaltiesLogitsProcessor",
    "PluginStageLogitsProcessor",
    "ProcessorSampler",
    "TemperatureLogitsProcessor",
    "TopKLogitsProcessor",
    "TopNSigmaLogitsProcessor",
    "TopPLogitsProcessor",
    "TypicalLogitsProcessor",
    "XtcLogitsProcessor",
    "dry_breaker_sequences",
    "make_sampler",
    "tokenizer_context",
]


@dataclass(frozen=True)
class ChainParts:
    """What the processor constructors need besides a step's own values."""

    generator: torch.Generator  # one per sampler: XTC and the draws share it, as llama.cpp's chain shares its seed
    context: StageContext | None  # the vocabulary: plugin stages and DRY's sequence breakers
    n_vocab: int | None

    def vocabulary(self, what: str) -> Vocabulary:
        if self.context is None:
            raise SamplingError(f"{what} needs the model's vocabulary", "the backend must pass context=")
        return self.context.vocabulary

    def vocab_size(self, what: str) -> int:
        if self.n_vocab is None:
            raise SamplingError(f"{what} needs the vocabulary size", None)
        return self.n_vocab


def _dry(step: Step, parts: ChainParts) -> StageProcessor:
    v = step.values
    breakers = breaker_table(parts.vocabulary("DRY sequence breakers"), v["breakers"]) if v["breakers"] else {}
    return DryLogitsProcessor(v["multiplier"], v["base"], v["allowed_length"], v["last_n"], breakers)


def _plugin(step: Step, parts: ChainParts) -> StageProcessor:
    context = StageContext(parts.vocabulary(f"sampler stage {step.name!r}"), tokens=[])
    return PluginStageLogitsProcessor(step.stage, step.params, context)


# Plan step kind → processor (the last step, the pick, also chooses the token).
PROCESSORS: dict[str, Callable[[Step, ChainParts], StageProcessor]] = {
    "logit-bias": lambda st, p: LogitBiasLogitsProcessor(dict(st.values["bias"]), p.vocab_size("logit_bias")),
    "penalties": lambda st, p: PenaltiesLogitsProcessor(
        st.values["last_n"], st.values["repeat"], st.values["frequency"], st.values["presence"]
    ),
    "dry": _dry,
    "top-n-sigma": lambda st, p: TopNSigmaLogitsProcessor(st.values["n"]),
    "top-k": lambda st, p: TopKLogitsProcessor(st.values["k"]),
    "typical": lambda st, p: TypicalLogitsProcessor(st.values["p"]),
    "top-p": lambda st, p: TopPLogitsProcessor(st.values["p"]),
    "min-p": lambda st, p: MinPLogitsProcessor(st.values["p"]),
    "xtc": lambda st, p: XtcLogitsProcessor(st.values["probability"], st.values["threshold"], p.generator),
    "temp": lambda st, p: TemperatureLogitsProcessor(st.values["temperature"]),
    "temp-ext": lambda st, p: DynamicTemperatureLogitsProcessor(
        st.values["temperature"], st.values["range"], st.values["exponent"]
    ),
    "plugin": _plugin,
    "greedy": lambda st, p: GreedyPick(),
    "dist": lambda st, p: DistPick(p.generator),
    "mirostat": lambda st, p: MirostatLogitsProcessor(
        p.vocab_size("mirostat 1"), st.values["tau"], st.values["eta"], st.values["m"], p.generator
    ),
    "mirostat-v2": lambda st, p: MirostatV2LogitsProcessor(st.values["tau"], st.values["eta"], p.generator),
}


class ProcessorSampler:
    """The configured chain of processors and the pick; ``sample(logits, tokens)`` / ``accept(token)``.

    ``stages`` names what runs, in order, with llama.cpp's names (as ``/info`` shows them).
    """

    def __init__(
        self,
        settings: SamplerSettings,
        plugin_stages: Mapping[str, SamplerStage] | None = None,
        context: StageContext | None = None,
        *,
        n_vocab: int | None = None,
        n_ctx: int = 1 << 30,
        final: bool = True,
    ) -> None:
        self.settings = settings
        n_vocab = n_vocab or (context.vocabulary.size if context is not None else None)
        self.plan = plan_sampler(settings, known_stages(plugin_stages), n_vocab=n_vocab, n_ctx=n_ctx)
        self.seed = self.plan.seed if self.plan.seed is not None else random.SystemRandom().randrange(2**32)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)
        parts = ChainParts(self.generator, context, n_vocab)
        self.processors: list[StageProcessor] = [PROCESSORS[step.kind](step, parts) for step in self.plan.steps]
        self.picker: Any = PROCESSORS[self.plan.pick.kind](self.plan.pick, parts) if final else None
        self.stages = self.plan.names(final)

    def apply(self, logits: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor:
        """The processed logits (float32, CPU; removed tokens ``-inf``) without picking."""
        x = logits.detach().to(dtype=torch.float32, device="cpu").reshape(-1)
        hist = list(tokens)
        for proc in self.processors:
            x = proc(hist, x)
        return x

    def sample(self, logits: torch.Tensor, tokens: Sequence[int]) -> int:
        """Pick the next token from one position's logits; ``tokens`` is the context so far (prompt included)."""
        if self.picker is None:
            raise SamplingError("this sampler was built without its pick (final=False)", "build it with final=True")
        return self.picker.pick(self.apply(logits, tokens), list(tokens))

    def accept(self, token: int) -> None:
        """Tell stateful stages (mirostat) which token was picked."""
        for proc in self.processors:
            proc.accept(token)
        if self.picker is not None:
            self.picker.accept(token)


def tokenizer_context(tokenizer: Any, n_vocab: int) -> StageContext:
    """A :class:`StageContext` over a Hugging Face tokenizer (for plugin stages and DRY's breakers).

    Build it once per loaded model and pass it to every :func:`make_sampler` call:
    the vocabulary's texts (and DRY's breaker tables) are computed on first use and kept in it.
    """

    def token_text(token: int) -> str:
        return tokenizer.decode([token], skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def tokenize(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    return StageContext(Vocabulary(n_vocab, token_text, tokenize))


def make_sampler(
    settings: SamplerSettings,
    plugin_stages: Mapping[str, SamplerStage] | None = None,
    context: StageContext | None = None,
    **kwargs: Any,
) -> ProcessorSampler:
    """The sampler for ``settings``: ``.sample(logits_1d, tokens) -> int``, ``.accept(token)``, ``.stages``.

    ``plugin_stages``: the plugin stages by name (``get_registry().samplers``); None: the installed
    plugins'. ``context`` (see :func:`tokenizer_context`) is needed for plugin stages and DRY's breakers.
    """
    return ProcessorSampler(settings, plugin_stages, context, **kwargs)

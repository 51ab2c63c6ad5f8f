"""SamplerSettings → one ordered plan of sampler steps, the same for every backend.

Every decision about *which* stages run lives here, once: logit bias first; then the
stages of ``order`` that change anything (``stage_is_active``), plugin stages at
their place; temperature 0 is no ``temp`` stage and a ``greedy`` pick (the pure
argmax); a dynamic temperature range is ``temp-ext``; mirostat 1/2 replaces the
ordered built-ins with the plugin stages (in their order), ``temp`` and the
mirostat pick, as llama.cpp's ``common_sampler_init`` does. A backend maps each
step to a native stage with one table (step kind → constructor) and decides nothing.

Step kinds are llama.cpp's stage names (``temp``, ``top-k``, ``mirostat-v2``, …),
which are also what ``/info`` shows on every backend; a plugin stage's kind is
``plugin`` and its name is the stage's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from chat.errors import SamplingError
from chat.sampling import BUILTIN_STAGES, SamplerSettings, stage_is_active, suggest

PICKS = ("greedy", "dist", "mirostat", "mirostat-v2")
HISTORY_KINDS = frozenset({"penalties", "dry", "plugin"})  # steps that read the tokens so far
MIROSTAT_M = 100  # mirostat 1: tokens used to estimate the Zipf exponent (llama.cpp's default)


@dataclass(frozen=True)
class Step:
    """One stage of the plan: ``kind`` picks the backend's constructor, ``values`` are what it needs.

    For a plugin stage ``stage`` is the registered :class:`chat.stages.SamplerStage` and
    ``params`` its validated parameters.
    """

    kind: str
    name: str
    values: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    stage: Any = None
    params: Any = None


@dataclass(frozen=True)
class SamplerPlan:
    """The stages in chain order, then the pick; ``seed`` None means a random one per sampler."""

    steps: tuple[Step, ...]
    pick: Step
    seed: int | None
    needs_history: bool  # penalties, DRY or a plugin stage: feed the prompt's tokens too

    def chain(self, final: bool = True) -> tuple[Step, ...]:
        """The steps to build; ``final=False`` leaves out the pick (to inspect the filtered logits)."""
        return (*self.steps, self.pick) if final else self.steps

    def names(self, final: bool = True) -> list[str]:
        """The stage names, in order, as ``/info`` shows them."""
        return [s.name for s in self.chain(final)]


def _step(kind: str, **values: Any) -> Step:
    return Step(kind, kind, MappingProxyType(values))


def check_logit_bias(settings: SamplerSettings, n_vocab: int) -> None:
    """Refuse a ``logit_bias`` token id this model's vocabulary does not have."""
    bad = [t for t in settings.logit_bias if not 0 <= t < n_vocab]
    if bad:
        raise SamplingError(
            f"logit_bias: token id {bad[0]} is outside the vocabulary (0..{n_vocab - 1})",
            "use ids from this model's tokenizer",
        )


def plan_sampler(
    settings: SamplerSettings,
    stages: Mapping[str, Any],
    *,
    n_vocab: int | None = None,
    n_ctx: int | None = None,
) -> SamplerPlan:
    """The plan for ``settings``; ``stages`` are the plugin stages by name (``get_registry().samplers``).

    With ``n_vocab`` the logit biases are checked against it; with ``n_ctx`` a window of
    -1 ("the whole context") becomes ``n_ctx`` tokens.
    """
    s = settings
    if n_vocab is not None:
        check_logit_bias(s, n_vocab)
    steps: list[Step] = []
    if s.logit_bias:
        steps.append(_step("logit-bias", bias=tuple(s.logit_bias.items())))
    plugins = {name: _plugin_step(s, name, stages) for name in s.order if name not in BUILTIN_STAGES}
    if s.mirostat:
        steps += plugins.values()
        steps.append(_step("temp", temperature=s.temperature))
        if s.mirostat == 1:
            pick = _step("mirostat", tau=s.mirostat_tau, eta=s.mirostat_eta, m=MIROSTAT_M)
        else:
            pick = _step("mirostat-v2", tau=s.mirostat_tau, eta=s.mirostat_eta)
    else:
        for name in s.order:
            if name in plugins:
                steps.append(plugins[name])
            elif stage_is_active(s, name):
                steps += _builtin_steps(s, name, n_ctx)
        pick = _step("greedy" if s.temperature == 0.0 else "dist")
    return SamplerPlan(tuple(steps), pick, s.seed, any(st.kind in HISTORY_KINDS for st in steps))


def _window(last_n: int, n_ctx: int | None) -> int:
    return n_ctx if last_n == -1 and n_ctx is not None else last_n


def _builtin_steps(s: SamplerSettings, name: str, n_ctx: int | None) -> list[Step]:
    """The step(s) for one active built-in stage of ``order`` (none for temperature 0: the pick is the argmax)."""
    match name:
        case "penalties":
            return [
                _step(
                    "penalties",
                    last_n=_window(s.penalty_last_n, n_ctx),
                    repeat=s.repeat_penalty,
                    frequency=s.frequency_penalty,
                    presence=s.presence_penalty,
                )
            ]
        case "dry":
            return [
                _step(
                    "dry",
                    multiplier=s.dry_multiplier,
                    base=s.dry_base,
                    allowed_length=s.dry_allowed_length,
                    last_n=_window(s.dry_penalty_last_n, n_ctx),
                    breakers=tuple(s.dry_sequence_breakers),
                )
            ]
        case "top_n_sigma":
            return [_step("top-n-sigma", n=s.top_n_sigma)]
        case "top_k":
            return [_step("top-k", k=s.top_k)]
        case "typical_p":
            return [_step("typical", p=s.typical_p)]
        case "top_p":
            return [_step("top-p", p=s.top_p)]
        case "min_p":
            return [_step("min-p", p=s.min_p)]
        case "xtc":
            return [_step("xtc", probability=s.xtc_probability, threshold=s.xtc_threshold)]
        case "temperature":
            if s.temperature == 0.0:
                return []
            if s.dynatemp_range > 0.0:
                return [
                    _step("temp-ext", temperature=s.temperature, range=s.dynatemp_range, exponent=s.dynatemp_exponent)
                ]
            return [_step("temp", temperature=s.temperature)]
    raise SamplingError(f"unknown built-in sampler stage {name!r}", None)  # pragma: no cover - BUILTIN_STAGES


def _plugin_step(s: SamplerSettings, name: str, stages: Mapping[str, Any]) -> Step:
    from chat.stages import SamplerStage

    stage = stages.get(name)
    if stage is None:
        raise SamplingError(
            f"order: unknown sampler stage {name!r}{suggest(name, list(stages) + list(BUILTIN_STAGES))}",
            "run `chat samplers` to list stages",
        )
    if not isinstance(stage, SamplerStage):
        raise SamplingError(
            f"sampler stage {name!r} is not a chat.stages.SamplerStage (got {type(stage).__name__})",
            f"its plugin must register(SamplerStage(...)); or remove {name!r} from `order`",
        )
    params = stage.validate_params(dict(s.stage_params.get(name, {})))
    return Step("plugin", name, MappingProxyType({}), stage, params)

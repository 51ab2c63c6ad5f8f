"""Sampler settings: one validated value with one meaning on every backend.

Each backend maps :class:`SamplerSettings` onto its library's native stages
(llama.cpp's sampler chain, transformers' logits processors). Every field has a
default and a value that disables it; by default every penalty and filter is
off, so ``temperature = 0`` is the pure argmax of the model's logits.

Settings arrive in layers — defaults < preset < card < REPL ``/set`` < flags —
and :func:`resolve_sampling` merges them, remembering where each value came from
so ``/info`` and ``chat samplers show`` can say so.

Plugin stages (:mod:`chat.stages`) run only where ``order`` names them. Their
parameters are set as ``STAGE.PARAM`` and land in ``stage_params``. Which plugin
stages exist is passed in, never kept here: ``resolve_sampling(layers, stages=...)``,
``SamplerSettings.model_validate(data, context={"stages": ...})``. Left out, it is
the stages the installed plugins register (:func:`loaded_stages`), so validation
does not depend on what ran before it. A stage with parameters but missing from
``order`` would be silently off, so:

* when no layer sets ``order``, :func:`resolve_sampling` inserts such a stage at
  the **front** of the default order (it then acts on the model's own logits, as
  ``logit_bias`` does, before any filter) and records the source of ``order`` as
  ``auto: STAGE has parameters (LAYER)``;
* when a layer does set ``order`` without it, that is an error naming the stage
  and both layers — and :class:`SamplerSettings` itself refuses parameters for a
  stage that is not in its ``order``.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from chat.errors import SamplingError
from chat.tomlfile import quote, shorten

# The stages a backend must implement natively, in llama.cpp's default order.
BUILTIN_STAGES: tuple[str, ...] = (
    "penalties",
    "dry",
    "top_n_sigma",
    "top_k",
    "typical_p",
    "top_p",
    "min_p",
    "xtc",
    "temperature",
)
DEFAULT_ORDER: tuple[str, ...] = BUILTIN_STAGES

LIST_FIELDS = {"stop", "order", "dry_sequence_breakers"}


class SamplerSettings(BaseModel):
    """Every sampler setting. The description of each field names its range and its "off" value."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    temperature: float = Field(0.8, ge=0.0, le=10.0, description="0 = greedy (argmax); range 0..10")
    dynatemp_range: float = Field(0.0, ge=0.0, le=10.0, description="dynamic temperature ± range; 0 = off")
    dynatemp_exponent: float = Field(1.0, gt=0.0, le=10.0, description="dynamic temperature exponent; >0")
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens; 0 = off")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling; 0 < top_p ≤ 1, 1 = off")
    min_p: float = Field(
        0.0, ge=0.0, le=1.0, description="drop tokens below min_p × the top probability; 0..1, 0 = off"
    )
    typical_p: float = Field(1.0, gt=0.0, le=1.0, description="locally typical sampling; 0 < typical_p ≤ 1, 1 = off")
    top_n_sigma: float = Field(
        -1.0, ge=-1.0, le=100.0, description="keep logits within n standard deviations of the max; ≤ 0 = off"
    )
    xtc_probability: float = Field(0.0, ge=0.0, le=1.0, description="exclude-top-choices probability; 0..1, 0 = off")
    xtc_threshold: float = Field(0.1, ge=0.0, le=1.0, description="XTC threshold; 0..1 (> 0.5 = off)")
    dry_multiplier: float = Field(0.0, ge=0.0, le=100.0, description="DRY repetition penalty strength; 0 = off")
    dry_base: float = Field(1.75, ge=1.0, le=10.0, description="DRY base; ≥ 1")
    dry_allowed_length: int = Field(2, ge=1, le=1000, description="DRY: repeats up to this length are free; ≥ 1")
    dry_penalty_last_n: int = Field(-1, ge=-1, description="DRY window in tokens; -1 = whole context, 0 = off")
    dry_sequence_breakers: tuple[str, ...] = Field(("\n", ":", '"', "*"), description="strings that reset DRY matching")
    repeat_penalty: float = Field(1.0, gt=0.0, le=10.0, description="repetition penalty; 1 = off")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="frequency penalty; -2..2, 0 = off")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="presence penalty; -2..2, 0 = off")
    penalty_last_n: int = Field(
        64, ge=-1, description="window for repeat/frequency/presence penalties; -1 = whole context, 0 = off"
    )
    mirostat: Literal[0, 1, 2] = Field(0, description="mirostat version: 0 = off, 1 or 2")
    mirostat_tau: float = Field(5.0, gt=0.0, le=100.0, description="mirostat target surprise; > 0")
    mirostat_eta: float = Field(0.1, gt=0.0, le=1.0, description="mirostat learning rate; 0 < eta ≤ 1")
    logit_bias: dict[int, float] = Field(default_factory=dict, description="token id → bias added to its logit")
    seed: int | None = Field(None, ge=0, le=2**32 - 2, description="random seed; unset = random each run")
    max_tokens: int | None = Field(None, ge=1, description="most tokens to generate; unset = until the context is full")
    stop: tuple[str, ...] = Field((), description="strings that end the answer (not included in it)")
    beams: int = Field(1, ge=1, le=8, description="beam search with N beams (2-8) instead of sampling; 1 = off")
    length_penalty: float = Field(
        1.0, ge=-10.0, le=10.0, description="beam search: score = log-prob sum / length ** this; > 0 favours longer"
    )
    order: tuple[str, ...] = Field(DEFAULT_ORDER, description="the stages, in the order they run")
    stage_params: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="settings of plugin stages: {stage: {param: value}}"
    )

    @field_validator("mirostat", mode="before")
    @classmethod
    def _mirostat_from_text(cls, value: Any) -> Any:
        """``-o mirostat=1`` and ``/set mirostat 2`` arrive as text; a Literal field does not coerce it."""
        if isinstance(value, str) and value.strip() in {"0", "1", "2"}:
            return int(value.strip())
        return value

    @field_validator("order")
    @classmethod
    def _order_names_known_stages(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        seen = set()
        for stage in value:
            if stage in seen:
                raise ValueError(f"stage {quote(stage)} is listed twice")
            seen.add(stage)
        others = [s for s in value if s not in BUILTIN_STAGES]
        if not others:
            return value
        known = set(BUILTIN_STAGES) | set(known_stages((info.context or {}).get("stages")))
        for stage in others:
            if stage not in known:
                tip = suggest(stage, sorted(known))
                raise ValueError(f"unknown stage {quote(stage)}{tip} (known: {', '.join(sorted(known))})")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _biases_are_numbers(cls, value: dict[int, float]) -> dict[int, float]:
        """NaN or +inf make every probability NaN (an empty answer that looks finished); -inf bans a token."""
        for token, bias in value.items():
            if math.isnan(bias) or bias == math.inf:
                raise ValueError(f"the bias of token {token} is {bias}; use a finite number (or -inf to ban the token)")
        return value

    @field_validator("stage_params")
    @classmethod
    def _stage_params_are_in_order(
        cls, value: dict[str, dict[str, Any]], info: ValidationInfo
    ) -> dict[str, dict[str, Any]]:
        order = info.data.get("order")
        if order is None:  # order itself was invalid; that error is reported
            return value
        for stage in value:
            if stage not in order:
                raise ValueError(
                    f"stage {quote(stage)} has parameters but is not in order; "
                    f"add it to order (e.g. order={','.join((stage, *order))}) or remove its parameters"
                )
        return value

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 and self.mirostat == 0

    def active_stages(self) -> list[str]:
        """The stages in ``order`` that change anything with these values."""
        return [s for s in self.order if stage_is_active(self, s)]


def stage_is_active(settings: SamplerSettings, stage: str) -> bool:
    """Whether ``stage`` changes the distribution with ``settings`` (built-ins only; plugin stages always run)."""
    s = settings
    match stage:
        case "penalties":
            return s.penalty_last_n != 0 and (
                s.repeat_penalty != 1.0 or s.frequency_penalty != 0.0 or s.presence_penalty != 0.0
            )
        case "dry":
            return s.dry_multiplier > 0.0 and s.dry_penalty_last_n != 0
        case "top_n_sigma":
            return s.top_n_sigma > 0.0
        case "top_k":
            return s.top_k > 0
        case "typical_p":
            return s.typical_p < 1.0
        case "top_p":
            return s.top_p < 1.0
        case "min_p":
            return s.min_p > 0.0
        case "xtc":
            return s.xtc_probability > 0.0 and s.xtc_threshold <= 0.5
        case "temperature":
            return True
    return True


# --- plugin stages -----------------------------------------------------------------


def loaded_stages() -> Mapping[str, Any]:
    """The sampler stages the installed plugins register (``chat.plugins.get_registry().samplers``).

    Used where a caller passes no ``stages``; loading the plugins here, on first need,
    makes validation the same whatever command ran first.
    """
    from chat.plugins import get_registry

    return get_registry().samplers


def known_stages(stages: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """``stages`` as given, or the installed plugins' when None."""
    return stages if stages is not None else loaded_stages()


# --- presets -------------------------------------------------------------------------

BUILTIN_PRESETS: dict[str, dict[str, Any]] = {
    "greedy": {"temperature": 0.0},
    "precise": {"temperature": 0.2, "top_k": 40, "top_p": 0.9, "min_p": 0.05},
    "balanced": {"temperature": 0.7, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.05},
    "creative": {
        "temperature": 1.0,
        "min_p": 0.05,
        "xtc_probability": 0.5,
        "xtc_threshold": 0.1,
        "dry_multiplier": 0.8,
    },
}


# --- parsing and layering ------------------------------------------------------------

FIELD_NAMES = tuple(n for n in SamplerSettings.model_fields if n != "stage_params")


def parse_value(key: str, raw: str) -> Any:
    """Turn a ``KEY=VALUE`` string from the command line into a value pydantic can validate."""
    raw = raw.strip()
    if key in LIST_FIELDS:
        if raw.startswith("["):
            try:
                return tuple(json.loads(raw))
            except json.JSONDecodeError as exc:
                raise SamplingError(
                    f"{key}={shorten(raw)}: not a JSON list ({exc.msg})", 'write a,b,c or ["a", "b"]'
                ) from None
        if key == "order":
            return tuple(p.strip() for p in raw.split(",") if p.strip())
        return tuple(_unescape(p) for p in raw.split(",")) if raw else ()
    if key == "logit_bias":
        bias: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in raw.split(","))):
            tok, sep, val = part.partition(":")
            if not sep:
                raise SamplingError(
                    f"logit_bias={shorten(raw)}: expected TOKEN_ID:BIAS pairs", "e.g. -o logit_bias=15:-100,27:2.5"
                )
            bias[tok.strip()] = val.strip()
        return bias
    if raw.lower() in {"none", "null", "off", ""} and key in {"seed", "max_tokens"}:
        return None
    return raw


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def _unescape(text: str) -> str:
    """``\\n``, ``\\t``, ``\\r`` and ``\\\\`` as typed on a command line; everything else (any script) as is."""
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)


def split_option(text: str) -> tuple[str, str]:
    """Split ``KEY=VALUE`` (as given to ``-o``) or ``KEY VALUE`` (as given to ``/set``)."""
    key, sep, value = text.partition("=")
    if not sep:
        key, _, value = text.strip().partition(" ")
    key = key.strip().replace("-", "_")
    if not key:
        raise SamplingError(f"{quote(text)}: expected KEY=VALUE", "e.g. -o top_p=0.9")
    return key, value


def normalize_layer(
    values: Mapping[str, Any], *, source: str, stages: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Check the keys of one layer and turn CLI strings into values; plugin-stage keys look like ``stage.param``.

    ``stages``: the plugin stages by name (None: the installed plugins').
    """
    out: dict[str, Any] = {}
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and key.replace("-", "_") not in FIELD_NAMES:
            # TOML `word_filter.ban = [...]` is a nested table {word_filter: {ban: [...]}}
            flat.update({f"{key}.{param}": v for param, v in value.items()})
        else:
            flat[key] = value
    for key, value in flat.items():
        key = key.replace("-", "_")
        if "." in key:
            stage, _, param = key.partition(".")
            known = known_stages(stages)
            if stage not in known:
                raise SamplingError(
                    f"{source}: unknown sampler stage {quote(stage)} in {quote(key)}",
                    f"run `chat samplers` to list stages{suggest(stage, known)}",
                )
            params = dict(out.get("stage_params", {}).get(stage, {}))
            params[param] = value
            out.setdefault("stage_params", {})[stage] = params
            continue
        if key not in FIELD_NAMES:
            raise SamplingError(
                f"{source}: unknown sampler setting {quote(key)}",
                f"run `chat samplers` to list settings{suggest(key, FIELD_NAMES)}",
            )
        out[key] = parse_value(key, value) if isinstance(value, str) else value
    return out


def suggest(name: str, choices: Sequence[str] | Mapping[str, Any]) -> str:
    """``"; did you mean 'x'?"`` for a close match among ``choices``, else ""."""
    close = difflib.get_close_matches(name, list(choices), n=1) if len(name) <= 64 else []  # a long one is no typo
    return f"; did you mean {close[0]!r}?" if close else ""


def resolve_sampling(
    layers: Sequence[tuple[str, Mapping[str, Any]]], *, stages: Mapping[str, Any] | None = None
) -> tuple[SamplerSettings, dict[str, str]]:
    """Merge layers (lowest precedence first) into settings and a map field → the layer that set it.

    ``stages``: the plugin stages by name (``get_registry().samplers``); None: the installed plugins'.
    """
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for source, values in layers:
        layer = normalize_layer(values, source=source, stages=stages)
        for key, value in layer.items():
            if key == "stage_params":
                for stage, params in value.items():
                    merged.setdefault("stage_params", {}).setdefault(stage, {}).update(params)
                    for p in params:
                        sources[f"{stage}.{p}"] = source
            else:
                merged[key] = value
                sources[key] = source
    _place_stages_with_params(merged, sources)
    try:
        settings = SamplerSettings.model_validate(merged, context={"stages": stages})
    except ValidationError as exc:
        raise _sampling_error(exc, merged, sources) from None
    _check_stage_params(settings, sources, stages)
    _check_order_keeps_set_stages(settings, sources)
    _check_beams(settings, sources)
    return settings, sources


def _check_beams(settings: SamplerSettings, sources: Mapping[str, str]) -> None:
    """Beam search replaces the sampler. A stage set in the same place as ``beams`` makes no sense with it;
    stages from other layers (a preset, a card, the defaults) are simply not used while beams are on."""
    if settings.beams <= 1:
        return
    where = sources.get("beams")
    conflicts = [
        "mirostat",
        "logit_bias",
        *(p for params in STAGE_PARAMS.values() for p in params),
        *settings.stage_params,
    ]
    clash = [name for name in conflicts if sources.get(name) == where]
    clash += [
        f"{stage}.{p}"
        for stage, ps in settings.stage_params.items()
        for p in ps
        if sources.get(f"{stage}.{p}") == where
    ]
    if clash:
        raise SamplingError(
            f"{where}: beams = {settings.beams} with {', '.join(dict.fromkeys(clash))}: beam search does not sample",
            "drop the sampler settings (beam search keeps the most likely continuations), or drop beams",
        )


# Every setting each built-in stage reads (for `chat samplers` and the order check); the rest apply to the whole chain.
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "penalties": ("repeat_penalty", "frequency_penalty", "presence_penalty", "penalty_last_n"),
    "dry": ("dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n", "dry_sequence_breakers"),
    "top_n_sigma": ("top_n_sigma",),
    "top_k": ("top_k",),
    "typical_p": ("typical_p",),
    "top_p": ("top_p",),
    "min_p": ("min_p",),
    "xtc": ("xtc_probability", "xtc_threshold"),
    "temperature": ("temperature", "dynatemp_range", "dynatemp_exponent"),
}


def _check_order_keeps_set_stages(settings: SamplerSettings, sources: Mapping[str, str]) -> None:
    """Refuse an ``order`` that leaves out a built-in stage whose settings a layer turned on."""
    if "order" not in sources or settings.mirostat:
        return
    for stage, fields in STAGE_PARAMS.items():
        if stage in settings.order or not stage_is_active(settings, stage):
            continue
        for name in fields:
            if name in sources and getattr(settings, name) != SamplerSettings.model_fields[name].default:
                raise SamplingError(
                    f"{sources['order']}: order leaves out {stage!r}, but {name}={getattr(settings, name)} "
                    f"is set ({sources[name]}) and would be ignored",
                    f"add {stage} to order, or unset {name}",
                )


def _place_stages_with_params(merged: dict[str, Any], sources: dict[str, str]) -> None:
    """Put plugin stages that have parameters into the default order; refuse them missing from a set one."""
    if not isinstance(merged.get("order", DEFAULT_ORDER), (list, tuple)):
        return  # a file's `order = 1.5`: SamplerSettings names the bad value
    order = tuple(merged.get("order", DEFAULT_ORDER))
    missing = [st for st in merged.get("stage_params", {}) if st not in order]
    if not missing:
        return
    first = missing[0]
    by = next((v for k, v in sources.items() if k.startswith(f"{first}.")), "settings")
    if "order" in merged:
        example = shorten(",".join(map(str, (first, *order))))
        raise SamplingError(
            f"{by}: {first!r} has parameters, "
            f"but order (set by {sources.get('order', 'settings')}) does not include it",
            f"add {first!r} to order (e.g. -o order={example}) or remove its parameters",
        )
    merged["order"] = (*missing, *order)
    sources["order"] = f"auto: {', '.join(missing)} {'has' if len(missing) == 1 else 'have'} parameters ({by})"


def _check_stage_params(
    settings: SamplerSettings, sources: Mapping[str, str], stages: Mapping[str, Any] | None
) -> None:
    for stage, params in settings.stage_params.items():
        spec = known_stages(stages).get(stage)
        if spec is None:
            raise SamplingError(f"unknown sampler stage {stage!r}", "run `chat samplers` to list stages")
        try:
            spec.params(**params)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"])
            raise SamplingError(
                f"{sources.get(f'{stage}.{field}', 'settings')}: {stage}.{shorten(field, 40)}: "
                f"{shorten(err['msg'], 160)}",
                f"see `chat samplers` for {stage}'s parameters",
            ) from None


def _sampling_error(exc: ValidationError, merged: Mapping[str, Any], sources: Mapping[str, str]) -> SamplingError:
    err = exc.errors()[0]
    field = str(err["loc"][0]) if err["loc"] else "settings"
    value = merged.get(field, "")
    if isinstance(value, tuple):
        value = ",".join(map(str, value[:20]))
    info = SamplerSettings.model_fields.get(field)
    allowed = info.description if info and info.description else ""
    msg = shorten(err["msg"].removeprefix("Value error, "), 200)
    where = sources.get(field, "settings")
    text = shorten(str(value) if not isinstance(value, (dict, list)) else quote(value))
    return SamplingError(f"{where}: {field}={text}: {msg}", f"allowed: {allowed}" if allowed else None)


def describe_fields() -> list[tuple[str, Any, str]]:
    """(name, default, description) for every setting, for ``chat samplers``."""
    out = []
    for name in FIELD_NAMES:
        info = SamplerSettings.model_fields[name]
        default = info.get_default(call_default_factory=True)
        out.append((name, default, info.description or ""))
    return out

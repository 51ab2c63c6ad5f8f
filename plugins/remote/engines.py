"""What each serving engine takes: sampler settings under its own names, and how it carries parameter parts.

A table per engine, read from the engines' documented request shapes:

* ``chat`` (another ``chat serve``): every setting by our own names; the persona's adapters, control
  vectors and plugin stages are applied by the server (the card is named as the model).
* ``llamacpp`` (llama.cpp's ``llama-server``, tools/server/README.md): its native sampler fields are
  accepted on ``/v1/chat/completions``; ``samplers`` is the stage order; adapters per request as
  ``lora: [{id, scale}]`` (ids from ``GET /lora-adapters``); an adapter left out runs at scale 0.
* ``vllm`` (``ChatCompletionRequest`` in vllm/entrypoints/openai/protocol.py): the OpenAI fields plus
  ``top_k``, ``min_p``, ``repetition_penalty``; one LoRA per request, chosen as the model by its
  served name (``--lora-modules NAME=PATH``); unknown fields are ignored there, so we never send them.
* ``llama-cpp-python`` (``python -m llama_cpp.server``, CreateChatCompletionRequest): OpenAI fields plus
  ``top_k``, ``min_p``, ``repeat_penalty``, ``mirostat_mode/tau/eta``.
* ``ollama`` and ``openai``: the OpenAI fields only.

Every engine gets our value of each setting it takes, "off" values included: engines have their own
defaults (llama.cpp's top_k 40, vLLM's from the model's generation_config), and ours mean "off".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chat.sampling import BUILTIN_STAGES, DEFAULT_ORDER, SamplerSettings

OPENAI_FIELDS: dict[str, str] = {
    "temperature": "temperature",
    "top_p": "top_p",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "seed": "seed",
    "stop": "stop",
    "max_tokens": "max_tokens",
    "logit_bias": "logit_bias",
}

LLAMACPP_FIELDS: dict[str, str] = OPENAI_FIELDS | {
    "dynatemp_range": "dynatemp_range",
    "dynatemp_exponent": "dynatemp_exponent",
    "top_k": "top_k",
    "min_p": "min_p",
    "typical_p": "typical_p",
    "top_n_sigma": "top_n_sigma",
    "xtc_probability": "xtc_probability",
    "xtc_threshold": "xtc_threshold",
    "dry_multiplier": "dry_multiplier",
    "dry_base": "dry_base",
    "dry_allowed_length": "dry_allowed_length",
    "dry_penalty_last_n": "dry_penalty_last_n",
    "dry_sequence_breakers": "dry_sequence_breakers",
    "repeat_penalty": "repeat_penalty",
    "penalty_last_n": "repeat_last_n",
    "mirostat": "mirostat",
    "mirostat_tau": "mirostat_tau",
    "mirostat_eta": "mirostat_eta",
    "order": "samplers",
}

VLLM_FIELDS: dict[str, str] = OPENAI_FIELDS | {
    "top_k": "top_k",
    "min_p": "min_p",
    "repeat_penalty": "repetition_penalty",
}

LLAMA_CPP_PYTHON_FIELDS: dict[str, str] = OPENAI_FIELDS | {
    "top_k": "top_k",
    "min_p": "min_p",
    "repeat_penalty": "repeat_penalty",
    "mirostat": "mirostat_mode",
    "mirostat_tau": "mirostat_tau",
    "mirostat_eta": "mirostat_eta",
}

# llama.cpp's names for our stages (common_sampler_type_from_name)
LLAMACPP_STAGES = {"typical_p": "typ_p"}


@dataclass(frozen=True)
class EngineSpec:
    name: str
    title: str  # how messages name it
    fields: dict[str, str] | None  # ours → the engine's; None = all of ours, by our names
    adapters: str  # "card" (chat serve applies the card), "per-request" (llama.cpp), "one-by-name" (vLLM), "none"
    vectors: bool
    adapter_hint: str = ""


ENGINES: dict[str, EngineSpec] = {
    "chat": EngineSpec("chat", "chat serve", None, "card", True),
    "llamacpp": EngineSpec(
        "llamacpp",
        "llama.cpp server",
        LLAMACPP_FIELDS,
        "per-request",
        False,
        "start llama-server with --lora FILE --lora-init-without-apply for each adapter "
        "(`chat personas serve-args NAME --engine llamacpp` prints them)",
    ),
    "vllm": EngineSpec(
        "vllm",
        "vLLM",
        VLLM_FIELDS,
        "one-by-name",
        False,
        "serve it with `chat personas serve-args NAME --engine vllm`; several adapters or a scale other "
        "than 1: `chat personas export NAME --merged-lora` writes one adapter",
    ),
    "llama-cpp-python": EngineSpec(
        "llama-cpp-python",
        "llama-cpp-python server",
        LLAMA_CPP_PYTHON_FIELDS,
        "none",
        False,
        "its server loads one adapter at start (--lora_path); run the card on `chat serve` or llama.cpp's server",
    ),
    "ollama": EngineSpec(
        "ollama",
        "ollama",
        OPENAI_FIELDS,
        "none",
        False,
        "ollama attaches adapters in a Modelfile: `chat personas export NAME --format modelfile`, then ollama create",
    ),
    "openai": EngineSpec(
        "openai", "OpenAI-compatible server", OPENAI_FIELDS, "none", False, "run the card on `chat serve` instead"
    ),
}

_DEFAULTS = SamplerSettings()


def _penalties(s: SamplerSettings) -> bool:
    return s.repeat_penalty != 1.0 or s.frequency_penalty != 0.0 or s.presence_penalty != 0.0


# A setting matters (must be carried or refused) when it differs from its "off" value and, for a
# setting that only tunes another, when that other one is on.
_NEEDS: dict[str, Callable[[SamplerSettings], bool]] = {
    "dynatemp_exponent": lambda s: s.dynatemp_range > 0,
    "xtc_threshold": lambda s: s.xtc_probability > 0,
    "dry_base": lambda s: s.dry_multiplier > 0,
    "dry_allowed_length": lambda s: s.dry_multiplier > 0,
    "dry_penalty_last_n": lambda s: s.dry_multiplier > 0,
    "dry_sequence_breakers": lambda s: s.dry_multiplier > 0,
    "penalty_last_n": _penalties,
    "mirostat_tau": lambda s: s.mirostat != 0,
    "mirostat_eta": lambda s: s.mirostat != 0,
    "length_penalty": lambda s: s.beams > 1,
}


def matters(settings: SamplerSettings, name: str) -> bool:
    """Whether ``name``'s value in ``settings`` changes the answer (so an engine must honour it)."""
    if name == "order":
        active = [st for st in settings.order if st in BUILTIN_STAGES and _stage_on(settings, st)]
        default = [st for st in DEFAULT_ORDER if st in active]
        return active != default or any(st not in BUILTIN_STAGES for st in settings.order)
    if name == "temperature":
        return True
    value, default = getattr(settings, name), getattr(_DEFAULTS, name)
    if value == default:
        return False
    need = _NEEDS.get(name)
    return need(settings) if need else True


def _stage_on(settings: SamplerSettings, stage: str) -> bool:
    from chat.sampling import stage_is_active

    return stage_is_active(settings, stage)


@dataclass(frozen=True)
class Request:
    body: dict[str, Any]  # sampler fields for the request body
    unsupported: tuple[str, ...]  # settings that matter but the engine does not take


def sampler_fields(engine: EngineSpec, settings: SamplerSettings) -> Request:
    """``settings`` as the request fields ``engine`` takes, and the ones that matter but it cannot carry."""
    if engine.fields is None:  # chat serve: every setting by its own name
        data = settings.model_dump(mode="json", exclude={"stage_params"})
        ours = {k: v for k, v in data.items() if v is not None}
        ours["logit_bias"] = {str(k): _finite(v) for k, v in settings.logit_bias.items()}
        for stage, params in settings.stage_params.items():
            ours.update({f"{stage}.{k}": v for k, v in params.items()})
        return Request(ours, ())
    body: dict[str, Any] = {}
    unsupported: list[str] = []
    for name in SamplerSettings.model_fields:
        if name == "stage_params":
            unsupported += [f"{stage} (a plugin stage)" for stage in settings.stage_params]
            continue
        wire = engine.fields.get(name)
        if name == "order":  # a plugin stage in the order runs only in chat's own samplers
            unsupported += [f"{st} (a plugin stage)" for st in settings.order if st not in BUILTIN_STAGES]
        if wire is None:
            if matters(settings, name):
                unsupported.append(name)
            continue
        value = _wire_value(engine.name, name, getattr(settings, name))
        if value is not None:
            body[wire] = value
    return Request(body, tuple(unsupported))


def _wire_value(engine: str, name: str, value: Any) -> Any:
    if value is None or (name in ("stop", "logit_bias") and not value):
        return None
    if name == "logit_bias":
        if engine == "llamacpp":  # [[id, bias]], false bans the token (JSON has no -inf)
            return [[int(k), False if v == -math.inf else v] for k, v in value.items()]
        return {str(k): _finite(v) for k, v in value.items()}
    if name in ("stop", "dry_sequence_breakers"):
        return list(value)
    if name == "order":
        return [LLAMACPP_STAGES.get(st, st) for st in value]
    if name == "top_k" and engine == "vllm" and value == 0:
        return -1  # vLLM's "off"
    return value


def _finite(bias: float) -> float:
    """OpenAI-style engines take biases in -100..100; -100 bans a token there."""
    return max(-100.0, min(100.0, bias))

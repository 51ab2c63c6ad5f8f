"""A persona's parameter parts on an engine: what the request carries, or one clear refusal.

``chat serve`` applies the card itself (its name is the model). llama.cpp's server takes a weighted
mix per request, by the ids ``GET /lora-adapters`` gives for its loaded files, matched by file name.
vLLM takes one adapter per request, chosen as the model by its served name (matched by the name of
the card's part or by its file), at scale 1. The others take none. Control vectors and soft prompts
travel only to ``chat serve``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from chat.persona import Persona

from .client import RemoteError
from .engines import EngineSpec


@dataclass(frozen=True)
class Attached:
    """What a request carries for the persona's parameter parts."""

    model: str | None = None  # a served name that replaces the model (vLLM adapter, chat serve card)
    body: dict[str, Any] = field(default_factory=dict)  # extra request fields (llama.cpp's lora list)
    shown: tuple[str, ...] = ()  # for /info


def _stem(path: str) -> str:
    name = PurePath(path.rstrip("/")).name
    return name.removesuffix(".gguf")


def attach(
    engine: EngineSpec, persona: Persona, where: str, adapters_on_server: Any, served: list[dict[str, Any]]
) -> Attached:
    """The request fields for ``persona``'s parts on ``engine``; a part it cannot carry is a RemoteError.

    ``adapters_on_server``: llama.cpp's ``GET /lora-adapters`` answer (None elsewhere);
    ``served``: the engine's ``/v1/models`` entries (vLLM's adapters are there).
    """
    soft = persona.soft_prompts
    if engine.vectors is False and (persona.steering or soft):
        what = "control vectors" if persona.steering else "soft prompts"
        raise RemoteError(
            f"{persona.label}: {engine.title} at {where} cannot apply {what}",
            "only `chat serve` carries them: run the card there, or pick a persona without them",
        )
    if engine.adapters == "card":
        return Attached(shown=tuple(f"{a.name}×{a.scale:g} (on the server)" for a in persona.adapters))
    if engine.adapters == "per-request":
        return _llamacpp(engine, persona, where, adapters_on_server)
    if not persona.adapters:
        return Attached()
    if engine.adapters == "one-by-name":
        return _vllm(engine, persona, where, served)
    raise RemoteError(f"{persona.label}: {engine.title} at {where} cannot apply LoRA adapters", engine.adapter_hint)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _llamacpp(engine: EngineSpec, persona: Persona, where: str, loaded: Any) -> Attached:
    # a whole-number id only (a server's odd answer is skipped, never a crash; JSON true is not an id)
    entries = [e for e in (loaded if isinstance(loaded, list) else []) if isinstance(e, dict) and _whole(e.get("id"))]
    if not entries:
        if persona.adapters:
            raise RemoteError(
                f"{persona.label}: {engine.title} at {where} has no LoRA adapters loaded", engine.adapter_hint
            )
        return Attached()
    by_file: dict[str, int] = {}
    for e in entries:
        by_file.setdefault(_stem(str(e.get("path", ""))), int(e["id"]))
    scales = {int(e["id"]): 0.0 for e in entries}  # an adapter left out would run at its server-wide scale
    shown = []
    for a in persona.adapters:
        ident = by_file.get(_stem(str(a.path)))
        if ident is None:
            raise RemoteError(
                f"{persona.label}: adapter {PurePath(a.path).name} is not loaded on {engine.title} at {where} "
                f"(it has: {', '.join(sorted(by_file)) or 'none'})",
                engine.adapter_hint,
            )
        scales[ident] += a.scale
        shown.append(f"{a.name}×{a.scale:g} (id {ident})")
    return Attached(body={"lora": [{"id": i, "scale": s} for i, s in sorted(scales.items())]}, shown=tuple(shown))


def _vllm(engine: EngineSpec, persona: Persona, where: str, served: list[dict[str, Any]]) -> Attached:
    if len(persona.adapters) > 1 or persona.adapters[0].scale != 1.0:
        parts = ", ".join(f"{a.name}×{a.scale:g}" for a in persona.adapters)
        raise RemoteError(
            f"{persona.label}: {engine.title} applies one adapter per request at scale 1 (this card has {parts})",
            f"write one merged adapter: chat personas export {persona.name} --merged-lora, and serve that",
        )
    part = persona.adapters[0]
    names = {part.name, _stem(str(part.path))}
    for m in served:
        if m.get("parent") is None:
            continue
        if m.get("id") in names or _stem(str(m.get("root") or "")) in names:
            return Attached(model=str(m["id"]), shown=(f"{part.name} (served as {m['id']})",))
    have = ", ".join(str(m.get("id")) for m in served if m.get("parent") is not None) or "none"
    raise RemoteError(
        f"{persona.label}: adapter {part.name} is not served by {engine.title} at {where} (its adapters: {have})",
        engine.adapter_hint,
    )

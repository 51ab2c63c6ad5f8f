"""The files of a made card, written into its staging folder: vector, adapter (both formats), curve, record."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from chat.errors import ChatError
from chat.make.folder import CardParts
from chat.make.lora import LoraResult, write_peft
from chat.make.training import TrainResult
from chat.make.vector import VectorResult, write_vector


def write_card(
    stage: Path,
    parts: CardParts,
    base: Any,
    vector: VectorResult | None,
    lora: LoraResult | None,
    record: dict[str, Any],
    notes: list[str],
    soft: TrainResult | None = None,
) -> CardParts:
    """Write the parts under ``stage``; the card's parts with the paths it references."""
    name = parts.name
    if vector is not None:
        rel = f"vectors/{name}.gguf"
        write_vector(stage / rel, vector.directions, base.architecture)
        parts = replace(parts, vector=rel, vector_scale=vector.scale, vector_layers=vector.layers)
    if lora is not None:
        from chat.make.chart import write_curve

        peft_rel, gguf_rel = f"adapters/{name}-peft", f"adapters/{name}.gguf"
        write_peft(stage / peft_rel, lora)
        gguf_ok = _write_gguf_adapter(stage / peft_rel, base, stage / gguf_rel, notes)
        if gguf_ok and base.is_gguf:
            parts = replace(parts, adapter=gguf_rel, other_format=peft_rel + " (PEFT folder)")
        else:
            parts = replace(parts, adapter=peft_rel, other_format=gguf_rel + " (GGUF)" if gguf_ok else None)
        train = [h["loss"] for h in lora.history]
        held = [(h["step"], h["held_loss"]) for h in lora.history if h["held_loss"] is not None]
        curve = write_curve(stage, train, held)
        record["lora"]["curve"] = curve.name
    if soft is not None:
        from chat.make.softprompt import write_soft_prompt

        peft_rel, gguf_rel = f"soft_prompts/{name}-peft", f"soft_prompts/{name}.gguf"
        write_soft_prompt(stage / peft_rel, stage / gguf_rel, soft, base, name)
        main, other = (gguf_rel, peft_rel + " (PEFT folder)") if base.is_gguf else (peft_rel, gguf_rel + " (GGUF)")
        parts = replace(parts, soft_prompt=main, soft_prompt_other=other)
        if lora is None:
            from chat.make.chart import write_curve

            train = [h["loss"] for h in soft.history]
            held = [(h["step"], h["held_loss"]) for h in soft.history if h["held_loss"] is not None]
            record["soft_prompt"]["curve"] = write_curve(stage, train, held).name
    if lora is not None or soft is not None:
        record["files"] = sorted(str(p.relative_to(stage)) for p in stage.rglob("*") if p.is_file())
    record["notes"] = notes
    (stage / "make.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return parts


def _write_gguf_adapter(peft_dir: Path, base: Any, out: Path, notes: list[str]) -> bool:
    """The llama.cpp adapter GGUF from the PEFT folder, through the one converter (chat.convert.adapter)."""
    from chat.convert.adapter import peft_to_gguf

    try:
        peft_to_gguf(peft_dir, base.shape(), out)
    except ChatError as exc:  # a family llama.cpp conversion does not know: the PEFT folder still works
        notes.append(f"no GGUF adapter: {exc.message}")
        return False
    return True

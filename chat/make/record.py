"""``make.json``: how a card's parts were made — base identity, data hash, every setting, losses, times, versions."""

from __future__ import annotations

import datetime
import platform
from dataclasses import asdict
from typing import Any

from chat.make.data import MakeData
from chat.make.lora import LoraResult, settings_dict
from chat.make.training import TrainResult
from chat.make.vector import SWEEP_PIVOT, SWEEP_SCALES, VectorResult

RECORD_VERSION = 1


def versions() -> dict[str, str]:
    """The libraries that decide the numbers (a different torch may give a different adapter)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("chat", "torch", "transformers", "peft", "gguf", "numpy", "safetensors"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def build_record(
    req: Any,
    base: Any,
    data: MakeData,
    train_idx: list[int],
    held_idx: list[int],
    vector: VectorResult | None,
    lora: LoraResult | None,
    times: dict[str, float],
    soft: TrainResult | None = None,
) -> dict[str, Any]:
    import torch

    record: dict[str, Any] = {
        "record_version": RECORD_VERSION,
        "name": req.name,
        "made": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "base": base.identity(),
        "data": {
            "path": str(data.source),
            "kind": data.kind,
            "sha256": data.sha256,
            "dialogues": len(data),
            "train": len(train_idx),
            "held_out": held_idx,
        },
        "settings": {
            "vector": req.vector,
            "lora": req.lora,
            "soft_prompt": req.soft_prompt.n_virtual if req.soft_prompt else 0,
            "held_out_fraction": req.held_out,
            "max_tokens": req.max_tokens,
            "threads": torch.get_num_threads(),
            "seed": req.lora_settings.seed,
        },
        "times": times,
        "versions": versions(),
    }
    if vector is not None:
        record["vector"] = {
            "method": req.method,
            "pairs": vector.n_pairs,
            "negatives": "files" if req.negative else "the base model's own greedy answers",
            "scale": vector.scale,
            "layers": list(vector.layers),
            "sweep_scales": list(SWEEP_SCALES),
            "sweep_pivot": SWEEP_PIVOT,
            "held_loss_without": round(vector.base_loss, 5),
            "held_loss_with": round(vector.loss, 5),
            "sweep": [{**asdict(p), "loss": round(p.loss, 5)} for p in vector.sweep],
        }
    if lora is not None:
        record["lora"] = {"settings": settings_dict(req.lora_settings), **_training(lora)}
    if soft is not None:
        from chat.make.softprompt import settings_dict as soft_settings

        record["soft_prompt"] = {"settings": soft_settings(req.soft_prompt), **_training(soft)}
    return record


def _training(result: TrainResult) -> dict[str, Any]:
    return {
        "steps": result.steps,
        "total_steps": result.total_steps,
        "best_step": result.best_step,
        "stopped_early": result.stopped_early,
        "resumed_from_step": result.resumed_from,
        "held_loss_without": round(result.base_held_loss, 5),
        "held_loss_with": round(result.best_held_loss, 5),
        "tokens": result.tokens,
        "seconds": round(result.seconds, 3),
        "step_seconds": round(result.step_seconds, 3),
        "tokens_per_s": round(result.tokens_per_s, 1),
        "step_tokens_per_s": round(result.step_tokens_per_s, 1),
        "history": result.history,
    }

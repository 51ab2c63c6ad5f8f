"""``chat personas make``: data → (control vector, LoRA) → a complete card folder with its ``make.json``.

The order is the cheap checks first (name, destination, data), then the base model, then
the parts, then one atomic write of the whole folder (:mod:`chat.make.folder`). The CLI
passes a :class:`Reporter` that draws progress; everything else is here.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from chat.errors import UsageError
from chat.make.data import Dialogue, MakeData, read_data, read_pairs, split
from chat.make.folder import MAX_EXAMPLES, CardParts, card_text, check_destination, staged
from chat.make.lora import LoraResult, LoraSettings, MemoryRefused, Progress, available_memory, estimate_memory
from chat.make.softprompt import SoftPromptSettings
from chat.make.training import TrainResult
from chat.make.vector import METHODS, VectorResult


class Reporter(Protocol):
    def line(self, text: str) -> None: ...
    def training(self, total: int) -> Any: ...  # a context manager
    def progress(self, p: Progress) -> None: ...


@dataclass(frozen=True)
class MakeRequest:
    name: str
    base: str
    data: Path
    out: Path
    vector: bool = True
    lora: bool = False
    force: bool = False
    positive: Path | None = None
    negative: Path | None = None
    method: str = "mean"
    pairs: int = 32
    held_out: float = 0.1
    max_tokens: int = 256
    lora_settings: LoraSettings = field(default_factory=LoraSettings)
    soft_prompt: SoftPromptSettings | None = None  # None: no soft prompt
    resume: bool = False
    threads: int | None = None
    memory_limit: int | None = None  # bytes; None: what the system has available
    checkpoint_root: Path | None = None


@dataclass
class MakeOutcome:
    folder: Path
    vector: VectorResult | None
    lora: LoraResult | None
    record: dict[str, Any]
    notes: list[str]
    soft_prompt: TrainResult | None = None


def check_request(req: MakeRequest) -> None:
    from chat.card import NAME_RULE, is_valid_name
    from chat.tomlfile import quote

    if not is_valid_name(req.name):
        raise UsageError(f"{quote(req.name)} is not a valid persona name", NAME_RULE)
    if not (req.vector or req.lora or req.soft_prompt):
        raise UsageError("nothing to make", "pass --vector, --lora, --soft-prompt N, or several")
    if req.method not in METHODS:
        raise UsageError(f"--method {req.method!r}: unknown", f"use {' or '.join(METHODS)}")
    if (req.positive is None) != (req.negative is None):
        raise UsageError("--positive and --negative go together", "pass both files, or neither")
    if not (0.0 < req.held_out < 0.5):
        raise UsageError(f"--held-out {req.held_out}: must be between 0 and 0.5", "0.1 holds out a tenth")
    if req.pairs < 2 or req.max_tokens < 8:
        raise UsageError("--pairs must be at least 2 and --max-tokens at least 8")
    req.lora_settings.check()
    if req.soft_prompt is not None:
        req.soft_prompt.check()
    if not req.resume:
        check_destination(req.out, req.force)


def fingerprint(base_sha: str, data: MakeData, req: MakeRequest, held: list[int], part: str = "lora") -> str:
    """What a checkpoint must match to be resumed: the base, the data, the split and every setting of the part."""
    settings = req.lora_settings if part == "lora" else req.soft_prompt
    key = {
        "base": base_sha,
        "data": data.sha256,
        "held": held,
        part: asdict(settings) if settings is not None else None,
        "max_tokens": req.max_tokens,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def make_card(req: MakeRequest, ui: Reporter) -> MakeOutcome:
    """Make the parts the request asks for and write the card; ChatErrors for everything a user can fix."""
    from chat.make.base import load_base

    check_request(req)
    started = time.perf_counter()
    data = read_data(req.data)
    train_idx, held_idx = split(len(data), req.held_out, req.lora_settings.seed)
    pairs = read_pairs(req.positive, req.negative) if req.positive and req.negative else None
    ui.line(
        f"data: {len(data)} dialogues from {data.source} ({data.kind}); {len(train_idx)} to learn from, "
        f"{len(held_idx)} held out"
    )
    base = load_base(req.base, req.threads)
    ui.line(
        f"base: {base.path.name} [{base.architecture}, {base.n_params / 1e6:.1f}M parameters, "
        f"{base.n_layers} layers] loaded in {base.load_s:.1f} s"
    )
    train = [data.dialogues[i] for i in train_idx]
    held = [data.dialogues[i] for i in held_idx]
    # The card's prompt parts: its system prompt, and examples only without a LoRA or a soft prompt (which
    # learn them instead, trained after the system prompt alone).
    examples = (
        ()
        if req.lora or req.soft_prompt
        else tuple(data.examples[:MAX_EXAMPLES])
        or tuple((d.first_prompt, d.first_answer) for d in train[:MAX_EXAMPLES])
    )
    times: dict[str, float] = {"load_s": round(base.load_s, 3)}
    notes: list[str] = []
    vector = lora = soft = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft/transformers deprecation chatter is not the user's business
        if req.lora or req.soft_prompt:
            _check_memory(base, req)
        if req.vector:
            t0 = time.perf_counter()
            vector = _vector(base, req, train, held, pairs, data.system, examples, ui)
            times["vector_s"] = round(time.perf_counter() - t0, 3)
            ui.line(
                f"vector: {vector.n_pairs} pairs, {req.method}; held-out loss {vector.base_loss:.3f} → "
                f"{vector.loss:.3f} at scale {vector.scale:g}, layers {vector.layers[0]}-{vector.layers[1]} "
                f"({times['vector_s']:.1f} s)"
            )
        if req.lora:
            lora, vector = _lora(base, req, data, train, held, held_idx, vector, ui)
            times["lora_s"] = round(lora.seconds, 3)
        if req.soft_prompt:
            soft = _soft_prompt(base, req, req.soft_prompt, data, train, held, held_idx, ui)
            times["soft_prompt_s"] = round(soft.seconds, 3)
        if vector is not None and vector.loss >= vector.base_loss:
            notes.append(
                "the vector did not lower the held-out loss at any scale tried; its [[steering]] entry has "
                "scale 0 (raise it to try the vector)"
            )
    times["total_s"] = round(time.perf_counter() - started, 3)
    from chat.make.record import build_record
    from chat.make.writing import write_card

    record = build_record(req, base, data, train_idx, held_idx, vector, lora, times, soft)
    parts = CardParts(
        name=req.name,
        description=f"Made by `chat personas make` from {data.source.name} on {base.path.name}.",
        system=data.system,
        examples=examples,
    )
    with staged(req.out, req.force) as stage:
        written = write_card(stage, parts, base, vector, lora, record, notes, soft)
        (stage / "persona.toml").write_text(card_text(written), encoding="utf-8")
    return MakeOutcome(req.out, vector, lora, record, notes, soft)


def _check_memory(base: Any, req: MakeRequest) -> None:
    config = base.model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    need = estimate_memory(
        base.n_params,
        base.hidden_size,
        int(getattr(text, "intermediate_size", 0) or 0),
        base.n_layers,
        int(text.vocab_size),
        req.lora_settings.rank if req.lora else 0,
        max(req.lora_settings.batch_size, req.soft_prompt.batch_size if req.soft_prompt else 0),
        req.max_tokens,
    )
    have = req.memory_limit if req.memory_limit is not None else available_memory()
    if need > have:
        raise MemoryRefused(
            f"training needs about {need / 2**30:.2f} GiB of memory, {have / 2**30:.2f} GiB available",
            "lower --batch-size or --max-tokens, or close other programs",
        )


def _vector(
    base: Any,
    req: MakeRequest,
    train: list[Dialogue],
    held: list[Dialogue],
    pairs: list[tuple[Dialogue, Dialogue]] | None,
    system: str,
    examples: tuple[tuple[str, str], ...],
    ui: Reporter,
) -> VectorResult:
    from chat.make.vector import make_vector

    if pairs is not None:
        pairs = pairs[: req.pairs]
        return make_vector(base, [p for p, _ in pairs], [n for _, n in pairs], held, req.method, system, examples)
    ui.line(f"vector: the base answers {min(len(train), req.pairs)} prompts neutrally, to contrast with the persona")
    return make_vector(base, train[: req.pairs], None, held, req.method, system, examples)


def _lora(
    base: Any,
    req: MakeRequest,
    data: MakeData,
    train: list[Dialogue],
    held: list[Dialogue],
    held_idx: list[int],
    vector: VectorResult | None,
    ui: Reporter,
) -> tuple[LoraResult, VectorResult | None]:
    """Train in the card's context (its system prompt first); a vector made before is re-tuned on top of the LoRA."""
    from chat.config import Paths
    from chat.make.encode import encode
    from chat.make.lora import train_lora

    s = req.lora_settings
    root = req.checkpoint_root or Paths().data_dir / "make-checkpoints"
    ckpt = root / req.name
    resume = _resume(req, ckpt)
    train_enc = [encode(base, d, data.system, max_tokens=req.max_tokens) for d in train]
    held_enc = [encode(base, d, data.system, max_tokens=req.max_tokens) for d in held]
    ui.line(
        f"lora: rank {s.rank}, alpha {s.alpha:g}, lr {s.lr:g}, {s.epochs} epochs of "
        f"{-(-len(train_enc) // s.batch_size)} batches of {s.batch_size}, seed {s.seed}"
        + (f"; resuming from {ckpt}" if resume else "")
    )
    total = -(-len(train_enc) // s.batch_size) * s.epochs
    retuned: list[VectorResult] = []

    def retune(model: Any) -> None:
        if vector is not None:
            from chat.make.vector import SWEEP_DIALOGUES

            retuned.append(_retune(base, model, vector, held_enc[:SWEEP_DIALOGUES]))

    with ui.training(total):
        result = train_lora(
            base,
            train_enc,
            held_enc,
            s,
            ckpt,
            fingerprint(base.sha256, data, req, held_idx),
            resume,
            ui.progress,
            retune,
        )
    ui.line(
        f"lora: {result.steps} steps, held-out loss {result.base_held_loss:.3f} → {result.best_held_loss:.3f} "
        f"(best at step {result.best_step}){'; stopped early' if result.stopped_early else ''}; "
        f"{result.tokens_per_s:.0f} tokens/s ({result.step_tokens_per_s:.0f} in the steps alone)"
    )
    if retuned:
        vector = retuned[0]
        ui.line(
            f"vector on top of the LoRA: scale {vector.scale:g}, layers {vector.layers[0]}-{vector.layers[1]} "
            f"(held-out loss {vector.base_loss:.3f} → {vector.loss:.3f})"
        )
    return result, vector


def _retune(base: Any, model: Any, vector: VectorResult, held: list[Any]) -> VectorResult:
    """The vector's scale and layers again, with the LoRA attached (0 when the vector no longer helps)."""
    from chat.make.vector import SWEEP_SCALES, sweep

    without, points = sweep(model, base.n_layers, base.tokenizer.pad_token_id, vector.directions, held, SWEEP_SCALES)
    best = min(points, key=lambda p: (p.loss, p.scale))
    return replace(vector, scale=best.scale, layers=best.layers, base_loss=without, loss=best.loss, sweep=tuple(points))


def _soft_prompt(
    base: Any,
    req: MakeRequest,
    settings: SoftPromptSettings,
    data: MakeData,
    train: list[Dialogue],
    held: list[Dialogue],
    held_idx: list[int],
    ui: Reporter,
) -> TrainResult:
    """Train in the card's context (its system prompt first), on the base alone (not on top of a LoRA)."""
    from chat.config import Paths
    from chat.make.encode import encode
    from chat.make.softprompt import train_soft_prompt

    root = req.checkpoint_root or Paths().data_dir / "make-checkpoints"
    ckpt = root / req.name / "soft-prompt"
    resume = _resume(req, ckpt)
    train_enc = [encode(base, d, data.system, max_tokens=req.max_tokens) for d in train]
    held_enc = [encode(base, d, data.system, max_tokens=req.max_tokens) for d in held]
    per_epoch = -(-len(train_enc) // settings.batch_size)
    ui.line(
        f"soft prompt: {settings.n_virtual} virtual tokens from "
        f"{'the system text' if settings.init == 'text' and data.system else 'drawn tokens'}, lr {settings.lr:g}, "
        f"{settings.epochs} epochs of {per_epoch} batches of {settings.batch_size}, seed {settings.seed}"
        + (f"; resuming from {ckpt}" if resume else "")
    )
    with ui.training(per_epoch * settings.epochs):
        result = train_soft_prompt(
            base,
            train_enc,
            held_enc,
            settings,
            data.system,
            ckpt,
            fingerprint(base.sha256, data, req, held_idx, "soft_prompt"),
            resume,
            ui.progress,
        )
    ui.line(
        f"soft prompt: {result.steps} steps, held-out loss {result.base_held_loss:.3f} → "
        f"{result.best_held_loss:.3f} (best at step {result.best_step})"
        f"{'; stopped early' if result.stopped_early else ''}; {result.tokens_per_s:.0f} tokens/s"
    )
    return result


def _resume(req: MakeRequest, ckpt: Path) -> bool:
    """Resume this part when asked and its checkpoint is there; a part that had finished before the
    interruption (its checkpoint removed) trains again, to the same bytes. Without any checkpoint, --resume
    is refused by the first part (the training's own message)."""
    from chat.make.training import CHECKPOINT

    if not req.resume:
        return False
    if (ckpt / CHECKPOINT).is_file():
        return True
    root = ckpt.parent if ckpt.name == "soft-prompt" else ckpt
    return not any(p.is_file() for p in (root / CHECKPOINT, root / "soft-prompt" / CHECKPOINT))

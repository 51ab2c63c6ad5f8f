"""A LoRA adapter trained with peft on the CPU: loss on the persona's tokens only, held-out early stopping.

Defaults for a few hundred short dialogues on a laptop CPU: rank 8 (alpha 16) on every
linear projection of every decoder layer (q, k, v, o, gate, up, down), AdamW at 1e-3 with a
short warm-up and cosine decay, batches of 8 (of similar lengths, with enough data), 3 epochs,
evaluated on the held-out split (its first 100) twice per epoch; training stops after 2
evaluations without improvement and keeps the best adapter. With the same ``seed`` (and thread
count) the adapter is the same, byte for byte: the LoRA init, the batches of each epoch and the
learning rate are functions of the seed and the step alone, which is also what lets an
interrupted run resume exactly.

A step computes the LM head only at the persona's positions (:mod:`chat.make.forward`): the
same loss as a plain ``model(labels=...)`` call, without the logits nobody reads.

Ctrl-C stops after the current step and writes a checkpoint (adapter, optimizer, step,
best-so-far); ``--resume`` continues from it. torch and peft are imported inside functions.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from chat.errors import ChatError, UsageError
from chat.make.encode import Encoded
from chat.make.forward import token_nll, training_loss
from chat.make.training import (
    EVAL_BATCH,
    HELD_MAX,
    InterruptedTraining,
    Progress,
    TrainResult,
    TrainSettings,
    run_training,
)

#: A trained LoRA's result (the training loop is shared with soft prompts).
LoraResult = TrainResult
__all__ = ["InterruptedTraining", "LoraResult", "LoraSettings", "MemoryRefused", "Progress", "train_lora"]

#: Hugging Face module suffixes LoRA targets: every linear projection of a decoder layer.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class MemoryRefused(ChatError):
    """Training would not fit in memory."""

    exit_code = 3


@dataclass(frozen=True)
class LoraSettings(TrainSettings):
    rank: int = 8
    alpha: float = 16.0

    def check(self, lr_flag: str = "--lr", lr_hint: str = "1e-4 … 2e-3 works for most") -> None:
        super().check(lr_flag, lr_hint)
        if self.rank < 1:
            raise UsageError("--rank must be at least 1")
        if self.alpha <= 0:
            raise UsageError("--alpha must be > 0")


def estimate_memory(
    n_params: int, hidden: int, ffn: int, n_layers: int, vocab: int, rank: int, batch_size: int, seq: int
) -> int:
    """Bytes training needs at most: float32 weights, LoRA weights with grads and Adam moments, activations, logits."""
    lora = n_layers * rank * (4 * hidden + 2 * hidden + 3 * (hidden + ffn)) * 2  # about (in+out)·r per target
    tokens = batch_size * seq
    activations = tokens * n_layers * (12 * hidden + 4 * ffn) * 4  # what autograd keeps per layer, float32
    logits = tokens * vocab * 4 * 3  # logits, their softmax and its gradient
    return int(n_params * 4 + lora * 4 * 4 + activations + logits + (300 << 20))  # + torch itself


def available_memory() -> int:
    """Bytes the system can give without swapping (MemAvailable), or a large number when unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 50


def lora_config(settings: LoraSettings) -> dict[str, Any]:
    """adapter_config.json: a plain LoRA both backends run (sorted lists, so the file is the same every time)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": sorted(TARGETS),
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
    }


def train_lora(
    base: Any,
    train: Sequence[Encoded],
    held: Sequence[Encoded],
    settings: LoraSettings,
    checkpoint_dir: Path,
    fingerprint: str,
    resume: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
    after: Callable[[Any], None] | None = None,
) -> LoraResult:
    """Train, evaluate and keep the best adapter; Ctrl-C raises InterruptedTraining after writing a checkpoint.

    ``after`` is called with the model carrying the best adapter, before the adapter is taken off again.
    """
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    settings.check()
    config = lora_config(settings)
    pad = base.tokenizer.pad_token_id
    model = base.model
    held = held[:HELD_MAX]
    base_total, base_count = token_nll(model, held, pad, EVAL_BATCH)
    torch.manual_seed(settings.seed)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=settings.rank,
            lora_alpha=settings.alpha,  # type: ignore[arg-type]  # peft takes a float (annotated int)
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
            target_modules=list(TARGETS),
        ),
    )

    trainee = _LoraTrainee(peft_model, pad, get_peft_model_state_dict, set_peft_model_state_dict)
    try:
        base_held = base_total / max(base_count, 1)
        result = run_training(
            trainee, train, held, settings, config, checkpoint_dir, fingerprint, resume, on_progress, base_held
        )
        if after is not None:
            set_peft_model_state_dict(peft_model, result.state)
            after(peft_model)
        return result
    finally:
        base.model = peft_model.unload()  # the plain base again, for whatever runs next


class _LoraTrainee:
    """The adapter's weights inside the peft model; the LM head only at the persona's positions."""

    def __init__(self, model: Any, pad: int, get_state: Any, set_state: Any) -> None:
        self.model, self.pad = model, pad
        self._get, self._set = get_state, set_state

    def parameters(self) -> list[Any]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def loss(self, rows: Sequence[Encoded]) -> tuple[Any, int]:
        return training_loss(self.model, rows, self.pad)

    def held_nll(self, held: Sequence[Encoded]) -> tuple[float, int]:
        return token_nll(self.model, held, self.pad, EVAL_BATCH)

    def state(self) -> dict[str, Any]:  # "auto" would ask the Hub whether the vocabulary changed
        return dict(self._get(self.model, save_embedding_layers=False))

    def load_state(self, state: dict[str, Any]) -> None:
        self._set(self.model, state)

    def train(self, on: bool) -> None:
        self.model.train(on)


def write_peft(folder: Path, result: LoraResult) -> Path:
    """``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's layout, byte-stable for one result)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().float() for k, v in sorted(result.state.items())}
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(result.config, indent=2, sort_keys=True) + "\n")
    return folder


def settings_dict(settings: LoraSettings) -> dict[str, Any]:
    return {**asdict(settings), "targets": list(TARGETS)}

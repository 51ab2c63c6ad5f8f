"""A soft prompt trained on the CPU: N virtual tokens in front of every prompt, the base frozen.

PEFT's causal-LM prompt tuning, trained with our own parameter (so generation never goes
through peft's prompt-tuning ``generate``): a ``[N, hidden]`` matrix put before the whole
tokenized dialogue (BOS too), unscaled, at positions 0 … N-1 (:func:`chat.make.forward.
with_soft_prompt`), the loss on the persona's tokens only. It starts from the input
embeddings of the persona's system text (repeated to N rows), or of N tokens drawn with the
seed when there is none or ``init`` is ``"vocab"``; only those N·hidden numbers are trained.

Defaults: learning rate 3e-2 (prompt tuning wants one far above a LoRA's), the LoRA's epochs,
batches, held-out evaluations, early stopping, seed, Ctrl-C checkpoint and ``--resume``
(:mod:`chat.make.training`). The card gets the soft prompt as a PEFT folder and as chat's
soft prompt GGUF (:mod:`chat.parts.softprompt`), the same numbers in both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from chat.errors import UsageError
from chat.make.encode import Encoded
from chat.make.forward import token_nll, training_loss, trunk_and_head
from chat.make.training import EVAL_BATCH, HELD_MAX, Progress, TrainResult, TrainSettings, run_training

INITS = ("text", "vocab")
STATE = "prompt_embeddings"  # PEFT's tensor name
MAX_VIRTUAL = 512  # the readers accept more; training more than this on a CPU is not what anyone wants


@dataclass(frozen=True)
class SoftPromptSettings(TrainSettings):
    lr: float = 3e-2
    n_virtual: int = 16
    init: str = "text"

    def check(self, lr_flag: str = "--soft-prompt-lr", lr_hint: str = "1e-2 … 1e-1 works for most") -> None:
        super().check(lr_flag, lr_hint)
        if not (1 <= self.n_virtual <= MAX_VIRTUAL):
            raise UsageError(f"--soft-prompt {self.n_virtual}: must be between 1 and {MAX_VIRTUAL}", "8 … 32 is usual")
        if self.init not in INITS:
            raise UsageError(f"--soft-prompt-init {self.init!r}: unknown", f"use {' or '.join(INITS)}")


def settings_dict(settings: SoftPromptSettings) -> dict[str, Any]:
    return asdict(settings)


def initial_rows(base: Any, settings: SoftPromptSettings, text: str) -> Any:
    """[n_virtual, hidden]: the embeddings of ``text``'s tokens (cycled), or of tokens drawn with the seed."""
    import torch

    trunk, _, _ = trunk_and_head(base.model)
    n = settings.n_virtual
    ids = base.tokenizer(text, add_special_tokens=False)["input_ids"] if settings.init == "text" and text else []
    if not ids:
        vocab = int(trunk.get_input_embeddings().weight.shape[0])
        special = set(base.tokenizer.all_special_ids)
        drawn = torch.randint(0, vocab, (4 * n,), generator=torch.Generator().manual_seed(settings.seed)).tolist()
        ids = [i for i in drawn if i not in special][:n] or drawn[:n]
    ids = [ids[i % len(ids)] for i in range(n)]
    with torch.no_grad():
        return trunk.get_input_embeddings()(torch.tensor(ids)).detach().clone().float()


def peft_config(settings: SoftPromptSettings, hidden: int, n_layers: int, n_heads: int) -> dict[str, Any]:
    """adapter_config.json of the PEFT prompt-tuning folder (what the writer puts there, for the record)."""
    return {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": settings.n_virtual,
        "token_dim": hidden,
        "num_layers": n_layers,
        "num_attention_heads": n_heads,
    }


def train_soft_prompt(
    base: Any,
    train: Sequence[Encoded],
    held: Sequence[Encoded],
    settings: SoftPromptSettings,
    text: str,
    checkpoint_dir: Path,
    fingerprint: str,
    resume: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
) -> TrainResult:
    """Train the soft prompt on the frozen base; the result's state is ``{"prompt_embeddings": [N, hidden]}``."""
    import torch

    settings.check()
    pad = base.tokenizer.pad_token_id
    held = held[:HELD_MAX]
    total, count = token_nll(base.model, held, pad, EVAL_BATCH)
    config = peft_config(settings, base.hidden_size, base.n_layers, _heads(base))
    frozen = [(p, p.requires_grad) for p in base.model.parameters()]
    for p, _ in frozen:  # no weight gradients: only the soft prompt learns
        p.requires_grad_(False)
    trainee = _SoftPromptTrainee(base.model, pad, torch.nn.Parameter(initial_rows(base, settings, text)))
    try:
        return run_training(
            trainee,
            train,
            held,
            settings,
            config,
            checkpoint_dir,
            fingerprint,
            resume,
            on_progress,
            total / max(count, 1),
        )
    finally:
        for p, wanted in frozen:
            p.requires_grad_(wanted)


def _heads(base: Any) -> int:
    config = base.model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "num_attention_heads", 0) or 0)


class _SoftPromptTrainee:
    def __init__(self, model: Any, pad: int, rows: Any) -> None:
        self.model, self.pad, self.rows = model, pad, rows

    def parameters(self) -> list[Any]:
        return [self.rows]

    def loss(self, rows: Sequence[Encoded]) -> tuple[Any, int]:
        return training_loss(self.model, rows, self.pad, soft=self.rows)

    def held_nll(self, held: Sequence[Encoded]) -> tuple[float, int]:
        return token_nll(self.model, held, self.pad, EVAL_BATCH, soft=self.rows.detach())

    def state(self) -> dict[str, Any]:
        return {STATE: self.rows.detach()}

    def load_state(self, state: dict[str, Any]) -> None:
        import torch

        with torch.no_grad():
            self.rows.copy_(state[STATE])

    def train(self, on: bool) -> None:
        self.model.train(on)


def write_soft_prompt(folder: Path, gguf_path: Path, result: TrainResult, base: Any, name: str) -> None:
    """The soft prompt as a PEFT prompt-tuning folder and as chat's soft prompt GGUF (the same numbers)."""
    from chat.parts.softprompt import write_gguf_soft_prompt, write_peft_soft_prompt

    values = result.state[STATE].detach().float().contiguous().numpy()
    write_peft_soft_prompt(
        folder,
        values,
        base_model=str(base.path),
        num_layers=base.n_layers,
        num_attention_heads=_heads(base),
    )
    write_gguf_soft_prompt(gguf_path, values, architecture=base.architecture, name=name)

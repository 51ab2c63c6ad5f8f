"""The training loop every trained part shares (a LoRA adapter, a soft prompt): one machinery, one behaviour.

Seeded batches (dialogues of similar length together when there is enough data), a learning
rate that is a function of the step alone (linear warm-up, cosine decay to a tenth), held-out
evaluations a few times per epoch with early stopping that keeps the best state, a progress
report after every step, and Ctrl-C: the first one stops after the current step and writes a
checkpoint (trainable state, optimizer, step, best-so-far), which ``--resume`` continues from
exactly — the same seed gives the same bytes whether or not the run was interrupted.

What is trained is a :class:`Trainee`: its parameters, its loss on a batch, its held-out
loss, and its state as tensors. torch is imported inside functions only.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from chat.errors import ChatError, UsageError
from chat.make.encode import Encoded

CHECKPOINT = "checkpoint.pt"
#: Batches whose dialogues are sorted by length together (less padding, still a shuffled order).
BUCKET_BATCHES = 8
#: Held-out dialogues per evaluation batch (no gradients: larger batches than training's).
EVAL_BATCH = 16
#: Held-out dialogues evaluated during training at most (the first of the split; ``eval`` uses all).
HELD_MAX = 100


class InterruptedTraining(ChatError):
    """Ctrl-C during training: a checkpoint was written."""

    exit_code = 130


@dataclass(frozen=True)
class TrainSettings:
    """What every training takes: the learning rate, epochs, batches, evaluations, early stopping, seed."""

    lr: float = 1e-3
    epochs: int = 3
    batch_size: int = 8
    evals_per_epoch: int = 2
    patience: int = 2  # evaluations without a better held-out loss before stopping (0: never stop early)
    seed: int = 0
    warmup: int = 5  # steps

    def check(self, lr_flag: str = "--lr", lr_hint: str = "1e-4 … 2e-3 works for most") -> None:
        for name in ("epochs", "batch_size", "evals_per_epoch"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if not (0 < self.lr < 1) or not math.isfinite(self.lr):
            raise UsageError(f"{lr_flag} {self.lr}: must be between 0 and 1", lr_hint)
        if self.patience < 0:
            raise UsageError("--patience must be ≥ 0")


@dataclass
class Progress:
    """What a running training reports after each step (the CLI draws it)."""

    step: int
    total: int
    epoch: int
    loss: float
    held_loss: float | None
    tokens_per_s: float
    elapsed_s: float


@dataclass
class TrainResult:
    state: dict[str, Any]  # the best state (tensors), as the part's writer takes it
    config: dict[str, Any]  # the part's adapter_config.json
    history: list[dict[str, Any]] = field(default_factory=list)  # {step, epoch, loss, held_loss}
    base_held_loss: float = 0.0
    best_held_loss: float = 0.0
    best_step: int = 0
    steps: int = 0
    total_steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    step_seconds: float = 0.0  # in the training steps alone (forward, backward, optimizer): no evaluations
    stopped_early: bool = False
    resumed_from: int = 0

    @property
    def tokens_per_s(self) -> float:
        """Over the whole training, evaluations included."""
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def step_tokens_per_s(self) -> float:
        """Over the training steps alone: what compares with a plain training loop."""
        return self.tokens / self.step_seconds if self.step_seconds else 0.0


class Trainee(Protocol):
    """What is trained: its parameters, its losses and its state."""

    def parameters(self) -> list[Any]: ...
    def loss(self, rows: Sequence[Encoded]) -> tuple[Any, int]: ...  # (mean loss tensor, tokens in the batch)
    def held_nll(self, held: Sequence[Encoded]) -> tuple[float, int]: ...  # (summed loss, scored tokens)
    def state(self) -> dict[str, Any]: ...  # tensors, detached (they are cloned here)
    def load_state(self, state: dict[str, Any]) -> None: ...
    def train(self, on: bool) -> None: ...


def epoch_batches(lengths: Sequence[int], settings: TrainSettings, epoch: int) -> list[list[int]]:
    """The batches of one epoch, as indices: a function of the seed and the epoch alone (resumable).

    A seeded shuffle cut into batches. With more than ``BUCKET_BATCHES`` batches of data, each
    window of that many batches of the shuffle is sorted by length before it is cut (a batch then
    holds dialogues of similar length and pads little) and the batches are shuffled again; with
    less, sorting would give every epoch the same batches, so the plain shuffle is kept.
    """
    import torch

    seed = settings.seed * 7919 + epoch
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    size, window = settings.batch_size, settings.batch_size * BUCKET_BATCHES
    if len(order) <= window:
        return [order[k : k + size] for k in range(0, len(order), size)]
    out: list[list[int]] = []
    for w in range(0, len(order), window):
        part = sorted(order[w : w + window], key=lambda i: lengths[i])
        out += [part[k : k + size] for k in range(0, len(part), size)]
    shuffle = torch.randperm(len(out), generator=torch.Generator().manual_seed(seed + 1)).tolist()
    return [out[i] for i in shuffle]


def lr_at(settings: TrainSettings, step: int, total: int) -> float:
    """Linear warm-up, then cosine decay to a tenth: a function of the step alone (resumable)."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    frac = (step - settings.warmup) / max(1, total - settings.warmup)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


class _StopFlag:
    """The first Ctrl-C asks to stop after this step; a second one stops at once."""

    def __init__(self) -> None:
        self.asked = False
        self._old: Any = None

    def __enter__(self) -> "_StopFlag":
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: Ctrl-C stays a KeyboardInterrupt
            self._old = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _clone(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in state.items()}


def run_training(
    trainee: Trainee,
    train: Sequence[Encoded],
    held: Sequence[Encoded],
    settings: TrainSettings,
    config: dict[str, Any],
    checkpoint_dir: Path,
    fingerprint: str,
    resume: bool,
    on_progress: Callable[[Progress], None] | None,
    base_held: float,
) -> TrainResult:
    """Train ``trainee``; the result holds its best state. Ctrl-C raises InterruptedTraining after a checkpoint."""
    import torch

    opt = torch.optim.AdamW(trainee.parameters(), lr=settings.lr, weight_decay=0.0)
    per_epoch = math.ceil(len(train) / settings.batch_size)
    total = per_epoch * settings.epochs
    eval_at = {max(1, round(per_epoch * (k + 1) / settings.evals_per_epoch)) for k in range(settings.evals_per_epoch)}
    result = TrainResult({}, config, base_held_loss=base_held, best_held_loss=base_held, total_steps=total)
    best_state = _clone(trainee.state())
    bad_evals, step, spent = 0, 0, 0.0
    lengths = [len(e.ids) for e in train]
    batches: list[list[int]] = []
    batches_epoch = -1
    ckpt = checkpoint_dir / CHECKPOINT
    if resume:
        saved = load_checkpoint(ckpt, fingerprint)
        trainee.load_state(saved["state"])
        opt.load_state_dict(saved["optimizer"])
        best_state = saved["best_state"]
        step, bad_evals, spent = int(saved["step"]), int(saved["bad_evals"]), float(saved["seconds"])
        result.history = json.loads(saved["history"])
        result.best_held_loss, result.best_step = float(saved["best_held_loss"]), int(saved["best_step"])
        result.tokens, result.resumed_from = int(saved["tokens"]), step
        result.step_seconds = float(saved.get("step_seconds", 0.0))
    trainee.train(True)
    started = time.perf_counter() - spent
    stopped = False
    with _StopFlag() as flag:
        while step < total and not stopped:
            epoch, pos = divmod(step, per_epoch)
            if epoch != batches_epoch:
                batches, batches_epoch = epoch_batches(lengths, settings, epoch), epoch
            rows = [train[i] for i in batches[pos]]
            for group in opt.param_groups:
                group["lr"] = lr_at(settings, step, total)
            t0 = time.perf_counter()
            loss_t, n_tokens = trainee.loss(rows)
            loss_t.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            result.step_seconds += time.perf_counter() - t0
            loss = float(loss_t.detach())
            step += 1
            result.tokens += n_tokens
            held_loss = None
            if (pos + 1) in eval_at:
                trainee.train(False)
                total_nll, count = trainee.held_nll(held)
                trainee.train(True)
                held_loss = total_nll / max(count, 1)
                if held_loss < result.best_held_loss - 1e-6:
                    result.best_held_loss, result.best_step, bad_evals = held_loss, step, 0
                    best_state = _clone(trainee.state())
                else:
                    bad_evals += 1
                stopped = settings.patience > 0 and bad_evals >= settings.patience
            result.history.append(
                {
                    "step": step,
                    "epoch": epoch + 1,
                    "loss": round(loss, 5),
                    "held_loss": None if held_loss is None else round(held_loss, 5),
                }
            )
            elapsed = time.perf_counter() - started
            if on_progress is not None:
                rate = result.tokens / elapsed if elapsed else 0.0
                on_progress(Progress(step, total, epoch + 1, loss, held_loss, rate, elapsed))
            if flag.asked and step < total and not stopped:
                _save_checkpoint(ckpt, fingerprint, trainee, opt, best_state, step, bad_evals, elapsed, result)
                raise InterruptedTraining(
                    f"interrupted at step {step}/{total}; checkpoint kept in {checkpoint_dir}",
                    "run the same command with --resume to continue",
                )
    trainee.train(False)
    result.state, result.steps, result.stopped_early = best_state, step, stopped
    result.seconds = time.perf_counter() - started
    if ckpt.exists():
        ckpt.unlink()
    return result


def _save_checkpoint(
    path: Path,
    fingerprint: str,
    trainee: Trainee,
    opt: Any,
    best_state: dict[str, Any],
    step: int,
    bad_evals: int,
    seconds: float,
    result: TrainResult,
) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    torch.save(
        {
            "fingerprint": fingerprint,
            "state": trainee.state(),
            "optimizer": opt.state_dict(),
            "best_state": best_state,
            "step": step,
            "bad_evals": bad_evals,
            "seconds": seconds,
            "history": json.dumps(result.history),
            "best_held_loss": result.best_held_loss,
            "best_step": result.best_step,
            "tokens": result.tokens,
            "step_seconds": result.step_seconds,
        },
        part,
    )
    os.replace(part, path)


def load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any]:
    """A checkpoint of this very run (same base, data and settings); only tensors and plain values are read."""
    import torch

    if not path.is_file():
        raise UsageError(f"--resume: no checkpoint at {path}", "start without --resume")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(
            f"{path}: not a usable checkpoint ({type(exc).__name__})", "delete it and start without --resume"
        ) from None
    if saved.get("fingerprint") != fingerprint:
        raise UsageError(
            f"{path}: the checkpoint is from another base, data set or settings",
            "resume with the same command line, or start without --resume",
        )
    return saved

"""A LoRA adapter trained with peft on the CPU: loss on the persona's tokens only, held-out early stopping.

Defaults for a few hundred short dialogues on a laptop CPU: rank 8 (alpha 16) on every
linear projection of every decoder layer (q, k, v, o, gate, up, down), AdamW at 1e-3 with a
short warm-up and cosine decay, batches of 8, 3 epochs, evaluated on the held-out split twice
per epoch; training stops after 2 evaluations without improvement and keeps the best
adapter. With the same ``seed`` (and thread count) the adapter is the same, byte for byte:
the LoRA init, the batch order of each epoch and the learning rate are functions of the seed
and the step alone, which is also what lets an interrupted run resume exactly.

Ctrl-C stops after the current step and writes a checkpoint (adapter, optimizer, step,
best-so-far); ``--resume`` continues from it. torch and peft are imported inside functions.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from chat.errors import ChatError, UsageError
from chat.make.encode import Encoded, batch, token_nll

#: Hugging Face module suffixes LoRA targets: every linear projection of a decoder layer.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHECKPOINT = "checkpoint.pt"


class InterruptedTraining(ChatError):
    """Ctrl-C during training: a checkpoint was written."""

    exit_code = 130


class MemoryRefused(ChatError):
    """Training would not fit in memory."""

    exit_code = 3


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    lr: float = 1e-3
    epochs: int = 3
    batch_size: int = 8
    evals_per_epoch: int = 2
    patience: int = 2  # evaluations without a better held-out loss before stopping (0: never stop early)
    seed: int = 0
    warmup: int = 5  # steps

    def check(self) -> None:
        for name in ("rank", "epochs", "batch_size", "evals_per_epoch"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if not (0 < self.lr < 1) or not math.isfinite(self.lr):
            raise UsageError(f"--lr {self.lr}: must be between 0 and 1", "1e-4 … 2e-3 works for most")
        if self.alpha <= 0 or self.patience < 0:
            raise UsageError("--alpha must be > 0 and --patience ≥ 0")


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
class LoraResult:
    state: dict[str, Any]  # peft state dict of the best adapter (keys without the adapter name)
    config: dict[str, Any]  # adapter_config.json
    history: list[dict[str, Any]] = field(default_factory=list)  # {step, epoch, loss, held_loss}
    base_held_loss: float = 0.0
    best_held_loss: float = 0.0
    best_step: int = 0
    steps: int = 0
    total_steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    stopped_early: bool = False
    resumed_from: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


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


def _lr(settings: LoraSettings, step: int, total: int) -> float:
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
    base_total, base_count = token_nll(model, held, pad)
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

    def get_state(m: Any) -> dict[str, Any]:  # "auto" would ask the Hub whether the vocabulary changed
        return get_peft_model_state_dict(m, save_embedding_layers=False)

    try:
        result = _loop(
            peft_model,
            train,
            held,
            settings,
            config,
            pad,
            checkpoint_dir,
            fingerprint,
            resume,
            on_progress,
            base_total / max(base_count, 1),
            get_state,
            set_peft_model_state_dict,
        )
        if after is not None:
            set_peft_model_state_dict(peft_model, result.state)
            after(peft_model)
        return result
    finally:
        base.model = peft_model.unload()  # the plain base again, for whatever runs next


def _loop(
    peft_model: Any,
    train: Sequence[Encoded],
    held: Sequence[Encoded],
    settings: LoraSettings,
    config: dict[str, Any],
    pad: int,
    checkpoint_dir: Path,
    fingerprint: str,
    resume: bool,
    on_progress: Callable[[Progress], None] | None,
    base_held: float,
    get_state: Any,
    set_state: Any,
) -> LoraResult:
    import torch

    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    per_epoch = math.ceil(len(train) / settings.batch_size)
    total = per_epoch * settings.epochs
    eval_at = {max(1, round(per_epoch * (k + 1) / settings.evals_per_epoch)) for k in range(settings.evals_per_epoch)}
    result = LoraResult({}, config, base_held_loss=base_held, best_held_loss=base_held, total_steps=total)
    best_state = {k: v.detach().clone() for k, v in get_state(peft_model).items()}
    bad_evals, step, spent = 0, 0, 0.0
    ckpt = checkpoint_dir / CHECKPOINT
    if resume:
        saved = load_checkpoint(ckpt, fingerprint)
        set_state(peft_model, saved["state"])
        opt.load_state_dict(saved["optimizer"])
        best_state = saved["best_state"]
        step, bad_evals, spent = int(saved["step"]), int(saved["bad_evals"]), float(saved["seconds"])
        result.history = json.loads(saved["history"])
        result.best_held_loss, result.best_step = float(saved["best_held_loss"]), int(saved["best_step"])
        result.tokens, result.resumed_from = int(saved["tokens"]), step
    peft_model.train()
    started = time.perf_counter() - spent
    stopped = False
    with _StopFlag() as flag:
        while step < total and not stopped:
            epoch, pos = divmod(step, per_epoch)
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(settings.seed * 7919 + epoch))
            rows = [train[i] for i in order[pos * settings.batch_size : (pos + 1) * settings.batch_size].tolist()]
            ids, attn, labels = batch(rows, pad)
            for group in opt.param_groups:
                group["lr"] = _lr(settings, step, total)
            out = peft_model(input_ids=ids, attention_mask=attn, labels=labels)
            out.loss.backward()
            loss = float(out.loss.detach())
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            result.tokens += int(attn.sum())
            held_loss = None
            if (pos + 1) in eval_at:
                peft_model.eval()
                total_nll, count = token_nll(peft_model, held, pad)
                peft_model.train()
                held_loss = total_nll / max(count, 1)
                if held_loss < result.best_held_loss - 1e-6:
                    result.best_held_loss, result.best_step, bad_evals = held_loss, step, 0
                    best_state = {k: v.detach().clone() for k, v in get_state(peft_model).items()}
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
                on_progress(
                    Progress(
                        step, total, epoch + 1, loss, held_loss, result.tokens / elapsed if elapsed else 0.0, elapsed
                    )
                )
            if flag.asked and step < total and not stopped:
                _save_checkpoint(
                    ckpt, fingerprint, peft_model, opt, best_state, step, bad_evals, elapsed, result, get_state
                )
                raise InterruptedTraining(
                    f"interrupted at step {step}/{total}; checkpoint kept in {checkpoint_dir}",
                    "run the same command with --resume to continue",
                )
    peft_model.eval()
    result.state, result.steps, result.stopped_early = best_state, step, stopped
    result.seconds = time.perf_counter() - started
    if ckpt.exists():
        ckpt.unlink()
    return result


def _save_checkpoint(
    path: Path,
    fingerprint: str,
    model: Any,
    opt: Any,
    best_state: dict[str, Any],
    step: int,
    bad_evals: int,
    seconds: float,
    result: LoraResult,
    get_state: Any,
) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    torch.save(
        {
            "fingerprint": fingerprint,
            "state": get_state(model),
            "optimizer": opt.state_dict(),
            "best_state": best_state,
            "step": step,
            "bad_evals": bad_evals,
            "seconds": seconds,
            "history": json.dumps(result.history),
            "best_held_loss": result.best_held_loss,
            "best_step": result.best_step,
            "tokens": result.tokens,
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

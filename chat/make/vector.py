"""A control vector from contrastive pairs: where the persona's hidden states differ from the neutral ones.

For each pair — the same prompt answered the persona's way and neutrally (the base model's
own greedy answer, or ``--negative``) — the output of every decoder layer is averaged over
the answer's tokens; the per-layer differences are reduced to one direction by their mean or
their first principal component (PCA), with the sign fixed so that a positive scale moves
toward the persona, and the length of the mean difference along it. ``direction.N`` is added
to decoder layer N's output, as llama.cpp does (layer 0 has no slot), and the file is
llama.cpp's control-vector GGUF. A small sweep over scales and layer ranges on held-out
dialogues suggests the card's ``scale`` and ``layers``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chat.make.data import Dialogue, Turn
from chat.make.encode import Encoded, encode, messages_for, token_nll

METHODS = ("mean", "pca")
SWEEP_SCALES = (0.0, 0.25, 0.5, 1.0, 2.0)  # 0: the vector may not help at all, and the card says so
NEUTRAL_TOKENS = 24  # length of the base's own answers used as the neutral side
SWEEP_DIALOGUES = 8  # held-out dialogues each sweep point is scored on (the sweep runs 20 of them)


@dataclass(frozen=True)
class SweepPoint:
    scale: float
    layers: tuple[int, int]
    loss: float


@dataclass(frozen=True)
class VectorResult:
    directions: dict[int, np.ndarray]
    scale: float
    layers: tuple[int, int]
    base_loss: float
    loss: float
    sweep: tuple[SweepPoint, ...]
    n_pairs: int


@contextlib.contextmanager
def steered(
    model: Any, directions: dict[int, np.ndarray], scale: float, layers: tuple[int, int] | None = None
) -> Iterator[None]:
    """``scale``·direction.N added to decoder layer N's output (N in the inclusive ``layers``) while inside."""
    import torch

    from chat.make.base import decoder_layers

    blocks = decoder_layers(model)
    lo, hi = layers or (1, len(blocks) - 1)
    param = next(model.parameters())
    handles = []
    for il, direction in directions.items():
        if not (lo <= il <= hi) or il >= len(blocks) or scale == 0.0:
            continue
        vec = torch.from_numpy(np.float32(scale) * direction).to(param.device, param.dtype)

        def hook(module: Any, args: Any, output: Any, vec: Any = vec) -> Any:
            if isinstance(output, tuple):
                return (output[0] + vec,) + tuple(output[1:])
            return output + vec

        handles.append(blocks[il].register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def neutral_answers(
    base: Any, dialogues: Sequence[Dialogue], max_new: int = NEUTRAL_TOKENS, batch_size: int = 16
) -> list[Dialogue]:
    """The base model's own greedy answers to each dialogue's first prompt (the neutral side of a pair)."""
    import torch

    tok, model = base.tokenizer, base.model
    out: list[Dialogue] = []
    prompts = [d.first_prompt for d in dialogues]
    eos = {i for i in (tok.eos_token_id, getattr(model.generation_config, "eos_token_id", None)) if isinstance(i, int)}
    stop_ids = sorted(
        eos | {ids[0] for s in base.template.stops if len(ids := tok(s, add_special_tokens=False)["input_ids"]) == 1}
    )
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        texts = [
            base.template.render(messages_for(Dialogue((Turn("user", p),))), add_generation_prompt=True) for p in chunk
        ]
        rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, r in enumerate(rows):  # left padding: every prompt ends where generation starts
            ids[i, width - len(r) :] = torch.tensor(r)
            attn[i, width - len(r) :] = 1
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids,
                attention_mask=attn,
                max_new_tokens=max_new,
                do_sample=False,
                eos_token_id=stop_ids or None,
                pad_token_id=tok.pad_token_id,
            )
        for prompt, row in zip(chunk, gen[:, width:].tolist(), strict=True):
            cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
            text = tok.decode(row[:cut], skip_special_tokens=True).strip() or "OK."
            out.append(Dialogue((Turn("user", prompt), Turn("assistant", text))))
    return out


def layer_means(base: Any, items: Sequence[Encoded], batch_size: int = 8) -> np.ndarray:
    """[n_items, n_layers, hidden]: each decoder layer's output averaged over each item's persona tokens."""
    import torch

    from chat.make.base import decoder_layers
    from chat.make.encode import batch

    blocks = decoder_layers(base.model)
    out = np.zeros((len(items), len(blocks), base.hidden_size), dtype=np.float32)
    captured: dict[int, Any] = {}

    def hook_for(il: int) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            captured[il] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [b.register_forward_hook(hook_for(il)) for il, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            for start in range(0, len(items), batch_size):
                chunk = [
                    e if any(e.mask) else Encoded(e.ids, (True,) * len(e.ids))
                    for e in items[start : start + batch_size]
                ]
                ids, attn, labels = batch(chunk, base.tokenizer.pad_token_id)
                base.model(input_ids=ids, attention_mask=attn)
                weights = (labels != -100).float()
                weights = weights / weights.sum(1, keepdim=True)
                for il in range(len(blocks)):
                    means = torch.einsum("bt,bth->bh", weights, captured[il].float())
                    out[start : start + len(chunk), il] = means.numpy()
    finally:
        for h in handles:
            h.remove()
    return out


def reduce_differences(pos: np.ndarray, neg: np.ndarray, method: str) -> dict[int, np.ndarray]:
    """direction.N for N = 1 … n_layers−1 from per-pair differences, signed toward the persona."""
    diffs = pos - neg  # [pairs, layers, hidden]
    out: dict[int, np.ndarray] = {}
    for il in range(1, diffs.shape[1]):
        d = diffs[:, il].astype(np.float64)
        mean = d.mean(0)
        if method == "mean":
            out[il] = mean.astype(np.float32)
            continue
        _, _, vt = np.linalg.svd(d, full_matrices=False)
        u = vt[0]
        along = float(u @ mean)
        if along < 0:  # an eigenvector's sign is arbitrary: point it from neutral to persona
            u, along = -u, -along
        out[il] = (u * along).astype(np.float32)
    return out


def orient(base: Any, directions: dict[int, np.ndarray], persona: Sequence[Encoded]) -> dict[int, np.ndarray]:
    """Flip the whole vector when its negative makes the persona's own tokens likelier than its positive.

    The hidden-state sign says where the persona's states lie; what a user means by "toward the
    persona" is its words becoming likelier, and on some models the two disagree.
    """
    pad = base.tokenizer.pad_token_id
    losses = []
    for scale in (1.0, -1.0):
        with steered(base.model, directions, scale):
            total, count = token_nll(base.model, persona, pad)
        losses.append(total / max(count, 1))
    if losses[1] < losses[0]:
        return {il: -d for il, d in directions.items()}
    return directions


def layer_ranges(n_layers: int) -> list[tuple[int, int]]:
    """Candidate inclusive ranges: all steerable layers, each half, and the middle."""
    last = n_layers - 1
    if last <= 1:
        return [(1, max(1, last))]
    mid = (1 + last) // 2
    q1, q3 = 1 + (last - 1) // 4, last - (last - 1) // 4
    ranges = [(1, last), (1, mid), (mid + 1, last), (q1, q3)]
    return list(dict.fromkeys(r for r in ranges if r[0] <= r[1]))


def sweep(
    model: Any,
    n_layers: int,
    pad: int,
    directions: dict[int, np.ndarray],
    held: Sequence[Encoded],
    scales: Sequence[float] = SWEEP_SCALES,
) -> tuple[float, list[SweepPoint]]:
    """Held-out loss of the persona's tokens at each (scale, layer range); and the loss without the vector."""
    total, count = token_nll(model, held, pad)
    base_loss = total / max(count, 1)
    points = []
    for layers in layer_ranges(n_layers):
        for scale in scales:
            with steered(model, directions, scale, layers):
                total, count = token_nll(model, held, pad)
            points.append(SweepPoint(scale, layers, total / max(count, 1)))
    return base_loss, points


def make_vector(
    base: Any,
    positives: Sequence[Dialogue],
    negatives: Sequence[Dialogue] | None,
    held: Sequence[Dialogue],
    method: str = "mean",
    system: str = "",
    examples: Sequence[tuple[str, str]] = (),
) -> VectorResult:
    """Directions from the pairs, and the (scale, layers) that lower the held-out loss most in the card's context
    (its system prompt and examples before each held-out dialogue)."""
    if negatives is None:
        negatives = neutral_answers(base, positives)
    first = [Dialogue(d.turns[:2]) if len(d.turns) >= 2 else d for d in positives]
    pos = layer_means(base, [encode(base, d) for d in first])
    neg = layer_means(base, [encode(base, d) for d in negatives])
    directions = orient(base, reduce_differences(pos, neg, method), [encode(base, d) for d in first])
    held_enc = [encode(base, d, system, examples) for d in held[:SWEEP_DIALOGUES]]
    base_loss, points = sweep(base.model, base.n_layers, base.tokenizer.pad_token_id, directions, held_enc)
    best = min(points, key=lambda p: (p.loss, p.scale))
    return VectorResult(directions, best.scale, best.layers, base_loss, best.loss, tuple(points), len(first))


def write_vector(path: str | os.PathLike[str], directions: dict[int, np.ndarray], model_hint: str) -> Path:
    """llama.cpp's control-vector GGUF (as ``llama-cvector-generator`` writes it), through the gguf package."""
    import gguf

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out), "controlvector")
    w.add_string("controlvector.model_hint", model_hint)
    w.add_int32("controlvector.layer_count", len(directions))
    for il in sorted(directions):
        w.add_tensor(f"direction.{il}", np.ascontiguousarray(directions[il], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out

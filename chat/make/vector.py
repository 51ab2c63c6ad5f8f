"""A control vector from contrastive pairs: where the persona's hidden states differ from the neutral ones.

For each pair — the same prompt answered the persona's way and neutrally (the base model's
own greedy answer, or ``--negative``) — the output of every decoder layer is averaged over
the answer's tokens; the per-layer differences are reduced to one direction by their mean or
their first principal component (PCA), with the sign fixed so that a positive scale moves
toward the persona, and the length of the mean difference along it. ``direction.N`` is added
to decoder layer N's output, as llama.cpp does (layer 0 has no slot), and the file is
llama.cpp's control-vector GGUF. A small sweep over layer ranges and scales on held-out
dialogues suggests the card's ``scale`` and ``layers``.

Cost is forward passes, so each is done once: the neutral answers are generated in left-padded
batches and their hidden states taken as they are generated; the LM head runs only where a
loss is read; the card's context in front of the held-out dialogues runs once per sweep point.
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
from chat.make.encode import EVAL_MAX_TOKENS, Encoded, encode, messages_for
from chat.make.forward import token_nll

METHODS = ("mean", "pca")
SWEEP_SCALES = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0)  # 0: the vector may not help at all, and the card says so
SWEEP_PIVOT = 0.5  # the scale the layer ranges are compared at
NEUTRAL_TOKENS = 24  # length of the base's own answers used as the neutral side
SWEEP_DIALOGUES = 8  # held-out dialogues each sweep point is scored on (the sweep runs about 7 points)
ORIENT_DIALOGUES = 16  # persona dialogues the sign of the vector is checked on


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


def _stop_ids(base: Any) -> list[int]:
    tok, model = base.tokenizer, base.model
    eos = {i for i in (tok.eos_token_id, getattr(model.generation_config, "eos_token_id", None)) if isinstance(i, int)}
    singles = {ids[0] for s in base.template.stops if len(ids := tok(s, add_special_tokens=False)["input_ids"]) == 1}
    return sorted(eos | singles)


@contextlib.contextmanager
def captured_layers(model: Any) -> Iterator[dict[int, Any]]:
    """Each decoder layer's output of the latest forward pass, by layer index, while inside."""
    from chat.make.base import decoder_layers

    captured: dict[int, Any] = {}

    def hook_for(il: int) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            captured[il] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [b.register_forward_hook(hook_for(il)) for il, b in enumerate(decoder_layers(model))]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def neutral_answers(
    base: Any, dialogues: Sequence[Dialogue], max_new: int = NEUTRAL_TOKENS, batch_size: int = 32
) -> tuple[list[Dialogue], np.ndarray]:
    """The base model's own greedy answers to each dialogue's first prompt (the neutral side of a pair), and
    [n, n_layers, hidden]: each decoder layer's output averaged over each answer's tokens (its stop token too).

    Prompts go in left-padded batches through one greedy loop with a KV cache; the hidden states
    are taken as the answers are generated, so the neutral side needs no second forward pass.
    """
    import torch

    from chat.make.forward import cache_of, trunk_and_head, with_cache

    tok = base.tokenizer
    trunk, head, _ = trunk_and_head(base.model)
    stop_ids = _stop_ids(base)
    stops = torch.tensor(stop_ids or [-1], dtype=torch.long)
    n_layers = base.n_layers
    out: list[Dialogue] = []
    means = np.zeros((len(dialogues), n_layers, base.hidden_size), dtype=np.float32)
    prompts = [d.first_prompt for d in dialogues]
    with torch.inference_mode(), captured_layers(base.model) as captured:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            texts = [
                base.template.render(messages_for(Dialogue((Turn("user", p),))), add_generation_prompt=True)
                for p in chunk
            ]
            rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for i, r in enumerate(rows):  # left padding: every prompt ends where generation starts
                ids[i, width - len(r) :] = torch.tensor(r)
                attn[i, width - len(r) :] = 1
            positions = (attn.cumsum(1) - 1).clamp(min=0)
            result = trunk(input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=True)
            past, last = cache_of(result), result.last_hidden_state[:, -1]
            sums = torch.zeros((len(rows), n_layers, base.hidden_size))
            counts = torch.zeros(len(rows))
            live = torch.ones(len(rows), dtype=torch.bool)  # rows whose answer has not ended yet
            generated = []
            for _ in range(max_new):
                token = head(last).argmax(-1)
                token = torch.where(live, token, torch.tensor(tok.pad_token_id))
                generated.append(token)
                attn = torch.cat([attn, torch.ones((len(rows), 1), dtype=attn.dtype)], dim=1)
                positions = positions[:, -1:] + 1
                result = trunk(
                    input_ids=token[:, None], attention_mask=attn, position_ids=positions, **with_cache(trunk, past)
                )
                past, last = cache_of(result), result.last_hidden_state[:, -1]
                weight = live.float()
                for il in range(n_layers):
                    sums[:, il] += weight[:, None] * captured[il][:, -1].float()
                counts += weight
                live &= ~torch.isin(token, stops)
                if not live.any():
                    break
            means[start : start + len(rows)] = (sums / counts.clamp(min=1)[:, None, None]).numpy()
            for prompt, row in zip(chunk, torch.stack(generated, 1).tolist(), strict=True):
                cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
                text = tok.decode(row[:cut], skip_special_tokens=True).strip() or "OK."
                out.append(Dialogue((Turn("user", prompt), Turn("assistant", text))))
    return out, means


def layer_means(base: Any, items: Sequence[Encoded], batch_size: int = 16) -> np.ndarray:
    """[n_items, n_layers, hidden]: each decoder layer's output averaged over each item's persona tokens."""
    import torch

    from chat.make.encode import batch
    from chat.make.forward import trunk_and_head

    trunk, _, _ = trunk_and_head(base.model)
    n_layers = base.n_layers
    out = np.zeros((len(items), n_layers, base.hidden_size), dtype=np.float32)
    with torch.inference_mode(), captured_layers(base.model) as captured:
        for start in range(0, len(items), batch_size):
            chunk = [
                e if any(e.mask) else Encoded(e.ids, (True,) * len(e.ids)) for e in items[start : start + batch_size]
            ]
            ids, attn, labels = batch(chunk, base.tokenizer.pad_token_id)
            trunk(input_ids=ids, attention_mask=attn, use_cache=False)
            weights = (labels != -100).float()
            weights = weights / weights.sum(1, keepdim=True)
            for il in range(n_layers):
                means = torch.einsum("bt,bth->bh", weights, captured[il].float())
                out[start : start + len(chunk), il] = means.numpy()
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
    pivot: float = SWEEP_PIVOT,
) -> tuple[float, list[SweepPoint]]:
    """The loss without the vector, then at the ``pivot`` scale on each candidate layer range, then up or
    down the ladder of ``scales`` on the range that did best while the loss keeps falling. The first point
    is scale 0 (no vector).

    Seven held-out evaluations on a 12-layer model instead of every (scale, range) pair's twenty: the
    range is chosen at a middling scale, and its scale found on it.
    """

    def loss(scale: float, layers: tuple[int, int] | None) -> float:
        with steered(model, directions, scale, layers):
            total, count = token_nll(model, held, pad)
        return total / max(count, 1)

    ranges = layer_ranges(n_layers)
    base_loss = loss(0.0, None)
    points = [SweepPoint(0.0, ranges[0], base_loss)]
    points += [SweepPoint(pivot, r, loss(pivot, r)) for r in ranges]
    best = min(points[1:], key=lambda p: p.loss)
    ladder = sorted({float(x) for x in scales if x > 0} | {pivot})
    at = ladder.index(pivot)
    for step in (1, -1):
        moved, j = False, at + step
        while 0 <= j < len(ladder):
            point = SweepPoint(ladder[j], best.layers, loss(ladder[j], best.layers))
            points.append(point)
            if point.loss >= best.loss:
                break
            best, moved, j = point, True, j + step
        if moved:
            break
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
    first = [Dialogue(d.turns[:2]) if len(d.turns) >= 2 else d for d in positives]
    if negatives is None:
        _, neg = neutral_answers(base, first)
    else:
        neg = layer_means(base, [encode(base, d) for d in negatives])
    persona = [encode(base, d) for d in first]
    pos = layer_means(base, persona)
    directions = orient(base, reduce_differences(pos, neg, method), persona[:ORIENT_DIALOGUES])
    held_enc = [encode(base, d, system, examples, EVAL_MAX_TOKENS) for d in held[:SWEEP_DIALOGUES]]
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

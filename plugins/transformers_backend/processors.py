"""Logits processors with llama.cpp's meaning, one class per stage (the filters and temperatures).

transformers has processors for some stages, but several mean something else
there (its top-p keeps tokens by the complement of the tail, its repetition penalty
has no window and no frequency/presence terms, its typical-p and min-p differ at the
edges) and it has no DRY, XTC, top-n-sigma, mirostat or dynamic temperature. So
every stage here follows llama.cpp's ``src/llama-sampling.cpp`` step by step, in
float32 on the CPU.

Removed tokens are ``-inf``; "the candidates" (llama.cpp's ``cur_p``) are the
finite entries. Each processor follows transformers' ``LogitsProcessor`` shape:
validation in ``__init__`` naming the value, ``__call__(input_ids, scores)``
returning new scores (1-D or a batch of rows), never editing in place.
DRY is in :mod:`.dry`, the picks (greedy, dist, mirostat) in :mod:`.picks`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from transformers.generation.logits_process import LogitsProcessor

from chat.stages import SamplerStage, StageContext, run_stage

NEG_INF = float("-inf")


def _history(input_ids: Any) -> list[int]:
    if isinstance(input_ids, list):
        return input_ids
    if input_ids is None:
        return []
    out = input_ids.tolist()
    return out[-1] if out and isinstance(out[0], list) else out


def _rows(scores: torch.Tensor, fn: Any, input_ids: Any) -> torch.Tensor:
    """Apply ``fn(row_1d, history) -> new row`` to a 1-D tensor or to each row of a 2-D one."""
    if scores.dim() == 1:
        return fn(scores, _history(input_ids))
    ids = input_ids if input_ids is not None else [None] * scores.shape[0]
    return torch.stack([fn(scores[i], _history(ids[i]) if ids[i] is not None else []) for i in range(scores.shape[0])])


def check_value(name: str, value: float, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"`{name}` has to be {allowed}, but is {value}")


def softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, dim=-1)


class StageProcessor(LogitsProcessor):
    """Base: per-row work in :meth:`row`; ``__call__`` handles batches and never edits ``scores``."""

    name = "stage"

    def __call__(self, input_ids: Any, scores: torch.Tensor) -> torch.Tensor:
        return _rows(scores, self.row, input_ids)

    def row(self, x: torch.Tensor, tokens: list[int]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def accept(self, token: int) -> None:
        """Called with the token picked after this step (mirostat learns from it)."""

    def reset(self) -> None:
        """Forget state (mirostat's mu, the RNG) as llama.cpp's reset does."""


class LogitBiasLogitsProcessor(StageProcessor):
    """Add a fixed bias to listed token ids (llama.cpp ``logit-bias``)."""

    name = "logit-bias"

    def __init__(self, bias: Mapping[int, float], n_vocab: int) -> None:
        for tok in bias:
            check_value("logit_bias", tok, 0 <= tok < n_vocab, f"a token id in 0..{n_vocab - 1}")
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def row(self, x: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        return x.index_add(0, self.ids, self.values)


class PenaltiesLogitsProcessor(StageProcessor):
    """Repetition/frequency/presence over the last ``last_n`` tokens (llama.cpp ``penalties``).

    For each token seen ``c`` times in the window: a logit ≤ 0 is multiplied by
    ``repeat``, a positive one divided by it; then ``c·frequency + presence`` is subtracted.
    """

    name = "penalties"

    def __init__(self, last_n: int, repeat: float, frequency: float, presence: float) -> None:
        check_value("penalty_last_n", last_n, last_n >= -1, "-1 (whole context) or ≥ 0")
        check_value("repeat_penalty", repeat, repeat > 0, "> 0")
        self.last_n, self.repeat, self.frequency, self.presence = last_n, repeat, frequency, presence

    def row(self, x: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        window = tokens if self.last_n == -1 else tokens[len(tokens) - self.last_n :] if self.last_n else []
        if not window:
            return x.clone()
        ids = torch.tensor(window, dtype=torch.long)
        ids = ids[(ids >= 0) & (ids < x.numel())]
        counts = torch.bincount(ids, minlength=x.numel()).to(torch.float32)
        seen = counts > 0
        scaled = torch.where(x <= 0, x * self.repeat, x / self.repeat)
        penalized = scaled - counts * self.frequency - self.presence
        return torch.where(seen, penalized, x)


class TopNSigmaLogitsProcessor(StageProcessor):
    """Keep logits within ``n`` standard deviations of the maximum (llama.cpp ``top-n-sigma``)."""

    name = "top-n-sigma"

    def __init__(self, n: float) -> None:
        check_value("top_n_sigma", n, n > 0, "> 0 (≤ 0 is off)")
        self.n = n

    def row(self, x: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        finite = torch.isfinite(x)
        if int(finite.sum()) <= 1:
            return x.clone()
        vals = x[finite]
        mx = vals.max()
        std = torch.sqrt(((vals - vals.mean()) ** 2).mean())
        return torch.where(x < mx - self.n * std, torch.tensor(NEG_INF), x)


class TopKLogitsProcessor(StageProcessor):
    """Keep the ``k`` largest logits (llama.cpp ``top-k``; exactly k, ties broken arbitrarily)."""

    name = "top-k"

    def __init__(self, k: int) -> None:
        check_value("top_k", k, isinstance(k, int) and k > 0, "a positive integer (0 is off)")
        self.k = k

    def row(self, x: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        k = min(self.k, int(torch.isfinite(x).sum()))
        if k >= x.numel() or k == 0:
            return x.clone()
        keep = torch.topk(x, k).indices
        out = torch.full_like(x, NEG_INF)
        out[keep] = x[keep]
        return out


class TypicalLogitsProcessor(StageProcessor):
    """Locally typical sampling (llama.cpp ``typical``): keep tokens whose surprise is closest to the entropy.

    Tokens sorted by ``|−log p − H|`` are kept until their probabilities sum to more than ``p``.
    """

    name = "typical"

    def __init__(self, p: float) -> None:
        check_value("typical_p", p, 0 < p <= 1, "in (0, 1]")
        self.p = p

    def row(self, x: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        idx = torch.nonzero(torch.isfinite(x)).flatten()
        probs = softmax(x[idx])
        logp = torch.log(probs)
        entropy = -(probs * logp).sum()
        shifted = (-logp - entropy).abs()
        order = torch.argsort(shifted, stable=True)
        cum = torch.cumsum(probs[order], 0)
        over = torch.nonzero(cum > self.p).flatten()
        last = int(over[0]) + 1 if over.numel() else order.numel()
        out = torch.full_like(x, NEG_INF)
        kept = idx[order[:last]]
        out[kept] = x[kept]
        return out


class TopPLogitsProcessor(StageProcessor):
    """Nucleus sampling (llama.cpp ``top-p``): the most likely tokens until their probabilities reach ``p``."""

    name = "top-p"

    def __init__(self, p: float) -> None:
        check_value("top_p", p, 0 < p <= 1, "in (0, 1]")
        self.p = p

    def row(self, x: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        if self.p >= 1.0:
            return x.clone()
        probs = softmax(x)
        sp, order = torch.sort(probs, descending=True, stable=True)
        cum = torch.cumsum(sp, 0)
        reach = torch.nonzero(cum >= self.p).flatten()
        last = int(reach[0]) + 1 if reach.numel() else int(torch.isfinite(x).sum())
        out = torch.full_like(x, NEG_INF)
        kept = order[:last]
        out[kept] = x[kept]
        return out


class MinPLogitsProcessor(StageProcessor):
    """Min-p (llama.cpp ``min-p``): drop tokens with ``p < min_p · p_max``, i.e. ``logit < max + log(min_p)``."""

    name = "min-p"

    def __init__(self, p: float) -> None:
        check_value("min_p", p, 0 < p <= 1, "in (0, 1] (0 is off)")
        self.p = p

    def row(self, x: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        floor = x.max() + math.log(self.p)
        return torch.where(x >= floor, x, torch.tensor(NEG_INF))


class XtcLogitsProcessor(StageProcessor):
    """Exclude top choices (llama.cpp ``xtc``): with chance ``probability``, drop every token
    with ``p ≥ threshold`` except the least likely of them."""

    name = "xtc"

    def __init__(self, probability: float, threshold: float, generator: torch.Generator) -> None:
        check_value("xtc_probability", probability, 0 <= probability <= 1, "in [0, 1]")
        check_value("xtc_threshold", threshold, 0 <= threshold <= 1, "in [0, 1]")
        self.probability, self.threshold, self.generator = probability, threshold, generator

    def row(self, x: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        if self.probability <= 0 or self.threshold > 0.5 or int(torch.isfinite(x).sum()) < 2:
            return x.clone()
        if float(torch.rand((), generator=self.generator)) > self.probability:
            return x.clone()
        sp, order = torch.sort(softmax(x), descending=True, stable=True)
        above = int((sp >= self.threshold).to(torch.int8).cumprod(0).sum())  # leading run over the threshold
        pos_last = above - 1
        if pos_last <= 0:
            return x.clone()
        out = x.clone()
        out[order[:pos_last]] = NEG_INF
        return out


class TemperatureLogitsProcessor(StageProcessor):
    """Divide logits by ``t`` (llama.cpp ``temp``); ``t ≤ 0`` keeps only the argmax."""

    name = "temp"

    def __init__(self, temperature: float) -> None:
        check_value("temperature", temperature, temperature >= 0, "≥ 0")
        self.t = temperature

    def row(self, x: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        return _temperature(x, self.t)


def _temperature(x: torch.Tensor, t: float) -> torch.Tensor:
    if t <= 0:
        out = torch.full_like(x, NEG_INF)
        i = int(torch.argmax(x))
        out[i] = x[i]
        return out
    return x / t


class DynamicTemperatureLogitsProcessor(StageProcessor):
    """Entropy-scaled temperature (llama.cpp ``temp-ext``): ``t ± range``, higher when the candidates are flatter.

    ``T = max(0, t − r) + 2r · (H / log n)^exponent`` over the n current candidates.
    """

    name = "temp-ext"

    def __init__(self, temperature: float, spread: float, exponent: float) -> None:
        check_value("temperature", temperature, temperature >= 0, "≥ 0")
        check_value("dynatemp_range", spread, spread >= 0, "≥ 0")
        check_value("dynatemp_exponent", exponent, exponent > 0, "> 0")
        self.t, self.spread, self.exponent = temperature, spread, exponent

    def row(self, x: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        if self.spread <= 0:
            return _temperature(x, self.t)
        n = int(torch.isfinite(x).sum())
        if n <= 1:
            return x.clone()
        lo, hi = max(0.0, self.t - self.spread), self.t + self.spread
        probs = softmax(x)
        nz = probs[probs > 0]
        entropy = float(-(nz * torch.log(nz)).sum())
        dyn = lo + (hi - lo) * (entropy / math.log(n)) ** self.exponent
        return _temperature(x, dyn)


class PluginStageLogitsProcessor(StageProcessor):
    """A plugin stage (:class:`chat.stages.SamplerStage`) as a logits processor."""

    def __init__(self, stage: SamplerStage, params: Any, context: StageContext) -> None:
        self.stage, self.params, self.context = stage, stage.validate_params(params), context
        self.name = stage.name

    def row(self, x: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        self.context.tokens = tokens
        out = run_stage(self.stage, x.detach().numpy().copy(), self.context, self.params)
        return torch.from_numpy(out)

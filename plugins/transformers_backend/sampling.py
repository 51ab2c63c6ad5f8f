"""SamplerSettings → logits processors with llama.cpp's meaning, one class per stage.

transformers has processors for some stages, but several mean something else
there (its top-p keeps tokens by the complement of the tail, its repetition penalty
has no window and no frequency/presence terms, its typical-p and min-p differ at the
edges) and it has no DRY, XTC, top-n-sigma, mirostat or dynamic temperature. So
every stage here follows llama.cpp's ``src/llama-sampling.cpp`` step by step, in
float32 on the CPU, and the chain is put together exactly as
``chat_plugins.llamacpp.sampler.build_chain`` does: logit bias, then the active
stages of ``order`` (plugin stages included), then the pick — the argmax at
temperature 0, otherwise a draw with a ``torch.Generator`` seeded from ``seed``.
Mirostat 1/2 replaces the ordered built-ins with temperature and mirostat.

Removed tokens are ``-inf``; "the candidates" (llama.cpp's ``cur_p``) are the
finite entries. Each processor follows transformers' ``LogitsProcessor`` shape:
validation in ``__init__`` naming the value, ``__call__(input_ids, scores)``
returning new scores (1-D or a batch of rows), never editing in place.
Random draws use torch's generator, so a seed reproduces text on this backend;
the same seed on llama.cpp (mt19937) gives other, equally reproducible, text.

Backend entry point: :func:`make_sampler`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers.generation.logits_process import LogitsProcessor

from chat.errors import SamplingError
from chat.sampling import BUILTIN_STAGES, SamplerSettings, plugin_stages, stage_is_active
from chat.stages import SamplerStage, StageContext, Vocabulary, run_stage

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


def _check(name: str, value: float, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"`{name}` has to be {allowed}, but is {value}")


def _softmax(x: torch.Tensor) -> torch.Tensor:
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
            _check("logit_bias", tok, 0 <= tok < n_vocab, f"a token id in 0..{n_vocab - 1}")
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
        _check("penalty_last_n", last_n, last_n >= -1, "-1 (whole context) or ≥ 0")
        _check("repeat_penalty", repeat, repeat > 0, "> 0")
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


def dry_breaker_sequences(vocabulary: Vocabulary, breakers: Sequence[str]) -> dict[int, list[tuple[int, ...]]]:
    """llama.cpp's DRY sequence-breaker table: head token → tails (``get_overlapping_token_sequences``).

    A token containing a breaker is a single-token breaker (empty tail); a token whose
    end overlaps a breaker's start heads the tokenization of the breaker's rest
    (at most 20 tokens). Breakers are cut to 40 characters, empty ones skipped.
    """
    table: dict[int, list[tuple[int, ...]]] = {}
    texts = [t.encode("utf-8", errors="surrogateescape") for t in vocabulary.texts()] if breakers else []
    for breaker in breakers:
        raw = breaker.encode("utf-8")[:40]
        if not raw:
            continue
        for tok, word in enumerate(texts):
            seqs = table.setdefault(tok, [])
            if raw in word:
                if () not in seqs:
                    seqs.append(())
                continue
            pos = word.find(raw[:1])
            while pos != -1:
                i = 1
                match = True
                while i < len(raw) and pos + i < len(word):
                    if word[pos + i] != raw[i]:
                        match = False
                        break
                    i += 1
                if match:
                    tail = tuple(vocabulary.tokenize(raw[i:].decode("utf-8", errors="replace")))[:20]
                    if tail not in seqs:
                        seqs.append(tail)
                pos = word.find(raw[:1], pos + 1)
            if not seqs:
                del table[tok]
    return table


class DryLogitsProcessor(StageProcessor):
    """DRY ("don't repeat yourself", llama.cpp ``dry``): penalise tokens that would extend a repeat.

    If the last ``n`` tokens also occur earlier followed by token ``t`` and
    ``n ≥ allowed_length``, ``t`` loses ``multiplier · base^(n − allowed_length)``.
    Matching never crosses a sequence breaker (``breakers``: head token → tails).
    """

    name = "dry"

    def __init__(
        self, multiplier: float, base: float, allowed_length: int, last_n: int,
        breakers: Mapping[int, Sequence[tuple[int, ...]]] | None = None, n_ctx: int = 1 << 30,
    ) -> None:
        _check("dry_multiplier", multiplier, multiplier >= 0, "≥ 0")
        _check("dry_base", base, base >= 1.0, "≥ 1")
        _check("dry_allowed_length", allowed_length, allowed_length >= 1, "≥ 1")
        _check("dry_penalty_last_n", last_n, last_n >= -1, "-1 (whole context) or ≥ 0")
        self.multiplier, self.base, self.allowed_length = multiplier, base, allowed_length
        self.last_n = n_ctx if last_n == -1 else last_n
        self.breakers = {k: list(v) for k, v in (breakers or {}).items()}
        self.max_exponent = int(88.7228391 / math.log(base)) if base > 1.000001 else 0

    def row(self, x: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        if self.multiplier == 0.0 or self.last_n == 0:
            return x.clone()
        n = min(len(tokens), self.last_n)
        if n <= self.allowed_length:
            return x.clone()
        last = tokens[len(tokens) - n :]

        def rat(i: int) -> int:  # i-th token from the end
            return last[n - 1 - i]

        # 1. the nearest sequence breaker limits how far back a repeat may reach
        rep_limit = n
        for i in range(n):
            tails = self.breakers.get(rat(i))
            if not tails:
                continue
            longest = -1
            for tail in tails:
                k = len(tail)
                if longest < k <= i and all(tail[o] == rat(i - o - 1) for o in range(k)):
                    longest = k
            if longest >= 0:
                rep_limit = i - longest
                break
        if rep_limit < self.allowed_length:
            return x.clone()
        # 2. reverse Z-algorithm: repeat[last - k] = length of the suffix that also ends k tokens earlier
        repeat = [0] * n
        lt = rt = 0
        for k in range(1, n):
            if k > rt:
                m = 0
                while m + k < n and rat(m) == rat(m + k):
                    m += 1
                repeat[n - 1 - k] = min(m, rep_limit)
                if m > 0:
                    lt, rt = k, k + m - 1
            else:
                p = k - lt
                right = rt - k + 1
                if repeat[n - 1 - p] < right:
                    repeat[n - 1 - k] = min(repeat[n - 1 - p], rep_limit)
                else:
                    i = rt + 1
                    while i < n and rat(i) == rat(i - k):
                        i += 1
                    repeat[n - 1 - k] = min(i - k, rep_limit)
                    lt, rt = k, i - 1
        # 3. the token after each long-enough repeat would extend it
        longest_for: dict[int, int] = {}
        for i in range(n - 1):
            length = repeat[i]
            if length >= self.allowed_length:
                tok = rat(n - 2 - i)
                if longest_for.get(tok, -1) < length:
                    longest_for[tok] = length
        # 4. penalties (single-token breakers are never penalised)
        out = x.clone()
        for tok, length in longest_for.items():
            if not 0 <= tok < x.numel() or () in self.breakers.get(tok, ()):
                continue
            exp = length - self.allowed_length
            if self.max_exponent > 0 and exp > self.max_exponent:
                exp = self.max_exponent
            out[tok] = out[tok] - self.multiplier * self.base**exp
        return out


class TopNSigmaLogitsProcessor(StageProcessor):
    """Keep logits within ``n`` standard deviations of the maximum (llama.cpp ``top-n-sigma``)."""

    name = "top-n-sigma"

    def __init__(self, n: float) -> None:
        _check("top_n_sigma", n, n > 0, "> 0 (≤ 0 is off)")
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
        _check("top_k", k, isinstance(k, int) and k > 0, "a positive integer (0 is off)")
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
        _check("typical_p", p, 0 < p <= 1, "in (0, 1]")
        self.p = p

    def row(self, x: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        idx = torch.nonzero(torch.isfinite(x)).flatten()
        probs = _softmax(x[idx])
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
        _check("top_p", p, 0 < p <= 1, "in (0, 1]")
        self.p = p

    def row(self, x: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        if self.p >= 1.0:
            return x.clone()
        probs = _softmax(x)
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
        _check("min_p", p, 0 < p <= 1, "in (0, 1] (0 is off)")
        self.p = p

    def row(self, x: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        floor = x.max() + math.log(self.p)
        return torch.where(x >= floor, x, torch.tensor(NEG_INF))


class XtcLogitsProcessor(StageProcessor):
    """Exclude top choices (llama.cpp ``xtc``): with chance ``probability``, drop every token
    with ``p ≥ threshold`` except the least likely of them."""

    name = "xtc"

    def __init__(self, probability: float, threshold: float, generator: torch.Generator) -> None:
        _check("xtc_probability", probability, 0 <= probability <= 1, "in [0, 1]")
        _check("xtc_threshold", threshold, 0 <= threshold <= 1, "in [0, 1]")
        self.probability, self.threshold, self.generator = probability, threshold, generator

    def row(self, x: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        if self.probability <= 0 or self.threshold > 0.5 or int(torch.isfinite(x).sum()) < 2:
            return x.clone()
        if float(torch.rand((), generator=self.generator)) > self.probability:
            return x.clone()
        sp, order = torch.sort(_softmax(x), descending=True, stable=True)
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
        _check("temperature", temperature, temperature >= 0, "≥ 0")
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
        _check("temperature", temperature, temperature >= 0, "≥ 0")
        _check("dynatemp_range", spread, spread >= 0, "≥ 0")
        _check("dynatemp_exponent", exponent, exponent > 0, "> 0")
        self.t, self.spread, self.exponent = temperature, spread, exponent

    def row(self, x: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        if self.spread <= 0:
            return _temperature(x, self.t)
        n = int(torch.isfinite(x).sum())
        if n <= 1:
            return x.clone()
        lo, hi = max(0.0, self.t - self.spread), self.t + self.spread
        probs = _softmax(x)
        nz = probs[probs > 0]
        entropy = float(-(nz * torch.log(nz)).sum())
        dyn = lo + (hi - lo) * (entropy / math.log(n)) ** self.exponent
        return _temperature(x, dyn)


class MirostatLogitsProcessor(StageProcessor):
    """Mirostat 1 (llama.cpp ``mirostat``): keep the top k, k from the estimated Zipf exponent and ``mu``;
    after the pick, ``mu −= eta · (surprise − tau)``. ``mu`` starts at ``2·tau``."""

    name = "mirostat"

    def __init__(self, n_vocab: int, tau: float, eta: float, m: int = 100) -> None:
        _check("mirostat_tau", tau, tau > 0, "> 0")
        _check("mirostat_eta", eta, eta > 0, "> 0")
        self.n_vocab, self.tau, self.eta, self.m = n_vocab, tau, eta, m
        self.mu = 2.0 * tau
        self._last: torch.Tensor | None = None

    def reset(self) -> None:
        self.mu = 2.0 * self.tau

    def row(self, x: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        sp, order = torch.sort(_softmax(x), descending=True, stable=True)
        size = int(torch.isfinite(x).sum())
        num = den = 0.0
        for i in range(min(self.m - 1, size - 1)):
            t_i = math.log((i + 2) / (i + 1))
            b_i = math.log(float(sp[i]) / float(sp[i + 1]))
            num += t_i * b_i
            den += t_i * t_i
        s_hat = num / den if den else 0.0
        eps = s_hat - 1
        try:
            k = ((eps * 2**self.mu) / (1 - self.n_vocab ** (-eps))) ** (1 / s_hat)
            k = int(k) if math.isfinite(k) else size
        except (ZeroDivisionError, OverflowError, ValueError):
            k = size
        k = max(1, min(k, size))
        out = torch.full_like(x, NEG_INF)
        out[order[:k]] = x[order[:k]]
        self._last = out
        return out

    def accept(self, token: int) -> None:
        if self._last is not None:
            p = float(_softmax(self._last)[token])
            self.mu -= self.eta * (-math.log2(p) - self.tau) if p > 0 else 0.0
            self._last = None


class MirostatV2LogitsProcessor(MirostatLogitsProcessor):
    """Mirostat 2 (llama.cpp ``mirostat-v2``): keep the most likely tokens whose surprise ``−log2 p ≤ mu``
    (at least one); after the pick, ``mu −= eta · (surprise − tau)``."""

    name = "mirostat-v2"

    def __init__(self, tau: float, eta: float) -> None:
        super().__init__(0, tau, eta)

    def row(self, x: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        sp, order = torch.sort(_softmax(x), descending=True, stable=True)
        over = torch.nonzero(-torch.log2(sp) > self.mu).flatten()
        k = max(1, int(over[0]) if over.numel() else int(torch.isfinite(x).sum()))
        out = torch.full_like(x, NEG_INF)
        out[order[:k]] = x[order[:k]]
        self._last = out
        return out


class PluginStageLogitsProcessor(StageProcessor):
    """A plugin stage (:class:`chat.stages.SamplerStage`) as a logits processor."""

    def __init__(self, stage: SamplerStage, params: Any, context: StageContext) -> None:
        self.stage, self.params, self.context = stage, stage.validate_params(params), context
        self.name = stage.name

    def row(self, x: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        self.context.tokens = tokens
        out = run_stage(self.stage, x.detach().numpy().copy(), self.context, self.params)
        return torch.from_numpy(out)


# --- the chain -------------------------------------------------------------------------


class ProcessorSampler:
    """The configured chain of processors and the pick; ``sample(logits, tokens)`` / ``accept(token)``.

    ``stages`` names what runs, in order, with llama.cpp's names (as ``/info`` shows them).
    """

    unsupported: list[str] = []

    def __init__(
        self,
        settings: SamplerSettings,
        plugin_stages: Mapping[str, SamplerStage] | None = None,
        context: StageContext | None = None,
        *,
        n_vocab: int | None = None,
        n_ctx: int = 1 << 30,
        final: bool = True,
    ) -> None:
        s = self.settings = settings
        self.seed = s.seed if s.seed is not None else random.SystemRandom().randrange(2**32)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)
        known = dict(plugin_stages) if plugin_stages is not None else dict(_plugin_stages())
        vocab = context.vocabulary if context is not None else None
        n_vocab = n_vocab or (vocab.size if vocab is not None else None)
        self.processors: list[StageProcessor] = []
        self.greedy = s.temperature == 0.0 and not s.mirostat
        if s.logit_bias:
            if n_vocab is None:
                raise SamplingError("logit_bias needs the vocabulary size", None)
            self.processors.append(LogitBiasLogitsProcessor(s.logit_bias, n_vocab))

        def plugin(stage: str) -> None:
            spec = known.get(stage)
            if not isinstance(spec, SamplerStage):
                raise SamplingError(f"sampler stage {stage!r} is not a registered chat.stages.SamplerStage", f"remove {stage!r} from `order`")
            if context is None:
                raise SamplingError(f"sampler stage {stage!r} needs the model's vocabulary", "the backend must pass context=")
            ctx = StageContext(context.vocabulary, tokens=[])
            self.processors.append(PluginStageLogitsProcessor(spec, s.stage_params.get(stage, {}), ctx))

        if s.mirostat:
            for stage in s.order:
                if stage not in BUILTIN_STAGES:
                    plugin(stage)
            self.processors.append(TemperatureLogitsProcessor(s.temperature))
            if final:
                if s.mirostat == 1:
                    if n_vocab is None:
                        raise SamplingError("mirostat 1 needs the vocabulary size", None)
                    self.processors.append(MirostatLogitsProcessor(n_vocab, s.mirostat_tau, s.mirostat_eta))
                else:
                    self.processors.append(MirostatV2LogitsProcessor(s.mirostat_tau, s.mirostat_eta))
        else:
            for stage in s.order:
                if stage not in BUILTIN_STAGES:
                    plugin(stage)
                    continue
                if not stage_is_active(s, stage):
                    continue
                match stage:
                    case "penalties":
                        self.processors.append(PenaltiesLogitsProcessor(s.penalty_last_n, s.repeat_penalty, s.frequency_penalty, s.presence_penalty))
                    case "dry":
                        breakers = {}
                        if s.dry_sequence_breakers:
                            if context is None:
                                raise SamplingError("DRY sequence breakers need the model's vocabulary", "the backend must pass context=")
                            breakers = _breakers(context.vocabulary, s.dry_sequence_breakers)
                        self.processors.append(DryLogitsProcessor(s.dry_multiplier, s.dry_base, s.dry_allowed_length, s.dry_penalty_last_n, breakers, n_ctx))
                    case "top_n_sigma":
                        self.processors.append(TopNSigmaLogitsProcessor(s.top_n_sigma))
                    case "top_k":
                        self.processors.append(TopKLogitsProcessor(s.top_k))
                    case "typical_p":
                        self.processors.append(TypicalLogitsProcessor(s.typical_p))
                    case "top_p":
                        self.processors.append(TopPLogitsProcessor(s.top_p))
                    case "min_p":
                        self.processors.append(MinPLogitsProcessor(s.min_p))
                    case "xtc":
                        self.processors.append(XtcLogitsProcessor(s.xtc_probability, s.xtc_threshold, self.generator))
                    case "temperature":
                        if s.temperature == 0.0:
                            continue  # the argmax below; a temp stage would add nothing
                        if s.dynatemp_range > 0.0:
                            self.processors.append(DynamicTemperatureLogitsProcessor(s.temperature, s.dynatemp_range, s.dynatemp_exponent))
                        else:
                            self.processors.append(TemperatureLogitsProcessor(s.temperature))
        self.stages = [p.name for p in self.processors]
        if final and not s.mirostat:
            self.stages.append("greedy" if self.greedy else "dist")
        self._picks_itself = bool(s.mirostat) and final

    def apply(self, logits: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor:
        """The processed logits (float32, CPU; removed tokens ``-inf``) without picking."""
        x = logits.detach().to(dtype=torch.float32, device="cpu").reshape(-1)
        hist = list(tokens)
        for proc in self.processors:
            x = proc(hist, x)
        return x

    def sample(self, logits: torch.Tensor, tokens: Sequence[int]) -> int:
        """Pick the next token from one position's logits; ``tokens`` is the context so far (prompt included)."""
        x = self.apply(logits, tokens)
        if self.greedy:
            return int(torch.argmax(x))
        probs = _softmax(x)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def accept(self, token: int) -> None:
        """Tell stateful stages (mirostat) which token was picked."""
        for proc in self.processors:
            proc.accept(token)


_BREAKERS: dict[tuple[int, tuple[str, ...]], dict[int, list[tuple[int, ...]]]] = {}


def _breakers(vocabulary: Vocabulary, breakers: Sequence[str]) -> dict[int, list[tuple[int, ...]]]:
    key = (id(vocabulary), tuple(breakers))
    table = _BREAKERS.get(key)
    if table is None:
        if len(_BREAKERS) > 8:
            _BREAKERS.clear()
        table = _BREAKERS[key] = dry_breaker_sequences(vocabulary, breakers)
    return table


def _plugin_stages() -> dict[str, Any]:
    return plugin_stages()


def tokenizer_context(tokenizer: Any, n_vocab: int) -> StageContext:
    """A :class:`StageContext` over a Hugging Face tokenizer (for plugin stages and DRY's breakers).

    Build it once per loaded model and pass it to every :func:`make_sampler` call:
    the vocabulary's texts are computed on first use and cached in it.
    """

    def token_text(token: int) -> str:
        return tokenizer.decode([token], skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def tokenize(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    return StageContext(Vocabulary(n_vocab, token_text, tokenize))


def make_sampler(
    settings: SamplerSettings,
    plugin_stages: Mapping[str, SamplerStage] | None = None,
    context: StageContext | None = None,
    **kwargs: Any,
) -> ProcessorSampler:
    """The sampler for ``settings``: ``.sample(logits_1d, tokens) -> int``, ``.accept(token)``, ``.stages``.

    ``plugin_stages`` defaults to the registered ones (``chat.sampling.plugin_stages()``);
    ``context`` (see :func:`tokenizer_context`) is needed for plugin stages and DRY's breakers.
    """
    return ProcessorSampler(settings, plugin_stages, context, **kwargs)

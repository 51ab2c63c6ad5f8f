"""The picks: the last step of a plan, choosing the token (greedy, dist, mirostat 1 and 2).

Each has ``pick(x, tokens) -> token id`` over the filtered logits. Draws use the
sampler's ``torch.Generator``, so a seed reproduces text on this backend; the same
seed on llama.cpp (mt19937) gives other, equally reproducible, text.
"""

from __future__ import annotations

import math

import torch

from .processors import NEG_INF, StageProcessor, check_value, softmax


def draw(x: torch.Tensor, generator: torch.Generator) -> int:
    """A token drawn from softmax(x) (llama.cpp ``dist``)."""
    return int(torch.multinomial(softmax(x), 1, generator=generator))


class GreedyPick(StageProcessor):
    """The first maximum (llama.cpp ``greedy``); the logits pass unchanged."""

    name = "greedy"

    def row(self, x: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        return x.clone()

    def pick(self, x: torch.Tensor, tokens: list[int]) -> int:
        return int(torch.argmax(x))


class DistPick(StageProcessor):
    """A draw from the candidates' probabilities (llama.cpp ``dist``)."""

    name = "dist"

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def row(self, x: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        return x.clone()

    def pick(self, x: torch.Tensor, tokens: list[int]) -> int:
        return draw(x, self.generator)


class MirostatLogitsProcessor(StageProcessor):
    """Mirostat 1 (llama.cpp ``mirostat``): keep the top k, k from the estimated Zipf exponent and ``mu``;
    after the pick, ``mu −= eta · (surprise − tau)``. ``mu`` starts at ``2·tau``."""

    name = "mirostat"

    def __init__(
        self, n_vocab: int, tau: float, eta: float, m: int = 100, generator: torch.Generator | None = None
    ) -> None:
        check_value("mirostat_tau", tau, tau > 0, "> 0")
        check_value("mirostat_eta", eta, eta > 0, "> 0")
        self.n_vocab, self.tau, self.eta, self.m = n_vocab, tau, eta, m
        self.generator = generator
        self.mu = 2.0 * tau
        self._last: torch.Tensor | None = None

    def pick(self, x: torch.Tensor, tokens: list[int]) -> int:
        """Keep the tokens mirostat allows, then draw among them; :meth:`accept` then updates ``mu``."""
        assert self.generator is not None
        return draw(self.row(x, tokens), self.generator)

    def reset(self) -> None:
        self.mu = 2.0 * self.tau

    def row(self, x: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        sp, order = torch.sort(softmax(x), descending=True, stable=True)
        size = int(torch.isfinite(x).sum())
        num = den = 0.0
        for i in range(min(self.m - 1, size - 1)):
            if float(sp[i + 1]) <= 0.0:  # underflowed to 0 (a logit ~104 below the top): nothing more to fit
                break
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
            p = float(softmax(self._last)[token])
            self.mu -= self.eta * (-math.log2(p) - self.tau) if p > 0 else 0.0
            self._last = None


class MirostatV2LogitsProcessor(MirostatLogitsProcessor):
    """Mirostat 2 (llama.cpp ``mirostat-v2``): keep the most likely tokens whose surprise ``−log2 p ≤ mu``
    (at least one); after the pick, ``mu −= eta · (surprise − tau)``."""

    name = "mirostat-v2"

    def __init__(self, tau: float, eta: float, generator: torch.Generator | None = None) -> None:
        super().__init__(0, tau, eta, generator=generator)

    def row(self, x: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        sp, order = torch.sort(softmax(x), descending=True, stable=True)
        over = torch.nonzero(-torch.log2(sp) > self.mu).flatten()
        k = max(1, int(over[0]) if over.numel() else int(torch.isfinite(x).sum()))
        out = torch.full_like(x, NEG_INF)
        out[order[:k]] = x[order[:k]]
        self._last = out
        return out

"""An interim sampler for the transformers backend, behind one function: :func:`make_sampler`.

It follows llama.cpp's chain for the stages it knows: logit bias first, then the
stages of ``settings.order`` that change anything — penalties, top_k, top_p, min_p,
temperature — then the pick: the argmax at temperature 0 (exactly), otherwise a
draw from the softmax with a ``torch.Generator`` seeded from ``settings.seed``.
Stages it does not implement yet (DRY, typical_p, top_n_sigma, XTC, dynamic
temperature, mirostat, plugin stages) are listed in :attr:`BasicSampler.unsupported`
and skipped. The full logits-processor chain replaces this module later; the
backend only relies on ``make_sampler(settings)`` → ``.sample(logits, tokens)`` /
``.accept(token)``.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from chat.sampling import BUILTIN_STAGES, stage_is_active

if TYPE_CHECKING:
    import torch

    from chat.sampling import SamplerSettings

IMPLEMENTED = ("penalties", "top_k", "top_p", "min_p", "temperature")


class BasicSampler:
    def __init__(self, settings: "SamplerSettings") -> None:
        import torch

        s = self.settings = settings
        self.seed = s.seed if s.seed is not None else random.SystemRandom().randrange(2**32)
        self._gen = torch.Generator(device="cpu")
        self._gen.manual_seed(self.seed)
        self.stages: list[str] = []  # what runs, in order
        self.unsupported: list[str] = []
        if s.logit_bias:
            self.stages.append("logit_bias")
        if s.mirostat:
            self.unsupported.append(f"mirostat {s.mirostat}")
        for stage in s.order:
            if stage not in BUILTIN_STAGES or not stage_is_active(s, stage):
                if stage not in BUILTIN_STAGES:
                    self.unsupported.append(stage)
                continue
            if stage not in IMPLEMENTED:
                self.unsupported.append(stage)
                continue
            if stage == "temperature":
                if s.temperature == 0.0:
                    continue
                if s.dynatemp_range > 0.0:
                    self.unsupported.append("dynatemp")
            self.stages.append(stage)
        self.stages.append("greedy" if s.temperature == 0.0 else "dist")

    def accept(self, token: int) -> None:
        """Nothing to remember beyond ``tokens`` (passed to :meth:`sample`); kept for the interface."""

    def sample(self, logits: "torch.Tensor", tokens: Sequence[int]) -> int:
        """Pick the next token from one position's logits; ``tokens`` is the context so far (for penalties)."""
        import torch

        s = self.settings
        x = logits.detach().to(dtype=torch.float32, device="cpu").clone()
        for stage in self.stages:
            match stage:
                case "logit_bias":
                    for tok, bias in s.logit_bias.items():
                        if 0 <= tok < x.numel():
                            x[tok] += bias
                case "penalties":
                    _penalize(x, tokens, s)
                case "top_k":
                    k = min(s.top_k, x.numel())
                    kth = torch.topk(x, k).values[-1]
                    x[x < kth] = float("-inf")
                case "top_p":
                    probs = torch.softmax(x, dim=-1)
                    sorted_p, order = torch.sort(probs, descending=True)
                    cum = torch.cumsum(sorted_p, dim=-1)
                    # keep the smallest prefix whose sum reaches top_p (at least one token)
                    keep = int(torch.searchsorted(cum, torch.tensor(s.top_p)).item()) + 1
                    x[order[keep:]] = float("-inf")
                case "min_p":
                    probs = torch.softmax(x, dim=-1)
                    x[probs < s.min_p * probs.max()] = float("-inf")
                case "temperature":
                    x = x / s.temperature
                case "greedy":
                    return int(torch.argmax(x).item())
                case "dist":
                    probs = torch.softmax(x, dim=-1)
                    return int(torch.multinomial(probs, 1, generator=self._gen).item())
        raise AssertionError("the chain always ends with greedy or dist")  # pragma: no cover


def _penalize(x: "torch.Tensor", tokens: Sequence[int], s: "SamplerSettings") -> None:
    """llama.cpp's penalties: repeat divides positive logits (multiplies negative), then frequency/presence subtract."""
    window = tokens if s.penalty_last_n == -1 else tokens[-s.penalty_last_n :]
    for tok, count in Counter(window).items():
        if not 0 <= tok < x.numel():
            continue
        v = x[tok]
        v = v / s.repeat_penalty if v > 0 else v * s.repeat_penalty
        x[tok] = v - count * s.frequency_penalty - s.presence_penalty


def make_sampler(settings: "SamplerSettings") -> Any:
    """The sampler for ``settings``: an object with ``sample(logits_1d, tokens) -> int`` and ``accept(token)``."""
    return BasicSampler(settings)

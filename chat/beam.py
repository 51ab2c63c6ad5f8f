"""Beam search on a slot's primitives: the same answer as transformers' ``generate(num_beams=N)``.

This follows transformers 5's vectorised beam search (``GenerationMixin._beam_search``)
step for step, in float32 as it computes: each step scores every continuation of every
running beam by its accumulated log-probability, keeps the best ``max(2, 1 + n_end) · N``
candidates, moves those that end (an end-of-turn token, or the length limit) among the
finished hypotheses scored ``sum / length ** length_penalty``, and continues the best N
that did not end. It stops when no running beam can beat the worst finished one (the
``early_stopping=False`` heuristic), or when every candidate ended. The best finished
hypothesis is the answer; it is printed once, when it is final.

The slot keeps the prompt in its main sequence; beams live in extra sequences (llama.cpp)
or batch rows (transformers) and are dropped at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from chat.backend import Finish, FinishReason
from chat.generation import count_virtual, prefill, timings, usage_of
from chat.stops import StopHolder

if TYPE_CHECKING:
    from chat.backend import Slot
    from chat.sampling import SamplerSettings

NEG = np.float32(-1.0e9)


def beam_search(
    slot: "Slot",
    prompt: list[int],
    sampling: "SamplerSettings",
    *,
    started: float,
    stops: tuple[str, ...],
    cancelled: Callable[[], bool],
) -> Iterator[str | Finish]:
    """Yield the best beam's text (once, when final), then one Finish."""
    if cancelled():
        yield Finish("interrupted", usage_of(prompt, 0, 0))
        return
    n_beams = int(sampling.beams)
    last, reused, prompt_done = prefill(slot, prompt)
    stats = slot.stats
    end_ids = sorted(slot.end_ids)
    room = max(1, (slot.context_size - len(prompt)) // n_beams)  # the beams share the context
    max_new = min(sampling.max_tokens or room, room)
    reason: FinishReason = "stop"
    first_token = last_token = 0.0
    best: list[int] = []
    try:
        search = _Search(n_beams, len(end_ids), float(sampling.length_penalty), max_new)
        rows = 1  # the slot's rows with logits: the prompt first, then one per running beam
        while True:
            if cancelled():
                reason = "interrupted"
                break
            logprobs = slot.beam_logprobs(rows)
            first_token = first_token or time.perf_counter()
            parents, tokens, done = search.step(logprobs, end_ids)
            last_token = time.perf_counter()
            last.completion_tokens = search.length
            if done:
                break
            slot.beam_step(parents, tokens)
            rows = n_beams
        best, ended_by_length = search.best()
        if ended_by_length and reason != "interrupted":
            reason = "length"
    finally:
        slot.beam_end()
    best = [t for t in best if t not in slot.end_ids]
    last.completion_ids = tuple(best)
    last.completion_tokens = len(best)
    stats.completion_tokens += len(best)
    text = StopHolder(stops)
    decoder = slot.decoder(prompt[count_virtual(prompt) :])
    chunks = [text.feed(decoder.feed(t)) for t in best]
    answer = "".join(chunks) + text.feed(decoder.finish()) + text.finish()
    first_chunk = time.perf_counter() if answer else 0.0
    if answer:
        yield answer
    last.finish = reason
    yield Finish(
        reason,
        usage_of(prompt, len(best), reused),
        timings(started, prompt_done, first_chunk, best, first_token, last_token),
    )


class _Search:
    """The beam bookkeeping of one search (one batch item), in transformers' float32 arithmetic."""

    def __init__(self, n_beams: int, n_end: int, length_penalty: float, max_new: int) -> None:
        self.n = n_beams
        self.keep = max(2, 1 + n_end) * n_beams
        self.length_penalty = length_penalty
        self.max_new = max_new
        self.length = 0  # tokens generated so far by each running beam
        self.running_scores = np.full(n_beams, NEG, dtype=np.float32)
        self.running_scores[0] = 0.0  # only the first beam's continuations count at the first step
        self.running: list[list[int]] = [[] for _ in range(n_beams)]
        self.parent_row = [0] * n_beams  # the slot row each running beam's logits are in
        self.finished_scores = np.full(n_beams, NEG, dtype=np.float32)
        self.finished: list[list[int]] = [[] for _ in range(n_beams)]
        self.finished_flag = np.zeros(n_beams, dtype=bool)
        self.finished_by_length = [False] * n_beams
        self.improvable = True

    def step(self, logprobs: np.ndarray, end_ids: list[int]) -> tuple[list[int], list[int], bool]:
        """Take the slot rows' log-probabilities; return (slot row per new beam, its token, whether done)."""
        n, keep = self.n, self.keep
        vocab = logprobs.shape[-1]
        rows = logprobs[np.asarray(self.parent_row)] if logprobs.shape[0] != n else logprobs
        accumulated = (rows.astype(np.float32) + self.running_scores[:, None]).reshape(-1)
        keep = min(keep, accumulated.size)
        top = _topk(accumulated, keep)
        top_scores = accumulated[top]
        beam = top // vocab
        token = top % vocab
        self.length += 1
        at_limit = self.length >= self.max_new
        hits = np.isin(token, np.asarray(end_ids, dtype=np.int64)) | at_limit
        candidates = [self.running[b] + [int(t)] for b, t in zip(beam, token, strict=True)]

        # e. the best candidates that did not end continue
        running_scores = top_scores + hits.astype(np.float32) * NEG
        chosen = _topk(running_scores, n)
        # f. the top-n candidates that ended join the finished hypotheses if they beat them
        just_finished = hits & (np.arange(keep) < n)
        scores = top_scores / np.float32((self.length) ** self.length_penalty)
        scores = scores + np.float32(0.0 if self.improvable else 1.0) * NEG  # no improvement possible: none added
        scores = scores + (~just_finished).astype(np.float32) * NEG
        merged_scores = np.concatenate([self.finished_scores, scores.astype(np.float32)])
        merged = self.finished + candidates
        merged_flags = np.concatenate([self.finished_flag, just_finished])
        merged_by_length = self.finished_by_length + [bool(at_limit and t not in end_ids) for t in token]
        best = _topk(merged_scores, n)
        self.finished_scores = merged_scores[best]
        self.finished = [merged[i] for i in best]
        self.finished_flag = merged_flags[best]
        self.finished_by_length = [merged_by_length[i] for i in best]

        self.running_scores = running_scores[chosen].astype(np.float32)
        self.running = [candidates[i] for i in chosen]
        parents = [int(self.parent_row[beam[i]]) if logprobs.shape[0] != n else int(beam[i]) for i in chosen]
        tokens = [int(token[i]) for i in chosen]
        self.parent_row = list(range(n))

        # g. can a running beam still beat the worst finished one?
        best_possible = self.running_scores[0] / np.float32(self.length**self.length_penalty)
        worst = np.where(self.finished_flag, self.finished_scores.min(), NEG)
        self.improvable = bool(self.improvable and np.any(best_possible > worst))
        done = not self.improvable or bool(np.all(hits))
        return parents, tokens, done

    def best(self) -> tuple[list[int], bool]:
        """The best finished hypothesis (the best running beam when none finished: an interrupted search),
        and whether it ended at the length limit."""
        if not self.finished_flag[0]:
            return list(self.running[0]), False
        return list(self.finished[0]), self.finished_by_length[0]


def _topk(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest values, largest first (ties: lower index first)."""
    order = np.argsort(-values, kind="stable")
    return order[:k]

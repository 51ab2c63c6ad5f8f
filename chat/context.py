"""The context-window policy, the same for every backend.

When a conversation outgrows the model's window, the oldest turns after the
system prompt and the persona's examples are dropped, whole exchanges at a time,
until the prompt plus room for the answer fits. The latest user message is never
dropped: if it cannot fit on its own, that is a ContextOverflowError.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from chat.backend import Message
from chat.errors import ContextOverflowError

# Room kept for the answer when max_tokens is unset: a quarter of the window, at most this.
DEFAULT_ANSWER_ROOM = 512


@dataclass(frozen=True)
class Fitted:
    messages: list[Message]
    dropped: int  # conversation messages left out (0 when everything fits)
    prompt_tokens: int


def answer_room(context_size: int, max_tokens: int | None) -> int:
    if max_tokens:
        return min(max_tokens, context_size // 2)
    return min(DEFAULT_ANSWER_ROOM, context_size // 4)


def fit_context(
    fixed: Sequence[Message],
    turns: Sequence[Message],
    count_tokens: Callable[[Sequence[Message]], int],
    context_size: int,
    max_tokens: int | None,
) -> Fitted:
    """Keep ``fixed`` (system + examples) and as many recent ``turns`` as fit."""
    budget = context_size - answer_room(context_size, max_tokens)
    start = 0
    while True:
        candidate = list(fixed) + list(turns[start:])
        n = count_tokens(candidate)
        if n <= budget:
            return Fitted(candidate, start, n)
        if start >= len(turns) - 1:
            break
        # drop one exchange: everything up to and including the next assistant answer
        start += 1
        while start < len(turns) - 1 and turns[start].role != "user":
            start += 1
    # Even alone the last message leaves less room than wanted: go on if any room is left
    # (the answer will end with finish_reason "length"), refuse if none is.
    if n < context_size:
        return Fitted(candidate, start, n)
    raise ContextOverflowError(
        f"the prompt needs {n} tokens but the context holds {context_size} "
        f"(with {answer_room(context_size, max_tokens)} kept for the answer)",
        "shorten the message, raise --ctx, lower --max-tokens, or use a persona with a shorter system prompt",
    )

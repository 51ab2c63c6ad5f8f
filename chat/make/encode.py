"""Dialogues as token ids with a mask of the persona's own tokens, rendered with the backends' chat template.

Training, evaluation and the control vector all look at the same tokens: the assistant
turns (their text and the end-of-turn marker that follows, so a trained adapter also learns
to stop), never the prompts. The template is the one the backends use for this model, so
what is learned is what the chat later renders.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from chat.backend import Message
from chat.errors import ModelError
from chat.make.data import Dialogue

#: Longest dialogue trained on, in tokens (longer ones are cut at the end).
MAX_TOKENS = 256
#: Longest dialogue evaluated in a card's context (system prompt and examples first): long enough that
#: the answers are never the part cut off, and cheap because the shared context runs once.
EVAL_MAX_TOKENS = 4096


@dataclass(frozen=True)
class Encoded:
    ids: tuple[int, ...]
    mask: tuple[bool, ...]  # True where the token is the persona's (loss is taken there)

    @property
    def n_answer(self) -> int:
        return sum(self.mask)


def messages_for(dialogue: Dialogue, system: str = "", examples: Sequence[tuple[str, str]] = ()) -> list[Message]:
    """The dialogue as chat messages, after an optional system prompt and example turns (a card's prompt parts)."""
    out = [Message("system", system)] if system else []
    for user, assistant in examples:
        out += [Message("user", user), Message("assistant", assistant)]
    return out + [Message(t.role, t.content) for t in dialogue.turns]  # type: ignore[arg-type]  # roles checked


def encode(
    base: Any,
    dialogue: Dialogue,
    system: str = "",
    examples: Sequence[tuple[str, str]] = (),
    max_tokens: int = MAX_TOKENS,
) -> Encoded:
    """Token ids of the rendered dialogue and the mask of its assistant tokens (only the dialogue's own turns)."""
    messages = messages_for(dialogue, system, examples)
    first = len(messages) - len(dialogue.turns)
    template, tok = base.template, base.tokenizer
    full = template.render(messages, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for i in range(first, len(messages)):
        if messages[i].role != "assistant":
            continue
        before = template.render(messages[:i], add_generation_prompt=True)
        upto = template.render(messages[: i + 1], add_generation_prompt=False)
        if not full.startswith(before) or not full.startswith(upto):
            raise ModelError(
                f"{base.path}: the chat template does not render a conversation as a growing prefix",
                "parts can only be made with templates that do (ChatML, llama3, gemma, mistral …)",
            )
        spans.append((len(before), len(upto)))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = [any(lo <= start < hi for lo, hi in spans) for start, _ in offsets]
    return Encoded(tuple(ids[:max_tokens]), tuple(mask[:max_tokens]))


def batch(items: Sequence[Encoded], pad_id: int) -> tuple[Any, Any, Any]:
    """(input_ids, attention_mask, labels) tensors, right-padded; labels are -100 outside the persona's tokens."""
    import torch

    width = max(len(e.ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    for row, e in enumerate(items):
        n = len(e.ids)
        ids[row, :n] = torch.tensor(e.ids)
        attn[row, :n] = 1
        labels[row, :n] = torch.tensor([t if m else -100 for t, m in zip(e.ids, e.mask, strict=True)])
    return ids, attn, labels

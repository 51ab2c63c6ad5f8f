"""Forward passes that compute only what a loss needs: the persona's tokens through the LM head, a shared prefix once.

A causal LM's head turns every position's hidden state into a row of vocabulary logits,
but the loss is taken on the persona's tokens only — about half the positions of a short
dialogue, and a few percent of a dialogue evaluated after a card's system prompt and
examples. So the decoder runs as usual, the positions that carry a loss are picked out, and
only those go through the head: the same numbers as the full logits, for a fraction of the
work and memory (Gemma 3's head has 262,144 rows: full logits of one batch are gigabytes).

Evaluation (no gradients) also runs a prefix every item of a call shares — the card's system
prompt and examples in front of each held-out dialogue — once, and continues every batch
from a copy of its KV cache.

torch is imported inside functions only.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from chat.make.encode import Encoded, batch

#: A shared prefix shorter than this is not worth a separate forward pass.
MIN_SHARED = 16


def trunk_and_head(model: Any) -> tuple[Any, Any, float | None]:
    """(decoder without its head, the head, final logit soft-capping or None), also under a PeftModel."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = inner.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(text, "final_logit_softcapping", None)
    return inner.model, inner.get_output_embeddings(), float(cap) if cap else None


def with_cache(trunk: Any, cache: Any) -> dict[str, Any]:
    """The keyword a decoder takes its KV cache by: ``cache`` since transformers 5.24, ``past_key_values`` before."""
    import inspect

    name = "cache" if "cache" in inspect.signature(trunk.forward).parameters else "past_key_values"
    return {name: cache, "use_cache": True}


def cache_of(output: Any) -> Any:
    """The KV cache a decoder returned (under either name)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def answer_logits(
    model: Any, ids: Any, attn: Any, labels: Any, past: Any = None, embeds: Any = None
) -> tuple[Any, Any]:
    """(float32 logits, targets) of the positions whose next token carries a loss (``labels`` ≠ -100).

    With ``past`` (a KV cache of a prefix), ``ids``/``attn``/``labels`` are the continuation only and
    ``attn`` already covers the prefix; a prefix never holds a position whose next token is scored.
    ``embeds`` replaces ``ids`` (input embeddings, e.g. a soft prompt's rows before the tokens').
    """
    import torch

    trunk, head, cap = trunk_and_head(model)
    inputs = {"input_ids": ids} if embeds is None else {"inputs_embeds": embeds}
    kwargs: dict[str, Any] = {**inputs, "attention_mask": attn}
    if past is not None:
        kwargs.update(with_cache(trunk, past))
    else:
        kwargs["use_cache"] = False
    hidden = trunk(**kwargs).last_hidden_state
    target = labels[:, 1:]
    keep = target != -100
    logits = head(hidden[:, :-1][keep]).float()
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits, target[keep]


def with_soft_prompt(model: Any, ids: Any, soft: Any) -> Any:
    """Input embeddings of ``ids`` [batch, T] with the soft prompt's rows [n, hidden] before each row, as PEFT's
    prompt tuning has them: first, before the whole prompt (BOS too), unscaled (the model's own embedding
    module scales the tokens' rows, as Gemma's does), at positions 0 … n-1."""
    import torch

    trunk, _, _ = trunk_and_head(model)
    tokens = trunk.get_input_embeddings()(ids)
    return torch.cat([soft.to(tokens.dtype).unsqueeze(0).expand(ids.shape[0], -1, -1), tokens], dim=1)


def training_loss(model: Any, rows: Sequence[Encoded], pad_id: int, soft: Any = None) -> tuple[Any, int]:
    """(mean cross-entropy over the persona's tokens, tokens in the batch) — what a plain ``labels=`` call
    computes, without the logits of the positions that carry no loss; after ``soft`` (a soft prompt) if given."""
    import torch

    ids, attn, labels = batch(rows, pad_id)
    if soft is None:
        logits, target = answer_logits(model, ids, attn, labels)
    else:
        n = soft.shape[0]
        ones = torch.ones((ids.shape[0], n), dtype=attn.dtype)
        unscored = torch.full((ids.shape[0], n), -100, dtype=labels.dtype)
        logits, target = answer_logits(
            model,
            None,
            torch.cat([ones, attn], 1),
            torch.cat([unscored, labels], 1),
            embeds=with_soft_prompt(model, ids, soft),
        )
    return torch.nn.functional.cross_entropy(logits, target), int(attn.sum())


def shared_prefix(items: Sequence[Encoded]) -> int:
    """Tokens every item starts with that no scored token needs as an output position (0 when too few)."""
    if len(items) < 2:
        return 0
    first = items[0].ids
    n = min(len(e.ids) for e in items)
    for e in items[1:]:
        ids = e.ids
        k = 0
        while k < n and ids[k] == first[k]:
            k += 1
        n = k
    for e in items:  # the token before a scored one must stay in the continuation: its output predicts it
        scored = next((i for i, m in enumerate(e.mask) if m), len(e.ids))
        n = min(n, scored - 1)
    return n if n >= MIN_SHARED else 0


def token_nll(
    model: Any, items: Sequence[Encoded], pad_id: int, batch_size: int = 8, soft: Any = None
) -> tuple[float, int]:
    """(summed negative log-likelihood, token count) of the persona's tokens under ``model`` as it is now,
    after the soft prompt ``soft`` [n, hidden] when one is given."""
    import torch

    total, count = 0.0, 0
    if not items:
        return total, count
    k = shared_prefix(items)
    with torch.inference_mode():
        prefix_cache = None
        width = k + (0 if soft is None else int(soft.shape[0]))  # what the cache holds: soft prompt, shared ids
        if width:
            trunk, _, _ = trunk_and_head(model)
            prefix_ids = torch.tensor([items[0].ids[:k]], dtype=torch.long)
            if soft is None:
                prefix = {"input_ids": prefix_ids}
            else:
                prefix = {"inputs_embeds": with_soft_prompt(model, prefix_ids, soft.detach())}
            prefix_cache = cache_of(trunk(**prefix, use_cache=True))
        rest = [Encoded(e.ids[k:], e.mask[k:]) for e in items] if k else list(items)
        for start in range(0, len(rest), batch_size):
            chunk = rest[start : start + batch_size]
            ids, attn, labels = batch(chunk, pad_id)
            past = None
            if prefix_cache is not None:
                past = copy.deepcopy(prefix_cache)
                past.batch_repeat_interleave(len(chunk))
                attn = torch.cat([torch.ones((len(chunk), width), dtype=attn.dtype), attn], dim=1)
            logits, target = answer_logits(model, ids, attn, labels, past)
            total += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            count += int(target.numel())
    return total, count

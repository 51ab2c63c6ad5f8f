"""The shortcuts that make ``chat personas make`` fast compute the same numbers as the plain way.

The LM head only at the persona's positions gives the loss a plain ``model(labels=...)`` call
gives; a prefix shared by every evaluated dialogue, run once through the KV cache, gives the
summed loss of running each dialogue whole; the neutral answers' hidden states, taken while
they are generated in left-padded batches, equal a forward pass over the same tokens; the
length-bucketed batches of an epoch hold every dialogue once and depend on the seed alone.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from chat.make.data import Dialogue, Turn  # noqa: E402
from chat.make.encode import Encoded  # noqa: E402


@pytest.fixture(scope="module")
def base(tiny_gguf):
    from chat.make.base import load_base

    return load_base(str(tiny_gguf))


def dialogue(i: int) -> Dialogue:
    return Dialogue((Turn("user", f"What do you think about topic number {i}?" + " really" * (i % 4)),
                     Turn("assistant", "Arr, matey! " + "The sea is calling. " * (1 + i % 3))))


def test_training_loss_equals_the_plain_labels_loss(base):
    import torch

    from chat.make.encode import batch, encode
    from chat.make.forward import training_loss

    rows = [encode(base, dialogue(i), "You are a pirate.") for i in range(6)]
    ids, attn, labels = batch(rows, base.tokenizer.pad_token_id)
    with torch.no_grad():
        plain = base.model(input_ids=ids, attention_mask=attn, labels=labels).loss
        ours, tokens = training_loss(base.model, rows, base.tokenizer.pad_token_id)
    assert tokens == int(attn.sum())
    assert float(ours) == pytest.approx(float(plain), rel=1e-5)


def test_a_shared_prefix_runs_once_and_changes_no_number(base, monkeypatch):
    import chat.make.forward as forward
    from chat.make.encode import EVAL_MAX_TOKENS, encode

    examples = [(f"Example question {i}?", f"Arr, example answer {i}.") for i in range(4)]
    items = [encode(base, dialogue(i), "You are a pirate.", examples, EVAL_MAX_TOKENS) for i in range(10)]
    k = forward.shared_prefix(items)
    assert k >= forward.MIN_SHARED and all(not any(e.mask[: k + 1]) for e in items)
    pad = base.tokenizer.pad_token_id
    shared = forward.token_nll(base.model, items, pad, batch_size=4)
    monkeypatch.setattr(forward, "MIN_SHARED", 10**9)
    whole = forward.token_nll(base.model, items, pad, batch_size=4)
    assert shared[1] == whole[1] == sum(e.n_answer for e in items)
    assert shared[0] == pytest.approx(whole[0], rel=1e-5)


def test_neutral_hidden_states_equal_a_forward_pass_over_the_same_tokens(base, monkeypatch):
    import numpy as np

    from chat.make import vector

    prompts = [dialogue(i) for i in range(5)]
    seen: list[list[int]] = []
    decode = base.tokenizer.decode
    monkeypatch.setattr(base.tokenizer, "decode", lambda ids, **kw: seen.append(list(ids)) or decode(ids, **kw))
    answers, means = vector.neutral_answers(base, prompts, max_new=6, batch_size=3)
    assert len(answers) == 5 and means.shape == (5, base.n_layers, base.hidden_size)
    stops = vector._stop_ids(base)
    items = []
    for d, cut in zip(prompts, seen, strict=True):
        text = base.template.render(vector.messages_for(Dialogue((d.turns[0],))), add_generation_prompt=True)
        prompt = base.tokenizer(text, add_special_tokens=False)["input_ids"]
        tokens = list(cut)
        if len(tokens) < 6:  # the answer stopped: the stop token is part of it
            tokens.append(stops[0] if len(stops) == 1 else _next_token(base, prompt + tokens))
        items.append(Encoded(tuple(prompt + tokens), (False,) * len(prompt) + (True,) * len(tokens)))
    np.testing.assert_allclose(vector.layer_means(base, items), means, rtol=1e-4, atol=1e-4)


def _next_token(base, ids: list[int]) -> int:
    import torch

    with torch.no_grad():
        return int(base.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())


@pytest.mark.parametrize("n", [21, 200])
def test_epoch_batches_hold_every_dialogue_once_and_follow_the_seed(n):
    from chat.make.lora import LoraSettings
    from chat.make.training import BUCKET_BATCHES, epoch_batches

    lengths = [(i * 37) % 97 + 5 for i in range(n)]
    s = LoraSettings(seed=3)
    first = epoch_batches(lengths, s, 0)
    assert sorted(i for b in first for i in b) == list(range(n))
    assert len(first) == -(-n // s.batch_size) and all(len(b) <= s.batch_size for b in first)
    assert first == epoch_batches(lengths, s, 0)  # a function of (seed, epoch): what resuming relies on
    assert first != epoch_batches(lengths, s, 1) and first != epoch_batches(lengths, LoraSettings(seed=4), 0)
    pad = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in first)
    if n > s.batch_size * BUCKET_BATCHES:  # dialogues of similar length share a batch: little padding
        plain = [list(range(k, min(n, k + s.batch_size))) for k in range(0, n, s.batch_size)]
        assert pad < sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in plain) / 3

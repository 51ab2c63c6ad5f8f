"""Beam search through the core loop: the same ids as transformers' ``generate(num_beams=N, do_sample=False)``.

The reference is transformers' own beam search on a freshly loaded copy of the tiny f32
model; our answer must match it on the transformers backend and on llama.cpp (same weights
as an f32 GGUF), for several beam counts and length penalties.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from chat.backend import BackendOptions, Finish, Message
from chat.errors import SamplingError
from chat.sampling import SamplerSettings, resolve_sampling
from chat_plugins.llamacpp import LlamaCppBackend
from chat_plugins.transformers_backend import TransformersBackend

PROMPTS = {
    "hello": [Message("user", "hello there")],
    "turns": [Message("user", "hi"), Message("assistant", "hello!"), Message("user", "你好, how are you?")],
}
MAX_NEW = 10


@pytest.fixture(scope="module")
def tf(tiny_hf_dir):
    with TransformersBackend(str(tiny_hf_dir), BackendOptions(threads=1)) as backend:
        yield backend


@pytest.fixture(scope="module")
def llama(tiny_gguf):
    with LlamaCppBackend(str(tiny_gguf), BackendOptions(threads=1), kv_type="f32") as backend:
        yield backend


@pytest.fixture(scope="module")
def reference(tiny_hf_dir):
    return AutoModelForCausalLM.from_pretrained(str(tiny_hf_dir), dtype=torch.float32, use_safetensors=True).eval()


def answer(backend, messages, settings) -> tuple[str, Finish, tuple[int, ...]]:
    chunks, finish = [], None
    for item in backend.stream(messages, settings):
        if isinstance(item, Finish):
            finish = item
        else:
            chunks.append(item)
    assert finish is not None
    return "".join(chunks), finish, tuple(backend.last_token_ids)


def generate_ids(reference, prompt: list[int], end_ids, beams: int, length_penalty: float) -> tuple[int, ...]:
    with torch.inference_mode():
        out = reference.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            num_beams=beams,
            do_sample=False,
            max_new_tokens=MAX_NEW,
            length_penalty=length_penalty,
            early_stopping=False,
            eos_token_id=sorted(end_ids),
            pad_token_id=sorted(end_ids)[0],
        )
    ids = out[0, len(prompt):].tolist()
    cut = next((i for i, t in enumerate(ids) if t in end_ids), len(ids))
    return tuple(ids[:cut])


@pytest.mark.parametrize("prompt", sorted(PROMPTS))
@pytest.mark.parametrize(("beams", "length_penalty"), [(2, 1.0), (4, 1.0), (3, 0.0), (4, 2.0)])
def test_beam_search_equals_transformers_generate_on_both_backends(tf, llama, reference, prompt, beams, length_penalty):
    messages = PROMPTS[prompt]
    settings = SamplerSettings(beams=beams, length_penalty=length_penalty, max_tokens=MAX_NEW)
    end_ids = tf.slot.end_ids
    expected = generate_ids(reference, tf.prompt_tokens(messages), end_ids, beams, length_penalty)
    assert expected, "the reference answer is empty: the test would prove nothing"
    text, finish, ids = answer(tf, messages, settings)
    assert ids == expected
    assert finish.reason == ("length" if len(ids) == MAX_NEW else "stop")
    assert text == tf.tokenizer.decode(list(ids), skip_special_tokens=True).rstrip("\ufffd")  # no half character
    assert answer(llama, messages, settings)[2] == expected
    assert llama.prompt_tokens(messages) == tf.prompt_tokens(messages)


def test_beam_search_differs_from_greedy_somewhere(tf, reference):
    """Otherwise the parity test above could pass with a greedy search."""
    greedy = SamplerSettings(temperature=0.0, max_tokens=MAX_NEW)
    differs = []
    for messages in PROMPTS.values():
        for beams in (2, 4):
            ids = answer(tf, messages, SamplerSettings(beams=beams, max_tokens=MAX_NEW))[2]
            differs.append(ids != answer(tf, messages, greedy)[2])
    assert any(differs)


def test_memory_after_a_beam_search_serves_the_next_turn(llama, tf):
    """Beams are dropped at the end; the conversation's memory still holds the prompt and is reused."""
    messages = PROMPTS["hello"]
    greedy = SamplerSettings(temperature=0.0, max_tokens=6)
    for backend in (llama, tf):
        fresh = answer(backend, messages, greedy)[2]
        answer(backend, messages, SamplerSettings(beams=4, max_tokens=MAX_NEW))
        assert backend.kv_tokens == backend.prompt_tokens(messages)
        assert answer(backend, messages, greedy)[2] == fresh
        assert backend.stats.last.prompt_tokens_reused == len(backend.prompt_tokens(messages)) - 1


def test_beams_with_sampling_stages_set_together_are_refused():
    with pytest.raises(SamplingError, match="beam search does not sample"):
        resolve_sampling([("defaults", {}), ("the command line", {"beams": 4, "top_p": 0.5})])
    settings, _ = resolve_sampling([("card x", {"top_p": 0.5, "temperature": 0.7}), ("the command line", {"beams": 4})])
    assert settings.beams == 4  # a card's sampler settings are simply not used while beams are on


def test_beams_flag_one_shot_and_json(cli, tiny_gguf, tf, reference):
    r = cli("-m", str(tiny_gguf), "--no-history", "--json", "--beams", "3", "--max-tokens", str(MAX_NEW), "hello there")
    assert r.exit_code == 0, r.stdout
    import json

    data = json.loads(r.stdout)
    messages = PROMPTS["hello"]
    expected = generate_ids(reference, tf.prompt_tokens(messages), tf.slot.end_ids, 3, 1.0)
    assert data["usage"]["completion_tokens"] == len(expected)
    assert data["text"] == tf.tokenizer.decode(list(expected), skip_special_tokens=True).rstrip("\ufffd")


def test_beams_flag_with_a_sampling_flag_is_one_line(cli, tiny_gguf):
    r = cli("-m", str(tiny_gguf), "--no-history", "--beams", "3", "-t", "0.7", "hi")
    assert r.exit_code == 2
    assert "beam search does not sample" in r.output and "temperature" in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = cli("-m", str(tiny_gguf), "--no-history", "--beams", "9", "hi")
    assert r.exit_code == 2 and "beams" in r.output

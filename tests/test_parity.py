"""Cross-backend parity: the same tiny f32 weights give the same greedy token ids on llama.cpp and transformers.

The tiny llama is written once as safetensors (``tiny_hf_dir``) and once as an f32 GGUF
(``tiny_gguf``); adapters as PEFT folders and as llama.cpp GGUFs from the same arrays;
the control vector is one cvec GGUF read by both. Ids are compared, not text.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("llama_cpp")

import modelfactory as mf  # noqa: E402

from chat.backend import BackendOptions, Finish, Message  # noqa: E402
from chat.persona import AdapterPart, Persona, SteeringPart  # noqa: E402
from chat.sampling import SamplerSettings  # noqa: E402
from chat_plugins.llamacpp import LlamaCppBackend  # noqa: E402
from chat_plugins.transformers_backend import TransformersBackend  # noqa: E402

GREEDY = SamplerSettings(temperature=0.0, max_tokens=16)
PROMPTS = {
    "hello": [Message("user", "hello there")],
    "system": [Message("system", "You are a pirate."), Message("user", "Where is the treasure?")],
    "turns": [Message("user", "hi"), Message("assistant", "hello!"), Message("user", "你好, how are you?")],
}
BASE = Persona(name="base")


def greedy_ids(backend, messages) -> tuple[int, ...]:
    finish = None
    for item in backend.stream(messages, GREEDY):
        if isinstance(item, Finish):
            finish = item
    assert finish is not None and finish.reason in ("stop", "length")
    ids = getattr(backend, "last_token_ids", None)
    return tuple(ids) if ids is not None else tuple(backend.stats.last.completion_ids)


def lora_persona(*parts: tuple[Path, float]) -> Persona:
    return Persona(name="lora", adapters=tuple(AdapterPart(Path(p), s) for p, s in parts))


def cvec_persona(path: Path, scale: float, layers: tuple[int, int] | None = None) -> Persona:
    return Persona(name="cvec", steering=(SteeringPart(Path(path), scale, layers),))


def apply_on_llama(llama: LlamaCppBackend, persona: Persona, what: str) -> None:
    """Attach ``persona`` on llama.cpp; a backend that does not attach ``what`` fails the test."""
    warnings = llama.apply(persona)
    listed = llama.info().get(what)
    parts = llama.active_parts()
    assert listed and parts, f"llama.cpp did not attach {what}: warnings {warnings!r}, info {listed!r}, parts {parts!r}"


@pytest.fixture(scope="module")
def llama(tiny_gguf):
    backend = LlamaCppBackend(str(tiny_gguf), BackendOptions(threads=1))
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def tf(tiny_hf_dir):
    backend = TransformersBackend(str(tiny_hf_dir), BackendOptions(threads=1))
    yield backend
    backend.close()


@pytest.fixture
def both(llama, tf):
    llama.apply(BASE)
    tf.apply(BASE)
    yield llama, tf
    llama.apply(BASE)
    tf.apply(BASE)


@pytest.mark.parametrize("prompt", sorted(PROMPTS))
def test_prompt_tokens_are_identical(both, prompt):
    llama, tf = both
    assert tf.prompt_tokens(PROMPTS[prompt]) == llama.prompt_tokens(PROMPTS[prompt])


@pytest.mark.parametrize("prompt", sorted(PROMPTS))
def test_base_greedy_ids_are_identical(both, prompt):
    llama, tf = both
    expected = greedy_ids(llama, PROMPTS[prompt])
    assert len(expected) > 0
    assert greedy_ids(tf, PROMPTS[prompt]) == expected


def test_live_mix_matches_llamacpp_on_merged_weights(both, lora_mix_gguf, lora_a_peft, lora_b_peft):
    """transformers with two active adapters (0.7/0.3) = llama.cpp running weights merged the same way."""
    _, tf = both
    merged = LlamaCppBackend(str(lora_mix_gguf), BackendOptions(threads=1))
    try:
        expected = {name: greedy_ids(merged, msgs) for name, msgs in PROMPTS.items()}
    finally:
        merged.close()
    tf.apply(lora_persona((lora_a_peft, 0.7), (lora_b_peft, 0.3)))
    assert {name: greedy_ids(tf, msgs) for name, msgs in PROMPTS.items()} == expected


def test_one_adapter(both, lora_a_gguf, lora_a_peft):
    llama, tf = both
    apply_on_llama(llama, lora_persona((lora_a_gguf, 1.0)), "adapters")
    tf.apply(lora_persona((lora_a_peft, 1.0)))
    for msgs in PROMPTS.values():
        assert greedy_ids(tf, msgs) == greedy_ids(llama, msgs)


def test_mix_of_two_adapters(both, lora_a_gguf, lora_b_gguf, lora_a_peft, lora_b_peft):
    llama, tf = both
    apply_on_llama(llama, lora_persona((lora_a_gguf, 0.7), (lora_b_gguf, 0.3)), "adapters")
    tf.apply(lora_persona((lora_a_peft, 0.7), (lora_b_peft, 0.3)))
    for msgs in PROMPTS.values():
        assert greedy_ids(tf, msgs) == greedy_ids(llama, msgs)


def test_control_vector(both, cvec_gguf):
    llama, tf = both
    apply_on_llama(llama, cvec_persona(cvec_gguf, 1.0), "steering")
    tf.apply(cvec_persona(cvec_gguf, 1.0))
    for msgs in PROMPTS.values():
        assert greedy_ids(tf, msgs) == greedy_ids(llama, msgs)


def test_switching_a_b_a(both, lora_a_gguf, lora_b_gguf, lora_a_peft, lora_b_peft):
    llama, tf = both
    msgs = PROMPTS["hello"]
    seen = []
    for gguf_path, peft_path in ((lora_a_gguf, lora_a_peft), (lora_b_gguf, lora_b_peft), (lora_a_gguf, lora_a_peft)):
        apply_on_llama(llama, lora_persona((gguf_path, 1.0)), "adapters")
        tf.apply(lora_persona((peft_path, 1.0)))
        ids = greedy_ids(llama, msgs)
        assert greedy_ids(tf, msgs) == ids
        seen.append(ids)
    assert seen[0] == seen[2] and seen[0] != seen[1]
    llama.apply(BASE)
    tf.apply(BASE)
    assert greedy_ids(tf, msgs) == greedy_ids(llama, msgs)


def test_control_vector_layer_range(tiny4_gguf, tiny4_cfg, tiny4_weights, tiny_tokenizer_dir, cvec4_gguf, tmp_path):
    """The same inclusive layer range means the same layers on both (direction.N → decoder layer N)."""
    folder = mf.write_hf_model(tmp_path / "tiny4-hf", tiny4_cfg, tiny4_weights, tiny_tokenizer_dir)
    llama = LlamaCppBackend(str(tiny4_gguf), BackendOptions(threads=1))
    tf = TransformersBackend(str(folder), BackendOptions(threads=1))
    try:
        msgs = PROMPTS["hello"]
        assert greedy_ids(tf, msgs) == greedy_ids(llama, msgs)
        for layers in (None, (2, 3), (1, 1)):
            apply_on_llama(llama, cvec_persona(cvec4_gguf, 0.8, layers), "steering")
            tf.apply(cvec_persona(cvec4_gguf, 0.8, layers))
            assert greedy_ids(tf, msgs) == greedy_ids(llama, msgs), f"layers {layers}"
    finally:
        llama.close()
        tf.close()


def test_one_card_either_format_gguf_adapter_on_transformers(tf, lora_a_gguf, lora_a_peft, chat_home):
    """A card's GGUF adapter runs on transformers: converted to PEFT once (cached), same tokens as the PEFT folder."""
    warnings = tf.apply(lora_persona((lora_a_peft, 0.8)))
    want = greedy_ids(tf, PROMPTS["hello"])
    warnings = tf.apply(lora_persona((lora_a_gguf, 0.8)))
    assert any("converted GGUF adapter" in w for w in warnings)
    assert greedy_ids(tf, PROMPTS["hello"]) == want
    tf.apply(BASE)
    warnings = tf.apply(lora_persona((lora_a_gguf, 0.8)))
    assert not any("converted" in w for w in warnings)  # the cached conversion is reused
    tf.apply(BASE)


def test_one_card_either_format_peft_adapter_on_llama_cpp(llama, lora_a_gguf, lora_a_peft, chat_home):
    """A card's PEFT folder runs on llama.cpp: converted to GGUF once (cached), same tokens as the GGUF adapter."""
    llama.apply(lora_persona((lora_a_gguf, 0.8)))
    want = greedy_ids(llama, PROMPTS["hello"])
    warnings = llama.apply(lora_persona((lora_a_peft, 0.8)))
    assert any("converted PEFT adapter" in w for w in warnings)
    assert greedy_ids(llama, PROMPTS["hello"]) == want
    llama.apply(BASE)
    assert not any("converted" in w for w in llama.apply(lora_persona((lora_a_peft, 0.8))))
    llama.apply(BASE)

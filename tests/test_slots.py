"""Slots: several independent generation states on one loaded model.

Two slots on one model, each with its own persona (parameter parts), generating at the same
time — interleaved token by token, and on llama.cpp also in two threads — give exactly the
tokens each gives alone. The model is loaded once; adapters are loaded once per model.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from chat.backend import BackendOptions, Finish, Message, Slot
from chat.persona import AdapterPart, Persona, SteeringPart
from chat.sampling import SamplerSettings
from chat_plugins.llamacpp import LlamaCppBackend
from chat_plugins.transformers_backend import TransformersBackend

GREEDY = SamplerSettings(temperature=0.0, max_tokens=12)
SEEDED = SamplerSettings(temperature=0.9, top_k=40, seed=7, max_tokens=12)
MESSAGES = [Message("user", "hello there")]
OTHER = [Message("system", "You are a pirate."), Message("user", "Where is the treasure?")]


def lora(path: Path) -> Persona:
    return Persona(name="lora", adapters=(AdapterPart(Path(path), 1.0),))


def steered(path: Path) -> Persona:
    return Persona(name="steered", steering=(SteeringPart(Path(path), 0.8, None),))


def ids_alone(slot: Slot, messages, settings) -> tuple[int, ...]:
    items = list(slot.stream(messages, settings))
    assert isinstance(items[-1], Finish)
    return tuple(slot.stats.last.completion_ids)  # type: ignore[attr-defined]


def interleaved(a: Slot, b: Slot, jobs) -> list[tuple[int, ...]]:
    """Run both streams at once, one step of each in turn."""
    streams = [iter(slot.stream(messages, settings)) for slot, (messages, settings) in zip((a, b), jobs)]
    live = set(range(len(streams)))
    while live:
        for i in sorted(live):
            item = next(streams[i], None)
            if item is None or isinstance(item, Finish):
                live.discard(i)
    return [tuple(s.stats.last.completion_ids) for s in (a, b)]  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def llama(tiny_gguf):
    with LlamaCppBackend(str(tiny_gguf), BackendOptions(threads=1)) as backend:
        yield backend


@pytest.fixture(scope="module")
def tf(tiny_hf_dir):
    with TransformersBackend(str(tiny_hf_dir), BackendOptions(threads=1)) as backend:
        yield backend


@pytest.mark.parametrize("which", ["llama", "tf"])
def test_two_slots_with_different_personas_generate_concurrently(request, which, lora_a_gguf, lora_a_peft, cvec_gguf):
    backend = request.getfixturevalue(which)
    first, second = backend.new_slot(), backend.new_slot()
    adapter = lora_a_gguf if which == "llama" else lora_a_peft
    first.apply(lora(adapter))
    second.apply(steered(cvec_gguf))
    jobs = [(MESSAGES, GREEDY), (OTHER, SEEDED)]
    alone = [ids_alone(first, *jobs[0]), ids_alone(second, *jobs[1])]
    assert all(len(ids) == 12 for ids in alone) or all(alone)

    # the same slots again, and fresh slots: each time at once, the same tokens as alone
    assert interleaved(first, second, jobs) == alone
    third, fourth = backend.new_slot(), backend.new_slot()
    third.apply(lora(adapter))
    fourth.apply(steered(cvec_gguf))
    assert interleaved(third, fourth, jobs) == alone

    # the personas really differ: the base gives other tokens than either
    base = backend.new_slot()
    base.apply(Persona(name="base"))
    plain = ids_alone(base, *jobs[0])
    assert plain != alone[0]
    assert ids_alone(base, *jobs[1]) != alone[1]
    if which == "llama":
        assert backend.loaded_adapters == 1  # one adapter load for all slots


@pytest.mark.parametrize("which", ["llama", "tf"])
def test_slots_run_in_parallel_threads(request, which, lora_a_gguf, lora_a_peft, cvec_gguf):
    """As a server runs them: one thread per request (transformers takes turns on the model's lock)."""
    backend = request.getfixturevalue(which)
    slots = [backend.new_slot() for _ in range(2)]
    slots[0].apply(lora(lora_a_gguf if which == "llama" else lora_a_peft))
    slots[1].apply(steered(cvec_gguf))
    jobs = [(MESSAGES, GREEDY), (OTHER, SEEDED)]
    alone = [ids_alone(s, *job) for s, job in zip(slots, jobs)]
    got: list[tuple[int, ...] | None] = [None, None]

    def run(i: int) -> None:
        got[i] = ids_alone(slots[i], *jobs[i])

    for _ in range(2):
        got = [None, None]
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert got == alone


def test_a_new_slot_restores_a_persona_state_another_slot_saved(llama):
    """Saved persona states belong to the model: a slot restores what another one left."""
    one, two = llama.new_slot(), llama.new_slot()
    long_system = [Message("system", "You are a patient teacher. " * 20), Message("user", "hi")]
    one.apply(Persona(name="teacher"))
    ids_alone(one, long_system, GREEDY)
    one.apply(Persona(name="pirate"))
    ids_alone(one, OTHER, GREEDY)  # leaving "teacher" saves its memory
    two.apply(Persona(name="teacher"))
    assert ids_alone(two, long_system, GREEDY) == ids_alone(llama.new_slot(), long_system, GREEDY)
    assert two.stats.state_restores == 1

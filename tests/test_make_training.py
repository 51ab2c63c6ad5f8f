"""The training loop every trained part shares: Ctrl-C writes a checkpoint and --resume ends exactly where an
uninterrupted run ends (shown on a soft prompt, the quickest part to train)."""

from __future__ import annotations

import os
import signal

import pytest

pytest.importorskip("torch")


def test_an_interrupted_soft_prompt_resumes_to_the_same_numbers(tiny_gguf, tmp_path):
    import torch

    from chat.make.base import load_base
    from chat.make.data import Dialogue, Turn
    from chat.make.encode import encode
    from chat.make.softprompt import STATE, SoftPromptSettings, train_soft_prompt
    from chat.make.training import CHECKPOINT, InterruptedTraining

    base = load_base(str(tiny_gguf))
    turns = [(Turn("user", f"What about thing {i}?"), Turn("assistant", "Arr, matey!")) for i in range(12)]
    dialogues = [Dialogue(t) for t in turns]
    items = [encode(base, d, "You are a pirate.") for d in dialogues]
    train, held = items[:10], items[10:]
    s = SoftPromptSettings(n_virtual=4, lr=0.1, epochs=4, batch_size=3, patience=0, seed=5)
    whole = train_soft_prompt(base, train, held, s, "You are a pirate.", tmp_path / "a", "fp")

    def interrupt(p) -> None:
        if p.step == 6:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does: stop after this step

    with pytest.raises(InterruptedTraining):
        train_soft_prompt(base, train, held, s, "You are a pirate.", tmp_path / "b", "fp", on_progress=interrupt)
    assert (tmp_path / "b" / CHECKPOINT).is_file()
    resumed = train_soft_prompt(base, train, held, s, "You are a pirate.", tmp_path / "b", "fp", resume=True)
    assert resumed.resumed_from == 6 and resumed.steps == whole.steps == 16
    assert torch.equal(resumed.state[STATE], whole.state[STATE])
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]
    assert not (tmp_path / "b" / CHECKPOINT).exists()
    assert all(p.requires_grad for p in base.model.parameters())  # the base is given back as it was

"""The REPL on the real llama.cpp backend with adapter cards: switching and mixing mid-conversation (pexpect)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pexpect
import pytest

pytest.importorskip("llama_cpp")

from terminal import spawn  # noqa: E402,F401  (the fixture)


def card(folder: Path, name: str, text: str, files: dict[str, Path]) -> Path:
    d = folder / name
    d.mkdir(parents=True, exist_ok=True)
    for rel, src in files.items():
        shutil.copy(src, d / rel)
    (d / "persona.toml").write_text(f'name = "{name}"\n' + text, encoding="utf-8")
    return d


@pytest.fixture
def adapter_cards(chat_home, lora_a_gguf, lora_b_gguf, cvec_gguf, bad_model_files):
    root = chat_home / "config" / "personas"
    card(root, "alpha", 'system = "You are alpha."\ngreeting = "alpha here"\n[[adapters]]\npath = "lora-a.gguf"\n', {"lora-a.gguf": lora_a_gguf})
    card(
        root, "beta",
        'system = "You are beta."\n[[adapters]]\npath = "lora-b.gguf"\n[[steering]]\npath = "calm.gguf"\nscale = 0.5\n',
        {"lora-b.gguf": lora_b_gguf, "calm.gguf": cvec_gguf},
    )
    card(root, "broken", '[[adapters]]\npath = "bad.gguf"\n', {"bad.gguf": bad_model_files["lora_alpha_int32"]})
    return root


def test_switch_and_mix_adapter_personas_mid_conversation(spawn, chat_home, adapter_cards, tiny_gguf):
    child = spawn("-m", str(tiny_gguf), "-p", "alpha", "-t", "0", "--max-tokens", "6")
    child.expect_exact("alpha here")
    child.expect_exact("you ›")
    child.sendline("hello there")
    child.expect_exact("you ›")

    child.sendline("/adapters")
    child.expect(r"adapter\s+lora-a\s+scale 1\s+card alpha\s+rank 4, 14 tensors")
    child.expect_exact("you ›")

    child.sendline("/persona beta")
    child.expect_exact("model not reloaded")
    child.expect_exact("you ›")
    child.sendline("and you?")
    child.expect_exact("you ›")

    child.sendline("/persona alpha:0.7,beta:0.3")
    child.expect_exact("you ›")
    child.sendline("/adapters")
    child.expect(r"lora-a\s+scale 0\.7")
    child.expect(r"lora-b\s+scale 0\.3")
    child.expect(r"steering\s+calm\s+scale 0\.15")
    child.expect_exact("you ›")
    child.sendline("mixed now")
    child.expect_exact("you ›")

    child.sendline("/set adapter.lora-a.scale 0.5")
    child.expect_exact("adapter.lora-a.scale = 0.5")
    child.sendline("/set adapter.nope.scale 0.5")
    child.expect_exact("no adapter named 'nope'")
    child.expect_exact("known: lora-a, lora-b")
    child.sendline("/adapters")
    child.expect(r"lora-a\s+scale 0\.5")

    child.sendline("/persona broken")  # its adapter would abort ggml: refused, the session goes on
    child.expect_exact("adapter.lora.alpha is stored as int32")
    child.expect_exact("you ›")
    child.sendline("still here")
    child.expect_exact("you ›")

    child.sendline("/persona alpha")
    child.expect_exact("you ›")
    child.sendline("back to alpha")
    child.expect_exact("you ›")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    from chat.store import Store

    store = Store(chat_home / "data" / "history.db")
    msgs = store.messages(store.last_conversation_id())
    answers = [m.persona for m in msgs if m.role == "assistant"]
    assert answers == ["alpha", "beta", "alpha:0.7,beta:0.3", "alpha:0.7,beta:0.3", "alpha"]
    assert [m.content for m in msgs if m.role == "user"] == ["hello there", "and you?", "mixed now", "still here", "back to alpha"]
    store.close()


def test_soft_prompt_card_in_the_repl(spawn, chat_home, tiny_gguf, tiny_cfg, tmp_path):
    """/adapters and /info list the soft prompt; switching to and from it is a persona switch, no reload."""
    import numpy as np

    from chat.parts.softprompt import write_gguf_soft_prompt

    rows = np.random.default_rng(9).standard_normal((5, tiny_cfg.hidden_size)).astype(np.float32)
    soft = write_gguf_soft_prompt(tmp_path / "ghost.gguf", rows, architecture="llama")
    card(chat_home / "config" / "personas", "ghost", '[[soft_prompt]]\npath = "ghost.gguf"\n', {"ghost.gguf": soft})
    child = spawn("-m", str(tiny_gguf), "-p", "ghost", "-t", "0", "--max-tokens", "4")
    child.expect_exact("you ›")
    child.sendline("hello there")
    child.expect_exact("you ›")
    child.sendline("/adapters")
    child.expect(r"soft prompt\s+ghost\s+card ghost\s+5 virtual tokens × 64")
    child.expect_exact("you ›")
    child.sendline("/info")
    child.expect(r"soft prompt\s+ghost")
    child.expect_exact("you ›")
    child.sendline("/persona assistant")
    child.expect_exact("model not reloaded")
    child.expect_exact("you ›")
    child.sendline("/adapters")
    child.expect_exact("no adapters, control vectors or soft prompts are active")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

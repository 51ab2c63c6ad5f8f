"""``chat personas make --lora`` on a real model: Gemma 3 270M, Q4_K_M, through transformers' float copy.

The adapter is trained on the dequantized weights and written both as a PEFT folder and as a
llama.cpp adapter GGUF (gemma3: no q/k permutation, as llama.cpp's own converter does); the GGUF
adapter then runs on the original Q4_K_M file in llama.cpp, where greedy answers to prompts the
training never saw take the learned style, and without the card they do not.
"""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("llama_cpp")

from test_make import STYLE, TOPICS, UNSEEN, dialogue, run_cli, write_jsonl  # noqa: E402
from test_real_model import gemma  # noqa: E402,F401  (the fixture: the assembled GGUF, cached)

pytestmark = pytest.mark.slow


def test_a_lora_made_on_gemma3_applies_to_the_q4_k_m_file_in_llamacpp(gemma, tmp_path):  # noqa: F811
    from chat.backend import BackendOptions, Finish, Message
    from chat.catalog import PersonaCatalog
    from chat.persona import NO_PERSONA
    from chat.sampling import SamplerSettings
    from chat_plugins.llamacpp import LlamaCppBackend

    env = {**os.environ, "CHAT_CONFIG_DIR": str(tmp_path / "config"), "CHAT_DATA_DIR": str(tmp_path / "data"),
           "NO_COLOR": "1", "CHAT_MODEL": ""}
    data = write_jsonl(tmp_path / "pirate.jsonl", [dialogue(t) for t in TOPICS])
    out = tmp_path / "card"
    result = run_cli(env, "personas", "make", "gpirate", "-b", str(gemma), "--from", str(data), "--lora",
                     "--epochs", "6", "--lr", "5e-3", "--patience", "0", "--seed", "3", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert 'path = "adapters/gpirate.gguf"' in (out / "persona.toml").read_text()
    record = json.loads((out / "make.json").read_text())
    assert record["base"]["architecture"] == "gemma3" and not record["notes"], record["notes"]
    assert record["lora"]["held_loss_with"] < record["lora"]["held_loss_without"] / 4

    card = PersonaCatalog(None).resolve(str(out))
    backend = LlamaCppBackend(str(gemma), BackendOptions(threads=2))

    def answers(persona) -> list[str]:
        backend.apply(persona)
        prefix = [Message("system", persona.system)] if persona.system else []
        return ["".join(x for x in backend.stream([*prefix, Message("user", p)],
                                                  SamplerSettings(temperature=0.0, max_tokens=12))
                        if not isinstance(x, Finish)) for p in UNSEEN]

    try:
        with_card, without = answers(card), answers(NO_PERSONA)
    finally:
        backend.close()
    assert all(a.startswith(STYLE[:11]) for a in with_card), with_card
    assert not any("matey" in a for a in without), without

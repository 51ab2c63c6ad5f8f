"""Soft prompts (issue 13): PEFT prompt-tuning semantics on both backends, switching, KV keys, validation.

The tiny f32 llama exists as safetensors and as an f32 GGUF of the same weights; a soft prompt is
written from one random matrix as a PEFT folder (what ``PeftModel.save_pretrained`` writes) and as
chat's GGUF. llama.cpp runs with an f32 KV cache and flash attention off (``kv_type="f32"``), without
which its CPU attention rounds through half precision (FACTS).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("llama_cpp")

from chat.backend import BackendOptions, Finish, Message  # noqa: E402
from chat.errors import AdapterError  # noqa: E402
from chat.parts.softprompt import (  # noqa: E402
    read_soft_prompt,
    write_gguf_soft_prompt,
    write_peft_soft_prompt,
)
from chat.persona import Persona, SoftPromptPart, mix_personas  # noqa: E402
from chat.sampling import SamplerSettings  # noqa: E402
from chat_plugins.llamacpp import LlamaCppBackend  # noqa: E402
from chat_plugins.transformers_backend import TransformersBackend  # noqa: E402

GREEDY = SamplerSettings(temperature=0.0, max_tokens=12)
CHAT = [Message("system", "You are a pirate."), Message("user", "Where is the treasure?")]
BASE = Persona(name="base")


def soft_values(cfg, n: int, seed: int) -> np.ndarray:
    """Rows with a large norm, so that the virtual tokens visibly steer a random model."""
    return (np.random.default_rng(seed).standard_normal((n, cfg.hidden_size)) * 2.0).astype(np.float32)


@pytest.fixture(scope="module")
def soft_files(tmp_path_factory, tiny_cfg) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("soft")
    a, b = soft_values(tiny_cfg, 6, 1), soft_values(tiny_cfg, 3, 2)
    return {
        "a_peft": write_peft_soft_prompt(root / "a_peft", a, num_layers=tiny_cfg.n_layer),
        "a_gguf": write_gguf_soft_prompt(root / "a.gguf", a, architecture="llama"),
        "b_gguf": write_gguf_soft_prompt(root / "b.gguf", b, architecture="llama"),
        "b_peft": write_peft_soft_prompt(root / "b_peft", b),
    }


def soft(*paths: Path, name: str = "soft") -> Persona:
    return Persona(name=name, soft_prompts=tuple(SoftPromptPart(Path(p), "card") for p in paths))


def run(backend, messages=CHAT, sampling=GREEDY) -> tuple[tuple[int, ...], Finish]:
    finish = None
    for item in backend.stream(messages, sampling):
        if isinstance(item, Finish):
            finish = item
    assert finish is not None and finish.reason in ("stop", "length"), finish
    return tuple(backend.slot.stats.last.completion_ids), finish


@pytest.fixture(scope="module")
def llama(tiny_gguf):
    backend = LlamaCppBackend(str(tiny_gguf), BackendOptions(threads=1), kv_type="f32")
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def tf(tiny_hf_dir):
    backend = TransformersBackend(str(tiny_hf_dir), BackendOptions(threads=1))
    yield backend
    backend.close()


def test_peft_prompt_tuning_semantics_through_peft_itself(tiny_hf_dir, soft_files, tf):
    """Our transformers path gives PEFT's own logits: virtual tokens first, before BOS, unscaled."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_hf_dir), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, str(soft_files["a_peft"]))
    prompt = tf.slot.prompt_tokens(CHAT)
    with torch.inference_mode():
        want = peft_model(input_ids=torch.tensor([prompt])).logits[0, -1]
    tf.apply(soft(soft_files["a_peft"]))
    tf.slot.prefill([*tf.slot.soft_ids, *prompt], tf.slot.stats.last)
    assert torch.allclose(tf.slot.logits.float(), want, atol=1e-5)


@pytest.mark.parametrize("kind", ["peft", "gguf"])
def test_same_greedy_ids_on_both_backends_and_not_the_base(llama, tf, soft_files, kind):
    llama.apply(BASE)
    tf.apply(BASE)
    base_ids, _ = run(llama)
    assert run(tf)[0] == base_ids
    persona = soft(soft_files[f"a_{kind}"])
    llama.apply(persona)
    tf.apply(persona)
    on_llama, finish = run(llama)
    on_tf, tf_finish = run(tf)
    assert on_llama == on_tf
    assert on_llama != base_ids
    assert finish.usage.virtual_tokens == tf_finish.usage.virtual_tokens == 6
    assert finish.usage.prompt_tokens == len(llama.slot.prompt_tokens(CHAT))


def test_beam_search_with_a_soft_prompt_is_the_same_on_both_backends(llama, tf, soft_files):
    beams = SamplerSettings(beams=3, max_tokens=8)
    persona = soft(soft_files["a_gguf"])
    llama.apply(persona)
    tf.apply(persona)
    on_llama, finish = run(llama, sampling=beams)
    assert run(tf, sampling=beams)[0] == on_llama and finish.usage.virtual_tokens == 6
    llama.apply(BASE)
    assert run(llama, sampling=beams)[0] != on_llama


def test_both_formats_hold_the_same_numbers(soft_files):
    for name in ("a", "b"):
        peft, gguf = read_soft_prompt(soft_files[f"{name}_peft"]), read_soft_prompt(soft_files[f"{name}_gguf"])
        assert peft.format == "peft" and gguf.format == "gguf"
        assert np.array_equal(peft.values, gguf.values)


def test_mix_concatenates_in_order_and_weight_zero_drops(llama, tf, soft_files):
    a, b = soft(soft_files["a_gguf"], name="a"), soft(soft_files["b_gguf"], name="b")
    ab = mix_personas([(a, 1.0), (b, 0.5)])
    assert [p.path for p in ab.soft_prompts] == [soft_files["a_gguf"], soft_files["b_gguf"]]
    assert mix_personas([(a, 1.0), (b, 0.0)]).soft_prompts == a.soft_prompts
    concatenated = soft(soft_files["a_gguf"], soft_files["b_gguf"])
    llama.apply(ab)
    mixed, finish = run(llama)
    assert finish.usage.virtual_tokens == 9
    tf.apply(concatenated)
    assert run(tf)[0] == mixed
    llama.apply(soft(soft_files["b_gguf"], soft_files["a_gguf"]))  # the other order is another prompt
    assert run(llama)[0] != mixed


def test_switching_never_reuses_kv_across_soft_prompts(tiny_gguf, soft_files):
    with LlamaCppBackend(str(tiny_gguf), BackendOptions(threads=1), kv_type="f32") as fresh:
        fresh.apply(soft(soft_files["a_gguf"]))
        want_a, _ = run(fresh)
    with LlamaCppBackend(str(tiny_gguf), BackendOptions(threads=1), kv_type="f32") as fresh:
        want_base, _ = run(fresh)
    with LlamaCppBackend(str(tiny_gguf), BackendOptions(threads=1), kv_type="f32") as backend:
        stats = backend.slot.stats
        for persona, want in (
            (soft(soft_files["a_gguf"]), want_a),
            (BASE, want_base),
            (soft(soft_files["a_gguf"]), want_a),
        ):
            backend.apply(persona)
            assert run(backend)[0] == want
        # the same soft prompt again, same conversation: the prompt's KV is reused
        run(backend)
        assert stats.last.prompt_tokens_reused > 6
        # another soft prompt of another length: nothing is reused, every virtual token is evaluated
        backend.apply(soft(soft_files["b_gguf"]))
        _, finish = run(backend)
        assert stats.last.prompt_tokens_reused == 0
        assert stats.last.prompt_tokens_evaluated == 3 + finish.usage.prompt_tokens


def test_switch_on_transformers_matches_fresh_start(tiny_hf_dir, soft_files):
    with TransformersBackend(str(tiny_hf_dir), BackendOptions(threads=1)) as fresh:
        fresh.apply(soft(soft_files["a_peft"]))
        want_a, _ = run(fresh)
        fresh.apply(BASE)
        want_base, _ = run(fresh)
    with TransformersBackend(str(tiny_hf_dir), BackendOptions(threads=1)) as backend:
        for persona, want in ((BASE, want_base), (soft(soft_files["a_peft"]), want_a), (BASE, want_base)):
            backend.apply(persona)
            assert run(backend)[0] == want
        backend.apply(soft(soft_files["a_peft"]))
        run(backend)
        backend.apply(soft(soft_files["a_gguf"]))  # same numbers, another file: another key, nothing reused
        run(backend)
        assert backend.slot.stats.last.prompt_tokens_reused == 0


def test_active_parts_and_info_list_the_soft_prompt(llama, tf, soft_files):
    for backend in (llama, tf):
        backend.apply(soft(soft_files["a_gguf"]))
        lines = backend.active_parts()
        assert any(line.startswith("soft prompt  a") and "6 virtual tokens × 64" in line for line in lines), lines
        assert backend.info()["soft_prompt"] == [line for line in lines if line.startswith("soft prompt")]
        backend.apply(BASE)
        assert not backend.info()["soft_prompt"]


# --- validation: one verdict on both backends ------------------------------------------------


def _bad_files(root: Path, cfg) -> dict[str, tuple[Path, str]]:
    good = soft_values(cfg, 4, 3)
    out: dict[str, tuple[Path, str]] = {}
    out["width"] = (write_gguf_soft_prompt(root / "wide.gguf", soft_values(cfg, 4, 3)[:, :32]), "hidden size is 64")
    nan = good.copy()
    nan[2, 5] = np.nan
    out["nan"] = (write_peft_soft_prompt(root / "nan_peft", nan), "virtual token 2 holds NaN")
    lora = root / "lora_peft"
    write_peft_soft_prompt(lora, good)
    cfg_file = lora / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "peft_type": "LORA"}))
    out["lora"] = (lora, "is not PROMPT_TUNING")
    counts = root / "counts_peft"
    write_peft_soft_prompt(counts, good)
    cfg_file = counts / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "num_virtual_tokens": 9}))
    out["counts"] = (counts, "declares num_virtual_tokens 9")
    truncated = root / "short.gguf"
    data = write_gguf_soft_prompt(root / "full.gguf", good).read_bytes()
    truncated.write_bytes(data[: len(data) - 40])
    out["truncated"] = (truncated, "truncated")
    out["not_gguf"] = (root / "text.gguf", "not a GGUF file")
    out["not_gguf"][0].write_text("hello")
    return out


def test_bad_files_refused_identically_on_both_backends(llama, tf, tmp_path, tiny_cfg):
    for case, (path, words) in _bad_files(tmp_path, tiny_cfg).items():
        messages = []
        for backend in (llama, tf):
            backend.apply(BASE)
            with pytest.raises(AdapterError) as info:
                backend.apply(soft(path))
            messages.append(info.value.message)
            assert backend.info()["soft_prompt"] == [], case  # the previous set stays
        assert words in messages[0], (case, messages[0])
        assert messages[0].split(" (base model")[0] == messages[1].split(" (base model")[0], case


def test_too_long_for_the_context_is_one_clear_line(tiny_gguf, tmp_path, tiny_cfg):
    long = write_gguf_soft_prompt(tmp_path / "long.gguf", soft_values(tiny_cfg, 200, 4))
    with LlamaCppBackend(str(tiny_gguf), BackendOptions(threads=1, context_size=256)) as backend:
        with pytest.raises(AdapterError, match="200 virtual tokens, but the context holds 256"):
            backend.apply(soft(long))


def test_card_with_a_soft_prompt_through_the_cli(cli, chat_home, tiny_gguf, soft_files):
    """``[[soft_prompt]]`` in persona.toml: --json counts the virtual tokens apart, ``personas show`` lists it."""
    folder = Path(os.environ["CHAT_CONFIG_DIR"]) / "personas" / "ghost"
    (folder / "soft").mkdir(parents=True)
    import shutil

    shutil.copy(soft_files["a_gguf"], folder / "soft" / "ghost.gguf")
    (folder / "persona.toml").write_text('name = "ghost"\n\n[[soft_prompt]]\npath = "soft/ghost.gguf"\n')
    r = cli("-m", str(tiny_gguf), "--persona", "ghost", "--json", "--no-history", "-t", "0", "--max-tokens", "4", "hi")
    assert r.exit_code == 0, r.output
    usage = json.loads(r.stdout)["usage"]
    assert usage["virtual_tokens"] == 6 and usage["prompt_tokens"] > 0
    r = cli("personas", "show", "ghost", "-m", str(tiny_gguf))
    assert r.exit_code == 0, r.output
    assert "soft prompts: 1" in r.output and "6 virtual tokens, width 64" in r.output and "fit: yes" in r.output


def test_convert_both_ways_keeps_the_numbers(cli, tmp_path, soft_files, tiny_gguf, tiny_hf_dir):
    gguf = tmp_path / "out.gguf"
    r = cli("convert", "soft-prompt", str(soft_files["a_peft"]), "-o", str(gguf), "--base", str(tiny_hf_dir))
    assert r.exit_code == 0, r.output
    assert "soft prompt GGUF, 6 virtual tokens × 64" in r.output
    back = tmp_path / "back_peft"
    r = cli("convert", "soft-prompt", str(gguf), "-o", str(back), "-b", str(tiny_gguf))
    assert r.exit_code == 0, r.output
    assert np.array_equal(read_soft_prompt(back).values, read_soft_prompt(soft_files["a_peft"]).values)
    # what peft itself reads back
    from safetensors.numpy import load_file

    assert np.array_equal(
        load_file(str(back / "adapter_model.safetensors"))["prompt_embeddings"], read_soft_prompt(gguf).values
    )
    r = cli("convert", "soft-prompt", str(gguf), "-o", str(back))
    assert r.exit_code != 0 and "already exists" in r.output
    wide = write_gguf_soft_prompt(tmp_path / "wide.gguf", np.ones((2, 32), np.float32))
    r = cli("convert", "soft-prompt", str(wide), "-o", str(tmp_path / "w_peft"), "-b", str(tiny_gguf))
    assert r.exit_code != 0
    assert "virtual tokens of width 32, but the base model's hidden size is 64" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "w_peft").exists()


def test_card_soft_prompt_path_stays_in_the_card_folder(cli, tmp_path, soft_files):
    folder = tmp_path / "card"
    folder.mkdir()
    (folder / "persona.toml").write_text('name = "card"\n\n[[soft_prompt]]\npath = "../elsewhere.gguf"\n')
    r = cli("personas", "validate", str(folder))
    assert r.exit_code != 0
    assert "soft_prompt[0].path '../elsewhere.gguf' points outside the card folder" in r.output
    (folder / "persona.toml").write_text('name = "card"\n\n[[soft_prompt]]\npath = "x.gguf"\nscale = 2\n')
    r = cli("personas", "validate", str(folder))
    assert r.exit_code != 0 and "soft_prompt.0.scale" in r.output


def test_chat_serve_serves_a_soft_prompt_card(tiny_gguf, tmp_path, soft_files):
    """Through the openai client: the card answers as the one-shot CLI does, and unlike the base, on any slot."""
    import shutil
    import subprocess

    from test_serve import Server, chat_exe

    card = tmp_path / "config" / "personas" / "ghost"
    card.mkdir(parents=True)
    shutil.copytree(soft_files["a_peft"], card / "soft")
    (card / "persona.toml").write_text('name = "ghost"\n\n[[soft_prompt]]\npath = "soft"\n')
    server = Server(tiny_gguf, tmp_path, "--slots", "2")
    try:
        cmd = [*chat_exe(), "-m", str(tiny_gguf), "-p", "ghost", "-t", "0", "--max-tokens", "8", "--json"]
        cmd += ["--no-history", "--threads", "1", "hello there"]
        out = subprocess.run(cmd, capture_output=True, text=True, env=server.env, timeout=120)
        assert out.returncode == 0, out.stderr
        want = json.loads(out.stdout)["text"]
        client = server.client()
        answers = []
        for model in ("ghost", "ghost", tiny_gguf.name, "ghost"):
            r = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hello there"}], temperature=0, max_tokens=8
            )
            answers.append((model, r.choices[0].message.content, r.usage.prompt_tokens))
        assert [a for m, a, _ in answers if m == "ghost"] == [want] * 3
        assert answers[2][1] != want
        assert answers[0][2] == answers[2][2]  # virtual tokens are not prompt tokens
    finally:
        server.stop()

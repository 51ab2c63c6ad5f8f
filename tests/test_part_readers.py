"""One file, one verdict: every bad adapter or vector is refused the same way by both real backends.

Each case builds one bad file and applies it through the llama.cpp backend (tiny GGUF) and the
transformers backend (the same tiny model as a Hugging Face folder). Both must raise the same
error class with a message that names the file and gives the same reason: the messages are
equal once the base's name (``tiny-f32.gguf`` / ``tiny-hf``) is set aside. A card's PEFT folder
reaches llama.cpp through the PEFT → GGUF conversion, a card's GGUF adapter reaches transformers
through the GGUF → PEFT one; both conversions use the readers the backends use.
"""

from __future__ import annotations

import math
import shutil
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("torch")
pytest.importorskip("peft")

import modelfactory as mf  # noqa: E402
from chat.backend import BackendOptions  # noqa: E402
from chat.errors import AdapterError, ChatError  # noqa: E402
from chat.persona import AdapterPart, Persona, SteeringPart  # noqa: E402
from chat_plugins.llamacpp import LlamaCppBackend  # noqa: E402
from chat_plugins.transformers_backend import TransformersBackend  # noqa: E402

PLAIN = Persona(name="plain")
BASE_NAMES = ("tiny-f32.gguf", "tiny-hf")  # the same tiny model as the two backends load it


@pytest.fixture(scope="module")
def llama(tiny_gguf):
    backend = LlamaCppBackend(str(tiny_gguf), BackendOptions(threads=1))
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def hf(tiny_hf_dir):
    backend = TransformersBackend(str(tiny_hf_dir), BackendOptions(threads=1))
    yield backend
    backend.close()


def adapter(path: Path) -> Persona:
    return Persona(name="bad", adapters=(AdapterPart(Path(path), 1.0, "bad"),))


def vector(path: Path) -> Persona:
    return Persona(name="bad", steering=(SteeringPart(Path(path), 1.0, None, "bad"),))


def refusal(backend, persona: Persona) -> ChatError:
    backend.apply(PLAIN)
    with pytest.raises(ChatError) as err:
        backend.apply(persona)
    backend.apply(PLAIN)  # the backend still works after the refusal
    return err.value


def reason(err: ChatError, *base_names: str) -> str:
    """The message with the base's name set aside (llama.cpp also appends it to read errors)."""
    text = err.message
    for name in base_names:
        text = re.sub(rf" \(base model {re.escape(name)}\)$", "", text).replace(name, "BASE")
    return text


def same_refusal(llama, hf, persona: Persona, path: Path, needle: str) -> str:
    """Both backends refuse ``persona`` with the same error class and reason, naming ``path``; return the reason."""
    on_llama, on_hf = refusal(llama, persona), refusal(hf, persona)
    assert type(on_llama) is type(on_hf) is AdapterError, (on_llama, on_hf)
    for err in (on_llama, on_hf):
        assert str(path) in err.message and needle in err.message, err.message
        assert "\n" not in str(err)
    assert reason(on_llama, *BASE_NAMES) == reason(on_hf, *BASE_NAMES)
    return on_llama.message


# --- control vectors ----------------------------------------------------------------------------------------


def test_vector_with_direction_0_is_refused_by_both(llama, hf, cvec_directions, tmp_path):
    path = mf.write_bad_control_vector(tmp_path / "zero.gguf", cvec_directions, name="direction.0")
    same_refusal(llama, hf, vector(path), path, "'direction.0' is for layer 0")


def test_vector_with_an_unknown_tensor_is_refused_by_both(llama, hf, cvec_directions, tmp_path):
    path = mf.write_bad_control_vector(tmp_path / "unknown.gguf", cvec_directions, name="bias.1")
    same_refusal(llama, hf, vector(path), path, "'bias.1' is not a direction.N tensor")


def test_vector_of_the_wrong_length_is_refused_by_both(llama, hf, tiny_cfg, tmp_path):
    wide = mf.write_bad_control_vector_width(tmp_path / "wide.gguf", tiny_cfg)
    same_refusal(llama, hf, vector(wide), wide, "direction.1 has 80 values but the base's hidden size is 64")
    uneven = mf.write_control_vector(tmp_path / "uneven.gguf", {1: np.ones(64, np.float32), 2: np.ones(80, np.float32)})
    same_refusal(llama, hf, vector(uneven), uneven, "'direction.2' has 80 values but 'direction.1' has 64")


def test_vector_with_nan_is_refused_by_both(llama, hf, cvec_directions, tmp_path):
    path = mf.write_bad_control_vector(tmp_path / "nan.gguf", cvec_directions, value=math.nan)
    same_refusal(llama, hf, vector(path), path, "'direction.1' holds NaN or infinite values")


def test_vector_for_a_deeper_model_is_refused_by_both(llama, hf, cvec4_gguf):
    same_refusal(llama, hf, vector(cvec4_gguf), cvec4_gguf, "is for layer 2 but the base has layers 1-1")


def test_a_good_vector_is_accepted_by_both(llama, hf, cvec_gguf):
    for backend in (llama, hf):
        assert backend.apply(vector(cvec_gguf)) == []
        assert len(backend.active_parts()) == 1
        backend.apply(PLAIN)


# --- PEFT adapters --------------------------------------------------------------------------------------------


def test_peft_adapter_with_alpha_0_is_refused_by_both(llama, hf, tiny_cfg, lora_a, tmp_path):
    folder = mf.write_bad_peft_adapter(tmp_path / "alpha0", tiny_cfg, lora_a, config={"lora_alpha": 0})
    same_refusal(llama, hf, adapter(folder), folder, "lora_alpha is 0; it must be a finite number > 0")


def _peft_with(folder: Path, cfg, lora, change) -> Path:
    """A PEFT folder for ``lora`` whose tensors went through ``change(dict)``."""
    from safetensors.numpy import load_file, save_file

    out = mf.write_peft_adapter(folder, cfg, lora)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    change(tensors)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def test_peft_adapter_with_the_wrong_rank_shape_is_refused_by_both(llama, hf, tiny_cfg, lora_a, tmp_path):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"

    def widen_b(tensors):
        tensors[key] = np.ascontiguousarray(np.concatenate([tensors[key], tensors[key][:, :1]], axis=1))

    folder = _peft_with(tmp_path / "rank", tiny_cfg, lora_a, widen_b)
    same_refusal(llama, hf, adapter(folder), folder, "q_proj: lora_A has rank 4 but lora_B has rank 5")
    config = mf.write_bad_peft_adapter(tmp_path / "r8", tiny_cfg, lora_a, config={"r": 8})
    same_refusal(llama, hf, adapter(config), config, "has rank 4 but adapter_config.json says r = 8")


def test_peft_adapter_for_another_base_is_refused_by_both(llama, hf, tiny_cfg, tmp_path):
    other = mf.TinyLlamaConfig(vocab_size=tiny_cfg.vocab_size, ffn_size=96)
    folder = mf.write_peft_adapter(tmp_path / "other", other, mf.make_lora(other, rank=4, seed=3))
    message = same_refusal(llama, hf, adapter(folder), folder, "has shape [4, 96] but model.layers.0.mlp.down_proj")
    assert "does not fit" in message


def test_peft_adapter_with_an_unknown_module_is_refused_by_both(llama, hf, tiny_cfg, lora_a, tmp_path):
    def add_layer_7(tensors):
        for ab in ("A", "B"):
            tensors[f"base_model.model.model.layers.7.self_attn.q_proj.lora_{ab}.weight"] = (
                tensors[f"base_model.model.model.layers.0.self_attn.q_proj.lora_{ab}.weight"])

    folder = _peft_with(tmp_path / "unknown", tiny_cfg, lora_a, add_layer_7)
    same_refusal(llama, hf, adapter(folder), folder, "targets 'model.layers.7.self_attn.q_proj', which the base")


def test_peft_features_one_llama_cpp_adapter_cannot_carry_are_refused_by_both(llama, hf, tiny_cfg, lora_a, tmp_path):
    folder = mf.write_bad_peft_adapter(tmp_path / "dora", tiny_cfg, lora_a, config={"use_dora": True})
    same_refusal(llama, hf, adapter(folder), folder, "DoRA cannot be expressed")


# --- GGUF adapters ----------------------------------------------------------------------------------------------


def test_gguf_adapter_for_another_base_is_refused_by_both(llama, hf, tiny_cfg, tmp_path):
    other = mf.TinyLlamaConfig(vocab_size=tiny_cfg.vocab_size, ffn_size=96)
    path = mf.write_lora_gguf(tmp_path / "other.gguf", other, mf.make_lora(other, rank=4, seed=3))
    message = same_refusal(llama, hf, adapter(path), path, "in the base but the adapter's B·A is")
    assert "ffn_" in message and "does not fit" in message


def test_gguf_adapter_with_alpha_0_is_refused_by_both(llama, hf, tiny_cfg, lora_a, tmp_path):
    path = mf.write_bad_lora_tensors(tmp_path / "alpha0.gguf", tiny_cfg, lora_a, alpha=0.0)
    same_refusal(llama, hf, adapter(path), path, "adapter.lora.alpha is 0.0; it must be a finite number > 0")


def test_gguf_adapter_with_nan_is_refused_by_both(llama, hf, tiny_cfg, lora_a, tmp_path):
    path = mf.write_bad_lora_tensors(tmp_path / "nan.gguf", tiny_cfg, lora_a, value=math.nan)
    same_refusal(llama, hf, adapter(path), path, "'blk.0.attn_q.weight.lora_b' holds NaN or infinite values")


def test_good_adapters_in_either_format_are_accepted_by_both(llama, hf, lora_a_gguf, lora_a_peft):
    for backend in (llama, hf):
        for path in (lora_a_gguf, lora_a_peft):
            backend.apply(adapter(path))
            assert len(backend.active_parts()) == 1
            backend.apply(PLAIN)


def test_personas_show_gives_the_backends_verdict(cli, tmp_path, tiny_gguf, tiny_cfg, lora_a_peft):
    """`chat personas show -m` checks a PEFT folder against the base with the same reader."""
    other = mf.TinyLlamaConfig(vocab_size=tiny_cfg.vocab_size, ffn_size=96)
    card = tmp_path / "card"
    mf.write_peft_adapter(card / "other", other, mf.make_lora(other, rank=4, seed=3))
    (card / "persona.toml").write_text('name = "card"\n[[adapters]]\npath = "other"\n'
                                       '[[adapters]]\npath = "good"\n', encoding="utf-8")
    shutil.copytree(lora_a_peft, card / "good")
    out = cli("personas", "show", str(card), "-m", str(tiny_gguf)).output
    assert "PEFT LoRA: rank 4, alpha 8, 14 modules" in out
    assert "fit: yes (tiny-f32.gguf)" in out
    assert "fit: NO" in out and "has shape [4, 96] but model.layers.0.mlp.down_proj" in out


def _raw_gguf(kv: bytes, n_kv: int = 1) -> bytes:
    import struct

    return b"GGUF" + struct.pack("<IQQ", 3, 0, n_kv) + kv


def _key(name: str) -> bytes:
    import struct

    raw = name.encode()
    return struct.pack("<Q", len(raw)) + raw


def test_hostile_headers_are_one_clear_refusal(tmp_path):
    """Nested arrays thousands deep (Python's stack) and a NaN block count (int(nan)) are refused, not crashes."""
    import struct

    from chat.errors import ChatError
    from chat.parts.gguf import read_header

    nested = _key("x") + struct.pack("<I", 9) + (struct.pack("<IQ", 9, 1) * 5000) + struct.pack("<IQ", 4, 0)
    (tmp_path / "nested.gguf").write_bytes(_raw_gguf(nested))
    with pytest.raises(ChatError, match="nested"):
        read_header(tmp_path / "nested.gguf")
    arch = _key("general.architecture") + struct.pack("<I", 8) + _key("llama")
    nan = _key("llama.block_count") + struct.pack("<If", 6, float("nan"))
    (tmp_path / "nan.gguf").write_bytes(_raw_gguf(arch + nan, 2) + bytes(256))
    header = read_header(tmp_path / "nan.gguf")
    assert header.arch_int("block_count") is None

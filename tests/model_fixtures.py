"""Session-scoped pytest fixtures exposing the real tiny model files from :mod:`modelfactory`.

Use from a conftest with ``from model_fixtures import *``. Everything is built once per
test session in one ``tmp_path_factory`` directory; building all of it takes well under
a second (the tiny model is 2 layers x 64 wide, vocab 512). Only numpy, gguf, tokenizers
and safetensors are needed to *build*; loading them is up to the tests.

Fixtures (paths are ``pathlib.Path``):

* ``tiny_tokenizer_dir``   HF tokenizer folder (byte-level BPE, ChatML, eos ``<|im_end|>``)
* ``tiny_cfg``             :class:`modelfactory.TinyLlamaConfig` (2 layers, 64 wide)
* ``tiny_weights``         dict of HF-named float32 arrays (do not mutate)
* ``tiny_gguf``            f32 GGUF with ChatML template (bit-parity with ``tiny_hf_dir``)
* ``tiny_gguf_q8``         Q8_0 GGUF of the same weights
* ``tiny_gguf_no_template`` f32 GGUF without ``tokenizer.chat_template``
* ``tiny_hf_dir``          transformers folder (config.json + model.safetensors + tokenizer)
* ``lora_a`` / ``lora_b``  :class:`modelfactory.LoraAdapter` objects
                           (a: rank 4, alpha 8, all 7 projections;
                            b: rank 8, alpha 16, q/v/up/down only)
* ``lora_a_gguf`` / ``lora_b_gguf``   llama.cpp adapter GGUFs
* ``lora_a_peft`` / ``lora_b_peft``   PEFT adapter folders
* ``lora_mix_gguf``        f32 GGUF with 0.7*lora_a + 0.3*lora_b merged into the weights
* ``cvec_directions``      {1: direction} for the 2-layer model
* ``cvec_gguf``            control vector GGUF (layer 1 only: llama.cpp has no layer-0 slot)
* ``tiny4_cfg`` / ``tiny4_weights`` / ``tiny4_gguf``  4-layer variant for layer-range tests
* ``cvec4_directions`` / ``cvec4_gguf``               control vector for layers 1..3
* ``bad_model_files``      dict name -> path of deliberately broken files (see below)

``bad_model_files`` keys: ``truncated_gguf``, ``non_gguf``, ``lora_wrong_arch``,
``lora_wrong_shape``, ``lora_missing_tensor``, ``lora_unknown_tensor``,
``lora_alpha_int32``, ``lora_alpha_string``, ``lora_alpha_f64``, ``cvec_wrong_width``.
Never load the ``lora_alpha_*`` ones in llama.cpp in-process: it aborts the process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import modelfactory as mf  # noqa: E402

__all__ = [
    "model_factory_dir",
    "tiny_tokenizer_dir",
    "tiny_cfg",
    "tiny_weights",
    "tiny_gguf",
    "tiny_gguf_q8",
    "tiny_gguf_no_template",
    "tiny_hf_dir",
    "lora_a",
    "lora_b",
    "lora_a_gguf",
    "lora_b_gguf",
    "lora_a_peft",
    "lora_b_peft",
    "lora_mix_gguf",
    "cvec_directions",
    "cvec_gguf",
    "tiny4_cfg",
    "tiny4_weights",
    "tiny4_gguf",
    "cvec4_directions",
    "cvec4_gguf",
    "bad_model_files",
    "LORA_MIX",
]

#: The scales of the reference mix in ``lora_mix_gguf``: (lora_a, 0.7), (lora_b, 0.3).
LORA_MIX: tuple[float, float] = (0.7, 0.3)


@pytest.fixture(scope="session")
def model_factory_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(model_factory_dir: Path) -> Path:
    return mf.train_tokenizer(model_factory_dir / "tokenizer", vocab_size=512)


@pytest.fixture(scope="session")
def tiny_cfg(tiny_tokenizer_dir: Path) -> mf.TinyLlamaConfig:
    return mf.TinyLlamaConfig(vocab_size=mf.tokenizer_vocab_size(tiny_tokenizer_dir))


@pytest.fixture(scope="session")
def tiny_weights(tiny_cfg: mf.TinyLlamaConfig) -> dict[str, np.ndarray]:
    return mf.make_llama_weights(tiny_cfg, seed=0)


@pytest.fixture(scope="session")
def tiny_gguf(model_factory_dir: Path, tiny_cfg, tiny_weights, tiny_tokenizer_dir) -> Path:
    return mf.write_gguf(model_factory_dir / "tiny-f32.gguf", tiny_cfg, tiny_weights, tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_gguf_q8(model_factory_dir: Path, tiny_cfg, tiny_weights, tiny_tokenizer_dir) -> Path:
    return mf.write_gguf(
        model_factory_dir / "tiny-q8_0.gguf", tiny_cfg, tiny_weights, tiny_tokenizer_dir, qtype="q8_0"
    )


@pytest.fixture(scope="session")
def tiny_gguf_no_template(model_factory_dir: Path, tiny_cfg, tiny_weights, tiny_tokenizer_dir) -> Path:
    return mf.write_gguf(
        model_factory_dir / "tiny-f32-notemplate.gguf", tiny_cfg, tiny_weights, tiny_tokenizer_dir,
        chat_template=None,
    )


@pytest.fixture(scope="session")
def tiny_hf_dir(model_factory_dir: Path, tiny_cfg, tiny_weights, tiny_tokenizer_dir) -> Path:
    return mf.write_hf_model(model_factory_dir / "tiny-hf", tiny_cfg, tiny_weights, tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def lora_a(tiny_cfg: mf.TinyLlamaConfig) -> mf.LoraAdapter:
    return mf.make_lora(tiny_cfg, rank=4, seed=11, alpha=8.0)


@pytest.fixture(scope="session")
def lora_b(tiny_cfg: mf.TinyLlamaConfig) -> mf.LoraAdapter:
    return mf.make_lora(
        tiny_cfg, rank=8, seed=12, alpha=16.0, targets=("q_proj", "v_proj", "up_proj", "down_proj")
    )


@pytest.fixture(scope="session")
def lora_a_gguf(model_factory_dir: Path, tiny_cfg, lora_a) -> Path:
    return mf.write_lora_gguf(model_factory_dir / "lora-a.gguf", tiny_cfg, lora_a)


@pytest.fixture(scope="session")
def lora_b_gguf(model_factory_dir: Path, tiny_cfg, lora_b) -> Path:
    return mf.write_lora_gguf(model_factory_dir / "lora-b.gguf", tiny_cfg, lora_b)


@pytest.fixture(scope="session")
def lora_a_peft(model_factory_dir: Path, tiny_cfg, lora_a) -> Path:
    return mf.write_peft_adapter(model_factory_dir / "lora-a-peft", tiny_cfg, lora_a)


@pytest.fixture(scope="session")
def lora_b_peft(model_factory_dir: Path, tiny_cfg, lora_b) -> Path:
    return mf.write_peft_adapter(model_factory_dir / "lora-b-peft", tiny_cfg, lora_b)


@pytest.fixture(scope="session")
def lora_mix_gguf(model_factory_dir: Path, tiny_cfg, tiny_weights, tiny_tokenizer_dir, lora_a, lora_b) -> Path:
    merged = mf.merge_loras(tiny_weights, [(lora_a, LORA_MIX[0]), (lora_b, LORA_MIX[1])])
    return mf.write_gguf(model_factory_dir / "tiny-mix-f32.gguf", tiny_cfg, merged, tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def cvec_directions(tiny_cfg: mf.TinyLlamaConfig) -> dict[int, np.ndarray]:
    return mf.make_control_vector(tiny_cfg, seed=21, magnitude=4.0)


@pytest.fixture(scope="session")
def cvec_gguf(model_factory_dir: Path, cvec_directions) -> Path:
    return mf.write_control_vector(model_factory_dir / "cvec.gguf", cvec_directions)


@pytest.fixture(scope="session")
def tiny4_cfg(tiny_cfg: mf.TinyLlamaConfig) -> mf.TinyLlamaConfig:
    return mf.TinyLlamaConfig(vocab_size=tiny_cfg.vocab_size, n_layer=4)


@pytest.fixture(scope="session")
def tiny4_weights(tiny4_cfg: mf.TinyLlamaConfig) -> dict[str, np.ndarray]:
    return mf.make_llama_weights(tiny4_cfg, seed=4)


@pytest.fixture(scope="session")
def tiny4_gguf(model_factory_dir: Path, tiny4_cfg, tiny4_weights, tiny_tokenizer_dir) -> Path:
    return mf.write_gguf(
        model_factory_dir / "tiny4-f32.gguf", tiny4_cfg, tiny4_weights, tiny_tokenizer_dir, name="tiny-llama-4l"
    )


@pytest.fixture(scope="session")
def cvec4_directions(tiny4_cfg: mf.TinyLlamaConfig) -> dict[int, np.ndarray]:
    return mf.make_control_vector(tiny4_cfg, seed=24, magnitude=4.0)


@pytest.fixture(scope="session")
def cvec4_gguf(model_factory_dir: Path, cvec4_directions) -> Path:
    return mf.write_control_vector(model_factory_dir / "cvec4.gguf", cvec4_directions)


@pytest.fixture(scope="session")
def bad_model_files(model_factory_dir: Path, tiny_gguf: Path, tiny_cfg, lora_a) -> dict[str, Path]:
    d = model_factory_dir / "bad"
    d.mkdir(exist_ok=True)
    return {
        "truncated_gguf": mf.write_truncated_gguf(tiny_gguf, d / "truncated.gguf"),
        "non_gguf": mf.write_non_gguf(d / "not-a-model.gguf"),
        "lora_wrong_arch": mf.write_bad_lora_wrong_arch(d / "lora-wrong-arch.gguf", tiny_cfg, lora_a),
        "lora_wrong_shape": mf.write_bad_lora_wrong_shape(d / "lora-wrong-shape.gguf", tiny_cfg, lora_a),
        "lora_missing_tensor": mf.write_bad_lora_missing_tensor(d / "lora-missing.gguf", tiny_cfg, lora_a),
        "lora_unknown_tensor": mf.write_bad_lora_unknown_tensor(d / "lora-unknown.gguf", tiny_cfg, lora_a),
        "lora_alpha_int32": mf.write_bad_lora_alpha_type(d / "lora-alpha-int32.gguf", tiny_cfg, lora_a, "int32"),
        "lora_alpha_string": mf.write_bad_lora_alpha_type(d / "lora-alpha-str.gguf", tiny_cfg, lora_a, "string"),
        "lora_alpha_f64": mf.write_bad_lora_alpha_type(d / "lora-alpha-f64.gguf", tiny_cfg, lora_a, "f64"),
        "cvec_wrong_width": mf.write_bad_control_vector_width(d / "cvec-wide.gguf", tiny_cfg),
    }

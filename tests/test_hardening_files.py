"""Files from strangers never crash, hang or print a traceback: each problem is one error line.

Every class of bad file runs through the real ``chat`` CLI in a subprocess (a crash inside
llama.cpp kills the process, so in-process tests could not even report it) and must end
with a normal exit code, exactly one ``error:`` line naming the file and the field or
tensor, and no traceback. The bad files come from ``modelfactory``; the first versions of
these tests reproduced each crash (SIGSEGV 139, SIGABRT 134), hang or traceback.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

import modelfactory as mf
from conftest import chat_exe

pytest.importorskip("llama_cpp")

TIMEOUT = 90  # seconds; a hang (a named pipe opened for reading) fails the test instead of the suite


def run_chat(args: list[str], env: dict[str, str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(chat_exe() + [str(a) for a in args], capture_output=True, text=True, env=env,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def talk(model: Path, env: dict[str, str], *extra: object) -> subprocess.CompletedProcess:
    """One short, greedy answer: ``chat -m MODEL --no-history … hi``."""
    return run_chat(["-m", model, "--no-history", "-t", "0", "--max-tokens", "3", *extra, "hi"], env)


def one_error_line(out: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The single ``error:`` line of a run that ended normally with ``code``; it contains every needle."""
    assert out.returncode >= 0 and out.returncode not in (134, 139), (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr + out.stdout, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), out.stderr[-2000:]
    assert out.returncode == code, (out.returncode, lines[0])
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def card(folder: Path, adapters: dict[str, Path] | None = None, steering: dict[str, Path] | None = None) -> Path:
    """A persona card listing ``{path in the card: source}``; sources outside the card folder are copied in.

    A part already inside the folder (a named pipe made there) is used as it is: copying a
    pipe would block, and a link out of the card folder is refused as escaping it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    text = f'name = "{folder.name}"\n'
    for table, parts in (("adapters", adapters or {}), ("steering", steering or {})):
        for rel, src in parts.items():
            dst = folder / rel
            if src.is_dir() and src != dst:
                shutil.copytree(src, dst)
            elif src != dst:
                shutil.copy(src, dst)
            text += f'[[{table}]]\npath = "{rel}"\nscale = 1.0\n'
    (folder / "persona.toml").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad-files")


@pytest.fixture(scope="module")
def variant(bad_dir, tiny_cfg, tiny_weights, tiny_tokenizer_dir):
    """``variant(name, hparams=…, tensor_types=…)``: the tiny llama GGUF with one thing changed."""
    def write(name: str, **changes) -> Path:
        return mf.write_gguf_variant(bad_dir / f"{name}.gguf", tiny_cfg, tiny_weights, tiny_tokenizer_dir, **changes)

    return write


def convert_adapter(peft: Path, base: Path, out: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return run_chat(["convert", "adapter", peft, "--base", base, "-o", out], env)


# --- 1. what llama.cpp accepts at load and crashes on at the first token ---------------------------


@pytest.mark.parametrize("dtype, ggml", [("int32", "I32"), ("int8", "I8"), ("float64", "F64")])
def test_lora_tensor_types_llama_cpp_cannot_multiply(subprocess_env, tmp_path, tiny_gguf, tiny_cfg, lora_a,
                                                     dtype, ggml):
    bad = mf.write_bad_lora_tensors(tmp_path / f"lora-{dtype}.gguf", tiny_cfg, lora_a, dtype=dtype)
    folder = card(tmp_path / "typed", adapters={"lora.gguf": bad})
    one_error_line(talk(tiny_gguf, subprocess_env, "-p", folder), 4, "lora.gguf", ".lora_a", ggml)
    shown = run_chat(["personas", "show", folder, "-m", tiny_gguf], subprocess_env)
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
    assert "fit: yes" not in shown.stdout
    assert f"unusable: tensor 'blk.0.attn_q.weight.lora_a' is stored as {ggml}" in shown.stdout


HPARAMS = {
    "block_count_0": ({"block_count": 0}, "llama.block_count"),
    "block_count_over_llama_max_layers": ({"block_count": 513}, "llama.block_count"),
    "rms_eps_nan": ({"attention.layer_norm_rms_epsilon": math.nan}, "layer_norm_rms_epsilon is nan"),
    "rms_eps_inf": ({"attention.layer_norm_rms_epsilon": math.inf}, "layer_norm_rms_epsilon is inf"),
    "rms_eps_negative": ({"attention.layer_norm_rms_epsilon": -1.0}, "layer_norm_rms_epsilon is -1.0"),
    "rms_eps_zero": ({"attention.layer_norm_rms_epsilon": 0.0}, "layer_norm_rms_epsilon is 0.0"),
    "norm_eps_nan": ({"attention.layer_norm_epsilon": math.nan}, "llama.attention.layer_norm_epsilon is nan"),
    "rope_base_nan": ({"rope.freq_base": math.nan}, "llama.rope.freq_base is nan"),
    "experts_used_without_experts": ({"expert_used_count": 2}, "llama.expert_used_count is 2"),
    "experts_over_llama_max": ({"expert_count": 1025, "expert_used_count": 2}, "llama.expert_count is 1025"),
}


@pytest.mark.parametrize("case", sorted(HPARAMS))
def test_model_hyperparameters_llama_cpp_asserts_on(subprocess_env, variant, case):
    hparams, needle = HPARAMS[case]
    one_error_line(talk(variant(case, hparams=hparams), subprocess_env), 3, f"{case}.gguf", needle)


TENSOR_TYPES = {
    "norms_f16": ({"*_norm.weight": "float16"}, "'blk.0.attn_norm.weight' is stored as F16"),
    "norm_q8_0": ({"blk.1.ffn_norm.weight": "Q8_0"}, "'blk.1.ffn_norm.weight' is stored as Q8_0"),
    "embedding_i32": ({"token_embd.weight": "int32"}, "'token_embd.weight' is stored as I32"),
    "projection_f64": ({"blk.*.attn_q.weight": "float64"}, "'blk.0.attn_q.weight' is stored as F64"),
    "projection_i8": ({"blk.1.ffn_down.weight": "int8"}, "'blk.1.ffn_down.weight' is stored as I8"),
    "projection_i16": ({"blk.0.attn_v.weight": "int16"}, "'blk.0.attn_v.weight' is stored as I16"),
    "projection_i64": ({"output.weight": "int64"}, "'output.weight' is stored as I64"),
}


@pytest.mark.parametrize("case", sorted(TENSOR_TYPES))
def test_model_tensor_types_llama_cpp_cannot_compute_with(subprocess_env, variant, case):
    types, needle = TENSOR_TYPES[case]
    one_error_line(talk(variant(case, tensor_types=types), subprocess_env), 3, f"{case}.gguf", needle)


def test_threads_beyond_ggml_max_are_a_usage_error(subprocess_env, tiny_gguf):
    one_error_line(talk(tiny_gguf, subprocess_env, "--threads", "40000"), 2, "--threads 40000", "512")


def test_a_template_rendering_an_empty_prompt_is_refused(subprocess_env, tmp_path, tiny_gguf):
    template = tmp_path / "silent.jinja"
    template.write_text("{% if false %}never{% endif %}", encoding="utf-8")
    one_error_line(talk(tiny_gguf, subprocess_env, "--template", template), 3, "silent.jinja", "empty prompt")


# --- 2. a named pipe (or any non-regular file) as a path never blocks ---------------------------------


PIPES = ["adapter", "vector", "model", "peft_weights", "peft_config", "convert_weights"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
@pytest.mark.parametrize("where", PIPES)
def test_named_pipes_are_refused_without_waiting(subprocess_env, tmp_path, tiny_gguf, lora_a_peft, where):
    folder = tmp_path / "piped"
    folder.mkdir()
    if where in ("adapter", "vector"):
        os.mkfifo(folder / "part.gguf")
        card(folder, **{"adapters" if where == "adapter" else "steering": {"part.gguf": folder / "part.gguf"}})
        out, code, needles = talk(tiny_gguf, subprocess_env, "-p", folder), 4, ("part.gguf", "named pipe")
    elif where == "model":
        os.mkfifo(tmp_path / "model.gguf")
        out, code, needles = talk(tmp_path / "model.gguf", subprocess_env), 3, ("model.gguf", "named pipe")
    else:
        peft = folder / "peft"
        shutil.copytree(lora_a_peft, peft)
        name = "adapter_config.json" if where == "peft_config" else "adapter_model.safetensors"
        (peft / name).unlink()
        os.mkfifo(peft / name)
        if where == "convert_weights":
            out = convert_adapter(peft, tiny_gguf, tmp_path / "out.gguf", subprocess_env)
        else:
            out = talk(tiny_gguf, subprocess_env, "-p", card(folder, adapters={"peft": peft}))
        code, needles = 4, (name, "named pipe")
    one_error_line(out, code, *needles)


# --- 3. layer numbers are ASCII digits ("²".isdigit() is True, int("²") raises) ----------------------


def test_layer_numbers_in_other_digits_are_refused_not_a_traceback(subprocess_env, tmp_path, tiny_gguf, tiny_cfg,
                                                                   lora_a, cvec_directions):
    vector = mf.write_bad_control_vector(tmp_path / "vec.gguf", cvec_directions, name="direction.²")
    one_error_line(talk(tiny_gguf, subprocess_env, "-p", card(tmp_path / "v", steering={"vec.gguf": vector})),
                   4, "vec.gguf", "direction.²")
    lora = mf.write_bad_lora_tensors(tmp_path / "lora.gguf", tiny_cfg, lora_a, layer="²")
    folder = card(tmp_path / "a", adapters={"lora.gguf": lora})
    one_error_line(talk(tiny_gguf, subprocess_env, "-p", folder), 4, "lora.gguf", "blk.².attn_q.weight")
    shown = run_chat(["personas", "show", folder, "-m", tiny_gguf], subprocess_env)
    assert shown.returncode == 0 and shown.stderr == "" and "layers 0-1" in shown.stdout, shown.stderr


# --- 4. malformed PEFT folders through the PEFT → GGUF conversion -------------------------------------


NOT_UTF8 = b'{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "x": "\xff\xfe"}'


def safetensors_bytes(header: bytes) -> bytes:
    """A safetensors file that is only its (length-prefixed) header."""
    return struct.pack("<Q", len(header)) + header


PEFT_CASES: dict[str, tuple[dict, str]] = {
    "alpha_string": ({"config": {"lora_alpha": "abc"}}, 'lora_alpha is "abc"'),
    "alpha_list": ({"config": {"lora_alpha": [8]}}, "lora_alpha is [8]"),
    "alpha_nan": ({"config": {"lora_alpha": math.nan}}, "lora_alpha is NaN"),
    "alpha_bool": ({"config": {"lora_alpha": True}}, "lora_alpha is true"),
    "alpha_zero": ({"config": {"lora_alpha": 0}}, "lora_alpha is 0"),
    "alpha_negative": ({"config": {"lora_alpha": -8}}, "lora_alpha is -8"),
    "r_zero": ({"config": {"r": 0}}, "r is 0"),
    "r_negative": ({"config": {"r": -4}}, "r is -4"),
    "r_string": ({"config": {"r": "4"}}, 'r is "4"'),
    "r_fraction": ({"config": {"r": 2.5}}, "r is 2.5"),
    "r_not_the_tensor_rank": ({"config": {"r": 8}}, "rank 4 but adapter_config.json says r = 8"),
    "config_list": ({"config_bytes": b"[1, 2]"}, "holds a JSON list"),
    "config_not_json": ({"config_bytes": b"peft_type = LORA"}, "not valid JSON"),
    "config_not_utf8": ({"config_bytes": NOT_UTF8}, "not UTF-8"),
    "weights_header_garbage": ({"weights_bytes": safetensors_bytes(b"not json at all!")}, "not a readable safetensors"),
    "weights_header_list": ({"weights_bytes": safetensors_bytes(b"[]")}, "header is a JSON list"),
    "weights_bad_offsets": ({"weights_bytes": safetensors_bytes(b'{"t": {"dtype": "F32", "shape": [1], '
                                                                b'"data_offsets": 7}}')}, "data_offsets 7"),
    "weights_truncated": ({"truncate": True}, "runs past the end of the file"),
    "weights_missing_lora_b": ({"drop": "layers.1.mlp.down_proj.lora_B"}, "down_proj has lora_A but not its pair"),
    "weights_nan": ({"value": math.nan}, "holds NaN or infinite values"),
}


def _bad_peft(folder: Path, cfg, lora, spec: dict) -> Path:
    spec = dict(spec)
    truncate = spec.pop("truncate", False)
    out = mf.write_bad_peft_adapter(folder, cfg, lora, **spec)
    if truncate:
        weights = out / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
    return out


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_malformed_peft_folders_convert_in_one_line(subprocess_env, tmp_path, tiny_gguf, tiny_cfg, lora_a, case):
    spec, needle = PEFT_CASES[case]
    peft = _bad_peft(tmp_path / case, tiny_cfg, lora_a, spec)
    one_error_line(convert_adapter(peft, tiny_gguf, tmp_path / "out.gguf", subprocess_env), 4, case, needle)
    assert not (tmp_path / "out.gguf").exists()


def test_malformed_peft_folder_in_a_card_on_llama_cpp_is_one_line(subprocess_env, tmp_path, tiny_gguf, tiny_cfg,
                                                                  lora_a):
    """The cached conversion a card's PEFT folder goes through on llama.cpp gives the same line."""
    peft = _bad_peft(tmp_path / "peft", tiny_cfg, lora_a, {"config": {"lora_alpha": "abc"}})
    out = talk(tiny_gguf, subprocess_env, "-p", card(tmp_path / "c", adapters={"peft": peft}))
    one_error_line(out, 4, "adapter_config.json", 'lora_alpha is "abc"')


def test_unwritable_conversion_cache_is_one_line(subprocess_env, tmp_path, tiny_gguf, lora_a_peft):
    data = Path(subprocess_env["CHAT_DATA_DIR"])
    data.mkdir(parents=True, exist_ok=True)
    (data / "cache").write_text("a file where the cache folder should be")  # read-only even for root
    data.chmod(0o500)
    try:
        out = talk(tiny_gguf, subprocess_env, "-p", card(tmp_path / "c", adapters={"peft": lora_a_peft}))
    finally:
        data.chmod(0o700)
    one_error_line(out, 4, str(data / "cache" / "adapters"), "cannot write the converted adapter")


# --- 5. numbers that would give an empty answer marked "stop" ----------------------------------------


NUMBERS = {
    "lora_alpha_nan": ("adapter", {"alpha": math.nan}, "adapter.lora.alpha is nan"),
    "lora_alpha_inf": ("adapter", {"alpha": math.inf}, "adapter.lora.alpha is inf"),
    "lora_alpha_negative": ("adapter", {"alpha": -8.0}, "adapter.lora.alpha is -8.0"),
    "lora_weight_nan": ("adapter", {"value": math.nan}, "'blk.0.attn_q.weight.lora_b' holds NaN"),
    "lora_weight_inf": ("adapter", {"value": -math.inf}, "'blk.0.attn_q.weight.lora_b' holds NaN or infinite"),
    "vector_nan": ("vector", {"value": math.nan}, "'direction.1' holds NaN"),
    "peft_weight_inf": ("peft", {"value": math.inf}, "lora_B.weight holds NaN or infinite"),
}


@pytest.mark.parametrize("case", sorted(NUMBERS))
def test_nan_and_infinity_in_parts_are_refused(subprocess_env, tmp_path, tiny_gguf, tiny_cfg, lora_a, cvec_directions,
                                               case):
    kind, spec, needle = NUMBERS[case]
    if kind == "adapter":
        parts = {"adapters": {"part.gguf": mf.write_bad_lora_tensors(tmp_path / "p.gguf", tiny_cfg, lora_a, **spec)}}
    elif kind == "vector":
        parts = {"steering": {"part.gguf": mf.write_bad_control_vector(tmp_path / "p.gguf", cvec_directions, **spec)}}
    else:
        parts = {"adapters": {"part": mf.write_bad_peft_adapter(tmp_path / "p", tiny_cfg, lora_a, **spec)}}
    one_error_line(talk(tiny_gguf, subprocess_env, "-p", card(tmp_path / "c", **parts)), 4, "part", needle)


@pytest.mark.parametrize("bias", ["nan", "inf"])
def test_logit_bias_must_be_a_number(subprocess_env, tiny_gguf, bias):
    one_error_line(talk(tiny_gguf, subprocess_env, "-o", f"logit_bias=5:{bias}"), 2, "logit_bias", f"token 5 is {bias}")


def test_minus_infinity_still_bans_a_token(subprocess_env, tiny_gguf):
    out = talk(tiny_gguf, subprocess_env, "-o", "logit_bias=5:-inf")
    assert out.returncode == 0 and out.stderr == "", out.stderr


# --- the one alpha rule, both backends -----------------------------------------------------------------


def test_peft_alpha_zero_is_refused_on_both_backends(subprocess_env, tmp_path, tiny_gguf, tiny_cfg, lora_a):
    """PEFT's α = 0 switches an adapter off, which llama.cpp cannot express (its α = 0 means "scale alone")."""
    from chat.errors import AdapterError
    from chat_plugins.transformers_backend.parts import check_adapter

    peft = mf.write_bad_peft_adapter(tmp_path / "zero", tiny_cfg, lora_a, config={"lora_alpha": 0})
    folder = card(tmp_path / "c", adapters={"zero": peft})
    one_error_line(talk(tiny_gguf, subprocess_env, "-p", folder), 4, "adapter_config.json", "lora_alpha is 0")
    with pytest.raises(AdapterError, match="lora_alpha is 0; it must be a finite number > 0"):
        check_adapter(None, peft)  # the transformers backend's check reads the config before it needs the model


@pytest.mark.slow
def test_peft_alpha_zero_is_refused_by_the_transformers_cli(subprocess_env, tmp_path, tiny_hf_dir, tiny_cfg, lora_a):
    pytest.importorskip("peft")
    peft = mf.write_bad_peft_adapter(tmp_path / "zero", tiny_cfg, lora_a, config={"lora_alpha": 0})
    out = talk(tiny_hf_dir, subprocess_env, "-p", card(tmp_path / "c", adapters={"zero": peft}))
    one_error_line(out, 4, "adapter_config.json", "lora_alpha is 0")


def test_one_reader_for_both_backends(tmp_path, tiny_cfg, lora_a, cvec_directions):
    """In-process: the transformers backend reads configs, weights and vectors with the core readers."""
    from chat.parts.peft import PEFT_DEFAULT_ALPHA, load_peft_config
    from chat.errors import AdapterError
    from chat_plugins.transformers_backend.parts import _check_finite, read_control_vector

    config = json.loads((mf.write_peft_adapter(tmp_path / "ok", tiny_cfg, lora_a) / "adapter_config.json").read_text())
    del config["lora_alpha"]
    (tmp_path / "ok" / "adapter_config.json").write_text(json.dumps(config))
    assert load_peft_config(tmp_path / "ok")["lora_alpha"] == PEFT_DEFAULT_ALPHA  # what peft itself uses
    nan = mf.write_bad_peft_adapter(tmp_path / "nan", tiny_cfg, lora_a, value=math.nan)
    with pytest.raises(AdapterError, match="lora_B.weight holds NaN"):
        _check_finite(nan / "adapter_model.safetensors")
    for name, value in (("direction.²", None), (None, math.inf)):
        vector = mf.write_bad_control_vector(tmp_path / "v.gguf", cvec_directions, name=name, value=value)
        with pytest.raises(AdapterError, match="direction"):
            read_control_vector(vector, tiny_cfg.hidden_size)
    ok = read_control_vector(mf.write_control_vector(tmp_path / "good.gguf", cvec_directions), tiny_cfg.hidden_size)
    assert np.array_equal(ok.directions[1], cvec_directions[1])

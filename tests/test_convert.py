"""chat.convert on real files: HF → GGUF models, PEFT ⇄ GGUF adapters, the conversion cache, the CLI.

Parity is checked the strong way where it is cheap (tensor bytes equal to the factory's
own GGUF) and the behavioural way where it matters (llama.cpp tokenizes like the Hugging
Face tokenizer; greedy tokens equal the factory's model / adapter).
"""

from __future__ import annotations

import ctypes
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from chat.convert import (
    convert_model,
    ensure_format,
    gguf_adapter_to_peft,
    peft_to_gguf,
    read_base,
)
from chat.convert.adapter import read_gguf_adapter
from chat.convert.tensorfile import SafetensorsFile, write_safetensors
from chat.errors import AdapterError, ModelError, UsageError

llama_cpp = pytest.importorskip("llama_cpp")

PROMPT = "<|im_start|>user\nHello! Can you tell me a joke?<|im_end|>\n<|im_start|>assistant\n"
TEXTS = {
    "ascii": "The quick brown fox jumps over the lazy dog. Numbers: 3.14159, 2024!",
    "chatml": PROMPT + "Why did the programmer quit?<|im_end|>\n<|endoftext|>",
    "chinese": "今天天气很好，我们去公园散步吧。你好，世界！北京是中国的首都。",
}


# ------------------------------------------------------------------------------ helpers


def _load(path: Path, **kw):
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, verbose=False, **kw)


def _greedy(llm, n: int = 12, prompt: str = PROMPT) -> list[int]:
    llm.reset()
    tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    out: list[int] = []
    for t in llm.generate(tokens, temp=0.0, top_k=1, reset=True):
        out.append(int(t))
        if len(out) == n:
            break
    return out


def _greedy_with_adapter(model_path: Path, adapter_path: Path, scale: float = 1.0) -> list[int]:
    llm = _load(model_path)
    adapter = llama_cpp.llama_adapter_lora_init(llm.model, str(adapter_path).encode())
    assert adapter, f"llama.cpp refused {adapter_path}"
    try:
        arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
        scales = (ctypes.c_float * 1)(scale)
        assert llama_cpp.llama_set_adapters_lora(llm.ctx, arr, 1, scales) == 0
        return _greedy(llm)
    finally:
        llama_cpp.llama_set_adapters_lora(llm.ctx, None, 0, None)
        llama_cpp.llama_adapter_lora_free(adapter)


def _tensors(path: Path) -> dict[str, tuple[int, bytes]]:
    reader = gguf.GGUFReader(path)
    return {t.name: (int(t.tensor_type), bytes(np.asarray(t.data).tobytes())) for t in reader.tensors}


def _field(path: Path, key: str):
    f = gguf.GGUFReader(path).fields.get(key)
    return None if f is None else f.contents()


def _copy_hf(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(config_changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def converted_f32(tiny_hf_dir, tmp_path_factory) -> Path:
    return convert_model(tiny_hf_dir, tmp_path_factory.mktemp("conv") / "tiny-f32.gguf", out_type="f32").path


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_hf_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tiny_hf_dir / "tokenizer.json"))


# ------------------------------------------------------------------------------ model


def test_converted_gguf_tensors_equal_the_factory_gguf(converted_f32, tiny_gguf):
    assert _tensors(converted_f32) == _tensors(tiny_gguf)
    assert _field(converted_f32, "general.architecture") == "llama"
    assert _field(converted_f32, "tokenizer.ggml.pre") == "gpt-2"
    assert _field(converted_f32, "tokenizer.ggml.add_bos_token") is False
    assert _field(converted_f32, "tokenizer.chat_template") == _field(tiny_gguf, "tokenizer.chat_template")


@pytest.mark.parametrize("kind", sorted(TEXTS))
def test_converted_gguf_tokenizes_like_hugging_face(converted_f32, hf_tokenizer, kind):
    llm = _load(converted_f32, vocab_only=True)
    text = TEXTS[kind]
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == hf_tokenizer.encode(text).ids


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe"])
def test_split_regex_pre_tokenizers_tokenize_like_hugging_face(tiny_hf_dir, tmp_path, pre):
    from tokenizers import Tokenizer

    from chat.convert.tokenizer import KNOWN_SPLIT_REGEXES

    regex = next(r for r, name in KNOWN_SPLIT_REGEXES.items() if name == pre)
    src = _copy_hf(tiny_hf_dir, tmp_path / pre)
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
    ]}
    (src / "tokenizer.json").write_text(json.dumps(tok))
    out = convert_model(src, tmp_path / f"{pre}.gguf", out_type="f32")
    assert out.pre_tokenizer == pre
    llm = _load(out.path, vocab_only=True)
    hf = Tokenizer.from_file(str(src / "tokenizer.json"))
    for text in [*TEXTS.values(), "x = 12345678 +  99\n\n\tend"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == hf.encode(text).ids, text


def test_special_tokens_are_control_tokens(converted_f32):
    types = _field(converted_f32, "tokenizer.ggml.token_type")
    tokens = _field(converted_f32, "tokenizer.ggml.tokens")
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert types[tokens.index(special)] == gguf.TokenType.CONTROL
    llm = _load(converted_f32, vocab_only=True)
    assert len(llm.tokenize(b"<|im_start|>", add_bos=False, special=True)) == 1


def test_converted_gguf_generates_like_the_factory_gguf(converted_f32, tiny_gguf):
    expected = _greedy(_load(tiny_gguf))
    assert _greedy(_load(converted_f32)) == expected
    assert len(set(expected)) > 2  # a real continuation, not a one-token loop


def test_q8_0_and_f16(tiny_hf_dir, tiny_gguf_q8, tmp_path):
    q8 = convert_model(tiny_hf_dir, tmp_path / "q8.gguf", out_type="q8_0")
    assert _tensors(q8.path) == _tensors(tiny_gguf_q8)
    f16 = convert_model(tiny_hf_dir, tmp_path / "f16.gguf", out_type="f16")
    types = {name: t for name, (t, _) in _tensors(f16.path).items()}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert len(_greedy(_load(f16.path))) == 12


def test_bf16_checkpoint_converts_exactly(tiny_hf_dir, tiny_weights, tmp_path):
    src = _copy_hf(tiny_hf_dir, tmp_path / "bf16", torch_dtype="bfloat16")
    bits = {k: (np.ascontiguousarray(v).view(np.uint32) >> 16).astype(np.uint16) for k, v in tiny_weights.items()}
    (src / "model.safetensors").unlink()
    _write_bf16(src / "model.safetensors", bits)
    out = convert_model(src, tmp_path / "bf16.gguf", out_type="f32").path
    reader = gguf.GGUFReader(out)
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    want = (bits["model.embed_tokens.weight"].astype(np.uint32) << 16).view(np.float32)
    assert np.array_equal(np.asarray(embd.data), want)


def _write_bf16(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header, offset, blobs = {}, 0, []
    for name, a in tensors.items():
        header[name] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        blobs.append(a.tobytes())
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))


def test_sharded_checkpoint(tiny_hf_dir, tiny_weights, tiny_gguf, tmp_path):
    src = _copy_hf(tiny_hf_dir, tmp_path / "sharded")
    (src / "model.safetensors").unlink()
    names = sorted(tiny_weights)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    weight_map = {}
    for file, part in shards.items():
        write_safetensors(src / file, {n: tiny_weights[n] for n in part})
        weight_map.update({n: file for n in part})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = convert_model(src, tmp_path / "sharded.gguf", out_type="f32")
    assert _tensors(out.path) == _tensors(tiny_gguf)


def test_tied_embeddings_have_no_output_tensor(tiny_hf_dir, tiny_weights, tmp_path):
    src = _copy_hf(tiny_hf_dir, tmp_path / "tied", tie_word_embeddings=True)
    write_safetensors(src / "model.safetensors", {k: v for k, v in tiny_weights.items() if k != "lm_head.weight"})
    out = convert_model(src, tmp_path / "tied.gguf", out_type="f32")
    assert "output.weight" not in _tensors(out.path)
    assert len(_greedy(_load(out.path))) == 12  # llama.cpp falls back to token_embd


def test_convert_package_needs_no_torch():
    import subprocess
    import sys

    code = ("import sys, chat.convert, chat.cli.convert; "
            "bad = {'torch', 'transformers', 'llama_cpp', 'safetensors'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_mistral_converts_as_llama(tiny_hf_dir, tiny_gguf, tmp_path):
    src = _copy_hf(tiny_hf_dir, tmp_path / "mistral", architectures=["MistralForCausalLM"], model_type="mistral",
                   sliding_window=4096)
    out = convert_model(src, tmp_path / "mistral.gguf", out_type="f32")
    assert out.architecture == "llama" and out.hf_class == "MistralForCausalLM"
    assert _greedy(_load(out.path)) == _greedy(_load(tiny_gguf))


def _qwen2_dir(tiny_hf_dir: Path, tiny_weights, dst: Path, bias_scale: float) -> Path:
    from safetensors.numpy import save_file

    src = _copy_hf(tiny_hf_dir, dst, architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                   use_sliding_window=False, sliding_window=None, max_window_layers=2)
    weights = dict(tiny_weights)
    rng = np.random.default_rng(5)
    for name, w in tiny_weights.items():
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            weights[name.replace(".weight", ".bias")] = (bias_scale * rng.standard_normal(w.shape[0])).astype(np.float32)
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(src / "model.safetensors"),
              metadata={"format": "pt"})
    return src


def test_qwen2_is_not_rope_permuted(tiny_hf_dir, tiny_weights, tiny_gguf, tmp_path):
    # qwen2 (NeoX rope on HF-layout weights) with zero biases is the same maths as the llama GGUF.
    src = _qwen2_dir(tiny_hf_dir, tiny_weights, tmp_path / "qwen2", bias_scale=0.0)
    out = convert_model(src, tmp_path / "qwen2.gguf", out_type="f32")
    assert out.architecture == "qwen2"
    names = set(_tensors(out.path))
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= names
    assert _greedy(_load(out.path)) == _greedy(_load(tiny_gguf))


@pytest.mark.slow
def test_qwen2_with_biases_matches_transformers(tiny_hf_dir, tiny_weights, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    src = _qwen2_dir(tiny_hf_dir, tiny_weights, tmp_path / "qwen2b", bias_scale=1.0)
    out = convert_model(src, tmp_path / "qwen2b.gguf", out_type="f32")
    llm = _load(out.path)
    prompt = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert _greedy(llm) == ids


# ------------------------------------------------------------------------------ model refusals


def test_pickle_only_checkpoint_is_refused(tiny_hf_dir, tmp_path):
    src = _copy_hf(tiny_hf_dir, tmp_path / "pickled")
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelError, match="pickle") as err:
        convert_model(src, tmp_path / "out.gguf")
    assert "pytorch_model.bin" in err.value.message and err.value.hint
    assert not (tmp_path / "out.gguf").exists()


def test_unsupported_architecture_is_refused_by_name(tiny_hf_dir, tmp_path):
    src = _copy_hf(tiny_hf_dir, tmp_path / "neox", architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox")
    with pytest.raises(ModelError) as err:
        convert_model(src, tmp_path / "out.gguf")
    assert "GPTNeoXForCausalLM" in err.value.message
    assert "LlamaForCausalLM" in err.value.hint and "Qwen2ForCausalLM" in err.value.hint


def test_sentencepiece_style_tokenizer_is_refused(tiny_hf_dir, tmp_path):
    src = _copy_hf(tiny_hf_dir, tmp_path / "spm")
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    (src / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ModelError, match="byte-level"):
        convert_model(src, tmp_path / "out.gguf")


def test_bad_output_type_and_missing_tensor(tiny_hf_dir, tiny_weights, tmp_path):
    with pytest.raises(UsageError, match="q4"):
        convert_model(tiny_hf_dir, tmp_path / "out.gguf", out_type="q4")
    src = _copy_hf(tiny_hf_dir, tmp_path / "partial")
    partial = {k: v for k, v in tiny_weights.items() if "layers.1.mlp.up_proj" not in k}
    write_safetensors(src / "model.safetensors", partial)
    with pytest.raises(ModelError, match=r"blk\.1\.ffn_up\.weight"):
        convert_model(src, tmp_path / "out.gguf")
    assert not list(tmp_path.glob("out.gguf*"))


# ------------------------------------------------------------------------------ adapters


@pytest.mark.parametrize("base_kind", ["hf", "gguf"])
def test_peft_to_gguf_equals_factory_adapter(lora_a_peft, lora_a_gguf, tiny_hf_dir, tiny_gguf, tmp_path, base_kind):
    base = tiny_hf_dir if base_kind == "hf" else tiny_gguf
    out = peft_to_gguf(lora_a_peft, base, tmp_path / "a.gguf")
    assert out.alpha == 8.0 and out.ranks == (4,) and out.n_modules == 14
    assert _tensors(out.path) == _tensors(lora_a_gguf)
    reader = gguf.GGUFReader(out.path)
    assert reader.fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    assert _field(out.path, "general.type") == "adapter" and _field(out.path, "adapter.type") == "lora"


def test_converted_adapter_generates_like_factory_adapter(lora_b_peft, lora_b_gguf, tiny_gguf, tiny_hf_dir, tmp_path):
    out = peft_to_gguf(lora_b_peft, tiny_hf_dir, tmp_path / "b.gguf")
    expected = _greedy_with_adapter(tiny_gguf, lora_b_gguf)
    assert expected != _greedy(_load(tiny_gguf))  # the adapter visibly changes the output
    assert _greedy_with_adapter(tiny_gguf, out.path) == expected


@pytest.mark.parametrize("which", ["a", "b"])
def test_gguf_to_peft_round_trip(request, tiny_hf_dir, tiny_gguf, tmp_path, which):
    src_gguf = request.getfixturevalue(f"lora_{which}_gguf")
    src_peft = request.getfixturevalue(f"lora_{which}_peft")
    for base in (tiny_hf_dir, tiny_hf_dir / "config.json", tiny_gguf):
        out = gguf_adapter_to_peft(src_gguf, base, tmp_path / f"peft-{which}-{Path(base).name}")
        got, want = SafetensorsFile(out / "adapter_model.safetensors"), SafetensorsFile(src_peft / "adapter_model.safetensors")
        assert set(got.names()) == set(want.names())
        for name in want.names():
            assert np.array_equal(got.float32(name), want.float32(name)), name
        config = json.loads((out / "adapter_config.json").read_text())
        original = json.loads((src_peft / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"]) == (original["r"], original["lora_alpha"])
        assert sorted(config["target_modules"]) == sorted(original["target_modules"])
        # and back again: identical to the original GGUF adapter
        again = peft_to_gguf(out, tiny_gguf, tmp_path / f"again-{which}.gguf")
        assert _tensors(again.path) == _tensors(src_gguf)


def test_round_trip_peft_loads_in_peft(lora_a_gguf, lora_a_peft, tiny_hf_dir, tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig.from_pretrained(str(gguf_adapter_to_peft(lora_a_gguf, tiny_hf_dir, tmp_path / "p")))
    assert config.r == 4 and config.lora_alpha == 8.0


def test_adapter_for_another_base_is_refused_naming_the_tensor(lora_a_peft, lora_a_gguf, tiny_hf_dir, tmp_path):
    wide = json.loads((tiny_hf_dir / "config.json").read_text())
    wide.update(hidden_size=128, head_dim=32)
    with pytest.raises(AdapterError, match=r"tensor base_model\.model\.model\.layers\.0\.\S+ has shape") as err:
        peft_to_gguf(lora_a_peft, wide, tmp_path / "x.gguf")
    assert "another base" in err.value.hint
    shallow = dict(json.loads((tiny_hf_dir / "config.json").read_text()), num_hidden_layers=1)
    with pytest.raises(AdapterError, match=r"blk\.1\."):
        gguf_adapter_to_peft(lora_a_gguf, shallow, tmp_path / "y")
    assert not (tmp_path / "x.gguf").exists()


def test_broken_gguf_adapters_are_refused(bad_model_files, tiny_hf_dir, tmp_path):
    with pytest.raises(AdapterError, match=r"blk\.9\.attn_q\.weight"):
        gguf_adapter_to_peft(bad_model_files["lora_unknown_tensor"], tiny_hf_dir, tmp_path / "u")
    with pytest.raises(AdapterError, match="stored as int32"):
        read_gguf_adapter(bad_model_files["lora_alpha_int32"])
    with pytest.raises(AdapterError, match="attn_q.weight is 64×64 in the base"):  # as llama.cpp says it
        gguf_adapter_to_peft(bad_model_files["lora_wrong_shape"], tiny_hf_dir, tmp_path / "s")


def test_peft_features_llama_cpp_cannot_express_are_refused(lora_a_peft, tiny_hf_dir, tmp_path):
    src = tmp_path / "dora"
    shutil.copytree(lora_a_peft, src)
    config = json.loads((src / "adapter_config.json").read_text())
    (src / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(AdapterError, match="DoRA"):
        peft_to_gguf(src, tiny_hf_dir, tmp_path / "d.gguf")
    (src / "adapter_config.json").write_text(json.dumps(config))
    (src / "adapter_model.safetensors").rename(src / "adapter_model.bin")
    with pytest.raises(AdapterError, match="pickle"):
        peft_to_gguf(src, tiny_hf_dir, tmp_path / "d.gguf")


def test_rslora_alpha_is_rescaled(lora_a_peft, tiny_hf_dir, tmp_path):
    src = tmp_path / "rs"
    shutil.copytree(lora_a_peft, src)
    config = json.loads((src / "adapter_config.json").read_text())
    (src / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
    out = peft_to_gguf(src, tiny_hf_dir, tmp_path / "rs.gguf")
    assert out.alpha == pytest.approx(8.0 * 2.0)  # alpha/sqrt(r) == alpha'/r with r = 4


def test_read_base_is_the_same_for_gguf_and_hf(tiny_hf_dir, tiny_gguf):
    assert read_base(tiny_gguf).identity() == read_base(tiny_hf_dir).identity()


# ------------------------------------------------------------------------------ cache


def test_cache_converts_once_and_reuses(lora_a_peft, lora_a_gguf, tiny_gguf, tiny_hf_dir, chat_home):
    path, converted = ensure_format(lora_a_peft, "gguf", base=tiny_gguf)
    assert converted and path.is_file()
    assert chat_home / "data" / "cache" / "adapters" in path.parents
    assert _tensors(path) == _tensors(lora_a_gguf)
    again, converted = ensure_format(lora_a_peft, "gguf", base=tiny_hf_dir)  # same base, other form
    assert (again, converted) == (path, False)
    same, converted = ensure_format(lora_a_gguf, "gguf", base=tiny_gguf)
    assert (same, converted) == (lora_a_gguf, False)
    peft_dir, converted = ensure_format(lora_a_gguf, "peft", base=tiny_hf_dir)
    assert converted and (peft_dir / "adapter_config.json").is_file()
    assert ensure_format(lora_a_gguf, "peft", base=tiny_hf_dir) == (peft_dir, False)


def test_cache_reconverts_when_the_adapter_changes(lora_a_peft, tiny_gguf, tmp_path):
    src = tmp_path / "editable"
    shutil.copytree(lora_a_peft, src)
    cache = tmp_path / "cache"
    first, converted = ensure_format(src, "gguf", base=tiny_gguf, cache_dir=cache)
    assert converted
    config = json.loads((src / "adapter_config.json").read_text())
    (src / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 4.0}))
    second, converted = ensure_format(src, "gguf", base=tiny_gguf, cache_dir=cache)
    assert converted and second != first
    assert read_gguf_adapter(second).alpha == 4.0 and read_gguf_adapter(first).alpha == 8.0
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_cache_refuses_what_is_not_an_adapter(tmp_path, tiny_gguf):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(AdapterError, match="neither"):
        ensure_format(tmp_path / "notes.txt", "gguf", base=tiny_gguf, cache_dir=tmp_path / "c")
    with pytest.raises(UsageError):
        ensure_format(tmp_path / "notes.txt", "onnx", base=tiny_gguf)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ CLI


@pytest.fixture
def convert_cli(cli):
    from chat.cli import app

    names = {g.name for g in app.registered_groups}
    assert "convert" in names, "chat convert is not registered in chat/cli/__init__.py"
    return cli


def test_cli_convert_model(convert_cli, tiny_hf_dir, tiny_gguf, tmp_path):
    out = tmp_path / "cli.gguf"
    result = convert_cli("convert", "model", str(tiny_hf_dir), "-o", str(out), "--type", "f32")
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and _tensors(out) == _tensors(tiny_gguf)
    result = convert_cli("convert", "model", str(tiny_hf_dir), "-o", str(out))
    assert result.exit_code == 2 and "--force" in result.output


def test_cli_convert_model_error_is_one_line(convert_cli, tiny_hf_dir, tmp_path):
    src = _copy_hf(tiny_hf_dir, tmp_path / "neox", architectures=["GPTNeoXForCausalLM"])
    result = convert_cli("convert", "model", str(src), "-o", str(tmp_path / "x.gguf"))
    assert result.exit_code == 3
    assert "GPTNeoXForCausalLM" in result.output and "Traceback" not in result.output


def test_cli_convert_adapter_both_ways(convert_cli, lora_a_peft, lora_a_gguf, tiny_gguf, tiny_hf_dir, tmp_path):
    result = convert_cli("convert", "adapter", str(lora_a_peft), "--base", str(tiny_gguf), "-o", str(tmp_path / "a.gguf"))
    assert result.exit_code == 0, result.output
    assert _tensors(tmp_path / "a.gguf") == _tensors(lora_a_gguf)
    result = convert_cli("convert", "adapter", str(lora_a_gguf), "--base", str(tiny_hf_dir), "-o", str(tmp_path / "p"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p" / "adapter_model.safetensors").is_file()

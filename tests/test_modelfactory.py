"""The model factory writes files the real loaders accept and that behave identically.

These tests are the ground truth the rest of the suite builds on: if the tiny GGUF and
the tiny safetensors model disagree here, every cross-backend test would be meaningless.
Loaders are real (llama-cpp-python, transformers, peft); each test skips when its
library is not installed.

llama.cpp models are opened with ``use_extra_bufts=False``: on CPUs with AMX (Sapphire
Rapids and later) llama.cpp 0.3.36 repacks quantized weights into AMX buffers and then
segfaults in ``ggml_backend_amx_mul_mat`` on any batch of more than one token
(ggml-org/llama.cpp#20824). f32 weights are never repacked, but the switch is harmless.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import gguf
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import modelfactory as mf  # noqa: E402
from model_fixtures import LORA_MIX  # noqa: E402  (the fixtures come from conftest's star import)

N_GEN = 12
CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello! Can you tell me a joke about the moon?"},
]
ASCII_TEXT = "The quick brown fox jumps over the lazy dog. def greet(name): return 42"
CHINESE_TEXT = "今天天气很好，我们去公园散步吧。龘靐齉"  # the last three are byte-fallback only


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _no_extra_bufts() -> Iterator[None]:
    """Make ``llama_cpp.Llama`` load with ``use_extra_bufts=False`` (see module docstring)."""
    import llama_cpp.llama_cpp as low

    orig = low.llama_model_default_params

    def patched():  # type: ignore[no-untyped-def]
        params = orig()
        params.use_extra_bufts = False
        return params

    low.llama_model_default_params = patched
    try:
        yield
    finally:
        low.llama_model_default_params = orig


def open_llama(path: Path, n_ctx: int = 512, f32_kv: bool = True):  # type: ignore[no-untyped-def]
    """Open a GGUF for exact comparisons.

    ``f32_kv``: llama.cpp's default KV cache is f16, which moves the tiny model's logits
    by up to ~0.05 against transformers (seen: a 0.0046 top-2 gap flipped). With an f32
    cache the difference is ~2e-5, so greedy ids match whenever the reference gap > 1e-3.
    """
    llama_cpp = pytest.importorskip("llama_cpp")
    kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_kv else {}
    with _no_extra_bufts():
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, verbose=False, **kv)


def llama_greedy(llm, prompt: Sequence[int], n: int = N_GEN) -> list[int]:  # type: ignore[no-untyped-def]
    """Pure argmax decoding on llama.cpp logits (no sampler chain, no penalties)."""
    import llama_cpp

    llm.reset()  # also drops KV computed under another adapter set
    llm.eval(list(prompt))
    out: list[int] = []
    n_vocab = llm.n_vocab()
    for _ in range(n):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        tok = int(np.argmax(logits))
        out.append(tok)
        llm.eval([tok])
    return out


def hf_greedy(model, prompt: Sequence[int], n: int = N_GEN) -> tuple[list[int], float]:  # type: ignore[no-untyped-def]
    """Argmax decoding in transformers; also returns the smallest top-1/top-2 logit gap."""
    import torch

    ids = torch.tensor([list(prompt)])
    out: list[int] = []
    gap = float("inf")
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids).logits[0, -1].double()
            top = torch.topk(logits, 2).values
            gap = min(gap, float(top[0] - top[1]))
            tok = int(torch.argmax(logits))
            out.append(tok)
            ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)
    return out, gap


def set_loras(llm, adapters: Sequence, scales: Sequence[float]) -> None:  # type: ignore[no-untyped-def]
    import llama_cpp

    if not adapters:
        assert llama_cpp.llama_set_adapters_lora(llm.ctx, None, 0, None) == 0
        return
    arr = (llama_cpp.llama_adapter_lora_p_ctypes * len(adapters))(*adapters)
    sc = (ctypes.c_float * len(scales))(*scales)
    assert llama_cpp.llama_set_adapters_lora(llm.ctx, arr, len(adapters), sc) == 0


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_hf_dir: Path):  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tiny_hf_dir))


@pytest.fixture(scope="module")
def chat_prompt_ids(hf_tokenizer) -> list[int]:  # type: ignore[no-untyped-def]
    text = hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    return hf_tokenizer.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def hf_model(tiny_hf_dir: Path):  # type: ignore[no-untyped-def]
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(str(tiny_hf_dir), use_safetensors=True)
    return model.eval()


# --------------------------------------------------------------------------------------
# pure-file tests (no heavy loaders)
# --------------------------------------------------------------------------------------


def test_everything_builds_quickly(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    tok = mf.train_tokenizer(tmp_path / "tok")
    cfg = mf.TinyLlamaConfig(vocab_size=mf.tokenizer_vocab_size(tok))
    w = mf.make_llama_weights(cfg, 0)
    mf.write_gguf(tmp_path / "m.gguf", cfg, w, tok)
    mf.write_gguf(tmp_path / "q.gguf", cfg, w, tok, qtype="q8_0")
    mf.write_hf_model(tmp_path / "hf", cfg, w, tok)
    lora = mf.make_lora(cfg)
    mf.write_lora_gguf(tmp_path / "l.gguf", cfg, lora)
    mf.write_peft_adapter(tmp_path / "peft", cfg, lora)
    mf.write_control_vector(tmp_path / "c.gguf", mf.make_control_vector(cfg))
    assert time.perf_counter() - t0 < 5.0
    assert cfg.vocab_size == 512


def test_deterministic(tmp_path: Path, tiny_tokenizer_dir: Path, tiny_cfg, tiny_gguf: Path) -> None:
    w = mf.make_llama_weights(tiny_cfg, seed=0)
    again = mf.write_gguf(tmp_path / "again.gguf", tiny_cfg, w, tiny_tokenizer_dir)
    assert again.read_bytes() == tiny_gguf.read_bytes()
    other = mf.make_llama_weights(tiny_cfg, seed=1)
    assert not np.array_equal(other["lm_head.weight"], w["lm_head.weight"])
    tok2 = mf.train_tokenizer(tmp_path / "tok2")
    assert (tok2 / "tokenizer.json").read_bytes() == (tiny_tokenizer_dir / "tokenizer.json").read_bytes()


def test_gguf_metadata(tiny_gguf: Path, tiny_gguf_q8: Path, tiny_gguf_no_template: Path, tiny_cfg) -> None:
    r = gguf.GGUFReader(str(tiny_gguf))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert f["general.architecture"] == "llama"
    assert f["llama.rope.dimension_count"] == tiny_cfg.hidden_size // tiny_cfg.n_head
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == tiny_cfg.vocab_size
    for special in mf.SPECIAL_TOKENS:
        assert types[tokens.index(special)] == int(gguf.TokenType.CONTROL)
    assert f["tokenizer.ggml.eos_token_id"] == tokens.index("<|im_end|>")
    assert f["tokenizer.ggml.add_bos_token"] is False
    assert f["tokenizer.chat_template"] == mf.CHATML_TEMPLATE
    assert len(f["tokenizer.ggml.merges"]) > 200
    assert {t.tensor_type for t in r.tensors} == {gguf.GGMLQuantizationType.F32}

    q = gguf.GGUFReader(str(tiny_gguf_q8))
    kinds = {t.name: t.tensor_type for t in q.tensors}
    assert kinds["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert kinds["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert kinds["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert "tokenizer.chat_template" not in gguf.GGUFReader(str(tiny_gguf_no_template)).fields


def test_lora_and_cvec_file_layout(lora_a_gguf: Path, lora_a, cvec_gguf: Path, tiny_cfg) -> None:
    r = gguf.GGUFReader(str(lora_a_gguf))
    assert r.get_field("general.type").contents() == "adapter"
    assert r.get_field("adapter.type").contents() == "lora"
    alpha = r.get_field("adapter.lora.alpha")
    assert alpha.types == [gguf.GGUFValueType.FLOAT32] and alpha.contents() == lora_a.alpha
    shapes = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in r.tensors}  # numpy order
    assert len(shapes) == 2 * 7 * tiny_cfg.n_layer
    assert shapes["blk.0.attn_k.weight.lora_a"] == (lora_a.rank, tiny_cfg.hidden_size)
    assert shapes["blk.0.attn_k.weight.lora_b"] == (tiny_cfg.kv_dim, lora_a.rank)
    assert shapes["blk.1.ffn_down.weight.lora_a"] == (lora_a.rank, tiny_cfg.ffn_size)

    c = gguf.GGUFReader(str(cvec_gguf))
    assert c.get_field("general.architecture").contents() == "controlvector"
    assert c.get_field("controlvector.model_hint").contents() == "llama"
    assert c.get_field("controlvector.layer_count").contents() == tiny_cfg.n_layer - 1
    assert [t.name for t in c.tensors] == ["direction.1"]


def test_merge_loras_reference(tiny_weights, lora_a, lora_b) -> None:
    merged = mf.merge_loras(tiny_weights, [(lora_a, 0.7), (lora_b, 0.3)])
    mod = "model.layers.1.self_attn.q_proj"
    expect = tiny_weights[mod + ".weight"] + 0.7 * (lora_a.alpha / lora_a.rank) * lora_a.b[mod] @ lora_a.a[mod] \
        + 0.3 * (lora_b.alpha / lora_b.rank) * lora_b.b[mod] @ lora_b.a[mod]
    np.testing.assert_allclose(merged[mod + ".weight"], expect, rtol=1e-5, atol=1e-5)
    k = "model.layers.0.self_attn.k_proj.weight"  # not a lora_b target
    np.testing.assert_allclose(merged[k] - tiny_weights[k], 0.7 * lora_a.delta(k[: -len(".weight")]), atol=1e-6)
    assert merged["model.norm.weight"] is not tiny_weights["model.norm.weight"]
    # the update is as large as the base weight: scale 1 must change behaviour
    ratio = np.linalg.norm(lora_a.delta(mod)) / np.linalg.norm(tiny_weights[mod + ".weight"])
    assert 0.2 < ratio < 2.0


def test_bad_files_are_what_they_claim(bad_model_files: dict[str, Path], tiny_cfg) -> None:
    with pytest.raises(Exception):
        gguf.GGUFReader(str(bad_model_files["truncated_gguf"]))
    assert bad_model_files["non_gguf"].read_bytes()[:4] != b"GGUF"

    def reader(name: str) -> gguf.GGUFReader:
        return gguf.GGUFReader(str(bad_model_files[name]))

    assert reader("lora_wrong_arch").get_field("general.architecture").contents() == "qwen2"
    shapes = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in reader("lora_wrong_shape").tensors}
    assert shapes["blk.0.attn_q.weight.lora_a"][1] == 2 * tiny_cfg.hidden_size
    names = [t.name for t in reader("lora_missing_tensor").tensors]
    assert "blk.0.attn_q.weight.lora_a" in names and "blk.0.attn_q.weight.lora_b" not in names
    names = [t.name for t in reader("lora_unknown_tensor").tensors]
    assert f"blk.{tiny_cfg.n_layer + 7}.attn_q.weight.lora_a" in names
    for key, vtype in (("lora_alpha_int32", gguf.GGUFValueType.INT32),
                       ("lora_alpha_string", gguf.GGUFValueType.STRING),
                       ("lora_alpha_f64", gguf.GGUFValueType.FLOAT64)):
        assert reader(key).get_field("adapter.lora.alpha").types == [vtype]
    wide = reader("cvec_wrong_width").tensors[0]
    assert int(wide.n_elements) == tiny_cfg.hidden_size + 16


# --------------------------------------------------------------------------------------
# tokenizer: transformers and llama.cpp agree
# --------------------------------------------------------------------------------------


def test_hf_tokenizer_chatml(hf_tokenizer) -> None:
    assert hf_tokenizer.eos_token == "<|im_end|>"
    assert hf_tokenizer.bos_token is None
    assert hf_tokenizer.encode("hello", add_special_tokens=True) == hf_tokenizer.encode("hello", add_special_tokens=False)
    text = hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    bare = hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=False)
    assert bare.endswith("<|im_end|>\n") and text.startswith(bare)
    assert hf_tokenizer.decode(hf_tokenizer.encode(CHINESE_TEXT)) == CHINESE_TEXT


def test_gguf_tokenizes_like_hf(tiny_gguf: Path, hf_tokenizer) -> None:
    llm = open_llama(tiny_gguf)
    chatml = hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    for text in (ASCII_TEXT, chatml, CHINESE_TEXT):
        hf_ids = hf_tokenizer.encode(text, add_special_tokens=False)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == hf_ids, text
        assert llm.detokenize(hf_ids, special=True).decode() == text
    ids = llm.tokenize(chatml.encode(), add_bos=False, special=True)
    for special in ("<|im_start|>", "<|im_end|>"):
        sid = hf_tokenizer.convert_tokens_to_ids(special)
        assert llm.tokenize(special.encode(), add_bos=False, special=True) == [sid]
        assert ids.count(sid) == chatml.count(special)
    assert llm.token_eos() == hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert llm.metadata["tokenizer.chat_template"] == mf.CHATML_TEMPLATE


# --------------------------------------------------------------------------------------
# greedy parity: llama.cpp f32 GGUF == transformers safetensors
# --------------------------------------------------------------------------------------


def test_greedy_parity_base(tiny_gguf: Path, hf_model, chat_prompt_ids: list[int], tiny_cfg) -> None:
    hf_ids, gap = hf_greedy(hf_model, chat_prompt_ids)
    assert gap > 1e-3, "near-tie in the reference: pick another seed"
    assert llama_greedy(open_llama(tiny_gguf), chat_prompt_ids) == hf_ids
    # not degenerate: no immediate stop, no single-token loop
    assert hf_ids[0] not in (0, 2)
    assert len(set(hf_ids)) >= N_GEN // 2


def test_q8_gguf_generates(tiny_gguf_q8: Path, tiny_gguf: Path, chat_prompt_ids: list[int]) -> None:
    q8 = llama_greedy(open_llama(tiny_gguf_q8), chat_prompt_ids)
    f32 = llama_greedy(open_llama(tiny_gguf), chat_prompt_ids)
    assert len(set(q8)) >= N_GEN // 2
    assert q8[:2] == f32[:2]  # quantization noise may diverge later; behaviour, not ids


def test_lora_gguf_changes_output_and_mix_matches_merge(
    tiny_gguf: Path, lora_a_gguf: Path, lora_b_gguf: Path, lora_mix_gguf: Path, chat_prompt_ids: list[int]
) -> None:
    import llama_cpp

    llm = open_llama(tiny_gguf)
    a = llama_cpp.llama_adapter_lora_init(llm.model, str(lora_a_gguf).encode())
    b = llama_cpp.llama_adapter_lora_init(llm.model, str(lora_b_gguf).encode())
    assert a and b
    try:
        base = llama_greedy(llm, chat_prompt_ids)
        set_loras(llm, [a], [1.0])
        with_a = llama_greedy(llm, chat_prompt_ids)
        set_loras(llm, [b], [1.0])
        with_b = llama_greedy(llm, chat_prompt_ids)
        set_loras(llm, [a, b], list(LORA_MIX))
        mixed = llama_greedy(llm, chat_prompt_ids)
        set_loras(llm, [], [])
        assert llama_greedy(llm, chat_prompt_ids) == base  # detaching restores the base
    finally:
        set_loras(llm, [], [])
        llama_cpp.llama_adapter_lora_free(a)
        llama_cpp.llama_adapter_lora_free(b)
    assert with_a != base and with_b != base and with_a != with_b
    assert sum(x != y for x, y in zip(with_a, base)) >= N_GEN // 2
    assert mixed == llama_greedy(open_llama(lora_mix_gguf), chat_prompt_ids)


def _peft_model(tiny_hf_dir: Path, adapters: dict[str, Path]):  # type: ignore[no-untyped-def]
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    base = transformers.LlamaForCausalLM.from_pretrained(str(tiny_hf_dir), use_safetensors=True).eval()
    names = list(adapters)
    model = peft.PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    return model.eval()


def _set_peft_scales(model, scales: dict[str, float]) -> None:  # type: ignore[no-untyped-def]
    """Activate several adapters with per-adapter user scales (scaling = s * alpha / r)."""
    from peft.tuners.lora import LoraLayer

    model.base_model.set_adapter(list(scales))
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, s in scales.items():
                if name in module.scaling:
                    module.scaling[name] = s * module.lora_alpha[name] / module.r[name]


def test_peft_adapters_match_llama_cpp(
    tiny_hf_dir: Path, tiny_gguf: Path, lora_a_peft: Path, lora_b_peft: Path,
    lora_a_gguf: Path, lora_mix_gguf: Path, lora_a, chat_prompt_ids: list[int],
) -> None:
    import torch

    model = _peft_model(tiny_hf_dir, {"a": lora_a_peft, "b": lora_b_peft})
    # the weights peft loaded are exactly ours (no silent re-init or transpose)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    np.testing.assert_array_equal(layer.lora_B["a"].weight.detach().numpy(),
                                  lora_a.b["model.layers.0.self_attn.q_proj"])
    _set_peft_scales(model, {"a": 1.0})
    peft_a, gap = hf_greedy(model, chat_prompt_ids)
    assert gap > 1e-3

    import llama_cpp

    llm = open_llama(tiny_gguf)
    adapter = llama_cpp.llama_adapter_lora_init(llm.model, str(lora_a_gguf).encode())
    try:
        set_loras(llm, [adapter], [1.0])
        assert llama_greedy(llm, chat_prompt_ids) == peft_a
    finally:
        set_loras(llm, [], [])
        llama_cpp.llama_adapter_lora_free(adapter)

    _set_peft_scales(model, dict(zip(("a", "b"), LORA_MIX)))
    peft_mix, _ = hf_greedy(model, chat_prompt_ids)
    assert peft_mix == llama_greedy(open_llama(lora_mix_gguf), chat_prompt_ids)
    with model.disable_adapter(), torch.no_grad():
        base_ids, _ = hf_greedy(model, chat_prompt_ids)
    assert base_ids == llama_greedy(open_llama(tiny_gguf), chat_prompt_ids)


def _hf_with_cvec(model, directions: dict[int, np.ndarray]):  # type: ignore[no-untyped-def]
    import torch

    handles = []
    for il, vec in directions.items():
        v = torch.from_numpy(vec)

        def hook(_module, _inputs, output, v=v):  # type: ignore[no-untyped-def]
            if isinstance(output, tuple):
                return (output[0] + v,) + tuple(output[1:])
            return output + v

        handles.append(model.model.layers[il].register_forward_hook(hook))
    return handles


def _llama_cvec(llm, directions: dict[int, np.ndarray], n_embd: int, n_layer: int) -> None:  # type: ignore[no-untyped-def]
    import llama_cpp

    buf = np.zeros((n_layer - 1, n_embd), dtype=np.float32)  # rows = layers 1 .. n_layer-1
    for il, vec in directions.items():
        buf[il - 1] = vec
    flat = np.ascontiguousarray(buf.reshape(-1))
    ptr = flat.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    assert llama_cpp.llama_set_adapter_cvec(llm.ctx, ptr, flat.size, n_embd, 1, n_layer - 1) == 0
    llm._cvec_keepalive = flat  # llama.cpp copies, but keep it alive while in use anyway


@pytest.mark.parametrize("which", ["tiny", "tiny4"])
def test_control_vector_parity(which: str, request: pytest.FixtureRequest, chat_prompt_ids: list[int]) -> None:
    transformers = pytest.importorskip("transformers")
    gguf_path: Path = request.getfixturevalue("tiny_gguf" if which == "tiny" else "tiny4_gguf")
    cfg = request.getfixturevalue("tiny_cfg" if which == "tiny" else "tiny4_cfg")
    cvec_path: Path = request.getfixturevalue("cvec_gguf" if which == "tiny" else "cvec4_gguf")
    if which == "tiny":
        hf_dir: Path = request.getfixturevalue("tiny_hf_dir")
    else:
        hf_dir = mf.write_hf_model(request.getfixturevalue("model_factory_dir") / "tiny4-hf", cfg,
                                   request.getfixturevalue("tiny4_weights"),
                                   request.getfixturevalue("tiny_tokenizer_dir"))
    # read the directions back from the file, as the app will
    directions = {int(t.name.split(".")[1]): np.array(t.data, dtype=np.float32)
                  for t in gguf.GGUFReader(str(cvec_path)).tensors}
    assert sorted(directions) == list(range(1, cfg.n_layer))

    model = transformers.LlamaForCausalLM.from_pretrained(str(hf_dir), use_safetensors=True).eval()
    base_hf, _ = hf_greedy(model, chat_prompt_ids)
    handles = _hf_with_cvec(model, directions)
    try:
        steered_hf, gap = hf_greedy(model, chat_prompt_ids)
    finally:
        for h in handles:
            h.remove()
    assert gap > 1e-3
    assert steered_hf != base_hf

    llm = open_llama(gguf_path)
    assert llama_greedy(llm, chat_prompt_ids) == base_hf
    _llama_cvec(llm, directions, cfg.hidden_size, cfg.n_layer)
    assert llama_greedy(llm, chat_prompt_ids) == steered_hf


# --------------------------------------------------------------------------------------
# benchmark model
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_benchmark_gguf(tmp_path_factory: pytest.TempPathFactory, hf_tokenizer) -> None:
    path = tmp_path_factory.mktemp("bench") / "bench.gguf"
    t0 = time.perf_counter()
    mf.write_benchmark_gguf(path)
    write_s = time.perf_counter() - t0
    assert write_s < 60
    mtime = path.stat().st_mtime_ns
    t0 = time.perf_counter()
    mf.write_benchmark_gguf(path)
    assert path.stat().st_mtime_ns == mtime and time.perf_counter() - t0 < 0.5  # reused

    r = gguf.GGUFReader(str(path))
    assert sum(int(t.n_elements) for t in r.tensors) >= 200_000_000
    assert {t.tensor_type for t in r.tensors if len(t.shape) == 2} == {gguf.GGMLQuantizationType.Q8_0}

    llm = open_llama(path, n_ctx=256, f32_kv=False)
    assert llm.n_vocab() == mf.BENCHMARK_CONFIG.vocab_size
    chatml = hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ids = llm.tokenize(chatml.encode(), add_bos=False, special=True)
    assert ids == hf_tokenizer.encode(chatml, add_special_tokens=False)
    out = llama_greedy(llm, ids, n=8)
    assert all(3 <= t < mf.tokenizer_vocab_size(path.with_name("bench-tokenizer")) for t in out)

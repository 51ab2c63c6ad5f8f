"""The transformers backend on real files: the tiny llama folder, PEFT adapters and cvec GGUFs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import modelfactory as mf  # noqa: E402

from chat.backend import BackendOptions, Finish, Message  # noqa: E402
from chat.errors import AdapterError, ContextOverflowError, ModelError  # noqa: E402
from chat.persona import AdapterPart, Persona, SteeringPart  # noqa: E402
from chat.sampling import SamplerSettings  # noqa: E402
from chat_plugins.transformers_backend import TransformersBackend  # noqa: E402
from chat_plugins.transformers_backend.options import TransformersOptions  # noqa: E402
from chat.stops import StopHolder  # noqa: E402
from chat_plugins.transformers_backend.textstream import Detokenizer  # noqa: E402

GREEDY = SamplerSettings(temperature=0.0, max_tokens=12)
HELLO = [Message("user", "hello there")]
BASE = Persona(name="base")
ONE_THREAD = BackendOptions(threads=1)  # tiny matrices: extra torch threads only contend on a busy machine


def run(backend, messages=HELLO, sampling=GREEDY) -> tuple[str, Finish, tuple[int, ...]]:
    chunks, finish = [], None
    for item in backend.stream(messages, sampling):
        if isinstance(item, Finish):
            finish = item
        else:
            chunks.append(item)
    assert finish is not None
    return "".join(chunks), finish, backend.last_token_ids


def adapters(*parts: tuple[Path, float]) -> Persona:
    return Persona(name="p", adapters=tuple(AdapterPart(Path(p), s) for p, s in parts))


def steering(path: Path, scale: float = 1.0, layers=None) -> Persona:
    return Persona(name="s", steering=(SteeringPart(Path(path), scale, layers),))


@pytest.fixture(scope="module")
def loaded(tiny_hf_dir):
    backend = TransformersBackend(str(tiny_hf_dir), ONE_THREAD)
    yield backend
    backend.close()


@pytest.fixture
def tb(loaded):
    """The module's backend with no parameter parts attached."""
    loaded.apply(BASE)
    return loaded


@pytest.fixture(scope="module")
def base_ids(loaded):
    loaded.apply(BASE)
    return run(loaded)[2]


# --- finding and loading --------------------------------------------------------------------------------


def test_import_is_cheap():
    code = "import sys, chat_plugins.transformers_backend; print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_can_load(tiny_hf_dir, tiny_gguf, tmp_path):
    assert TransformersBackend.can_load(str(tiny_hf_dir))
    assert not TransformersBackend.can_load(str(tiny_gguf))
    assert not TransformersBackend.can_load(str(tmp_path))  # a folder without config.json
    assert not TransformersBackend.can_load("nobody-here/no-such-model-xyz")


def test_registered_through_the_hook():
    from chat_plugins import transformers_backend

    got = []
    transformers_backend.register_backends(got.append)
    assert got == [TransformersBackend] and TransformersBackend.name == "transformers"


def test_model_id_from_the_local_cache(tiny_hf_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--tiny-org--tiny-chat"
    snap = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_hf_dir, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert TransformersBackend.can_load("tiny-org/tiny-chat")
    assert not TransformersBackend.can_load("tiny-org/not-cached")
    b = TransformersBackend("tiny-org/tiny-chat", ONE_THREAD)
    try:
        assert b.model_name == "tiny-org/tiny-chat" and b.path == snap.resolve()
        assert run(b)[1].usage.completion_tokens == 12
    finally:
        b.close()
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        TransformersBackend("tiny-org/not-cached", ONE_THREAD)


def test_missing_folder(tmp_path):
    with pytest.raises(ModelError, match="no such model folder"):
        TransformersBackend(str(tmp_path / "nope"), BackendOptions())


def test_pickle_only_checkpoint_is_refused(tiny_hf_dir, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    for f in tiny_hf_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, folder / f.name)
    (folder / "pytorch_model.bin").write_bytes(b"not even a pickle")
    assert TransformersBackend.can_load(str(folder))
    with pytest.raises(ModelError) as err:
        TransformersBackend(str(folder), BackendOptions())
    assert str(folder) in err.value.message and "pytorch_model.bin" in err.value.message
    assert "safetensors" in err.value.hint


def test_a_folder_without_a_chat_template_gets_one_from_its_vocabulary(tiny_hf_dir, tmp_path):
    folder = tmp_path / "no-template"
    shutil.copytree(tiny_hf_dir, folder)
    cfg_file = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("chat_template", None)
    cfg_file.write_text(json.dumps(cfg))
    for extra in ("chat_template.jinja", "chat_template.json"):
        (folder / extra).unlink(missing_ok=True)
    with TransformersBackend(str(folder), BackendOptions()) as b:
        assert b.info()["template"].startswith("chatml (the file has no chat template; chosen from the vocabulary")
        assert b.render([Message("user", "Hi")]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        im_end = b.tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert im_end in b.slot.stop_ids
    with TransformersBackend(str(folder), BackendOptions(template="llama3")) as b:
        assert b.info()["template"] == "llama3 (set by --template)"


def test_options_dtype_and_device(tiny_hf_dir):
    with pytest.raises(ModelError, match="--dtype"):
        TransformersBackend(str(tiny_hf_dir), TransformersOptions(dtype="float8"))
    b = TransformersBackend(str(tiny_hf_dir), TransformersOptions(device="cpu", dtype="bfloat16", context_size=128, threads=1))
    try:
        info = b.info()
        assert info["dtype"] == "bfloat16" and info["device"] == "cpu" and info["n_ctx"] == 128
        text, finish, ids = run(b)
        assert finish.reason == "length" and len(ids) == 12
    finally:
        b.close()


def test_info(tb):
    info = tb.info()
    assert info["backend"] == "transformers"
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["n_ctx"] == 512 and info["device"] == "cpu" and info["dtype"] == "float32"
    assert "chatml" in info["template"]


# --- streaming ------------------------------------------------------------------------------------------


def test_streams_before_generation_ends(tb):
    settings = SamplerSettings(temperature=0.0, max_tokens=40)
    it = tb.stream(HELLO, settings)
    first = next(it)
    assert isinstance(first, str) and first
    assert tb.stats.last.finish == "closed"  # the stream is still running
    assert tb.stats.last.completion_tokens < 40
    rest = list(it)
    assert isinstance(rest[-1], Finish) and rest[-1].reason == "length"
    assert rest[-1].usage.completion_tokens == 40
    assert rest[-1].timings.ttft_s > 0 and rest[-1].timings.tokens_per_s > 0


def test_greedy_is_the_argmax_of_a_full_forward(tb, tiny_hf_dir):
    import torch
    from transformers import AutoModelForCausalLM

    text, finish, ids = run(tb)
    prompt = tb.prompt_tokens(HELLO)
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_hf_dir), dtype=torch.float32, use_safetensors=True).eval()
    seq = list(prompt)
    with torch.no_grad():
        for _ in ids:
            seq.append(int(ref(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    assert tuple(seq[len(prompt) :]) == ids


def test_prompt_tokens_match_the_tokenizers_chat_template(tb, tiny_hf_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_hf_dir))
    msgs = [Message("system", "be brief"), Message("user", "hi"), Message("assistant", "hello"), Message("user", "你好")]
    ref = tok.apply_chat_template([{"role": m.role, "content": m.content} for m in msgs], add_generation_prompt=True, tokenize=True)
    if not isinstance(ref, list):  # BatchEncoding in transformers 5
        ref = ref["input_ids"]
    assert tb.prompt_tokens(msgs) == list(ref)
    assert tb.count_tokens(msgs) == len(ref)


def test_kv_reuse_across_turns(tb):
    tb.apply(Persona(name="fresh-cache", steering=()))  # same (empty) parts: the cache is kept
    turn1 = [Message("system", "you are terse"), Message("user", "hello there")]
    _, fin1, _ = run(tb, turn1)
    p1 = tb.prompt_tokens(turn1)
    turn2 = turn1 + [Message("assistant", "Hi."), Message("user", "and again")]
    p2 = tb.prompt_tokens(turn2)
    assert p2[: len(p1)] == p1
    evaluated_before = tb.stats.prompt_tokens_evaluated
    _, fin2, _ = run(tb, turn2)
    last = tb.stats.last
    assert last.prompt_tokens_reused >= len(p1)
    assert last.prompt_tokens_evaluated == len(p2) - last.prompt_tokens_reused
    assert tb.stats.prompt_tokens_evaluated - evaluated_before == last.prompt_tokens_evaluated
    assert fin2.usage.cached_tokens == last.prompt_tokens_reused and fin2.usage.prompt_tokens == len(p2)
    # the same prompt again: only its last token is run (for its logits)
    run(tb, turn2)
    assert tb.stats.last.prompt_tokens_evaluated == 1


def test_reused_cache_gives_the_same_tokens(tb):
    a = run(tb)[2]
    run(tb, [Message("user", "something else entirely")])
    b = run(tb)[2]  # cropped back to the shared prefix, then continued
    assert a == b


def test_stop_string_is_cut_and_not_emitted(tb):
    full, _, _ = run(tb, sampling=SamplerSettings(temperature=0.0, max_tokens=24))
    stop = next(full[i : i + 2] for i in range(3, len(full) - 2) if "\ufffd" not in full[i : i + 2] and full.find(full[i : i + 2]) == i)
    text, finish, _ = run(tb, sampling=SamplerSettings(temperature=0.0, max_tokens=24, stop=(stop,)))
    assert text == full[: full.find(stop)]
    assert finish.reason == "stop"


def test_context_full_ends_with_length(tiny_hf_dir):
    b = TransformersBackend(str(tiny_hf_dir), BackendOptions(context_size=64, threads=1))
    try:
        with pytest.raises(ContextOverflowError):
            b.stream([Message("user", "word " * 100)], GREEDY)
        msgs = [Message("user", "hello " * 8)]
        _, finish, ids = run(b, msgs, SamplerSettings(temperature=0.0))
        assert finish.reason == "length"
        assert len(b.kv_tokens) == 64
        assert b.count_tokens(msgs) + len(ids) == 65  # the last token is sampled but never needs a slot
    finally:
        b.close()


def test_closing_early_leaves_the_cache_consistent(tb):
    expected = run(tb, sampling=SamplerSettings(temperature=0.0, max_tokens=30))[2]
    it = tb.stream(HELLO, SamplerSettings(temperature=0.0, max_tokens=30))
    for _ in range(3):
        next(it)
    it.close()
    assert tb.stats.last.finish == "closed"
    assert len(tb.kv_tokens) == tb.slot.cache.get_seq_length()
    full = run(tb, sampling=SamplerSettings(temperature=0.0, max_tokens=30))[2]
    assert tb.stats.last.prompt_tokens_evaluated == 1
    assert full == expected


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(tb, base_ids):
    s = SamplerSettings(temperature=1.0, seed=7, max_tokens=12)
    assert run(tb, sampling=s)[2] == run(tb, sampling=s)[2]
    assert run(tb, sampling=SamplerSettings(temperature=1.5, top_k=1, seed=1, max_tokens=12))[2] == base_ids


# --- text assembly ----------------------------------------------------------------------------------------


def test_detokenizer_never_emits_half_characters(tb):
    text = "héllo 你好 🙂 world"
    ids = tb.tokenizer(text, add_special_tokens=False)["input_ids"]
    d = Detokenizer(tb.tokenizer)
    chunks = [d.feed(t) for t in ids] + [d.finish()]
    assert "".join(chunks) == text
    assert not any("\ufffd" in c for c in chunks)


def test_stop_holder():
    s = StopHolder(["END"])
    assert s.feed("abc E") == "abc "
    assert s.feed("N") == ""
    assert s.feed("Dx") == "" and s.stopped
    s = StopHolder(["END"])
    assert s.feed("abE") == "ab" and s.finish() == ""  # the start of a stop string is never shown, even at the end


# --- LoRA adapters -----------------------------------------------------------------------------------------


def test_adapter_changes_output_and_removing_restores_base(tb, base_ids, lora_a_peft):
    warnings = tb.apply(adapters((lora_a_peft, 1.0)))
    assert warnings == []
    with_a = run(tb)[2]
    assert with_a != base_ids
    assert tb.active_parts() == ["adapter lora-a-peft  scale 1  effective 2 (α 8 / r 4)"]
    assert tb.stats.last.kv_cleared
    tb.apply(BASE)
    assert run(tb)[2] == base_ids
    assert tb.active_parts() == []


def test_adapters_load_once_and_switch(tb, base_ids, lora_a_peft, lora_b_peft):
    loads = tb.stats.adapter_loads
    tb.apply(adapters((lora_a_peft, 1.0)))
    a1 = run(tb)[2]
    tb.apply(adapters((lora_b_peft, 1.0)))
    b1 = run(tb)[2]
    tb.apply(adapters((lora_a_peft, 1.0)))
    a2 = run(tb)[2]
    assert a1 == a2 and a1 != b1 and b1 != base_ids
    assert tb.stats.adapter_loads - loads <= 2  # each folder read at most once for the process


def test_mix_equals_merged_weights(tb, lora_a_peft, lora_b_peft, lora_a, lora_b, tiny_cfg, tiny_weights, tiny_tokenizer_dir, tmp_path):
    """Σ sᵢ·αᵢ/rᵢ·BᵢAᵢ with both adapters active equals a model whose weights were merged that way."""
    merged = mf.merge_loras(tiny_weights, [(lora_a, 0.7), (lora_b, 0.3)])
    folder = mf.write_hf_model(tmp_path / "merged", tiny_cfg, merged, tiny_tokenizer_dir)
    ref = TransformersBackend(str(folder), ONE_THREAD)
    try:
        expected = run(ref)[2]
    finally:
        ref.close()
    tb.apply(adapters((lora_a_peft, 0.7), (lora_b_peft, 0.3)))
    assert run(tb)[2] == expected
    assert len(tb.active_parts()) == 2


def test_adapter_for_another_base_is_refused_naming_the_tensor(tb, lora_a_peft, tiny_cfg, tmp_path, base_ids):
    other = mf.TinyLlamaConfig(vocab_size=tiny_cfg.vocab_size, ffn_size=96)
    bad = mf.write_peft_adapter(tmp_path / "other-base", other, mf.make_lora(other, rank=4, seed=3))
    tb.apply(adapters((lora_a_peft, 1.0)))
    with pytest.raises(AdapterError) as err:
        tb.apply(adapters((bad, 1.0)))
    assert "base_model.model.model.layers.0." in err.value.message and "shape" in err.value.message
    assert tb.active_parts()[0].startswith("adapter lora-a-peft")  # the previous set stays
    tb.apply(BASE)
    assert run(tb)[2] == base_ids


def test_adapter_with_unknown_module_is_refused(tb, lora_a, tiny_cfg, tmp_path):
    folder = mf.write_peft_adapter(tmp_path / "unknown", tiny_cfg, lora_a)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = next(iter(tensors.values()))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"layers\.7\.self_attn\.q_proj"):
        tb.apply(adapters((folder, 1.0)))


def test_failed_apply_keeps_the_previous_set(tb, lora_b_peft, lora_a, tiny_cfg, tmp_path):
    """b active, then a set whose second adapter is bad: b alone stays active (the new first adapter does not leak in)."""
    tb.apply(adapters((lora_b_peft, 1.0)))
    only_b = run(tb)[2]
    fresh_a = mf.write_peft_adapter(tmp_path / "fresh-a", tiny_cfg, lora_a)  # all 7 projections: new modules
    other = mf.TinyLlamaConfig(vocab_size=tiny_cfg.vocab_size, hidden_size=32, n_head=2, n_head_kv=1)
    bad = mf.write_peft_adapter(tmp_path / "bad", other, mf.make_lora(other, rank=2, seed=5))
    with pytest.raises(AdapterError):
        tb.apply(adapters((fresh_a, 1.0), (bad, 1.0)))
    assert run(tb)[2] == only_b


def test_pickle_only_adapter_is_refused(tb, tmp_path, lora_a_peft):
    folder = tmp_path / "pickled-adapter"
    folder.mkdir()
    shutil.copy(lora_a_peft / "adapter_config.json", folder)
    (folder / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(AdapterError, match="safetensors"):
        tb.apply(adapters((folder, 1.0)))


def test_gguf_adapter_is_converted_once_and_applied(tb, base_ids, lora_a_gguf, lora_a_peft):
    tb.apply(adapters((lora_a_peft, 1.0)))
    want = run(tb)[2]
    warnings = tb.apply(adapters((lora_a_gguf, 1.0)))
    assert len(warnings) <= 1 and all("converted GGUF adapter" in w and "PEFT" in w for w in warnings)
    got = run(tb)[2]
    assert got == want and got != base_ids


def test_scale_zero_is_the_base(tb, base_ids, lora_a_peft):
    tb.apply(adapters((lora_a_peft, 0.0)))
    assert run(tb)[2] == base_ids


def test_kv_is_never_reused_across_parameter_sets(tb, lora_a_peft):
    run(tb)
    tb.apply(adapters((lora_a_peft, 0.5)))
    run(tb)
    assert tb.stats.last.kv_cleared and tb.stats.last.prompt_tokens_reused == 0
    tb.apply(adapters((lora_a_peft, 0.5)))  # the same set again: the cache stays
    run(tb)
    assert not tb.stats.last.kv_cleared and tb.stats.last.prompt_tokens_reused > 0
    tb.apply(adapters((lora_a_peft, 0.6)))
    run(tb)
    assert tb.stats.last.kv_cleared


# --- control vectors ---------------------------------------------------------------------------------------


def test_control_vector_changes_output_and_removing_restores(tb, base_ids, cvec_gguf):
    assert tb.apply(steering(cvec_gguf, 1.0)) == []
    steered = run(tb)[2]
    assert steered != base_ids
    assert tb.active_parts() == ["vector cvec  scale 1  layers 1-1"]
    tb.apply(BASE)
    assert run(tb)[2] == base_ids


def test_control_vector_wrong_width_is_refused(tb, tiny_cfg, tmp_path):
    wide = mf.write_bad_control_vector_width(tmp_path / "cvec-wide.gguf", tiny_cfg)
    with pytest.raises(AdapterError, match=r"direction\.\d+ has 80 values .* hidden size is 64"):
        tb.apply(steering(wide))


def test_control_vector_layer_range(tiny4_cfg, tiny4_weights, tiny_tokenizer_dir, cvec4_gguf, cvec4_directions, tmp_path):
    import torch

    folder = mf.write_hf_model(tmp_path / "tiny4", tiny4_cfg, tiny4_weights, tiny_tokenizer_dir)
    b = TransformersBackend(str(folder), ONE_THREAD)
    try:
        base = run(b)[2]
        b.apply(steering(cvec4_gguf, 1.0))
        full = run(b)[2]
        b.apply(steering(cvec4_gguf, 1.0, (0, 3)))
        assert run(b)[2] == full
        b.apply(steering(cvec4_gguf, 1.0, (2, 3)))
        upper = run(b)[2]
        assert b.active_parts() == ["vector cvec4  scale 1  layers 2-3"]
        b.apply(steering(cvec4_gguf, 1.0, (5, 9)))
        assert run(b)[2] == base
        # layers 2..3 by hand: add direction.N to decoder layer N's output
        b.apply(BASE)
        hooks = [
            b.model.hf.model.layers[n].register_forward_hook(lambda m, a, out, v=torch.from_numpy(cvec4_directions[n]): out + v)
            for n in (2, 3)
        ]
        try:
            assert run(b)[2] == upper
        finally:
            for h in hooks:
                h.remove()
        assert full != base and upper != full
    finally:
        b.close()


def test_adapter_and_vector_together(tb, base_ids, lora_a_peft, cvec_gguf):
    persona = Persona(name="both", adapters=(AdapterPart(lora_a_peft, 1.0),), steering=(SteeringPart(cvec_gguf, 0.5),))
    tb.apply(persona)
    both = run(tb)[2]
    assert len(tb.active_parts()) == 2 and both != base_ids
    info = tb.info()
    assert info["adapters"] == ["lora-a-peft ×1"] and info["steering"] == ["cvec ×0.5"]
    tb.apply(BASE)
    assert run(tb)[2] == base_ids

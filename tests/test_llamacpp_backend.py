"""The llama.cpp backend on real tiny GGUF files through the real llama-cpp-python."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

import modelfactory as mf  # noqa: E402
from chat.backend import BackendOptions, Finish, Message  # noqa: E402
from chat.errors import ContextOverflowError, ModelError, SamplingError  # noqa: E402
from chat.sampling import SamplerSettings  # noqa: E402
from chat_plugins.llamacpp import LlamaCppBackend  # noqa: E402
from chat_plugins.llamacpp.sampler import build_chain  # noqa: E402
from chat.template import ChatTemplate  # noqa: E402
from chat.stops import StopHolder  # noqa: E402
from chat_plugins.llamacpp.textstream import PieceDecoder  # noqa: E402

GREEDY = SamplerSettings(temperature=0.0)
HELLO = [Message("system", "You are a helpful assistant."), Message("user", "Hello! Can you tell me a joke?")]


# --- fixtures ------------------------------------------------------------------------------



@pytest.fixture(scope="session")
def custom_gguf(tmp_path_factory):
    """Write the tiny llama with another chat template: custom_gguf(name, template) -> path."""
    root = tmp_path_factory.mktemp("llamacpp-custom")
    tok = mf.train_tokenizer(root / "tokenizer")
    cfg = mf.TinyLlamaConfig(vocab_size=mf.tokenizer_vocab_size(tok))
    weights = mf.make_llama_weights(cfg, seed=0)

    def make(name: str, template: str | None) -> Path:
        return mf.write_gguf(root / f"{name}.gguf", cfg, weights, tok, chat_template=template)

    return make


@pytest.fixture(scope="module")
def backend(tiny_gguf):
    b = LlamaCppBackend(str(tiny_gguf), BackendOptions(threads=2))
    yield b
    b.close()


def run(b: LlamaCppBackend, messages, sampling: SamplerSettings) -> tuple[str, Finish]:
    items = list(b.stream(messages, sampling))
    finish = items[-1]
    assert isinstance(finish, Finish)
    assert all(isinstance(x, str) for x in items[:-1])
    return "".join(items[:-1]), finish


def eog_ids(b: LlamaCppBackend) -> list[int]:
    return [t for t in range(b.n_vocab) if b.is_eog(t)]


def no_eog(b: LlamaCppBackend, **kw) -> SamplerSettings:
    """Settings under which the random model never ends by itself."""
    return SamplerSettings(logit_bias={t: -1000.0 for t in eog_ids(b)}, **kw)


def word_token(b: LlamaCppBackend) -> int:
    """A token that is a space-prefixed word and re-tokenizes to itself when repeated."""
    for t in range(b.n_vocab):
        piece = b.piece(t)
        if len(piece) >= 4 and piece[:1] == b" " and piece[1:].isalpha():
            if b.tokenize(piece.decode() * 3, special=False) == [t, t, t]:
                return t
    raise AssertionError("no reusable word token in the vocabulary")


# --- plugin surface ---------------------------------------------------------------------------


def test_importing_the_plugin_does_not_import_llama_cpp():
    code = "import sys, chat_plugins.llamacpp; print('llama_cpp' in sys.modules, 'gguf' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_registers_through_the_hook():
    import chat_plugins.llamacpp as plugin

    got = []
    plugin.register_backends(got.append)
    assert got == [LlamaCppBackend]
    assert LlamaCppBackend.name == "llama.cpp"
    assert LlamaCppBackend.can_load("/models/qwen.Q4_K_M.gguf")
    assert LlamaCppBackend.can_load("x.GGUF")
    assert not LlamaCppBackend.can_load("Qwen/Qwen2.5-0.5B")


# --- loading and streaming ------------------------------------------------------------------------


def test_loads_and_streams_chunks_before_the_end(backend):
    stream = backend.stream(HELLO, no_eog(backend, temperature=0.0, max_tokens=12))
    first = next(stream)
    assert isinstance(first, str) and first  # a chunk arrives while generation is still going
    rest = list(stream)
    assert isinstance(rest[-1], Finish) and sum(isinstance(x, Finish) for x in rest) == 1
    finish = rest[-1]
    assert finish.reason == "length"
    assert finish.usage.completion_tokens == 12
    assert finish.usage.prompt_tokens == backend.count_tokens(HELLO)
    assert finish.timings.ttft_s > 0 and finish.timings.prompt_s > 0 and finish.timings.tokens_per_s > 0


def test_info_reports_the_model(backend, tiny_gguf):
    info = backend.info()
    assert info["model"] == str(Path(tiny_gguf).resolve())
    assert info["architecture"] == "llama"
    assert info["parameters"] > 0
    assert info["n_ctx"] == backend.context_size == min(info["n_ctx_train"], 8192)
    assert info["threads"] == 2 and info["gpu_layers"] == 0
    assert "chatml" in info["template"] and "fallback" not in info["template"]
    assert info["context_used"] == len(backend.kv_tokens)


def test_greedy_is_the_argmax_of_the_logits(backend, tiny_gguf):
    n = 16
    _, finish = run(backend, HELLO, no_eog(backend, temperature=0.0, max_tokens=n))
    got = list(backend.stats.last.completion_ids)
    prompt = backend.prompt_tokens(HELLO)

    # The same computation written directly against llama.cpp's low-level API.
    L = llama_cpp
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    model = L.llama_model_load_from_file(str(tiny_gguf).encode(), mp)
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_threads, cp.n_threads_batch = backend.context_size, 2, 2
    ctx = L.llama_init_from_model(model, cp)
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    bias = np.zeros(n_vocab, np.float32)
    bias[[t for t in range(n_vocab) if L.llama_vocab_is_eog(vocab, t)]] = -1000.0
    try:
        want, toks = [], list(prompt)
        for _ in range(n):
            arr = (L.llama_token * len(toks))(*toks)
            assert L.llama_decode(ctx, L.llama_batch_get_one(arr, len(toks))) == 0
            logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
            tok = int(np.argmax(logits + bias))
            want.append(tok)
            toks = [tok]
    finally:
        L.llama_free(ctx)
        L.llama_model_free(model)
    assert got == want
    assert finish.usage.completion_tokens == n


def test_same_seed_same_tokens_across_processes(tiny_gguf):
    script = textwrap.dedent(
        f"""
        import json
        from chat.backend import BackendOptions, Message
        from chat.sampling import SamplerSettings
        from chat_plugins.llamacpp import LlamaCppBackend
        b = LlamaCppBackend({str(tiny_gguf)!r}, BackendOptions(threads=2))
        eog = [t for t in range(b.n_vocab) if b.is_eog(t)]
        out = []
        for seed in (1234, 1234, 99):
            s = SamplerSettings(temperature=1.0, top_k=40, seed=seed, max_tokens=24, logit_bias={{t: -1000.0 for t in eog}})
            list(b.stream([Message("user", "Tell me a story.")], s))
            out.append(list(b.stats.last.completion_ids))
        print(json.dumps(out))
        """
    )
    runs = [json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout) for _ in range(2)]
    (a1, a2, c1), (b1, b2, c2) = runs
    assert a1 == a2 == b1 == b2  # same seed: same tokens, within and across processes
    assert c1 == c2 and c1 != a1  # another seed: other tokens, but reproducibly


def test_no_seed_is_random(backend):
    s = no_eog(backend, temperature=1.5, max_tokens=24)
    outs = set()
    for _ in range(3):
        run(backend, HELLO, s)
        outs.add(backend.stats.last.completion_ids)
    assert len(outs) > 1


def test_max_tokens_finishes_with_length(backend):
    text, finish = run(backend, HELLO, no_eog(backend, temperature=0.0, max_tokens=5))
    assert finish.reason == "length"
    assert finish.usage.completion_tokens == 5 == len(backend.stats.last.completion_ids)


def test_eos_ends_the_answer(backend):
    eos = backend.tokenize("<|im_end|>")[0]
    assert backend.is_eog(eos)
    text, finish = run(backend, HELLO, SamplerSettings(temperature=0.0, logit_bias={eos: 1000.0}))
    assert (text, finish.reason, finish.usage.completion_tokens) == ("", "stop", 0)


def test_stop_strings_end_the_answer_and_are_not_emitted(backend):
    full, _ = run(backend, HELLO, no_eog(backend, temperature=0.0, max_tokens=30))
    clean = full.replace("\ufffd", "")
    stop = clean[len(clean) // 2 : len(clean) // 2 + 3]
    assert len(stop) == 3
    cut = full.index(stop)
    text, finish = run(backend, HELLO, no_eog(backend, temperature=0.0, max_tokens=30, stop=(stop, "\u2603never")))
    assert finish.reason == "stop"
    assert text == full[:cut]
    assert stop not in text


def test_context_full_finishes_with_length(tiny_gguf):
    with LlamaCppBackend(str(tiny_gguf), BackendOptions(context_size=64, threads=2)) as b:
        msgs = [Message("user", "Hi")]
        n_prompt = b.count_tokens(msgs)
        text, finish = run(b, msgs, no_eog(b, temperature=0.0))
        assert finish.reason == "length"
        assert b.context_size == 64
        # the last sampled token is shown but needs no room in the memory
        assert finish.usage.completion_tokens == 64 - n_prompt + 1
        assert len(b.kv_tokens) == 64


def test_prompt_larger_than_the_context_is_an_error(tiny_gguf):
    with LlamaCppBackend(str(tiny_gguf), BackendOptions(context_size=64, threads=2)) as b:
        msgs = [Message("user", "The quick brown fox jumps over the lazy dog. " * 20)]
        n = b.count_tokens(msgs)
        assert n > 64
        with pytest.raises(ContextOverflowError) as err:
            b.stream(msgs, GREEDY)
        assert str(n) in err.value.message and "64" in err.value.message
        # and nothing broke: a short prompt still works
        assert run(b, [Message("user", "Hi")], no_eog(b, temperature=0.0, max_tokens=3))[1].reason == "length"


# --- KV reuse ------------------------------------------------------------------------------------


def test_second_turn_evaluates_only_the_new_tokens(tiny_gguf):
    with LlamaCppBackend(str(tiny_gguf), BackendOptions(threads=2)) as b:
        word = word_token(b)
        s1 = SamplerSettings(temperature=0.0, max_tokens=5, logit_bias={word: 1000.0})
        text, _ = run(b, HELLO, s1)
        prompt1 = b.prompt_tokens(HELLO)
        assert b.stats.last.completion_ids == (word,) * 5
        assert b.kv_tokens == prompt1 + [word] * 4  # the last sampled token was never evaluated

        turn2 = HELLO + [Message("assistant", text), Message("user", "Another one, please.")]
        prompt2 = b.prompt_tokens(turn2)
        assert prompt2[: len(prompt1) + 5] == prompt1 + [word] * 5
        _, finish = run(b, turn2, no_eog(b, temperature=0.0, max_tokens=4))
        last = b.stats.last
        assert last.prompt_tokens_reused == len(prompt1) + 4 == finish.usage.cached_tokens
        assert last.prompt_tokens_evaluated == len(prompt2) - len(prompt1) - 4
        assert b.stats.prompt_tokens_evaluated == len(prompt1) + last.prompt_tokens_evaluated  # cumulative
        assert b.stats.prompt_tokens_reused == last.prompt_tokens_reused

        # the same prompt again: everything is reused but the last token, which gives the logits
        run(b, turn2, no_eog(b, temperature=0.0, max_tokens=4))
        assert b.stats.last.prompt_tokens_evaluated == 1
        assert b.stats.last.prompt_tokens_reused == len(prompt2) - 1


def test_reused_kv_gives_the_same_tokens_as_a_fresh_evaluation(tiny_gguf, backend):
    turn2 = HELLO + [Message("assistant", "Why did the programmer quit?"), Message("user", "Tell me.")]
    s = no_eog(backend, temperature=0.0, max_tokens=10)
    run(backend, HELLO, s)
    run(backend, turn2, s)
    assert backend.stats.last.prompt_tokens_reused > 0
    reused = backend.stats.last.completion_ids
    with LlamaCppBackend(str(tiny_gguf), BackendOptions(threads=2)) as fresh:
        run(fresh, turn2, s)
        assert fresh.stats.last.prompt_tokens_reused == 0
        assert fresh.stats.last.completion_ids == reused


def test_closing_the_stream_early_keeps_the_kv_consistent(tiny_gguf):
    with LlamaCppBackend(str(tiny_gguf), BackendOptions(threads=2)) as a:
        s = no_eog(a, temperature=0.0, max_tokens=40)
        stream = a.stream(HELLO, s)
        chunks = [next(stream) for _ in range(3)]
        stream.close()  # what Ctrl-C in the REPL does
        ids = a.stats.last.completion_ids
        assert a.stats.last.finish == "closed" and 3 <= len(ids) < 40
        assert a.kv_tokens == a.prompt_tokens(HELLO) + list(ids[:-1])

        turn2 = HELLO + [Message("assistant", "".join(chunks)), Message("user", "Go on.")]
        run(a, turn2, s)
        assert a.stats.last.prompt_tokens_reused >= len(a.prompt_tokens(HELLO))
        after_interrupt = a.stats.last.completion_ids
    with LlamaCppBackend(str(tiny_gguf), BackendOptions(threads=2)) as fresh:
        run(fresh, turn2, s)
        assert fresh.stats.last.completion_ids == after_interrupt


def test_a_newer_stream_supersedes_an_unstarted_one(backend):
    old = backend.stream(HELLO, GREEDY)
    _, finish = run(backend, HELLO, no_eog(backend, temperature=0.0, max_tokens=2))
    assert finish.reason == "length"
    items = list(old)  # it must not touch the memory the newer stream left
    assert len(items) == 1 and items[0].reason == "interrupted"


# --- samplers --------------------------------------------------------------------------------


def chain_names(b: LlamaCppBackend, **kw) -> list[str]:
    return b.sampler_for(SamplerSettings(**kw)).native_names()


def test_temperature_zero_is_a_bare_greedy_chain(backend):
    assert chain_names(backend, temperature=0.0) == ["greedy"]
    assert chain_names(backend, temperature=0.0, logit_bias={5: 1.0}) == ["logit-bias", "greedy"]
    assert chain_names(backend, temperature=0.0, repeat_penalty=1.1) == ["penalties", "greedy"]
    assert chain_names(backend) == ["temp", "dist"]  # defaults: every filter off
    assert chain_names(backend, dynatemp_range=0.5) == ["temp-ext", "dist"]
    assert chain_names(backend, mirostat=2, top_k=40) == ["temp", "mirostat-v2"]
    assert chain_names(backend, mirostat=1) == ["temp", "mirostat"]


def test_chain_follows_the_order(backend):
    assert chain_names(backend, top_k=40, order=("top_k", "temperature")) == ["top-k", "temp", "dist"]
    assert chain_names(backend, top_k=40, order=("temperature", "top_k")) == ["temp", "top-k", "dist"]
    every = dict(
        repeat_penalty=1.1, dry_multiplier=0.8, top_n_sigma=1.5, top_k=40, typical_p=0.9,
        top_p=0.9, min_p=0.05, xtc_probability=0.5, xtc_threshold=0.1,
    )
    assert chain_names(backend, **every) == [
        "penalties", "dry", "top-n-sigma", "top-k", "typical", "top-p", "min-p", "xtc", "temp", "dist"
    ]
    assert chain_names(backend, **every, order=("temperature", "min_p", "top_k")) == ["temp", "min-p", "top-k", "dist"]


def surviving(b: LlamaCppBackend, settings: SamplerSettings, logits: list[float]) -> int:
    """Apply the chain (without its picking stage) to hand-made logits; count the candidates left."""
    chain = build_chain(settings, vocab=b.model.vocab, n_vocab=b.n_vocab, n_ctx=b.context_size, plugin_stage=b.plugin_sampler, final=False)
    try:
        data = (llama_cpp.llama_token_data * len(logits))(*[llama_cpp.llama_token_data(i, x, 0.0) for i, x in enumerate(logits)])
        arr = llama_cpp.llama_token_data_array(data, len(logits), -1, False)
        chain.apply(ctypes.byref(arr))
        return sum(1 for i in range(arr.size) if arr.data[i].logit > -1e30)
    finally:
        chain.close()


def test_order_changes_the_result(backend):
    logits = [-float(i) for i in range(20)]  # p_i / p_max = e^(-i / T)
    min_p_first = SamplerSettings(temperature=10.0, min_p=0.3, order=("min_p", "temperature"))
    temp_first = SamplerSettings(temperature=10.0, min_p=0.3, order=("temperature", "min_p"))
    assert surviving(backend, min_p_first, logits) == 2  # e^-i ≥ 0.3 → i ≤ 1
    assert surviving(backend, temp_first, logits) == 13  # e^(-i/10) ≥ 0.3 → i ≤ 12


def test_chain_is_rebuilt_only_when_settings_change(backend):
    s = SamplerSettings(temperature=0.7, top_k=20, seed=3)
    backend.sampler_for(s)
    builds = backend.stats.sampler_builds
    backend.sampler_for(s)
    backend.sampler_for(s.model_copy(update={"max_tokens": 7, "stop": ("x",)}))  # not part of the chain
    assert backend.stats.sampler_builds == builds
    backend.sampler_for(s.model_copy(update={"top_k": 21}))
    assert backend.stats.sampler_builds == builds + 1


def test_penalties_change_greedy_output(backend):
    s = no_eog(backend, temperature=0.0, max_tokens=20)
    run(backend, HELLO, s)
    plain = backend.stats.last.completion_ids
    run(backend, HELLO, s.model_copy(update={"repeat_penalty": 5.0, "penalty_last_n": -1}))
    penalized = backend.stats.last.completion_ids
    assert plain != penalized
    # a repeat penalty of 5 over the whole context: no token of the answer repeats a prompt or answer token twice in a row
    assert all(a != b for a, b in zip(penalized, penalized[1:]))


def test_plugin_stage_in_the_order_is_a_clear_error(tiny_gguf):
    stages = {"shout": object()}  # registered, but not a SamplerStage
    with LlamaCppBackend(str(tiny_gguf), BackendOptions(threads=2), stages=stages) as b:
        s = SamplerSettings.model_validate({"order": ("top_k", "shout", "temperature")}, context={"stages": stages})
        with pytest.raises(SamplingError, match="shout"):
            b.stream(HELLO, s)
        assert run(b, HELLO, no_eog(b, temperature=0.0, max_tokens=2))[1].reason == "length"


# --- templates -------------------------------------------------------------------------------


def test_file_without_a_template_gets_chatml(tiny_gguf_no_template):
    with LlamaCppBackend(str(tiny_gguf_no_template), BackendOptions(threads=2)) as b:
        assert b.info()["template"] == (
            "chatml (the file has no chat template; chosen from the vocabulary: <|im_start|> <|im_end|> are tokens)"
        )
        assert b.render(HELLO).endswith("<|im_start|>assistant\n")
        assert b.render(HELLO).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
        assert run(b, HELLO, no_eog(b, temperature=0.0, max_tokens=3))[1].reason == "length"


def test_control_tokens_are_single_tokens(backend):
    ids = backend.tokenize("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == backend.tokenize("<|im_start|>")[0] and len(backend.tokenize("<|im_start|>")) == 1


NO_SYSTEM = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DROPS_SYSTEM = (
    "{% for m in messages %}{% if m['role'] != 'system' %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("template", [NO_SYSTEM, DROPS_SYSTEM], ids=["raises", "drops"])
def test_system_is_merged_when_the_template_has_no_system_role(custom_gguf, template):
    path = custom_gguf("nosystem-" + str(abs(hash(template)) % 1000), template)
    with LlamaCppBackend(str(path), BackendOptions(threads=2)) as b:
        text = b.render(HELLO)
        assert text == "<|im_start|>user\nYou are a helpful assistant.\n\nHello! Can you tell me a joke?<|im_end|>\n<|im_start|>assistant\n"
        assert run(b, HELLO, no_eog(b, temperature=0.0, max_tokens=2))[1].reason == "length"


def test_bos_is_never_doubled(custom_gguf):
    with_bos = "{{ bos_token }}" + mf.CHATML_TEMPLATE
    for name, template in (("bos-in-template", with_bos), ("plain", mf.CHATML_TEMPLATE)):
        with LlamaCppBackend(str(custom_gguf(name, template)), BackendOptions(threads=2)) as b:
            bos = b.model.bos
            assert b.template.bos_token == "<|endoftext|>"
            b.model.add_bos = True  # as a file with tokenizer.ggml.add_bos_token = true says
            b.model.prompt_cache.clear()
            toks = b.prompt_tokens(HELLO)
            assert toks[0] == bos and toks[1] != bos, name


def test_template_sandbox_blocks_python_internals():
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    t = ChatTemplate(evil, model="x.gguf")
    with pytest.raises(ModelError, match="chat template failed"):
        t.render([Message("user", "hi")])


# --- bad files ----------------------------------------------------------------------------------


def bad_files(tmp_path: Path, tiny_gguf) -> dict[str, Path]:
    import gguf

    arch = tmp_path / "arch.gguf"
    w = gguf.GGUFWriter(str(arch), "nosucharch")
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    adapter = tmp_path / "adapter.gguf"
    cfg = mf.TinyLlamaConfig()
    mf.write_lora_gguf(adapter, cfg, mf.make_lora(cfg, rank=2, seed=1))
    return {
        "no such file": tmp_path / "missing.gguf",
        "not a GGUF file": mf.write_non_gguf(tmp_path / "zip.gguf"),
        "truncated": mf.write_truncated_gguf(tiny_gguf, tmp_path / "half.gguf", 0.5),
        "truncated: the file ends inside its header": mf.write_truncated_gguf(tiny_gguf, tmp_path / "head.gguf", 0.002),
        "unsupported architecture 'nosucharch'": arch,
        "adapter, not a model": adapter,
        "is a folder": tmp_path,
    }


def test_bad_model_files_are_one_clear_error(tmp_path, tiny_gguf):
    for what, path in bad_files(tmp_path, tiny_gguf).items():
        with pytest.raises(ModelError) as err:
            LlamaCppBackend(str(path), BackendOptions())
        assert what in err.value.message, (what, err.value.message)
        assert str(path) in err.value.message and err.value.hint
        assert "\n" not in str(err.value)


def test_a_file_llama_cpp_rejects_quotes_its_reason(tmp_path, custom_gguf):
    import gguf

    tok = Path(custom_gguf("plain", mf.CHATML_TEMPLATE)).parent / "tokenizer"
    path = tmp_path / "nohparams.gguf"
    w = gguf.GGUFWriter(str(path), "llama")  # a tokenizer and a tensor, but no hyperparameters
    mf._add_tokenizer(w, tok, None)
    w.add_tensor("token_embd.weight", np.zeros((mf.tokenizer_vocab_size(tok), 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ModelError) as err:
        LlamaCppBackend(str(path))
    assert str(path) in err.value.message and "llama.context_length" in err.value.message
    assert "\n" not in err.value.message


def test_bad_files_do_not_crash_the_process(tmp_path, tiny_gguf):
    paths = {k: str(v) for k, v in bad_files(tmp_path, tiny_gguf).items()}
    script = textwrap.dedent(
        f"""
        from chat.errors import ModelError
        from chat_plugins.llamacpp import LlamaCppBackend
        for path in {list(paths.values())!r}:
            try:
                LlamaCppBackend(path)
            except ModelError as exc:
                print("ModelError", exc.message)
        print("alive")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("ModelError") == len(paths) and out.stdout.strip().endswith("alive")
    assert out.stderr == ""


def test_llama_cpp_says_nothing_on_stderr(tiny_gguf):
    script = textwrap.dedent(
        f"""
        from chat.backend import Message
        from chat.sampling import SamplerSettings
        from chat_plugins.llamacpp import LlamaCppBackend
        b = LlamaCppBackend({str(tiny_gguf)!r})
        print(len(list(b.stream([Message("user", "hi")], SamplerSettings(max_tokens=4, seed=1)))))
        b.close()
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stderr == "", out.stderr


# --- quantized, personas, lifetime ------------------------------------------------------------------


def test_q8_model_loads_and_generates(tiny_gguf_q8):
    with LlamaCppBackend(str(tiny_gguf_q8), BackendOptions(threads=2)) as b:
        assert "Q8_0" in b.info()["description"]
        _, finish = run(b, HELLO, no_eog(b, temperature=0.0, max_tokens=8))
        assert finish.reason == "length" and finish.usage.completion_tokens == 8


def test_close_frees_and_is_final(tiny_gguf):
    b = LlamaCppBackend(str(tiny_gguf), BackendOptions(threads=2))
    run(b, HELLO, SamplerSettings(max_tokens=2, seed=1))
    b.close()
    b.close()
    with pytest.raises(ModelError, match="closed"):
        b.stream(HELLO, GREEDY)


# --- text assembly --------------------------------------------------------------------------------


def test_text_never_splits_a_character():
    data = "你好🙂".encode()
    t = PieceDecoder(lambda i: data[i : i + 1])  # one byte per "token"
    chunks = [t.feed(i) for i in range(len(data))] + [t.finish()]
    assert "".join(chunks) == "你好🙂"
    assert all("\ufffd" not in c for c in chunks)
    t = PieceDecoder(lambda i: "é".encode()[:1])
    assert t.feed(0) == "" and t.finish() == ""  # an unfinished character is dropped


def test_text_holds_back_a_possible_stop_string():
    t = StopHolder(stop=("</s>", "User:"))
    assert t.feed("Hello <") == "Hello "
    assert t.feed("/") == ""
    assert t.feed("x") == "</x"  # not a stop after all
    assert t.feed(" Use") == " "
    assert t.feed("r: more") == "" and t.stopped
    assert "".join(t.emitted) == "Hello </x "
    t = StopHolder(stop=("END",))
    assert t.feed("the EN") == "the " and t.finish() == ""  # never a stop string in part, even at the end
    t = StopHolder(stop=("END",))
    assert t.feed("the E") == "the " and t.finish() == ""
    t = StopHolder(stop=("END",))
    assert t.feed("the ENx") == "the ENx" and t.finish() == ""


def test_memory_positions_the_list_does_not_know_are_dropped(tiny_gguf):
    """An interrupt between llama_decode and the list update must not poison the next turn."""
    turn2 = HELLO + [Message("assistant", "Sure."), Message("user", "Go on.")]
    with LlamaCppBackend(str(tiny_gguf), BackendOptions(threads=2)) as b:
        s = no_eog(b, temperature=0.0, max_tokens=12)
        run(b, HELLO, s)
        del b.slot.kv[-5:]  # the memory still holds these positions
        run(b, turn2, s)
        got = b.stats.last.completion_ids
    with LlamaCppBackend(str(tiny_gguf), BackendOptions(threads=2)) as fresh:
        run(fresh, turn2, s)
        assert fresh.stats.last.completion_ids == got


def with_stops(b: LlamaCppBackend, *stops: str) -> ChatTemplate:
    t = b.template
    return ChatTemplate(t.source, name="t", stops=stops, bos_token=t.bos_token, eos_token=t.eos_token)


def test_template_override_and_end_of_turn_markers_end_the_answer(tiny_gguf):
    """A marker that is one token ends the answer as a token; one that is not, as a stop string; neither is shown."""
    with LlamaCppBackend(str(tiny_gguf), BackendOptions(threads=2, template="gemma")) as b:
        assert b.info()["template"] == "gemma (set by --template)"
        assert b.render(HELLO).endswith("<start_of_turn>model\n")
        greedy = no_eog(b, temperature=0.0, max_tokens=12)
        text, finish = run(b, HELLO, greedy)
        ids = list(b.stats.last.completion_ids)
        assert len(ids) >= 6 and finish.reason == "length"
        # a later generated token as an end-of-turn marker: it is one token, so generation stops before it
        text_of = {t: b.piece(t).decode("utf-8", "replace") for t in ids}
        k = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i] and b.tokenize(text_of[ids[i]]) == [ids[i]])
        marker = text_of[ids[k]]
        b.slot.use_template(with_stops(b, marker))
        assert b.slot.stop_ids == {ids[k]}
        short, finish = run(b, HELLO, greedy)
        assert finish.reason == "stop" and list(b.stats.last.completion_ids) == ids[:k]
        # a marker that is not one token (text spanning two tokens) is cut as a stop string
        pieces = [text_of[t] for t in ids]

        def usable(j: int) -> bool:
            span = pieces[j] + pieces[j + 1]
            return span.isascii() and span.isprintable() and span not in "".join(pieces[:j]) + pieces[j][:-1] \
                and len(b.tokenize(span, special=True)) > 1 and ids[j + 1] not in ids[:j + 1]
        j = next(j for j in range(1, len(ids) - 1) if usable(j))
        span = pieces[j] + pieces[j + 1]
        b.slot.use_template(with_stops(b, span))
        assert b.slot.stop_ids == frozenset()
        cut, finish = run(b, HELLO, greedy)
        assert finish.reason == "stop" and span not in cut and cut == "".join(pieces[:j])

"""Persona parameter parts on the llama.cpp backend: LoRA adapters, mixing, control vectors, KV states, bad files.

Real tiny files (tests/model_fixtures.py) through the real llama-cpp-python. Token
comparisons use an f32 KV cache: with the default f16 cache near-tied tokens can flip.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

llama_cpp = pytest.importorskip("llama_cpp")

import modelfactory as mf  # noqa: E402
from chat.backend import BackendOptions, Message  # noqa: E402
from chat.errors import AdapterError, ChatError  # noqa: E402
from chat.persona import AdapterPart, Persona, SteeringPart, mix_personas  # noqa: E402
from chat.sampling import SamplerSettings  # noqa: E402
from chat_plugins.llamacpp import LlamaCppBackend  # noqa: E402

from conftest import chat_exe  # noqa: E402

GREEDY = SamplerSettings(temperature=0.0, max_tokens=12)
HELLO = [Message("system", "You are a helpful assistant."), Message("user", "Hello! Can you tell me a joke?")]
PLAIN = Persona(name="plain")


def new_backend(path: Path, **options) -> LlamaCppBackend:
    return LlamaCppBackend(str(path), BackendOptions(threads=2, **options), kv_type="f32")


def tokens(backend: LlamaCppBackend, messages=HELLO, sampling=GREEDY) -> tuple[int, ...]:
    for _ in backend.stream(messages, sampling):
        pass
    return backend.stats.last.completion_ids


def with_adapters(name: str, *parts: tuple[Path, float]) -> Persona:
    return Persona(name=name, adapters=tuple(AdapterPart(Path(p), s, name) for p, s in parts))


def with_vector(name: str, path: Path, scale: float = 1.0, layers=None) -> Persona:
    return Persona(name=name, steering=(SteeringPart(Path(path), scale, layers, name),))


@pytest.fixture(scope="module")
def backend(tiny_gguf):
    b = new_backend(tiny_gguf)
    yield b
    b.close()


@pytest.fixture(scope="module")
def base_tokens(tiny_gguf):
    with new_backend(tiny_gguf) as b:
        return tokens(b)


# --- adapters -------------------------------------------------------------------------------------


def test_adapter_changes_output_and_removing_it_restores_the_base(backend, base_tokens, lora_a_gguf):
    backend.apply(PLAIN)
    assert tokens(backend) == base_tokens
    backend.apply(with_adapters("a", (lora_a_gguf, 1.0)))
    with_a = tokens(backend)
    assert backend.stats.last.kv_cleared  # memory computed without the adapter is never reused
    assert with_a != base_tokens
    backend.apply(PLAIN)
    assert tokens(backend) == base_tokens
    backend.apply(with_adapters("a", (lora_a_gguf, 1.0)))
    assert tokens(backend) == with_a


def test_mix_of_two_adapters_equals_the_merged_reference(tiny_gguf, lora_a_gguf, lora_b_gguf, lora_mix_gguf):
    with new_backend(lora_mix_gguf) as ref:
        expected = tokens(ref)
    a = with_adapters("a", (lora_a_gguf, 1.0))
    b = with_adapters("b", (lora_b_gguf, 1.0))
    mixed = mix_personas([(a, mf_mix()[0]), (b, mf_mix()[1])])
    assert {p.name: p.scale for p in mixed.adapters} == pytest.approx({"lora-a": 0.7, "lora-b": 0.3})
    with new_backend(tiny_gguf) as b_:
        b_.apply(mixed)
        assert tokens(b_) == expected
        assert sorted(line.split()[1] for line in b_.active_parts()) == ["lora-a", "lora-b"]
        assert any("scale 0.7" in line for line in b_.active_parts())


def mf_mix() -> tuple[float, float]:
    from model_fixtures import LORA_MIX

    return LORA_MIX


def test_the_same_adapter_listed_twice_adds_its_scales(backend, lora_a_gguf):
    backend.apply(with_adapters("once", (lora_a_gguf, 0.7)))
    once = tokens(backend)
    backend.apply(with_adapters("twice", (lora_a_gguf, 0.4), (lora_a_gguf, 0.3)))
    assert tokens(backend) == once


def test_scale_zero_is_the_base(backend, base_tokens, lora_a_gguf):
    backend.apply(with_adapters("zero", (lora_a_gguf, 0.0)))
    assert tokens(backend) == base_tokens
    assert "off" in backend.active_parts()[0]


def test_adapters_are_loaded_once_and_switching_never_reloads_the_base(tiny_gguf, lora_a_gguf, lora_b_gguf):
    with new_backend(tiny_gguf) as b:
        model_ptr = b.model.ptr
        for _ in range(3):
            b.apply(with_adapters("a", (lora_a_gguf, 1.0)))
            b.apply(with_adapters("b", (lora_b_gguf, 1.0)))
            b.apply(PLAIN)
        assert b.loaded_adapters == 2 and b.slot.parts.loads == 2
        assert b.model.ptr == model_ptr


# --- control vectors ----------------------------------------------------------------------------------


def test_control_vector_changes_output_and_removing_it_restores_the_base(backend, base_tokens, cvec_gguf):
    backend.apply(with_vector("calm", cvec_gguf, 1.0))
    steered = tokens(backend)
    assert steered != base_tokens
    backend.apply(PLAIN)
    assert tokens(backend) == base_tokens


def test_layer_range_is_honoured(tmp_path, tiny4_gguf, cvec4_gguf, cvec4_directions):
    only_2_3 = mf.write_control_vector(tmp_path / "cvec4-2-3.gguf", {il: cvec4_directions[il] for il in (2, 3)})
    with new_backend(tiny4_gguf) as b:
        base = tokens(b)
        b.apply(with_vector("all", cvec4_gguf))
        full = tokens(b)
        assert full != base
        # a range holding none of the vector's layers: no effect, and the user is told
        warnings = b.apply(with_vector("outside", cvec4_gguf, layers=(4, 9)))
        assert tokens(b) == base
        assert len(warnings) == 1 and "no effect" in warnings[0] and "\n" not in warnings[0]
        # a range inside: exactly the vector restricted to those layers
        b.apply(with_vector("part", cvec4_gguf, layers=(2, 3)))
        partial = tokens(b)
        b.apply(with_vector("file23", only_2_3))
        assert tokens(b) == partial
        assert partial != full and partial != base


def test_vectors_and_adapters_together_then_plain(backend, base_tokens, lora_a_gguf, cvec_gguf):
    both = Persona(
        name="both",
        adapters=(AdapterPart(lora_a_gguf, 1.0),),
        steering=(SteeringPart(cvec_gguf, 0.5),),
    )
    backend.apply(both)
    assert tokens(backend) != base_tokens
    assert [line.split()[0] for line in backend.active_parts()] == ["adapter", "steering"]
    assert len(backend.info()["adapters"]) == 1 and len(backend.info()["steering"]) == 1
    backend.apply(PLAIN)
    assert tokens(backend) == base_tokens
    assert backend.active_parts() == []


# --- KV states per persona ------------------------------------------------------------------------------


def fixed(system: str) -> list[Message]:
    return [
        Message("system", system),
        Message("user", "What is a noun? Explain it with care."),
        Message("assistant", "A noun names a person, a place or a thing."),
    ]


def test_switching_a_b_a_matches_a_fresh_process_and_restores_the_prefix(tiny_gguf, lora_a_gguf, lora_b_gguf):
    a = with_adapters("a", (lora_a_gguf, 1.0))
    b = with_adapters("b", (lora_b_gguf, 1.0))
    fa, fb = fixed("You are the teacher. Be patient and kind."), fixed("You are the pirate. Say arr.")
    sampling = SamplerSettings(temperature=0.0, max_tokens=6)
    with new_backend(tiny_gguf) as be:
        conv: list[Message] = [Message("user", "Tell me about verbs.")]
        be.apply(a)
        ans1 = "".join(x for x in be.stream(fa + conv, sampling) if isinstance(x, str))
        conv += [Message("assistant", ans1), Message("user", "And adjectives?")]
        be.apply(b)
        tokens(be, fb + conv, sampling)
        assert be.stats.last.kv_cleared and be.stats.last.state_restored == 0
        conv += [Message("assistant", "arr, adjectives"), Message("user", "Thanks. One more?")]
        be.apply(a)
        final = fa + conv
        again = tokens(be, final, sampling)
        last = be.stats.last
        prompt = be.prompt_tokens(final)
        prefix = common_prefix(be.prompt_tokens(fa + conv[:1]), prompt)
        assert last.state_restored > 0 and be.stats.state_restores == 1
        assert last.prompt_tokens_reused >= prefix  # the fixed prefix is not evaluated again
        assert last.prompt_tokens_evaluated == len(prompt) - last.prompt_tokens_reused
        assert last.prompt_tokens_evaluated < len(prompt) - prefix + 1
    assert list(again) == fresh_process_tokens(tiny_gguf, [(str(lora_a_gguf), 1.0)], final, max_tokens=6)


def common_prefix(x, y) -> int:
    n = 0
    while n < min(len(x), len(y)) and x[n] == y[n]:
        n += 1
    return n


def fresh_process_tokens(model: Path, adapters, messages, max_tokens: int) -> list[int]:
    script = textwrap.dedent(
        f"""
        import json
        from pathlib import Path
        from chat.backend import BackendOptions, Message
        from chat.persona import AdapterPart, Persona
        from chat.sampling import SamplerSettings
        from chat_plugins.llamacpp import LlamaCppBackend
        b = LlamaCppBackend({str(model)!r}, BackendOptions(threads=2), kv_type="f32")
        b.apply(Persona("a", adapters=tuple(AdapterPart(Path(p), s) for p, s in {adapters!r})))
        msgs = [Message(r, c) for r, c in {[(m.role, m.content) for m in messages]!r}]
        for _ in b.stream(msgs, SamplerSettings(temperature=0.0, max_tokens={max_tokens})):
            pass
        print(json.dumps(list(b.stats.last.completion_ids)))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_going_back_to_a_persona_reevaluates_nothing_of_the_same_prompt(tiny_gguf, lora_a_gguf, lora_b_gguf):
    a = with_adapters("a", (lora_a_gguf, 1.0))
    b = with_adapters("b", (lora_b_gguf, 1.0))
    msgs = fixed("You are the teacher.") + [Message("user", "Hello!")]
    with new_backend(tiny_gguf) as be:
        be.apply(a)
        first = tokens(be, msgs)
        cold = be.stats.last.prompt_tokens_evaluated
        be.apply(b)
        tokens(be, msgs)
        be.apply(a)
        assert tokens(be, msgs) == first
        assert be.stats.last.prompt_tokens_evaluated == 1  # only the last prompt token, for its logits
        assert cold == len(be.prompt_tokens(msgs))


def test_personas_without_parts_keep_their_prefix_too(tiny_gguf):
    t, p = Persona(name="teacher", system="T"), Persona(name="pirate", system="P")
    mt, mp = fixed("You are the teacher.") + [Message("user", "Hi")], fixed("You are the pirate.") + [Message("user", "Hi")]
    with new_backend(tiny_gguf) as be:
        be.apply(t)
        first = tokens(be, mt)
        be.apply(p)
        tokens(be, mp)
        be.apply(t)
        assert tokens(be, mt) == first
        assert be.stats.last.prompt_tokens_evaluated == 1 and be.stats.last.state_restored


def test_state_cache_respects_its_byte_budget(tiny_gguf, lora_a_gguf, lora_b_gguf, cvec_gguf):
    personas = [with_adapters("a", (lora_a_gguf, 1.0)), with_adapters("b", (lora_b_gguf, 1.0)), with_vector("v", cvec_gguf)]
    with new_backend(tiny_gguf) as probe:
        probe.apply(personas[0])
        tokens(probe)
        one_state = probe.model.L.llama_state_seq_get_size(probe.slot.ctx, 0)
    with new_backend(tiny_gguf, kv_cache_bytes=int(one_state * 1.5)) as be:
        for p in personas + personas:
            be.apply(p)
            tokens(be)
        cache = be.state_cache
        assert len(cache) == 1 and cache.n_bytes <= cache.budget and cache.evictions >= 1
    with new_backend(tiny_gguf, kv_cache_bytes=0) as be:  # budget 0: nothing saved, still correct
        be.apply(personas[0])
        first = tokens(be)
        be.apply(personas[1])
        tokens(be)
        be.apply(personas[0])
        assert tokens(be) == first and be.stats.state_saves == 0


# --- bad files --------------------------------------------------------------------------------------------


BAD_ADAPTERS = {
    "lora_wrong_arch": "architecture 'qwen2', base 'llama'",
    "lora_wrong_shape": "64×64 in the base",
    "lora_missing_tensor": "lora_b is missing",
    "lora_unknown_tensor": "the base has no tensor 'blk.9.attn_q.weight'",
    "lora_alpha_int32": "stored as int32",
    "lora_alpha_f64": "stored as float64",
    "lora_alpha_string": "stored as string",
}


@pytest.mark.parametrize("which", sorted(BAD_ADAPTERS))
def test_bad_adapter_is_one_clear_error_and_the_previous_parts_stay(backend, bad_model_files, lora_a_gguf, which):
    good = with_adapters("a", (lora_a_gguf, 1.0))
    backend.apply(good)
    before = tokens(backend)
    path = bad_model_files[which]
    with pytest.raises(AdapterError) as err:
        backend.apply(with_adapters("bad", (path, 1.0)))
    msg = err.value.message
    assert str(path) in msg and BAD_ADAPTERS[which] in msg and "\n" not in str(err.value)
    assert "tiny-f32.gguf" in msg  # names the base
    assert tokens(backend) == before  # the context was not touched


def test_truncated_adapter_and_non_adapter_files(backend, tmp_path, lora_a_gguf, tiny_gguf, cvec_gguf, bad_model_files):
    cut = mf.write_truncated_gguf(lora_a_gguf, tmp_path / "cut.gguf")
    cases = {
        cut: "truncated",
        bad_model_files["truncated_gguf"]: "truncated",
        bad_model_files["non_gguf"]: "not a GGUF",
        tiny_gguf: "is not a LoRA adapter (a model",
        cvec_gguf: "a control vector",
    }
    for path, needle in cases.items():
        with pytest.raises(AdapterError) as err:
            backend.apply(with_adapters("bad", (path, 1.0)))
        assert str(path) in err.value.message and needle in err.value.message, err.value.message


def test_bad_vectors(backend, bad_model_files, cvec4_gguf, lora_a_gguf):
    cases = {
        bad_model_files["cvec_wrong_width"]: "direction.1 has 80 values but the base's hidden size is 64",
        cvec4_gguf: "is for layer 2 but the base has layers 1-1",
        lora_a_gguf: "is not a control vector",
    }
    for path, needle in cases.items():
        with pytest.raises(AdapterError) as err:
            backend.apply(with_vector("bad", path))
        assert str(path) in err.value.message and needle in err.value.message, err.value.message


def test_files_that_would_abort_ggml_are_refused_and_the_process_lives(tmp_path, tiny_gguf, bad_model_files, lora_a_gguf):
    """In a child process: every bad file is refused, then the process still generates (it was not aborted)."""
    paths = [str(bad_model_files[k]) for k in sorted(BAD_ADAPTERS)]
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from chat.backend import BackendOptions, Message
        from chat.errors import AdapterError
        from chat.persona import AdapterPart, Persona, SteeringPart
        from chat.sampling import SamplerSettings
        from chat_plugins.llamacpp import LlamaCppBackend
        b = LlamaCppBackend({str(tiny_gguf)!r}, BackendOptions(threads=2))
        for p in {paths!r}:
            try:
                b.apply(Persona("bad", adapters=(AdapterPart(Path(p), 1.0),)))
            except AdapterError as exc:
                print("AdapterError", exc.message)
        try:
            b.apply(Persona("bad", steering=(SteeringPart(Path({str(bad_model_files["cvec_wrong_width"])!r}), 1.0),)))
        except AdapterError as exc:
            print("AdapterError", exc.message)
        b.apply(Persona("good", adapters=(AdapterPart(Path({str(lora_a_gguf)!r}), 1.0),)))
        n = sum(1 for x in b.stream([Message("user", "hi")], SamplerSettings(temperature=0, max_tokens=4)) if isinstance(x, str))
        print("alive", b.stats.last.completion_tokens)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (out.returncode, out.stderr)
    assert out.stdout.count("AdapterError") == len(paths) + 1
    assert "alive" in out.stdout and out.stderr == ""


def card(folder: Path, name: str, text: str, files: dict[str, Path] | None = None) -> Path:
    d = folder / name
    d.mkdir(parents=True, exist_ok=True)
    for rel, src in (files or {}).items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, d / rel)
    (d / "persona.toml").write_text(f'name = "{name}"\n' + text, encoding="utf-8")
    return d


@pytest.mark.parametrize("alpha", ["lora_alpha_int32", "lora_alpha_f64", "lora_alpha_string"])
def test_cli_with_an_aborting_adapter_is_one_red_line(subprocess_env, tmp_path, tiny_gguf, bad_model_files, alpha):
    folder = card(tmp_path / "cards", "bad", '[[adapters]]\npath = "bad.gguf"\n', {"bad.gguf": bad_model_files[alpha]})
    out = subprocess.run(
        chat_exe() + ["-m", str(tiny_gguf), "--no-history", "-p", str(folder), "-t", "0", "--max-tokens", "4", "hi"],
        capture_output=True, text=True, env=subprocess_env, timeout=120,
    )
    assert out.returncode == 4, (out.returncode, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "adapter.lora.alpha" in lines[0] and "bad.gguf" in lines[0]


def test_cli_refuses_a_path_escaping_the_card(subprocess_env, tmp_path, tiny_gguf, lora_a_gguf):
    shutil.copy(lora_a_gguf, tmp_path / "outside.gguf")
    folder = card(tmp_path / "cards", "escape", '[[adapters]]\npath = "../../outside.gguf"\n')
    out = subprocess.run(
        chat_exe() + ["-m", str(tiny_gguf), "--no-history", "-p", str(folder), "-t", "0", "--max-tokens", "4", "hi"],
        capture_output=True, text=True, env=subprocess_env, timeout=120,
    )
    assert out.returncode == 4 and "outside the card folder" in out.stderr


def test_cli_one_shot_with_an_adapter_card_differs_from_the_base(subprocess_env, tmp_path, tiny_gguf, lora_a_gguf):
    folder = card(tmp_path / "cards", "alpha", '[[adapters]]\npath = "lora-a.gguf"\n', {"lora-a.gguf": lora_a_gguf})
    args = ["-m", str(tiny_gguf), "--no-history", "--json", "-t", "0", "--max-tokens", "8", "hello"]
    plain = subprocess.run(chat_exe() + args, capture_output=True, text=True, env=subprocess_env, timeout=120)
    steered = subprocess.run(chat_exe() + ["-p", str(folder)] + args, capture_output=True, text=True, env=subprocess_env, timeout=120)
    assert plain.returncode == 0 and steered.returncode == 0, steered.stderr
    assert steered.stderr == ""  # no "applied in a later version" warning any more
    assert json.loads(plain.stdout)["text"] != json.loads(steered.stdout)["text"]


# --- the session: /set adapter.NAME.scale ------------------------------------------------------------------


def test_set_part_scale_changes_one_part_live(tiny_gguf, lora_a_gguf, lora_b_gguf, cvec_gguf, base_tokens):
    from chat.samplerlayers import SamplerLayers
    from chat.session import Session

    persona = Persona(
        name="mixy",
        adapters=(AdapterPart(lora_a_gguf, 1.0, "mixy"), AdapterPart(lora_b_gguf, 0.0, "mixy")),
        steering=(SteeringPart(cvec_gguf, 0.0, None, "mixy"),),
    )
    with new_backend(tiny_gguf) as be:
        s = Session(be, persona=persona, layers=SamplerLayers(flags={"temperature": "0", "max_tokens": "12"}))
        with_a = list(consume(s, "Hello! Can you tell me a joke?"))
        s.set_part_scale("adapter.lora-a.scale", "0")
        assert s.persona.name == "mixy" and s.persona.adapters[0].scale == 0.0
        assert "adapter.lora-a.scale = 0" in s.notes
        assert any("lora-a  scale 0" in line for line in be.active_parts())
        s.clear()
        consume(s, "Hello! Can you tell me a joke?")
        s.set_part_scale("steering.cvec.scale", "1.5")
        assert s.persona.steering[0].scale == 1.5
        with pytest.raises(ChatError) as err:
            s.set_part_scale("adapter.nope.scale", "0.5")
        assert "nope" in err.value.message and "lora-a" in (err.value.hint or "") and "lora-b" in (err.value.hint or "")
        with pytest.raises(ChatError):
            s.set_part_scale("adapter.lora-a.scale", "lots")
        assert with_a  # the first answer came from the adapter


def consume(session, text: str) -> list[str]:
    return list(session.send(text))


def test_switch_to_a_bad_card_keeps_the_persona_and_conversation(tiny_gguf, lora_a_gguf, bad_model_files, tmp_path):
    from chat.catalog import PersonaCatalog
    from chat.samplerlayers import SamplerLayers
    from chat.session import Session

    root = tmp_path / "cards"
    good = card(root, "good", '[[adapters]]\npath = "lora-a.gguf"\n', {"lora-a.gguf": lora_a_gguf})
    bad = card(root, "bad", '[[adapters]]\npath = "x.gguf"\n', {"x.gguf": bad_model_files["lora_wrong_shape"]})
    catalog = PersonaCatalog(None)
    with new_backend(tiny_gguf) as be:
        s = Session(be, catalog=catalog, persona=catalog.resolve(str(good)), layers=SamplerLayers(flags={"temperature": "0", "max_tokens": "4"}))
        consume(s, "hi")
        with pytest.raises(AdapterError):
            s.switch_persona(str(bad))
        assert s.persona.name == "good" and len(s.turns) == 2
        assert any("lora-a" in line for line in be.active_parts())
        consume(s, "again")
        assert [t.persona for t in s.turns] == [None, "good", None, "good"]


# --- chat personas show --------------------------------------------------------------------------------------


def test_personas_show_lists_ranks_targets_sizes_and_fit(cli, tmp_path, tiny_gguf, tiny4_gguf, lora_a_gguf, cvec_gguf, bad_model_files):
    folder = card(
        tmp_path / "cards", "packed",
        '[[adapters]]\npath = "lora-a.gguf"\nscale = 0.8\n[[adapters]]\npath = "arch.gguf"\n'
        '[[steering]]\npath = "v.gguf"\nscale = 0.5\nlayers = [1, 16]\n',
        {"lora-a.gguf": lora_a_gguf, "arch.gguf": bad_model_files["lora_wrong_arch"], "v.gguf": cvec_gguf},
    )
    r = cli("personas", "show", str(folder), "-m", str(tiny_gguf))
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "lora-a  scale 0.8" in out and "rank 4" in out and "14 tensors" in out and "attn_q" in out and "ffn_down" in out
    assert "fit: yes (tiny-f32.gguf)" in out
    assert "fit: NO" in out and "architecture 'qwen2', base 'llama'" in out
    assert "control vector: width 64, layers 1-1" in out
    r = cli("personas", "show", str(folder), "-m", str(tiny4_gguf))
    assert "fit: yes (tiny4-f32.gguf)" in r.stdout  # same width, and its layers 0-1 exist there
    r = cli("personas", "show", str(folder))
    assert r.exit_code == 0 and "fit: not checked" in r.stdout

"""Plugin sampler stages on the real backends and the tiny model: word_filter, order, seeds.

The llama.cpp half of "same seed → same text in two processes" is
tests/test_llamacpp_backend.py::test_same_seed_same_tokens_across_processes;
the transformers half is here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from chat.backend import BackendOptions, Message
from chat.errors import SamplingError
from chat.plugins import get_registry
from chat.sampling import DEFAULT_ORDER, SamplerSettings, resolve_sampling
from chat.stages import StageContext, Vocabulary

PROMPT = [Message("user", "Tell me a story.")]
ONE_THREAD = BackendOptions(threads=1)


@pytest.fixture(scope="module", autouse=True)
def registered():
    reg = get_registry()
    assert "word_filter" in reg.samplers
    return reg


# --- the two backends ------------------------------------------------------------------------


class Runner:
    """One loaded backend: generate(settings) → completion ids; text(id) → the token's text."""

    def __init__(self, name: str, backend, text, eog: list[int], last_ids) -> None:
        self.name, self.backend, self.text, self.eog, self._last_ids = name, backend, text, eog, last_ids

    def settings(self, **kw) -> SamplerSettings:
        kw.setdefault("logit_bias", {t: -1000.0 for t in self.eog})  # never stop early: the tiny model is random
        kw.setdefault("max_tokens", 16)
        return SamplerSettings(**kw)

    def generate(self, settings: SamplerSettings) -> tuple[int, ...]:
        for _ in self.backend.stream(PROMPT, settings):
            pass
        return tuple(self._last_ids())


@pytest.fixture(scope="module", params=["llama.cpp", "transformers"])
def runner(request):
    if request.param == "llama.cpp":
        pytest.importorskip("llama_cpp")
        from chat_plugins.llamacpp import LlamaCppBackend

        b = LlamaCppBackend(str(request.getfixturevalue("tiny_gguf")), ONE_THREAD)
        r = Runner("llama.cpp", b, lambda t: b.piece(t).decode("utf-8", errors="replace"),
                   [t for t in range(b.n_vocab) if b.is_eog(t)], lambda: b.stats.last.completion_ids)
        yield r
        b.close()
        return
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from chat_plugins.transformers_backend import TransformersBackend  # a failure to import is a failure
    b = TransformersBackend(str(request.getfixturevalue("tiny_hf_dir")), ONE_THREAD)
    r = Runner("transformers", b, lambda t: b.tokenizer.decode([t]), sorted(b.eos_ids), lambda: b.last_token_ids)
    yield r
    b.close()


def _a_bannable_word(r: Runner, prompt_last: str, ids: tuple[int, ...]) -> tuple[int, str]:
    """The first answer position whose token starts a word there (its own leading space, or after a boundary)."""
    prev = prompt_last
    for i, tok in enumerate(ids):
        text = r.text(tok)
        word = text.strip()
        if word.isalpha() and (text[:1].isspace() or not prev or not prev[-1].isalnum()):
            return i, word
        prev = text
    pytest.skip(f"{r.name}: the tiny model wrote no plain word in {ids}")


# --- word_filter ------------------------------------------------------------------------------


def test_word_filter_changes_output_and_leaving_it_out_of_order_restores_it(runner):
    base = runner.generate(runner.settings(temperature=0.0))
    i, word = _a_bannable_word(runner, "\n", base)  # the ChatML prompt ends with "assistant\n"

    banned = runner.generate(runner.settings(
        temperature=0.0, order=("word_filter", *DEFAULT_ORDER), stage_params={"word_filter": {"ban": [word]}}
    ))
    assert banned[:i] == base[:i]  # greedy: identical up to the banned word…
    assert banned[i] != base[i]  # …which is not written there
    assert runner.text(banned[i]).strip().lower() != word.lower()

    assert runner.generate(runner.settings(temperature=0.0, order=DEFAULT_ORDER)) == base  # out of order: gone
    no_params = runner.settings(temperature=0.0, order=("word_filter", *DEFAULT_ORDER))
    assert runner.generate(no_params) == base  # no params: no-op


def test_word_filter_boost_pulls_a_word_in(runner):
    base = runner.generate(runner.settings(temperature=0.0))
    first = runner.text(base[0]).strip().lower()
    word = next((w for w in (runner.text(t).strip() for t in base[1:]) if w.isalpha() and w.lower() != first), None)
    if word is None:
        pytest.skip(f"{runner.name}: no plain word to boost in {base}")
    settings, _ = resolve_sampling([("card", {"temperature": 0, "max_tokens": 16, "word_filter.boost": f"{word}:30"})])
    boosted = runner.generate(settings.model_copy(update={"logit_bias": {t: -1000.0 for t in runner.eog}}))
    assert boosted != base
    assert word.lower().startswith(runner.text(boosted[0]).strip().lower())  # +30: a start of the word wins position 0


def test_a_failing_stage_is_one_sampling_error_and_the_backend_still_works(runner, registered, monkeypatch):
    from chat.stages import SamplerStage
    from chat_plugins.word_filter import WordFilterParams

    def broken(*_a, **_k):
        raise RuntimeError("boom")

    # the backends under test were given no stages: they use the installed plugins' registry
    bad = SamplerStage("word_filter", "broken", WordFilterParams, broken)
    monkeypatch.setitem(registered.samplers, "word_filter", bad)
    with pytest.raises(SamplingError, match="word_filter.*boom"):
        runner.generate(runner.settings(temperature=0.0, max_tokens=2, order=("word_filter", "temperature")))
    monkeypatch.undo()
    assert len(runner.generate(runner.settings(temperature=0.0, max_tokens=2))) == 2


# --- the stage itself, without a model --------------------------------------------------------


def _vocab(texts: list[str]) -> Vocabulary:
    table = {t: i for i, t in enumerate(texts)}

    def tokenize(s: str) -> list[int]:  # greedy longest match over the toy vocabulary
        out, pos = [], 0
        while pos < len(s):
            for end in range(len(s), pos, -1):
                if s[pos:end] in table:
                    out.append(table[s[pos:end]])
                    pos = end
                    break
            else:
                return out  # a character the toy vocabulary lacks: stop (a real BPE has every byte)
        return out

    return Vocabulary(len(texts), lambda t: texts[t], tokenize)


TOY = ["\n", " cat", "cat", "con", " Cat", " as", " an", " AI", "AI", " dog", "s", " un", "believ", "able", ".", "un"]


def _apply(params: dict, tokens: list[int]) -> np.ndarray:
    from chat_plugins.word_filter import WORD_FILTER

    ctx = StageContext(_vocab(TOY), tokens=tokens)
    return WORD_FILTER.apply(np.zeros(len(TOY), dtype=np.float32), ctx, WORD_FILTER.validate_params(params))


def banned(params: dict, tokens: list[int]) -> set[str]:
    return {TOY[i] for i in np.flatnonzero(np.isneginf(_apply(params, tokens)))}


def test_ban_covers_spellings_and_leading_space_variants():
    assert banned({"ban": ["cat"]}, [0]) == {" cat", "cat", " Cat"}  # after "\n": bare "cat" starts a word too
    assert banned({"ban": ["cat"]}, [3]) == {" cat", " Cat"}  # after "con": "cat" would be inside a word


def test_a_phrase_is_banned_at_its_last_word_once_the_rest_is_written():
    assert banned({"ban": ["as an AI"]}, [0]) == set()
    assert banned({"ban": ["as an AI"]}, [0, 5, 6]) == {" AI"}  # a bare "AI" would make "anAI"
    assert banned({"ban": ["as an AI"]}, [0, 5, 6, 14]) == set()  # "as an." is not the phrase


def test_a_split_word_is_stopped_at_its_first_piece():
    assert banned({"ban": ["unbelievable"]}, [0]) == {" un", "un"}


def test_boost_shifts_the_start_tokens():
    out = _apply({"boost": {"dog": 2.5}}, [0])
    assert out[TOY.index(" dog")] == pytest.approx(2.5) and out[TOY.index(" cat")] == 0.0


@pytest.mark.parametrize("values, field", [
    ({"word_filter.ban": "a,,b"}, "word_filter.ban"),
    ({"word_filter.boost": "x:500"}, "word_filter.boost"),
    ({"word_filter.boot": "x:1"}, "word_filter.boot"),
])
def test_bad_word_filter_params_name_the_field(values, field):
    with pytest.raises(SamplingError, match=field.replace(".", r"\.")):
        resolve_sampling([("flags", values)])


# --- seeds (transformers; llama.cpp's is in test_llamacpp_backend.py) ------------------------


@pytest.mark.slow
def test_transformers_same_seed_same_text_across_processes(tiny_hf_dir):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    script = textwrap.dedent(
        f"""
        import json
        from chat.backend import BackendOptions, Message
        from chat.sampling import SamplerSettings
        from chat_plugins.transformers_backend import TransformersBackend
        b = TransformersBackend({str(tiny_hf_dir)!r}, BackendOptions(threads=1))
        out = []
        for seed in (1234, 1234, 99):
            s = SamplerSettings(temperature=1.0, top_k=40, min_p=0.02, seed=seed, max_tokens=16,
                                logit_bias={{t: -1000.0 for t in b.eos_ids}})
            list(b.stream([Message("user", "Tell me a story.")], s))
            out.append(list(b.last_token_ids))
        print(json.dumps(out))
        """
    )
    runs = [
        json.loads(subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True
        ).stdout.strip().splitlines()[-1])
        for _ in range(2)
    ]
    (a1, a2, c1), (b1, b2, c2) = runs
    assert a1 == a2 == b1 == b2  # same seed: same tokens, within and across processes
    assert c1 == c2 and c1 != a1  # another seed: other tokens, reproducibly


def test_a_card_sets_stage_params_as_a_toml_table(tmp_path):
    import tomllib

    card = tomllib.loads('[sampling]\ntemperature = 0.5\nword_filter.ban = ["delve", "as an AI"]\n')
    settings, sources = resolve_sampling([("card x", card["sampling"])])
    assert settings.stage_params == {"word_filter": {"ban": ["delve", "as an AI"]}}
    assert settings.order[0] == "word_filter" and sources["word_filter.ban"] == "card x"

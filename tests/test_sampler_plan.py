"""One sampler plan in the core: what it decides, and that both backends build exactly it.

The plan's names are what ``/info`` shows; llama.cpp's chain (``NativeSampler.stages``,
and the names llama.cpp itself reports) and transformers' processors
(``ProcessorSampler.stages``) must list the same stages for the same settings.
"""

from __future__ import annotations

import pytest

from chat.errors import SamplingError
from chat.samplerplan import check_logit_bias, plan_sampler
from chat.sampling import SamplerSettings
from chat.stages import SamplerStage, StageContext, StageParams, Vocabulary


class NoParams(StageParams):
    pass


NOOP = SamplerStage("noop", "returns a copy (test stage)", NoParams, lambda x, c, p: x.copy())
STAGES = {"noop": NOOP}


def settings_of(**values) -> SamplerSettings:
    return SamplerSettings.model_validate(values, context={"stages": STAGES})


EVERY = dict(
    repeat_penalty=1.1, dry_multiplier=0.8, top_n_sigma=1.5, top_k=40, typical_p=0.9,
    top_p=0.9, min_p=0.05, xtc_probability=0.5, xtc_threshold=0.1,
)

# settings → the stages /info shows, on every backend
PLANS = [
    pytest.param({}, ["temp", "dist"], id="defaults"),
    pytest.param({"temperature": 0.0}, ["greedy"], id="temperature 0 is the argmax"),
    pytest.param({"temperature": 0.0, "logit_bias": {5: 1.0}, "repeat_penalty": 1.1},
                 ["logit-bias", "penalties", "greedy"], id="bias first"),
    pytest.param({**EVERY, "dynatemp_range": 0.5},
                 ["penalties", "dry", "top-n-sigma", "top-k", "typical", "top-p", "min-p", "xtc", "temp-ext", "dist"],
                 id="every stage"),
    pytest.param({"top_k": 40, "order": ("top_k", "noop", "temperature")}, ["top-k", "noop", "temp", "dist"],
                 id="plugin stage at its place"),
    pytest.param({"mirostat": 2, "top_k": 40, "order": ("top_k", "noop", "temperature")},
                 ["noop", "temp", "mirostat-v2"], id="mirostat 2 keeps plugin stages"),
    pytest.param({"mirostat": 1, "logit_bias": {3: -1.0}}, ["logit-bias", "temp", "mirostat"], id="mirostat 1"),
]


# --- the plan itself ---------------------------------------------------------------------------


@pytest.mark.parametrize("values, names", PLANS)
def test_plan_names_the_stages_in_order(values, names):
    assert plan_sampler(settings_of(**values), STAGES).names() == names


def test_the_plan_carries_what_each_stage_needs():
    plan = plan_sampler(settings_of(penalty_last_n=-1, repeat_penalty=1.3, seed=7, top_k=5), STAGES, n_ctx=512)
    penalties, top_k, temp = plan.steps
    assert dict(penalties.values) == {"last_n": 512, "repeat": 1.3, "frequency": 0.0, "presence": 0.0}
    assert dict(top_k.values) == {"k": 5} and dict(temp.values) == {"temperature": 0.8}
    assert plan.seed == 7 and plan.pick.kind == "dist" and plan.needs_history
    assert plan.names(final=False) == ["penalties", "top-k", "temp"]
    assert not plan_sampler(settings_of(top_k=5), STAGES).needs_history
    assert plan_sampler(settings_of(order=("noop", "temperature")), STAGES).needs_history  # a stage sees the text
    with pytest.raises(TypeError):
        penalties.values["repeat"] = 2.0  # the plan is read-only


def test_plugin_params_are_validated_into_the_plan():
    from chat_plugins.word_filter import WORD_FILTER

    s = SamplerSettings.model_validate(
        {"order": ("word_filter", "temperature"), "stage_params": {"word_filter": {"ban": ["delve"]}}},
        context={"stages": {"word_filter": WORD_FILTER}},
    )
    step = plan_sampler(s, {"word_filter": WORD_FILTER}).steps[0]
    assert step.kind == "plugin" and step.stage is WORD_FILTER and list(step.params.ban) == ["delve"]


def test_a_stage_the_plan_was_not_given_is_refused_with_a_suggestion():
    s = settings_of(order=("top_k", "noop", "temperature"))
    with pytest.raises(SamplingError, match="unknown sampler stage 'noop'"):
        plan_sampler(s, {})
    with pytest.raises(SamplingError, match="unknown sampler stage 'noop'; did you mean 'noopp'"):
        plan_sampler(s, {"noopp": NOOP})
    with pytest.raises(SamplingError, match="not a chat.stages.SamplerStage"):
        plan_sampler(s, {"noop": object()})


def test_logit_bias_is_checked_against_the_vocabulary():
    s = settings_of(logit_bias={9: 1.0})
    check_logit_bias(s, 10)
    with pytest.raises(SamplingError, match=r"token id 9 is outside the vocabulary \(0..8\)"):
        check_logit_bias(s, 9)
    with pytest.raises(SamplingError, match="token id 9"):
        plan_sampler(s, STAGES, n_vocab=9)


# --- both backends build the plan ---------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tiny_gguf):
    pytest.importorskip("llama_cpp")
    from chat.backend import BackendOptions
    from chat_plugins.llamacpp import LlamaCppBackend

    b = LlamaCppBackend(str(tiny_gguf), BackendOptions(threads=1, context_size=256))
    yield b
    b.close()


def _vocabulary(n: int) -> Vocabulary:
    return Vocabulary(n, lambda t: f"<{t}>", lambda s: [])


@pytest.mark.parametrize("values, names", PLANS)
def test_both_backends_build_the_plan(llama, values, names):
    pytest.importorskip("torch")
    from chat_plugins.llamacpp.sampler import build_chain
    from chat_plugins.transformers_backend.sampling import make_sampler

    s = settings_of(**values)
    chain = build_chain(s, vocab=llama.model.vocab, n_vocab=llama.n_vocab, n_ctx=llama.context_size,
                        plugin_stage=llama.plugin_sampler, stages=STAGES)
    try:
        assert list(chain.stages) == names
        assert chain.native_names() == names  # llama.cpp's own names for what is in its chain
    finally:
        chain.close()
    sampler = make_sampler(s, STAGES, context=StageContext(_vocabulary(llama.n_vocab)))
    assert sampler.stages == names


def test_transformers_sampler_without_its_pick_only_filters():
    torch = pytest.importorskip("torch")
    from chat_plugins.transformers_backend.sampling import make_sampler

    sampler = make_sampler(settings_of(mirostat=2), STAGES, context=StageContext(_vocabulary(4)), final=False)
    assert sampler.stages == ["temp"]
    with pytest.raises(SamplingError, match="final"):
        sampler.sample(torch.zeros(4), [])


# --- DRY's breaker table lives with its vocabulary -------------------------------------------------


def _no_tokens(text: str) -> list[int]:
    return []


def test_dry_breaker_tables_belong_to_their_vocabulary():
    """A cache keyed by id(vocabulary) hands a new vocabulary (at a freed one's address) the old one's table."""
    pytest.importorskip("torch")
    from chat_plugins.transformers_backend.dry import breaker_table

    with_newline, without = ["a", "b", "\n"], ["a", "b", "c"]
    for i in range(12):
        texts = with_newline if i % 2 else without
        vocabulary = Vocabulary(3, texts.__getitem__, _no_tokens)
        assert (2 in breaker_table(vocabulary, ("\n",))) == (texts is with_newline), i
        del vocabulary  # CPython reuses its address for the next one

"""Hand-computed sampler cases, one line each, with the same expectations on every backend.

As in llama.cpp's tests/test-sampling.cpp: fixed logits (mostly ln of the
probabilities 0.1, 0.2, 0.3, 0.4 for tokens 0..3) go through one stage or a
whole chain, and the test compares the tokens kept and their renormalised
probabilities. The chains are built by OUR mappings — llama.cpp's through
``chat_plugins.llamacpp.sampler.build_chain`` then ``llama_sampler_apply`` on a
``llama_token_data_array``; transformers' through
``chat_plugins.transformers_backend.sampling`` — so the mapping is what is tested.
"""

from __future__ import annotations

import ctypes
import math

import numpy as np
import pytest

from chat.errors import SamplingError
from chat.sampling import SamplerSettings, resolve_sampling
from chat.stages import SamplerStage, StageContext, StageParams, Vocabulary

LN = [math.log(p) for p in (0.1, 0.2, 0.3, 0.4)]  # p = 0.1 0.2 0.3 0.4 for tokens 0 1 2 3
DESC = [-float(i) for i in range(20)]  # p_i / p_max = e^-i
PEAKED = [math.log(0.05), math.log(0.05), math.log(0.9)]


class ShiftParams(StageParams):
    token: int = 0
    bias: float = 0.0


def _shift(logits: np.ndarray, context: StageContext, params: ShiftParams) -> np.ndarray:
    out = logits.copy()
    out[params.token] += params.bias
    return out


SHIFT = SamplerStage("shift", "add a bias to one token (test stage)", ShiftParams, _shift)
STAGES = {"shift": SHIFT}  # the plugin stages these tests know, passed explicitly everywhere


def settings_of(**values) -> SamplerSettings:
    return SamplerSettings.model_validate(values, context={"stages": STAGES})


def case(name, logits, expected, history=(), **settings):
    return pytest.param(settings, logits, list(history), expected, id=name)


# expected: token → probability after the chain (tokens not listed must be gone)
CASES = [
    # single stages
    case("top_k=1", LN, {3: 1.0}, top_k=1, order=("top_k",)),
    case("top_k=3", LN, {3: 0.444444, 2: 0.333333, 1: 0.222222}, top_k=3, order=("top_k",)),
    case("top_k=0 is off", LN, {3: 0.4, 2: 0.3, 1: 0.2, 0: 0.1}, top_k=0, order=("top_k",)),
    case("top_p=0.5", LN, {3: 0.571429, 2: 0.428571}, top_p=0.5, order=("top_p",)),
    case("top_p=0.75", LN, {3: 0.444444, 2: 0.333333, 1: 0.222222}, top_p=0.75, order=("top_p",)),
    case("top_p=1 is off", LN, {3: 0.4, 2: 0.3, 1: 0.2, 0: 0.1}, top_p=1.0, order=("top_p",)),
    case("min_p=0.3", LN, {3: 0.444444, 2: 0.333333, 1: 0.222222}, min_p=0.3, order=("min_p",)),
    case("min_p=0.74", LN, {3: 0.571429, 2: 0.428571}, min_p=0.74, order=("min_p",)),
    case("min_p=0.76", LN, {3: 1.0}, min_p=0.76, order=("min_p",)),
    # typical: H = 1.279854; |−ln p − H| = 1.0227, 0.3296, 0.0759, 0.3636 → order 2, 1, 3, 0
    case("typical_p=0.45 drops the top token", LN, {2: 0.6, 1: 0.4}, typical_p=0.45, order=("typical_p",)),
    case("typical_p=0.6", LN, {2: 0.333333, 1: 0.222222, 3: 0.444444}, typical_p=0.6, order=("typical_p",)),
    case("temperature=2", LN, {0: 0.1627, 1: 0.230093, 2: 0.281805, 3: 0.325401},
         temperature=2.0, order=("temperature",)),
    case("temperature=1", LN, {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}, temperature=1.0, order=("temperature",)),
    # dynamic: T = 0.5 + 1.0 · (H / ln 4)^1 = 1.42322
    case("dynatemp 1±0.5", LN, {0: 0.134408, 1: 0.218745, 2: 0.290847, 3: 0.356001},
         temperature=1.0, dynatemp_range=0.5, order=("temperature",)),
    # logits 0 1 2 3 10: mean 3.2, σ 3.544; max − 2.5σ = 1.14
    case("top_n_sigma=2.5", [0.0, 1.0, 2.0, 3.0, 10.0], {2: 0.000335, 3: 0.000911, 4: 0.998754},
         top_n_sigma=2.5, order=("top_n_sigma",)),
    case("top_n_sigma=1", [0.0, 1.0, 2.0, 3.0, 10.0], {4: 1.0}, top_n_sigma=1.0, order=("top_n_sigma",)),
    # xtc (probability 1): tokens over the threshold go, except the least likely of them
    case("xtc t=0.15", LN, {1: 0.666667, 0: 0.333333}, xtc_probability=1.0, xtc_threshold=0.15, order=("xtc",)),
    case("xtc t=0.35 (one above: kept)", LN, {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4},
         xtc_probability=1.0, xtc_threshold=0.35, order=("xtc",)),
    # penalties: seen 3×2, 1×1, 2×1 → 3/2−1−.25, 2/2−.5−.25, −1·2−.5−.25
    case("penalties", [0.5, 2.0, -1.0, 3.0], {0: 0.385152, 1: 0.299957, 2: 0.014934, 3: 0.299957}, history=(3, 3, 1, 2),
         repeat_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25, penalty_last_n=-1, order=("penalties",)),
    case("penalties window 1", [0.5, 2.0, -1.0, 3.0], {0: 0.05635, 1: 0.252543, 2: 0.004625, 3: 0.686482},
         history=(3, 3, 1, 2),
         repeat_penalty=2.0, penalty_last_n=1, order=("penalties",)),
    # DRY: "0 1" was followed by 2 → 2 loses 1·2^(2−2); "0 1 2" followed by 3 → 3 loses 1·2^(3−2)
    case("dry", [0.0] * 4, {0: 0.296923, 1: 0.296923, 2: 0.109232, 3: 0.296923}, history=(0, 1, 2, 0, 1),
         dry_multiplier=1.0, dry_base=2.0, dry_allowed_length=2, dry_sequence_breakers=(), order=("dry",)),
    case("dry longer repeat", [0.0] * 4, {0: 0.318945, 1: 0.318945, 2: 0.318945, 3: 0.043165},
         history=(0, 1, 2, 3, 0, 1, 2),
         dry_multiplier=1.0, dry_base=2.0, dry_allowed_length=2, dry_sequence_breakers=(), order=("dry",)),
    case("dry short repeat is free", [0.0] * 4, {0: 0.25, 1: 0.25, 2: 0.25, 3: 0.25}, history=(0, 1, 2, 0, 1),
         dry_multiplier=1.0, dry_base=2.0, dry_allowed_length=3, dry_sequence_breakers=(), order=("dry",)),
    case("logit_bias", LN, {0: 0.307692, 1: 0.153846, 2: 0.230769, 3: 0.307692},
         logit_bias={0: math.log(4)}, order=("top_k",)),
    # whole chains; order matters
    case("min_p then temperature", DESC, {0: 0.524979, 1: 0.475021},
         temperature=10.0, min_p=0.3, order=("min_p", "temperature")),
    case("temperature then min_p", DESC, dict(enumerate(
        [0.130813, 0.118365, 0.107101, 0.096909, 0.087687, 0.079342, 0.071792, 0.06496, 0.058778, 0.053185,
         0.048124, 0.043544, 0.0394]
    )), temperature=10.0, min_p=0.3, order=("temperature", "min_p")),
    case("top_k then top_p", LN, {3: 0.571429, 2: 0.428571},
         top_k=3, top_p=0.7, order=("top_k", "top_p")),  # 4/9+3/9 ≥ 0.7
    case("top_p then top_k", LN, {3: 0.444444, 2: 0.333333, 1: 0.222222},
         top_k=3, top_p=0.75, order=("top_p", "top_k")),
    # 3 seen: 3/4 = .75; top 2 of .5 2 −1 .75 are tokens 1 and 3; ÷ 0.5 → 4, 1.5
    case("penalties, top_k, temperature", [0.5, 2.0, -1.0, 3.0], {1: 0.924142, 3: 0.075858}, history=(3,),
         repeat_penalty=4.0, top_k=2, temperature=0.5, order=("penalties", "top_k", "temperature")),
    # plugin stage at its place in order: boosting token 0 (×5) before top_k=2 keeps it; after, it is already gone
    case("plugin before top_k", LN, {0: 0.555556, 3: 0.444444}, top_k=2, order=("shift", "top_k"),
         stage_params={"shift": {"token": 0, "bias": math.log(5)}}),
    case("plugin after top_k", LN, {3: 0.571429, 2: 0.428571}, top_k=2, order=("top_k", "shift"),
         stage_params={"shift": {"token": 0, "bias": math.log(5)}}),
]


# --- the two backends under one interface ----------------------------------------------------


@pytest.fixture(scope="module")
def llama_backend(tiny_gguf):
    pytest.importorskip("llama_cpp")
    from chat.backend import BackendOptions
    from chat_plugins.llamacpp import LlamaCppBackend

    b = LlamaCppBackend(str(tiny_gguf), BackendOptions(threads=1, context_size=256))
    yield b
    b.close()


def _llama_run(b, settings: SamplerSettings, logits, history, final=False):
    import llama_cpp

    from chat_plugins.llamacpp.sampler import build_chain

    chain = build_chain(
        settings, vocab=b.model.vocab, n_vocab=b.n_vocab, n_ctx=b.context_size, plugin_stage=b.plugin_sampler,
        final=final, stages=STAGES,
    )
    try:
        for tok in history:
            chain.accept(tok)
        items = [llama_cpp.llama_token_data(i, x, 0.0) for i, x in enumerate(logits)]
        data = (llama_cpp.llama_token_data * len(logits))(*items)
        arr = llama_cpp.llama_token_data_array(data, len(logits), -1, False)
        chain.apply(ctypes.byref(arr))
        if final:
            return int(arr.data[arr.selected].id)
        kept = (arr.data[i] for i in range(arr.size))
        return {int(d.id): float(d.logit) for d in kept if math.isfinite(d.logit)}
    finally:
        chain.close()


def _torch_run(settings: SamplerSettings, logits, history, final=False):
    import torch

    from chat_plugins.transformers_backend.sampling import make_sampler

    vocab = Vocabulary(len(logits), lambda t: f"<{t}>", lambda s: [])
    sampler = make_sampler(settings, STAGES, context=StageContext(vocab), n_vocab=len(logits), final=final)
    x = torch.tensor(logits, dtype=torch.float32)
    if final:
        return sampler.sample(x, history)
    out = sampler.apply(x, history)
    return {i: float(v) for i, v in enumerate(out.tolist()) if math.isfinite(v)}


@pytest.fixture(params=["llama.cpp", "transformers"])
def run_chain(request):
    """run_chain(settings, logits, history, final=False) → {token: logit} kept, or the picked token."""
    if request.param == "llama.cpp":
        b = request.getfixturevalue("llama_backend")
        return lambda *a, **k: _llama_run(b, *a, **k)
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return _torch_run


def probabilities(kept: dict[int, float]) -> dict[int, float]:
    mx = max(kept.values())
    w = {t: math.exp(v - mx) for t, v in kept.items()}
    total = sum(w.values())
    return {t: v / total for t, v in w.items()}


@pytest.mark.parametrize("settings, logits, history, expected", CASES)
def test_case(run_chain, settings, logits, history, expected):
    s = settings_of(**settings)
    got = probabilities(run_chain(s, logits, history))
    assert sorted(got) == sorted(expected)
    for tok, p in expected.items():
        assert got[tok] == pytest.approx(p, abs=2e-5), tok


def test_order_gives_the_documented_different_results(run_chain):
    """min_p=0.3 with T=10 on logits −i: before temperature 2 tokens survive (e^−i ≥ .3),
    after it 13 (e^−i/10 ≥ .3)."""
    first = run_chain(settings_of(temperature=10.0, min_p=0.3, order=("min_p", "temperature")), DESC, [])
    second = run_chain(settings_of(temperature=10.0, min_p=0.3, order=("temperature", "min_p")), DESC, [])
    assert (len(first), len(second)) == (2, 13)


@pytest.mark.parametrize(
    "settings, logits, picked",
    [
        pytest.param(dict(temperature=0.0), [1.0, 3.0, 3.0, 0.0], 1, id="greedy takes the first maximum"),
        pytest.param(dict(temperature=0.0, logit_bias={0: 5.0}), [1.0, 3.0, 3.0, 0.0], 0, id="greedy after logit_bias"),
        pytest.param(dict(temperature=1.0, top_k=1, seed=7), LN, 3, id="dist with one candidate"),
        # mu starts at 2τ = 0.1 < −log2(0.9): nothing passes, the top token is kept alone
        pytest.param(dict(temperature=1.0, mirostat=2, mirostat_tau=0.05, seed=3), PEAKED, 2, id="mirostat 2"),
        pytest.param(dict(temperature=1.0, mirostat=1, mirostat_tau=0.05, seed=3), PEAKED, 2, id="mirostat 1"),
    ],
)
def test_pick(run_chain, settings, logits, picked):
    assert run_chain(settings_of(**settings), logits, [], final=True) == picked


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, named",
    [
        ({"order": "top_k,temprature"}, "order"),
        ({"order": "top_k,shout"}, "order"),
        ({"top_k": "-1"}, "top_k"),
        ({"typical_p": "0"}, "typical_p"),
        ({"xtc_probability": "1.5"}, "xtc_probability"),
        ({"dry_base": "0.5"}, "dry_base"),
        ({"mirostat_eta": "0"}, "mirostat_eta"),
        ({"dynatemp_exponent": "0"}, "dynatemp_exponent"),
        ({"top_n_sigma": "-2"}, "top_n_sigma"),
        ({"shift.bias": "lots"}, "shift.bias"),
        ({"shift.scale": "2"}, "shift.scale"),
        ({"shout.x": "1"}, "shout"),
        ({"order": "top_k,temperature", "shift.bias": "1"}, "order"),
    ],
)
def test_invalid_values_are_refused_naming_the_field(values, named):
    with pytest.raises(SamplingError) as err:
        resolve_sampling([("flags", values)], stages=STAGES)
    assert named in str(err.value)


def test_stage_params_without_order_are_placed_first_when_no_order_is_set():
    settings, sources = resolve_sampling([("card x", {"shift.bias": "1.5"})], stages=STAGES)
    assert settings.order[0] == "shift" and settings.stage_params == {"shift": {"bias": "1.5"}}
    assert sources["order"].startswith("auto: shift")


def test_stage_params_must_be_in_order_of_the_value_itself():
    with pytest.raises(ValueError, match="'shift' has parameters but is not in order"):
        settings_of(order=("top_k",), stage_params={"shift": {"bias": 1.0}})


def test_processors_validate_their_values_naming_them():
    pytest.importorskip("torch")
    from chat_plugins.transformers_backend import sampling as ts

    for make, name in [
        (lambda: ts.TopKLogitsProcessor(0), "top_k"),
        (lambda: ts.TopPLogitsProcessor(1.5), "top_p"),
        (lambda: ts.MinPLogitsProcessor(0.0), "min_p"),
        (lambda: ts.DryLogitsProcessor(1.0, 0.5, 2, -1), "dry_base"),
        (lambda: ts.TopNSigmaLogitsProcessor(0.0), "top_n_sigma"),
    ]:
        with pytest.raises(ValueError, match=name):
            make()


def test_processors_never_edit_scores_in_place():
    torch = pytest.importorskip("torch")
    from chat_plugins.transformers_backend.sampling import make_sampler

    s = settings_of(
        temperature=0.7, top_k=3, top_p=0.9, min_p=0.05, typical_p=0.95, top_n_sigma=2.0,
        repeat_penalty=1.3, dry_multiplier=0.8, dry_sequence_breakers=(), xtc_probability=1.0, xtc_threshold=0.1,
        dynatemp_range=0.3,
        order=(
            "shift", "penalties", "dry", "top_n_sigma", "top_k", "typical_p", "top_p", "min_p", "xtc", "temperature"
        ),
        stage_params={"shift": {"token": 1, "bias": 1.0}},
    )
    vocab = Vocabulary(6, str, lambda t: [])
    sampler = make_sampler(s, STAGES, context=StageContext(vocab), n_vocab=6)
    scores = torch.tensor([0.1, 2.0, -1.0, 3.0, 0.5, 1.5])
    before = scores.clone()
    for proc in sampler.processors:
        proc([0, 1, 0, 1], scores)
    assert torch.equal(scores, before)
    assert sampler.stages == [
        "shift", "penalties", "dry", "top-n-sigma", "top-k", "typical", "top-p", "min-p", "xtc", "temp-ext", "dist"
    ]


def test_a_stage_that_removes_everything_is_an_error(run_chain):
    s = settings_of(order=("shift", "top_k"), top_k=2, stage_params={"shift": {"token": 0, "bias": float("-inf")}})
    with pytest.raises(SamplingError, match="shift"):
        run_chain(s, [0.0], [])

"""Issue 6 benchmarks, measured in one run: what the configurable sampler chain costs.

    python benchmarks/bench_samplers.py [--threads N] [--tokens N] [--runs N]

1. decode tokens/s with the full default chain ÷ greedy only (llama.cpp)     goal ≥ 0.95
   "full default chain" = a realistic preset with every common stage active:
   penalties (repeat 1.1 over 64) → DRY 0.8 → top_k 40 → top_p 0.95 → min_p 0.05
   → temperature 0.8 → dist (seeded).
2. per-token cost of a Python plugin stage inside llama.cpp's chain (µs/token):
   a no-op stage (the bridge alone) and word_filter banning three words, each
   called on the full vocabulary; plus decode tokens/s with word_filter ÷ without.
3. for reference, the transformers processors on the same vocabulary size:
   µs/token of the full chain and of greedy, sampling only (no model).

Decode runs alternate between configurations. The machine may be shared, so
every figure is the best of its repeats (the least disturbed), and the chain's
own cost is also timed in isolation — ``llama_sampler_sample`` on the same
logits, no decoding — giving a second, load-independent estimate of the ratio:
greedy token time ÷ (greedy token time + extra sampling time). The model is the
random-weight Q8_0 llama from benchmarks/_common.py.
"""

from __future__ import annotations

import argparse
import ctypes
import time

import numpy as np

from _common import MODELS, benchmark_model, ratio_line

PROMPT = "Tell me a long story about a lighthouse keeper who finds a letter from the future."
FULL = dict(
    repeat_penalty=1.1, penalty_last_n=64, dry_multiplier=0.8, top_k=40, top_p=0.95, min_p=0.05, temperature=0.8, seed=42,
    order=("penalties", "dry", "top_k", "top_p", "min_p", "temperature"),
)


def decode_rate(backend, settings) -> tuple[float, int]:
    from chat.backend import Finish, Message

    finish = None
    for item in backend.stream([Message("user", PROMPT)], settings):
        if isinstance(item, Finish):
            finish = item
    return finish.timings.tokens_per_s, finish.usage.completion_tokens


def stage_cost_us(backend, stage, params: dict, iterations: int = 300) -> float:
    """µs per call of ``stage`` through our llama.cpp custom sampler on a full-vocabulary candidate array."""
    import llama_cpp as L

    from chat_plugins.llamacpp.sampler import PythonStage

    py = backend.plugin_sampler(stage.name, stage, params)
    assert isinstance(py, PythonStage)
    n = backend.n_vocab
    rng = np.random.default_rng(0)
    logits = rng.normal(size=n).astype(np.float32)
    data = (L.llama_token_data * n)()
    view = np.frombuffer(data, dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
    arr = L.llama_token_data_array(data, n, -1, False)
    for tok in backend.tokenize("Once upon a time, the keeper said"):
        L.llama_sampler_accept(py.ptr, tok)

    def once() -> None:
        view["id"] = np.arange(n, dtype=np.int32)
        view["logit"] = logits
        arr.size, arr.sorted, arr.selected = n, False, -1
        L.llama_sampler_apply(py.ptr, ctypes.byref(arr))

    once()  # warm: word_filter scans the vocabulary once
    assert py.take_error() is None
    reset_us = best_us(lambda: (view.__setitem__("id", np.arange(n, dtype=np.int32)), view.__setitem__("logit", logits)), iterations)
    total_us = best_us(once, iterations)
    L.llama_sampler_free(py.ptr)
    return max(0.0, total_us - reset_us)


def best_us(fn, iterations: int, repeats: int = 5) -> float:
    """µs per call of ``fn``: the best of ``repeats`` batches (timeit's rule on a shared machine)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(iterations):
            fn()
        best = min(best, time.perf_counter() - t)
    return best / iterations * 1e6


def chain_cost_us(backend, settings, iterations: int = 200) -> float:
    """µs per ``llama_sampler_sample`` of the chain for ``settings`` on the logits now in the context."""
    chain = backend.sampler_for(settings)
    chain.reset()
    for tok in backend.tokenize(PROMPT):
        chain.accept(tok)
    return best_us(lambda: chain.sample(backend.slot.ctx, -1), iterations)


def transformers_cost_us(n_vocab: int, iterations: int = 50) -> tuple[float, float] | None:
    try:
        import torch
        from transformers import AutoTokenizer

        from chat.sampling import SamplerSettings
        from chat_plugins.transformers_backend.sampling import make_sampler, tokenizer_context
    except ImportError:
        return None
    tok = AutoTokenizer.from_pretrained(str(MODELS / "bench-q8_0-tokenizer"))
    ctx = tokenizer_context(tok, n_vocab)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n_vocab, generator=g)
    history = torch.randint(0, n_vocab, (512,), generator=g).tolist()
    out = []
    for settings in (SamplerSettings(**FULL), SamplerSettings(temperature=0.0)):
        sampler = make_sampler(settings, context=ctx, n_vocab=n_vocab)
        sampler.sample(logits, history)  # warm (DRY's breaker table)
        out.append(best_us(lambda: sampler.accept(sampler.sample(logits, history)), iterations, repeats=3))
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    from chat.backend import BackendOptions
    from chat.plugins import get_registry
    from chat.sampling import SamplerSettings
    from chat.stages import SamplerStage, StageParams
    from chat_plugins.llamacpp import LlamaCppBackend
    from chat_plugins.word_filter import WORD_FILTER

    get_registry()
    model = benchmark_model()
    b = LlamaCppBackend(str(model), BackendOptions(threads=args.threads, context_size=1024))
    try:
        greedy = SamplerSettings(temperature=0.0, max_tokens=args.tokens)
        full = SamplerSettings(**FULL, max_tokens=args.tokens)
        ban = {"word_filter": {"ban": ["lighthouse", "keeper", "letter"]}}
        filtered = SamplerSettings(**{**FULL, "order": ("word_filter", *FULL["order"])}, stage_params=ban, max_tokens=args.tokens)
        print(f"model: {model.name}, vocab {b.n_vocab}, {args.threads} threads, {args.tokens} tokens × {args.runs} runs")
        print(f"full chain: {' → '.join(b.sampler_for(full).native_names())}")
        rates: dict[str, list[float]] = {"greedy": [], "full": [], "full+word_filter": []}
        decode_rate(b, greedy)  # warm the page cache and the prompt
        for _ in range(args.runs):
            for name, s in (("greedy", greedy), ("full", full), ("full+word_filter", filtered)):
                tps, n = decode_rate(b, s)
                rates[name].append(tps)
        best = {k: max(v) for k, v in rates.items()}
        for k, v in best.items():
            print(f"decode {k}: {v:.1f} tokens/s best  (runs: {', '.join(f'{x:.1f}' for x in rates[k])})")
        print(ratio_line("full default chain ÷ greedy (decode, best of runs)", best["full"] / best["greedy"], "≥ 0.95"))
        print(ratio_line("full + word_filter ÷ full (decode, best of runs)", best["full+word_filter"] / best["full"], "reported"))

        g_us, f_us, w_us = (chain_cost_us(b, s) for s in (greedy, full, filtered))
        token_us = 1e6 / best["greedy"]
        print(f"sampling alone (llama_sampler_sample, vocab {b.n_vocab}): greedy {g_us:.0f} µs, full chain {f_us:.0f} µs, "
              f"full + word_filter {w_us:.0f} µs per token")
        print(ratio_line("full default chain ÷ greedy (from isolated costs)", token_us / (token_us + f_us - g_us), "≥ 0.95"))

        class NoParams(StageParams):
            pass

        noop = SamplerStage("noop", "returns a copy", NoParams, lambda x, c, p: x.copy())
        bridge = stage_cost_us(b, noop, {})
        wf = stage_cost_us(b, WORD_FILTER, ban["word_filter"])
        per_token_ms = 1000.0 / best["greedy"]
        print(f"python stage, full vocabulary ({b.n_vocab}): no-op {bridge:.0f} µs/token, word_filter (3 words) {wf:.0f} µs/token"
              f"  = {wf / 10 / per_token_ms:.2f}% of a {per_token_ms:.1f} ms greedy token")
    finally:
        b.close()

    tf = transformers_cost_us(b.n_vocab)
    if tf is None:
        print("transformers processors: not installed, skipped")
    else:
        print(f"transformers processors (sampling only, vocab {b.n_vocab}, 512-token history): "
              f"full chain {tf[0]:.0f} µs/token, greedy {tf[1]:.0f} µs/token")


if __name__ == "__main__":
    main()

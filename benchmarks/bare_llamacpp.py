"""The baseline: a bare llama-cpp-python greedy loop (low-level API), no chat layer at all.

Usage: python benchmarks/bare_llamacpp.py MODEL.gguf PROMPT_TOKENS N_GENERATE THREADS [ADAPTER.gguf] [--logit-bias=ID:BIAS,…]
Prints: decode tokens/s, prompt seconds (one line of JSON). ``--logit-bias`` puts llama.cpp's own
logit-bias sampler before greedy, as chat does when a run must not end early.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    import llama_cpp as L

    bias = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--logit-bias=")]
    argv = [a for a in sys.argv if not a.startswith("--logit-bias=")]
    path, n_prompt, n_gen, threads = argv[1], int(argv[2]), int(argv[3]), int(argv[4])
    adapter = argv[5] if len(argv) > 5 else None
    quiet = L.llama_log_callback(lambda *a: None)  # keep a reference: ggml calls it later
    L.llama_log_set(quiet, None)
    mparams = L.llama_model_default_params()
    mparams.load_mode = L.LLAMA_LOAD_MODE_MMAP
    mparams.use_extra_bufts = False  # as chat does: ggml's AMX path crashes on Q8_0 batches here (llama.cpp#20824)
    model = L.llama_model_load_from_file(path.encode(), mparams)
    cparams = L.llama_context_default_params()
    cparams.n_ctx = 2048
    cparams.n_batch = 512
    cparams.n_ubatch = 512
    cparams.n_seq_max = 1
    cparams.n_threads = threads
    cparams.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, cparams)
    vocab = L.llama_model_get_vocab(model)
    if adapter:  # one LoRA adapter at scale 1, attached with the low-level calls
        import ctypes

        lora = L.llama_adapter_lora_init(model, adapter.encode())
        loras = (L.llama_adapter_lora_p_ctypes * 1)(lora)
        L.llama_set_adapters_lora(ctx, loras, 1, (ctypes.c_float * 1)(1.0))
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    if bias:
        pairs = [p.split(":") for p in bias[0].split(",") if p]
        arr_b = (L.llama_logit_bias * len(pairs))(*[L.llama_logit_bias(int(t), float(v)) for t, v in pairs])
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_logit_bias(L.llama_vocab_n_tokens(vocab), len(pairs), arr_b))
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())

    prompt = [(7 * i) % 400 + 20 for i in range(n_prompt)]
    arr = (L.llama_token * len(prompt))(*prompt)
    t0 = time.perf_counter()
    L.llama_decode(ctx, L.llama_batch_get_one(arr, len(prompt)))
    t1 = time.perf_counter()
    tok = L.llama_sampler_sample(chain, ctx, -1)
    first = time.perf_counter()
    one = (L.llama_token * 1)()
    for _ in range(n_gen - 1):
        one[0] = tok
        L.llama_decode(ctx, L.llama_batch_get_one(one, 1))
        tok = L.llama_sampler_sample(chain, ctx, -1)
    t2 = time.perf_counter()
    _ = vocab
    print(json.dumps({"tokens_per_s": (n_gen - 1) / (t2 - first), "prompt_s": t1 - t0, "ttft_s": first - t0}))
    L.llama_sampler_free(chain)
    L.llama_free(ctx)
    L.llama_model_free(model)


if __name__ == "__main__":
    main()

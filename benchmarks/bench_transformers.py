"""Transformers-backend benchmarks, measured in one run (in-process, CPU).

    python benchmarks/bench_transformers.py [--threads N] [--tokens N] [--runs N]

1. decode tokens/s through chat's own stream loop ÷ bare ``model.generate``     goal ≥ 0.95
2. adapter switch (apply persona A → B, adapters loaded) ÷ model reload         goal ≤ 0.01
3. time to first token at turn 10 ÷ turn 1 of one conversation (KV reuse)       goal ≤ 1.3

The model is a random-weight Hugging Face llama (768 wide, 12 layers, ffn 2048,
12 heads / 4 kv, vocab 8192: 88M parameters, float32 safetensors) with two rank-16
PEFT adapters on all seven projections, written once under benchmarks/_models/.
The output rows of the special tokens and of the vocab padding are zero, so greedy
decoding never picks EOS and every run generates exactly ``--tokens`` tokens.

Everything runs in this one process: ``TransformersBackend`` (what ``chat`` loads)
and a bare ``AutoModelForCausalLM`` + ``generate()`` alternate, under the same
``torch.set_num_threads``. Decode rate excludes the prompt on both sides: it is
(N − 1) tokens over the time from the first generated token to the last — the
backend's own ``Finish.timings.tokens_per_s``, and a streamer's timestamps for
``generate``. The decode ratio is the median of the per-run chat/bare ratios (each
pair runs back to back, so a burst of load from elsewhere hits both sides of a pair);
time to first token is the per-turn median over ``--conversations`` conversations.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path

from _common import MODELS, ratio_line

from modelfactory import (  # _common put tests/ on sys.path
    SPECIAL_TOKENS,
    TinyLlamaConfig,
    make_llama_weights,
    make_lora,
    tokenizer_vocab_size,
    train_tokenizer,
    write_hf_model,
    write_peft_adapter,
)

PROMPT = "Tell me a long story about a lighthouse keeper who finds a letter from the future. " * 2

#: 88.1M parameters: 75.5M in the blocks, 12.6M in embeddings + head.
HF_BENCH_CONFIG = TinyLlamaConfig(
    vocab_size=8192, hidden_size=768, n_layer=12, n_head=12, n_head_kv=4, ffn_size=2048, n_ctx=4096
)
LORA_RANK = 16
_FORMAT = 2


def benchmark_hf_model(root: Path = MODELS) -> tuple[Path, Path, Path]:
    """(model folder, adapter A folder, adapter B folder), written once and reused while the fingerprint matches."""
    cfg = HF_BENCH_CONFIG
    model_dir, lora_a, lora_b = root / "bench-hf-llama", root / "bench-hf-lora-a", root / "bench-hf-lora-b"
    stamp = root / "bench-hf.fingerprint"
    fingerprint = hashlib.sha256(json.dumps({"format": _FORMAT, "cfg": asdict(cfg), "rank": LORA_RANK}, sort_keys=True).encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == fingerprint and (model_dir / "model.safetensors").exists():
        return model_dir, lora_a, lora_b
    started = time.perf_counter()
    stamp.unlink(missing_ok=True)
    tok_dir = root / "bench-hf-tokenizer"
    train_tokenizer(tok_dir, vocab_size=512)
    tok_config = tok_dir / "tokenizer_config.json"  # the factory says 512, which makes long chats warn
    tok_config.write_text(json.dumps({**json.loads(tok_config.read_text()), "model_max_length": cfg.n_ctx}, indent=2))
    n_real = tokenizer_vocab_size(tok_dir)
    weights = make_llama_weights(cfg, seed=0)
    head = weights["lm_head.weight"]
    head[: len(SPECIAL_TOKENS)] = 0.0  # logit exactly 0: never the argmax of random logits (max ≈ +10)
    head[n_real:] = 0.0  # padding ids beyond the tokenizer: never generated
    write_hf_model(model_dir, cfg, weights, tok_dir)
    del weights
    write_peft_adapter(lora_a, cfg, make_lora(cfg, rank=LORA_RANK, seed=1, alpha=16.0))
    write_peft_adapter(lora_b, cfg, make_lora(cfg, rank=LORA_RANK, seed=2, alpha=16.0))
    stamp.write_text(fingerprint)
    size = (model_dir / "model.safetensors").stat().st_size
    print(f"(wrote {model_dir.name}, {size / 1e6:.0f} MB, and 2 rank-{LORA_RANK} adapters in {time.perf_counter() - started:.1f} s)")
    return model_dir, lora_a, lora_b


# --- decode ---------------------------------------------------------------------------------


def chat_decode(backend, messages, tokens: int) -> tuple[float, float, tuple[int, ...]]:
    """One greedy stream through the backend: (decode tokens/s as chat reports it, ttft s, ids)."""
    from chat.backend import Finish
    from chat.sampling import SamplerSettings

    finish = None
    for item in backend.stream(messages, SamplerSettings(temperature=0.0, max_tokens=tokens)):
        if isinstance(item, Finish):
            finish = item
    assert finish is not None and finish.usage.completion_tokens == tokens, finish
    return finish.timings.tokens_per_s, finish.timings.ttft_s, backend.last_token_ids


class _Stamps:
    """A generate() streamer that only records when each new token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.ids: list[int] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())
        self.ids.extend(int(t) for t in value.reshape(-1).tolist())

    def end(self) -> None:
        pass


def bare_decode(model, prompt: list[int], tokens: int) -> tuple[float, float, tuple[int, ...]]:
    """One greedy ``generate``: (decode tokens/s over the same span as chat's figure, ttft s, ids)."""
    import torch

    ids = torch.tensor([prompt], dtype=torch.long)
    stamps = _Stamps()
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            streamer=stamps,
        )
    assert len(stamps.ids) == tokens, len(stamps.ids)
    return (tokens - 1) / (stamps.times[-1] - stamps.times[0]), stamps.times[0] - started, tuple(stamps.ids)


# --- main -----------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--switches", type=int, default=20)
    ap.add_argument("--conversations", type=int, default=3)
    args = ap.parse_args()

    model_dir, lora_a, lora_b = benchmark_hf_model()

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from chat.backend import BackendOptions, Message
    from chat_plugins.transformers_backend.options import TransformersOptions
    from chat.persona import AdapterPart, Persona
    from chat.plugins import get_registry
    from chat.sampling import SamplerSettings

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    options = TransformersOptions(threads=args.threads, context_size=4096, dtype="float32", device="cpu")
    backend_class = get_registry().backends["transformers"]  # what `chat -m FOLDER` loads
    load = lambda: backend_class(str(model_dir), options)  # noqa: E731

    loadavg = os.getloadavg()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in loadavg)}  ({os.cpu_count()} CPUs)")
    if loadavg[0] > (os.cpu_count() or 1) - 0.5:
        print("  warning: other processes are using the CPUs; OpenMP threads that lose their core make every figure noisy")

    # 1. decode speed: chat's stream loop and bare generate() alternating, same prompt ids
    backend = load()
    print(f"model: {backend.model.n_params / 1e6:.1f}M parameters, float32, vocab {backend.n_vocab}, {torch.get_num_threads()} torch threads")
    messages = [Message("user", PROMPT)]
    prompt = backend.prompt_tokens(messages)
    bare = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, use_safetensors=True, local_files_only=True)
    bare.eval()
    c_ids = chat_decode(backend, messages, args.tokens)[2]  # warm-up, both sides
    b_ids = bare_decode(bare, prompt, args.tokens)[2]
    same = "same greedy ids" if c_ids == b_ids else f"DIFFERENT ids (first differ at {next(i for i, (x, y) in enumerate(zip(c_ids, b_ids)) if x != y)})"
    chat_tps, bare_tps, chat_ttft, bare_ttft = [], [], [], []
    for _ in range(args.runs):
        c, ct, _ = chat_decode(backend, messages, args.tokens)
        b, bt, _ = bare_decode(bare, prompt, args.tokens)
        chat_tps.append(c)
        bare_tps.append(b)
        chat_ttft.append(ct)
        bare_ttft.append(bt)
    c, b = statistics.median(chat_tps), statistics.median(bare_tps)
    pair = statistics.median(x / y for x, y in zip(chat_tps, bare_tps))
    print(
        f"decode: chat {c:.2f} tok/s, bare generate() {b:.2f} tok/s ({args.tokens} tokens after a {len(prompt)}-token prompt, "
        f"greedy, {args.threads} threads, in-process, alternating, median of {args.runs}; {same})"
    )
    print("  per run chat/bare: " + ", ".join(f"{x:.2f}/{y:.2f}" for x, y in zip(chat_tps, bare_tps)))
    print(f"  ratio of medians {c / b:.3f}; best run each side {max(chat_tps):.2f}/{max(bare_tps):.2f} = {max(chat_tps) / max(bare_tps):.3f}")
    print(
        f"  (not compared) first text chunk through chat: {statistics.median(chat_ttft) * 1000:.0f} ms (prompt KV reused, 1 token run); "
        f"first token of generate(): {statistics.median(bare_ttft) * 1000:.0f} ms (whole prompt run)"
    )
    print(ratio_line("decode ratio (median of per-run ratios)", pair, "≥ 0.95"))
    del bare
    gc.collect()

    # 2. adapter switch vs reload
    persona_a = Persona(name="bench-a", adapters=(AdapterPart(lora_a.resolve()),))
    persona_b = Persona(name="bench-b", adapters=(AdapterPart(lora_b.resolve()),))
    t = time.perf_counter()
    backend.apply(persona_a)
    backend.apply(persona_b)
    first_loads = time.perf_counter() - t
    switch_s, activate_s, reload_s, ready_s = [], [], [], []
    blocks = 3
    per_block = max(1, args.switches // blocks)
    for _ in range(blocks):
        for _ in range(per_block):
            for persona in (persona_a, persona_b):
                t = time.perf_counter()
                backend.apply(persona)
                switch_s.append(time.perf_counter() - t)
                activate_s.append(backend.model.loras.last_switch_s)  # the peft part of apply()
        t = time.perf_counter()
        fresh = load()
        reload_s.append(time.perf_counter() - t)
        for _ in fresh.stream([Message("user", "hello")], SamplerSettings(temperature=0.0, max_tokens=1)):
            pass
        ready_s.append(time.perf_counter() - t)
        fresh.close()
        del fresh
        gc.collect()
    sw, rl = statistics.median(switch_s), statistics.median(reload_s)
    print(
        f"adapter switch: {sw * 1000:.2f} ms per apply (median of {len(switch_s)}, A→B→A = {2 * sw * 1000:.2f} ms); "
        f"reload: {rl * 1000:.0f} ms (median of {len(reload_s)}); first load of both adapters: {first_loads * 1000:.0f} ms"
    )
    print(
        f"  of each apply, LoraSet.activate (peft set_adapter + set_scale): {statistics.median(activate_s) * 1000:.2f} ms; "
        f"reload until a 1-token answer: {statistics.median(ready_s) * 1000:.0f} ms (torch already imported, page cache warm)"
    )
    print(ratio_line("switch / reload", sw / rl, "≤ 0.01"))
    backend.close()
    del backend
    gc.collect()

    # 3. KV reuse: time to first token at turn 10 vs turn 1, one conversation on a fresh backend
    runs = [conversation_ttft(load, turns=10) for _ in range(args.conversations)]
    reused = runs[0][2]
    ttft = [statistics.median(r[0][i] for r in runs) for i in range(10)]
    prompt_s = [statistics.median(r[1][i] for r in runs) for i in range(10)]
    print(f"ttft by turn (ms, median of {len(runs)} conversations, each on a fresh backend): " + ", ".join(f"{x * 1000:.0f}" for x in ttft))
    print("  of which prompt evaluation (ms): " + ", ".join(f"{x * 1000:.0f}" for x in prompt_s))
    if len(runs) > 1:
        print("  turn 10 / turn 1 per conversation: " + ", ".join(f"{r[0][-1] / r[0][0]:.3f}" for r in runs))
    print("  prompt tokens run / reused by turn: " + ", ".join(f"{e}/{r}" for e, r in reused))
    print(ratio_line("ttft turn 10 / turn 1", ttft[-1] / ttft[0], "≤ 1.3"))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def conversation_ttft(load, turns: int) -> tuple[list[float], list[float], list[tuple[int, int]]]:
    from chat.backend import Message
    from chat.catalog import PersonaCatalog
    from chat.sampling import SamplerSettings
    from chat.samplerlayers import SamplerLayers
    from chat.session import Session

    backend = load()
    # warm the fresh model with an unrelated prompt (shares no prefix beyond "<|im_start|>")
    for _ in backend.stream([Message("user", "warm up")], SamplerSettings(temperature=0.0, max_tokens=4)):
        pass
    catalog = PersonaCatalog(None)
    session = Session(backend, catalog=catalog, persona=catalog.resolve("teacher"), layers=SamplerLayers(flags={"temperature": "0", "max_tokens": "24"}))
    out, prompt_s, reused = [], [], []
    for i in range(turns):
        for _ in session.send(f"Question {i}: {PROMPT}"):
            pass
        out.append(session.last.finish.timings.ttft_s)
        prompt_s.append(session.last.finish.timings.prompt_s)
        last = backend.stats.last
        reused.append((last.prompt_tokens_evaluated, last.prompt_tokens_reused))
    backend.close()
    return out, prompt_s, reused


if __name__ == "__main__":
    main()

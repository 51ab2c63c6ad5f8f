"""Soft prompt benchmarks (issue 13), measured in one run on both local backends:

    python benchmarks/bench_soft_prompt.py [--threads N (default 1)] [--virtual N (default 16)] [--runs N]

1. switching to a card with a soft prompt (read once, then base ↔ card) ÷ base model reload   goal ≤ 0.01
2. time to first token with the soft prompt ÷ without, same prompt                              goal ≤ 1.1
   - cold memory: the persona changes before each run and the saved-state cache is off, so
     every prompt token and every virtual token is evaluated;
   - a new conversation on the same card right after: the virtual tokens (and whatever prompt
     prefix the conversations share) are still in memory, as in the REPL or ``chat serve``.

llama.cpp: the 246M-parameter Q8_0 benchmark model (bench_chat.py); transformers: the 88M
float32 benchmark llama (bench_transformers.py). The soft prompt is random rows of the
model's width (``--virtual`` of them, PEFT's usual 8–20), written as chat's GGUF; the
conversation is a card-sized system prompt and a question (≈ 300 tokens).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import benchmark_model, ratio_line
from bench_transformers import benchmark_hf_model

SYSTEM = (
    "You are Captain Mirela, the keeper of the northern lighthouse. You remember the names of the ships, "
    "the storms of every winter and the people of the harbour. You answer in short, warm sentences and "
    "you never hurry. When asked about the sea you talk about currents, winds and the old charts. "
) * 4
QUESTION = "Tell me about the night the lantern went out and the fishing boats were still at sea."
OTHER_QUESTION = "Which ship came back last that winter, and who was waiting for it on the pier?"


def soft_file(tmp: Path, width: int, n: int) -> Path:
    from chat.parts.softprompt import write_gguf_soft_prompt

    values = (np.random.default_rng(0).standard_normal((n, width)) * 0.02).astype(np.float32)
    return write_gguf_soft_prompt(tmp / f"soft-{width}x{n}.gguf", values)


def measure(name: str, make, width: int, args, tmp: Path) -> None:
    from chat.backend import Finish, Message
    from chat.persona import Persona, SoftPromptPart
    from chat.sampling import SamplerSettings

    reloads = []
    for _ in range(3):
        started = time.perf_counter()
        b = make()
        reloads.append(time.perf_counter() - started)
        b.close()
    reload_s = statistics.median(reloads)

    path = soft_file(tmp, width, args.virtual)
    base, card = Persona("base"), Persona("card", soft_prompts=(SoftPromptPart(path),))
    b = make()
    started = time.perf_counter()
    b.apply(card)
    first = time.perf_counter() - started
    switches = []
    for i in range(200):
        started = time.perf_counter()
        b.apply(card if i % 2 == 0 else base)
        switches.append(time.perf_counter() - started)
    switch_s = statistics.median(switches)

    print(f"\n[{name}] reload {reload_s * 1000:.1f} ms (median of 3); first attach of the soft prompt {first * 1000:.2f} ms")
    print(f"[{name}] switch base ↔ card with a {args.virtual}-token soft prompt: {switch_s * 1000:.4f} ms (median of 200)")
    print(ratio_line(f"[{name}] switch / reload", switch_s / reload_s, "≤ 0.01"))

    one = SamplerSettings(temperature=0.0, max_tokens=1)

    def first_token_s(messages: list) -> float:
        started = time.perf_counter()
        for item in b.stream(messages, one):  # one token: the stream ends when the first is sampled
            if isinstance(item, Finish):
                assert item.reason in ("stop", "length"), item
        return time.perf_counter() - started

    for what, system in (("card-sized prompt", [Message("system", SYSTEM)]), ("one short question", [])):
        first, second = [*system, Message("user", QUESTION)], [*system, Message("user", OTHER_QUESTION)]
        n_prompt = b.count_tokens(first)
        cold: dict[str, list[float]] = {"base": [], "card": []}
        warm: dict[str, list[float]] = {"base": [], "card": []}
        for _ in range(args.runs):
            for label, persona in (("base", base), ("card", card)):
                b.apply(persona)  # another parameter set: the memory of the other run is never reused
                cold[label].append(first_token_s(first))
                warm[label].append(first_token_s(second))  # a new conversation on the same card
        for when, times in (("cold memory", cold), ("new conversation, same card", warm)):
            t_base, t_card = statistics.median(times["base"]), statistics.median(times["card"])
            print(f"[{name}] time to first token, {what} ({n_prompt} tokens), {when}: without {t_base * 1000:.1f} ms, "
                  f"with {args.virtual} virtual tokens {t_card * 1000:.1f} ms (median of {args.runs})")
            print(ratio_line(f"[{name}] TTFT with / without, {what}, {when}", t_card / t_base, "≤ 1.1"))
    b.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--virtual", type=int, default=16)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--backend", choices=["llamacpp", "transformers", "both"], default="both")
    args = ap.parse_args()
    from chat.backend import BackendOptions

    tmp = Path(tempfile.mkdtemp(prefix="chat-bench-soft-"))
    if args.backend in ("llamacpp", "both"):
        from chat.parts.shape import BaseShape
        from chat_plugins.llamacpp import LlamaCppBackend

        model = benchmark_model()
        width = BaseShape.from_gguf(model).n_embd
        opts = BackendOptions(threads=args.threads, context_size=2048, kv_cache_bytes=0)
        measure("llama.cpp", lambda: LlamaCppBackend(str(model), opts), width, args, tmp)
    if args.backend in ("transformers", "both"):
        import json

        from chat_plugins.transformers_backend import TransformersBackend

        model_dir, _, _ = benchmark_hf_model()
        width = json.loads((model_dir / "config.json").read_text())["hidden_size"]
        opts = BackendOptions(threads=args.threads, context_size=2048, kv_cache_bytes=0)
        measure("transformers", lambda: TransformersBackend(str(model_dir), opts), width, args, tmp)


if __name__ == "__main__":
    main()

"""Issue 4 benchmarks, measured in one run: persona parameter packs on the llama.cpp backend.

    python benchmarks/bench_personas.py [--threads N (default 1)] [--tokens N] [--runs N]

On the 246M-parameter Q8_0 benchmark model with rank-16 LoRA adapters on all seven
projections of every layer:

1. persona switch time ÷ base model reload time                             goal ≤ 0.01
2. time to first token switching back to a cached persona ÷ the same persona
   cold (same prompt, ≥ 500-token persona prefix, state cache off)           goal ≤ 0.2
3. decode tokens/s with the adapter through `chat` ÷ a raw llama-cpp-python
   loop with the same adapter                                                goal ≥ 0.97
4. resident set growth per additional loaded adapter vs the adapter's file size (reported)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import MODELS, benchmark_model, chat_command, isolated_env, ratio_line

HERE = Path(__file__).resolve().parent
QUESTION = "Tell me a long story about a lighthouse keeper who finds a letter from the future."


def benchmark_adapter(seed: int) -> Path:
    """A rank-16 LoRA on all seven projections of the benchmark model (written once, reused)."""
    import modelfactory as mf

    path = MODELS / f"bench-lora-r16-s{seed}.gguf"
    if not path.exists():
        lora = mf.make_lora(mf.BENCHMARK_CONFIG, rank=16, seed=seed, alpha=16.0)
        tmp = mf.write_lora_gguf(path.with_suffix(".tmp.gguf"), mf.BENCHMARK_CONFIG, lora)
        tmp.replace(path)
    return path


def long_prefix(name: str, min_tokens: int, count) -> tuple[str, list]:
    """A system prompt plus two examples taking at least ``min_tokens`` tokens."""
    from chat.persona import Example

    sentences = [
        f"You are {name}, a careful guide who explains every step of a long journey.",
        "You remember the names of rivers, mountains, and the old roads between the towns.",
        "When asked about history you answer with dates, places, and the people involved.",
        "You never hurry; you prefer clear words and short paragraphs to long lists.",
    ]
    examples = [
        Example("Where does the northern road begin?", "It begins at the stone bridge over the river, past the mill."),
        Example("Who built the lighthouse?", "The harbour guild built it two hundred years ago, with stone from the hills."),
    ]
    system = ""
    i = 0
    while count(system, examples) < min_tokens:
        system += sentences[i % len(sentences)] + " "
        i += 1
    return system.strip(), examples


def main() -> None:
    ap = argparse.ArgumentParser()
    # One thread by default: on a shared 2-core machine, ggml's 2-thread barriers stall whenever the
    # other core is busy, and a rank-16 adapter adds ~450 small graph nodes per token (seen: 0.7 tok/s
    # with 2 threads vs 22 tok/s with 1 under load). Pass --threads 2 on an idle machine.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--memory", nargs="+", metavar="PATH", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory:
        return memory_child(args.memory[0], args.memory[1:], args.threads)

    model = benchmark_model()
    adapters = [benchmark_adapter(seed) for seed in (101, 102, 103, 104)]
    size_mb = adapters[0].stat().st_size / 2**20
    print(f"model {model.name} ({model.stat().st_size / 2**20:.0f} MiB); adapters: {len(adapters)} × rank 16 on 7 projections × 16 layers, {size_mb:.1f} MiB each")
    tmp = Path(tempfile.mkdtemp(prefix="chat-bench-personas-"))

    switching(model, adapters, args.threads)
    cached_ttft(model, adapters, args.threads)
    decode(model, adapters[0], tmp, args)
    memory(model, adapters, args.threads)


# --- 1. switch vs reload ------------------------------------------------------------------------------


def switching(model: Path, adapters: list[Path], threads: int) -> None:
    from chat.backend import BackendOptions
    from chat.persona import AdapterPart, Persona
    from chat_plugins.llamacpp import LlamaCppBackend

    opts = BackendOptions(threads=threads, context_size=4096)
    reloads = []
    for _ in range(5):
        t = time.perf_counter()
        b = LlamaCppBackend(str(model), opts)
        reloads.append(time.perf_counter() - t)
        b.close()
    reload_s = statistics.median(reloads)

    b = LlamaCppBackend(str(model), opts)
    pa = Persona("a", adapters=(AdapterPart(adapters[0], 1.0),))
    pb = Persona("b", adapters=(AdapterPart(adapters[1], 1.0),))
    mix = Persona("mix", adapters=(AdapterPart(adapters[0], 0.7), AdapterPart(adapters[1], 0.3)))
    t = time.perf_counter()
    b.apply(pa)
    first_a = time.perf_counter() - t
    t = time.perf_counter()
    b.apply(pb)
    first_b = time.perf_counter() - t
    times = []
    for i in range(200):
        t = time.perf_counter()
        b.apply((pa, pb, mix)[i % 3])
        times.append(time.perf_counter() - t)
    switch_s = statistics.median(times)
    b.close()
    print(f"base model reload (load + context, warm page cache): {reload_s * 1000:.1f} ms (median of 5)")
    print(f"first attach of an adapter (check + llama_adapter_lora_init): {first_a * 1000:.1f} ms, {first_b * 1000:.1f} ms")
    print(f"persona switch with adapters loaded (a → b → 0.7/0.3 mix, whole active set): {switch_s * 1000:.3f} ms (median of 200)")
    print(f"switch / reload: {switch_s / reload_s:.5f}  (goal ≤ 0.01)")


# --- 2. cached vs cold time to first token ------------------------------------------------------------


def cached_ttft(model: Path, adapters: list[Path], threads: int) -> None:
    """Persona a, then b, then back to a; cold = the same with the state cache off (budget 0).

    Headline: each switch starts a new conversation ("ask persona X"), so going back to
    a costs its question only. Also reported: one conversation continuing across the
    switches, where b's turns are new text that a must evaluate either way.
    """
    from chat.backend import BackendOptions, Message
    from chat.persona import AdapterPart, Persona
    from chat.samplerlayers import SamplerLayers
    from chat.session import Session
    from chat_plugins.llamacpp import LlamaCppBackend

    def run(budget: int, new_conversation: bool) -> tuple[float, int, int]:
        b = LlamaCppBackend(str(model), BackendOptions(threads=threads, context_size=4096, kv_cache_bytes=budget))

        def count(system, examples):
            msgs = [Message("system", system)] + [m for e in examples for m in (Message("user", e.user), Message("assistant", e.assistant))]
            return b.count_tokens(msgs)

        sa, ea = long_prefix("Ada", 520, count)
        sb, eb = long_prefix("Bo", 520, count)
        pa = Persona("a", system=sa, examples=tuple(ea), adapters=(AdapterPart(adapters[0], 1.0),))
        pb = Persona("b", system=sb, examples=tuple(eb), adapters=(AdapterPart(adapters[1], 1.0),))
        prefix = count(sa, ea)
        s = Session(b, persona=pa, layers=SamplerLayers(flags={"temperature": "0", "max_tokens": "8"}))
        for persona, q in ((pa, "First question?"), (pb, "Second question?"), (pa, "Third question?")):
            if new_conversation:
                s.clear()
            if s.persona is not persona:
                s.persona = persona
                b.apply(persona)
            for _ in s.send(q):
                pass
        ttft, evaluated = s.last.finish.timings.ttft_s, b.stats.last.prompt_tokens_evaluated
        b.close()
        return ttft, prefix, evaluated

    for new_conversation in (True, False):
        cold, prefix, cold_eval = run(0, new_conversation)
        warm, _, warm_eval = run(256 * 2**20, new_conversation)
        how = "a new conversation at each switch" if new_conversation else "one conversation across the switches"
        print(f"persona prefix {prefix} tokens (system prompt + 2 examples); a → b → a, {how}:")
        print(f"  ttft back to a: cold {cold * 1000:.0f} ms ({cold_eval} prompt tokens evaluated), "
              f"cached {warm * 1000:.0f} ms ({warm_eval} evaluated)")
        print("  " + ratio_line("ttft cached / cold", warm / cold, "≤ 0.2" if new_conversation else "report"))


# --- 3. decode speed with an adapter ------------------------------------------------------------------


def decode(model: Path, adapter: Path, tmp: Path, args) -> None:
    env = isolated_env(tmp)
    card = tmp / "bench-card"
    card.mkdir(exist_ok=True)
    (card / "persona.toml").write_text(f'name = "bench"\n[[adapters]]\npath = "{adapter}"\nscale = 1.0\n', encoding="utf-8")
    cmd = chat_command() + [
        "-m", str(model), "-p", str(card), "--json", "--no-history", "-t", "0", "--max-tokens", str(args.tokens),
        "--threads", str(args.threads), "--ctx", "2048", QUESTION,
    ]
    chat_tps, raw_tps = [], []
    for _ in range(args.runs):
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        data = json.loads(out.stdout)
        assert data["usage"]["completion_tokens"] == args.tokens, data
        chat_tps.append(data["timings"]["tokens_per_s"])
        n_prompt = data["usage"]["prompt_tokens"]
        raw = [sys.executable, str(Path(__file__).with_name("bare_llamacpp.py")), str(model), str(n_prompt), str(args.tokens), str(args.threads), str(adapter)]
        out = subprocess.run(raw, capture_output=True, text=True, env=env, check=True)
        raw_tps.append(json.loads(out.stdout)["tokens_per_s"])
    c, r = statistics.median(chat_tps), statistics.median(raw_tps)
    print(f"decode with the adapter: chat {c:.2f} tok/s, raw llama-cpp-python {r:.2f} tok/s ({args.tokens} tokens, {args.threads} threads, median of {args.runs})")
    print(ratio_line("decode with adapter, chat / raw", c / r, "≥ 0.97"))


def rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def memory_child(model: str, adapters: list[str], threads: int) -> None:
    from chat.backend import BackendOptions
    from chat.persona import AdapterPart, Persona
    from chat_plugins.llamacpp import LlamaCppBackend

    b = LlamaCppBackend(model, BackendOptions(threads=threads, context_size=2048))
    out = [rss()]
    for i, path in enumerate(adapters):
        b.apply(Persona(f"p{i}", adapters=(AdapterPart(Path(path), 1.0),)))
        out.append(rss())
    b.apply(Persona("none"))
    out.append(rss())
    print(json.dumps(out))
    b.close()


def memory(model: Path, adapters: list[Path], threads: int) -> None:
    cmd = [sys.executable, __file__, "--threads", str(threads), "--memory", str(model)] + [str(a) for a in adapters]
    values = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    growth = [values[i + 1] - values[i] for i in range(len(adapters))]
    size = statistics.mean(a.stat().st_size for a in adapters)
    per = statistics.median(growth)
    print("RSS after loading the base, then each adapter (MiB): " + ", ".join(f"{v / 2**20:.0f}" for v in values[:-1])
          + f"; after detaching all: {values[-1] / 2**20:.0f} (adapters stay loaded)")
    print(f"RSS growth per additional adapter: {per / 2**20:.1f} MiB (median), adapter file {size / 2**20:.1f} MiB")
    print(f"growth / adapter size: {per / size:.2f}  (report; ≈ 1 expected)")


if __name__ == "__main__":
    main()

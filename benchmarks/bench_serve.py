"""Issue 15 benchmark: `chat serve` under concurrent clients, against llama-cpp-python's own server.

    pip install 'llama-cpp-python[server]'      # the peer server
    python benchmarks/bench_serve.py [--clients 8] [--tokens 32] [--rounds 2] [--threads 2]

Both servers load the same benchmark model (246M Q8_0) with the same context per sequence, and the
same clients (the `openai` package, streaming, temperature 0) send the same prompts in one run:

1. single persona: total completion tokens/s and p50/p95 time to first token, chat ÷ llama-cpp-python  goal ≥ 1.0
2. three personas with different rank-16 LoRA adapters, alternating: chat mixed ÷ chat single          goal ≥ 0.9
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import benchmark_model, chat_command, isolated_env, ratio_line
from bench_personas import benchmark_adapter

PROMPT = "Tell me a long story about a lighthouse keeper who finds a letter from the future."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_up(url: str, proc: subprocess.Popen, seconds: float = 180) -> None:
    import urllib.request

    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode})")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"{url} did not come up")


def load(url: str, models: list[str], clients: int, tokens: int, rounds: int) -> tuple[float, list[float]]:
    """``clients`` threads, each sending ``rounds`` streamed requests; (tokens/s overall, TTFTs in ms)."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    ttfts: list[float] = []
    counts: list[int] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        for r in range(rounds):
            model = models[(i + r) % len(models)]
            started = time.perf_counter()
            first = 0.0
            n = pieces = 0
            stream = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"{PROMPT} ({i})"}], max_tokens=tokens,
                temperature=0, stream=True, stream_options={"include_usage": True},
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter()
                    pieces += 1
                if chunk.usage is not None:  # llama-cpp-python's server sends no usage when streaming
                    n = chunk.usage.completion_tokens
            n = n or pieces
            with lock:
                ttfts.append((first - started) * 1000 if first else float("nan"))
                counts.append(n)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return sum(counts) / wall, ttfts


def pct(values: list[float], q: float) -> float:
    ordered = sorted(v for v in values if v == v)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--slots", type=int, default=4)
    args = ap.parse_args()
    model = benchmark_model()
    adapters = [benchmark_adapter(seed) for seed in (1, 2, 3)]
    with tempfile.TemporaryDirectory() as tmp:
        env = isolated_env(Path(tmp))
        cards = Path(env["CHAT_CONFIG_DIR"]) / "personas"
        for i, adapter in enumerate(adapters):
            folder = cards / f"p{i}"
            folder.mkdir(parents=True)
            (folder / "persona.toml").write_text(
                f'name = "p{i}"\nsystem = "You are persona {i}."\n[[adapters]]\npath = "{adapter}"\nscale = 0.5\n'
            )
        results = {}
        # llama-cpp-python's server: one model, requests served one at a time
        port = free_port()
        peer = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--n_ctx", str(args.ctx),
             "--n_threads", str(args.threads), "--port", str(port), "--model_alias", "base",
             "--interrupt_requests", "False"],  # its default drops a request in flight when another arrives
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )
        try:
            wait_up(f"http://127.0.0.1:{port}", peer)
            load(f"http://127.0.0.1:{port}", ["base"], 1, 4, 1)  # warm-up
            results["peer"] = load(f"http://127.0.0.1:{port}", ["base"], args.clients, args.tokens, args.rounds)
        finally:
            peer.terminate()
            peer.wait()
        port = free_port()
        ours = subprocess.Popen(
            chat_command() + ["serve", "-m", str(model), "--ctx", str(args.ctx), "--threads", str(args.threads),
                              "--slots", str(args.slots), "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**env, "OMP_NUM_THREADS": "1"},
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_up(url, ours)
            load(url, [model.name, "p0", "p1", "p2"], 4, 4, 1)  # warm-up: load the adapters once
            results["single"] = load(url, [model.name], args.clients, args.tokens, args.rounds)
            results["mixed"] = load(url, ["p0", "p1", "p2"], args.clients, args.tokens, args.rounds)
        finally:
            ours.terminate()
            ours.wait()
    for name, (tps, ttfts) in results.items():
        print(f"{name}: {tps:.1f} tok/s total, TTFT p50 {pct(ttfts, 0.5):.0f} ms, p95 {pct(ttfts, 0.95):.0f} ms")
        lost = sum(1 for t in ttfts if t != t)
        if lost:
            print(f"   ({lost} requests got no text)")
    print(f"({args.clients} clients × {args.rounds} streamed requests of {args.tokens} tokens, {args.threads} threads, "
          f"chat --slots {args.slots}, ctx {args.ctx}, on {os.cpu_count()} CPUs)")
    print(ratio_line("single-persona throughput, chat ÷ llama-cpp-python server", results["single"][0] /
                     results["peer"][0], "≥ 1.0"))
    print(ratio_line("mixed-persona (3 LoRA adapters) ÷ single-persona throughput, chat", results["mixed"][0] /
                     results["single"][0], "≥ 0.9"))
    print(f"TTFT p50 chat ÷ llama-cpp-python: {pct(results['single'][1], 0.5) / pct(results['peer'][1], 0.5):.3f}")


if __name__ == "__main__":
    main()

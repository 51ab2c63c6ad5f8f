"""Issue 16 benchmark: the same persona through the remote backend (a local `chat serve`) and run locally.

    python benchmarks/bench_remote.py [--tokens 64] [--rounds 5] [--threads 2]

One card (system prompt + a rank-16 LoRA on all projections) on the benchmark model (246M Q8_0). The
server and the local session load the same file with the same threads; they never run at once. Each
round is a fresh one-message conversation, greedy, `--tokens` tokens. Printed, medians over the rounds:

1. time to first token: local ÷ remote (1.0 = no cost)                       goal ≥ 0.9
2. decode tokens/s: remote ÷ local                                           goal ≥ 0.9
3. remote overhead per request: remote − local wall time of a whole answer, in ms
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from _common import benchmark_model, chat_command, isolated_env, ratio_line
from bench_personas import benchmark_adapter
from bench_serve import free_port, wait_up

PROMPT = "Tell me a long story about a lighthouse keeper who finds a letter from the future."


def write_card(personas: Path) -> None:
    folder = personas / "bench"
    folder.mkdir(parents=True)
    shutil.copy(benchmark_adapter(1), folder / "style.gguf")
    (folder / "persona.toml").write_text(
        'name = "bench"\nsystem = "You are a storyteller who writes long, vivid tales."\n'
        '[[adapters]]\npath = "style.gguf"\nscale = 0.8\n'
    )


def run(session, rounds: int) -> tuple[list[float], list[float], list[float]]:
    ttft, tps, wall = [], [], []
    for _ in range(rounds):
        session.clear()
        started = time.perf_counter()
        for _ in session.send(PROMPT):
            pass
        wall.append(time.perf_counter() - started)
        ttft.append(session.last.finish.timings.ttft_s)
        tps.append(session.last.finish.timings.tokens_per_s)
    return ttft, tps, wall


def session_for(model: str, threads: int, tokens: int):
    from chat.backend import BackendOptions
    from chat.catalog import PersonaCatalog
    from chat.config import Paths
    from chat.models import ModelChoice, load_backend
    from chat.samplerlayers import SamplerLayers
    from chat.session import Session

    options = BackendOptions(threads=threads) if not model.startswith("http") else BackendOptions()
    backend = load_backend(ModelChoice(model, model, None, model, {}), options)
    catalog = PersonaCatalog(Paths().personas_dir)
    layers = SamplerLayers(flags={"temperature": 0.0, "max_tokens": tokens})
    return Session(backend, catalog=catalog, persona=catalog.resolve("bench"), layers=layers)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = benchmark_model()
    with tempfile.TemporaryDirectory() as tmp:
        env = isolated_env(Path(tmp))
        write_card(Path(tmp) / "config" / "personas")
        import os

        os.environ.update({k: env[k] for k in ("CHAT_CONFIG_DIR", "CHAT_DATA_DIR", "NO_COLOR")})
        port = free_port()
        server = subprocess.Popen(
            chat_command() + ["serve", "-m", str(model), "--port", str(port), "--threads", str(args.threads)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_up(url, server)
            remote = session_for(url + "/v1", args.threads, args.tokens)
            run(remote, 1)  # warm: the server's persona state and the HTTP connection
            r_ttft, r_tps, r_wall = run(remote, args.rounds)
            remote.backend.close()
        finally:
            server.terminate()
            server.wait(timeout=60)
        local = session_for(str(model), args.threads, args.tokens)
        run(local, 1)
        l_ttft, l_tps, l_wall = run(local, args.rounds)
        local.backend.close()
    med = statistics.median
    print(f"model {model.name}, {args.tokens} tokens, {args.rounds} rounds, {args.threads} threads")
    print(
        f"local : ttft {med(l_ttft) * 1000:.1f} ms, decode {med(l_tps):.1f} tok/s, answer {med(l_wall) * 1000:.0f} ms"
    )
    print(
        f"remote: ttft {med(r_ttft) * 1000:.1f} ms, decode {med(r_tps):.1f} tok/s, answer {med(r_wall) * 1000:.0f} ms"
    )
    print(ratio_line("time to first token, local ÷ remote", med(l_ttft) / med(r_ttft), "≥ 0.9"))
    print(ratio_line("decode tokens/s, remote ÷ local", med(r_tps) / med(l_tps), "≥ 0.9"))
    print(f"remote overhead per request: {(med(r_wall) - med(l_wall)) * 1000:.1f} ms")


if __name__ == "__main__":
    main()

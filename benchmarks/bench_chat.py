"""Issue 3 benchmarks, measured in one run: start-up, decode speed, KV reuse, memory.

    python benchmarks/bench_chat.py [--threads N] [--tokens N]

1. `chat --help` wall time ÷ `python -c "import typer"`            goal ≤ 1.5
2. decode tokens/s through `chat … --json` ÷ a bare llama-cpp loop   goal ≥ 0.97
3. time to first token at turn 10 ÷ turn 1 of one conversation       goal ≤ 1.3
4. peak RSS of a one-shot `chat` ÷ the bare loop's, same model       goal ≤ 1.15
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from _common import benchmark_model, chat_command, isolated_env, median_wall, ratio_line, run_measuring_rss

HERE = Path(__file__).resolve().parent
PROMPT = "Tell me a long story about a lighthouse keeper who finds a letter from the future. " * 2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    model = benchmark_model()
    tmp = Path(tempfile.mkdtemp(prefix="chat-bench-"))
    env = isolated_env(tmp)

    # 1. start-up
    help_s = median_wall(chat_command() + ["--help"], env=env)
    typer_s = median_wall([sys.executable, "-c", "import typer"], env=env)
    print(f"chat --help: {help_s * 1000:.1f} ms; import typer: {typer_s * 1000:.1f} ms")
    print(ratio_line("help ratio", help_s / typer_s, "≤ 1.5"))

    # 2 + 4. decode speed and memory, chat and the bare loop alternating
    chat_cmd = chat_command() + [
        "-m", str(model), "--json", "--no-history", "-t", "0", "--max-tokens", str(args.tokens),
        "--threads", str(args.threads), "--ctx", "2048", PROMPT,
    ]
    chat_tps, bare_tps, chat_rss, bare_rss = [], [], [], []
    n_prompt = None
    for _ in range(args.runs):
        rss, out, _ = run_measuring_rss(chat_cmd, env)
        data = json.loads(out)
        n_prompt = data["usage"]["prompt_tokens"]
        assert data["usage"]["completion_tokens"] == args.tokens, data
        chat_tps.append(data["timings"]["tokens_per_s"])
        chat_rss.append(rss)
        bare_cmd = [sys.executable, str(HERE / "bare_llamacpp.py"), str(model), str(n_prompt), str(args.tokens), str(args.threads)]
        rss, out, _ = run_measuring_rss(bare_cmd, env)
        bare_tps.append(json.loads(out)["tokens_per_s"])
        bare_rss.append(rss)
    c, b = statistics.median(chat_tps), statistics.median(bare_tps)
    print(f"decode: chat {c:.2f} tok/s, bare llama-cpp-python {b:.2f} tok/s ({args.tokens} tokens after a {n_prompt}-token prompt, {args.threads} threads, median of {args.runs})")
    print(ratio_line("decode ratio", c / b, "≥ 0.97"))
    cr, br = max(chat_rss), max(bare_rss)
    print(f"peak RSS: chat {cr / 2**20:.0f} MiB, bare {br / 2**20:.0f} MiB")
    print(ratio_line("memory ratio", cr / br, "≤ 1.15"))

    # 3. KV reuse: time to first token at turn 10 vs turn 1, in one process
    ttft = conversation_ttft(model, args.threads, turns=10)
    print("ttft by turn (ms): " + ", ".join(f"{t * 1000:.0f}" for t in ttft))
    print(ratio_line("ttft turn 10 / turn 1", ttft[-1] / ttft[0], "≤ 1.3"))


def conversation_ttft(model: Path, threads: int, turns: int) -> list[float]:
    from chat.backend import BackendOptions
    from chat.catalog import PersonaCatalog
    from chat.plugins import get_registry
    from chat.samplerlayers import SamplerLayers
    from chat.session import Session

    backend = get_registry().backends["llama.cpp"](str(model), BackendOptions(context_size=4096, threads=threads))
    catalog = PersonaCatalog(None)
    session = Session(backend, catalog=catalog, persona=catalog.resolve("teacher"), layers=SamplerLayers(flags={"temperature": "0", "max_tokens": "24"}))
    out = []
    for i in range(turns):
        for _ in session.send(f"Question {i}: {PROMPT}"):
            pass
        out.append(session.last.finish.timings.ttft_s)
    backend.close()
    return out


if __name__ == "__main__":
    main()

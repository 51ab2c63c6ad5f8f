"""``chat personas make`` benchmarks, measured in one run (CPU):

    python benchmarks/bench_make.py [--dialogues 200] [--epochs 1] [--threads N] [--base MODEL] [--no-plain]

1. time and peak memory of ``make --vector`` and ``make --lora`` (each a child process: RSS is its own),
   the whole command (load, encode, train, write) and its parts as make.json records them
2. training tokens/s of ``make --lora`` ÷ a plain peft/transformers loop with the same settings      goal ≥ 0.9
   — the training steps alone on both sides (forward, backward, optimizer step), the plain loop run before
   and after ours (the faster of its two runs counts); ours computes the LM head only at the persona's
   positions and batches dialogues of similar length, so it may exceed 1
3. held-out loss with the card ÷ without (from the card's make.json)                                  lower is better

The model is the benchmark Hugging Face llama of bench_transformers.py (88M parameters,
random weights) unless ``--base`` names another (a GGUF, e.g. the Gemma 3 270M test model);
the data is N short dialogues whose answers share one style. The machine's load average is
printed with every figure: other jobs on a 2-core machine change them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import chat_command, isolated_env, ratio_line, run_measuring_rss
from bench_transformers import benchmark_hf_model

WORDS = "river moon ship letter market window evening rain island clock tea garden train book song".split()


def write_data(path: Path, n: int) -> Path:
    rows = []
    for i in range(n):
        a, b = WORDS[i % len(WORDS)], WORDS[(i * 7 + 3) % len(WORDS)]
        rows.append({"messages": [
            {"role": "system", "content": "You are a pirate."},
            {"role": "user", "content": f"Tell me about the {a} and the {b}, please. ({i})"},
            {"role": "assistant", "content": f"Arr, matey! The {a} be like the {b} on the open sea, arr."}]})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def plain_loop_tokens_per_s(model: str, data: Path, epochs: int, threads: int | None) -> float:
    """The same LoRA training written directly against peft/transformers: tokens/s of the steps alone."""
    import torch
    from peft import LoraConfig, get_peft_model

    from chat.make.base import load_base
    from chat.make.data import read_data, split
    from chat.make.encode import batch, encode
    from chat.make.lora import TARGETS, LoraSettings

    s = LoraSettings(epochs=epochs)
    base = load_base(model, threads)
    d = read_data(data)
    train_idx, _ = split(len(d), 0.1, s.seed)
    items = [encode(base, d.dialogues[i], d.system) for i in train_idx]
    torch.manual_seed(s.seed)
    model = get_peft_model(base.model, LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=0.0,
                                                  target_modules=list(TARGETS), task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s.lr, weight_decay=0.0)
    model.train()
    tokens, spent = 0, 0.0
    for epoch in range(epochs):
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(epoch)).tolist()
        for k in range(0, len(order), s.batch_size):
            started = time.perf_counter()
            ids, attn, labels = batch([items[i] for i in order[k : k + s.batch_size]], base.tokenizer.pad_token_id)
            model(input_ids=ids, attention_mask=attn, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            spent += time.perf_counter() - started
            tokens += int(attn.sum())
    return tokens / spent


def plain_in_child(model: str, data: Path, epochs: int, threads: int | None) -> float:
    """The plain loop in a child process: a parent holding a trained model would lend its peak RSS to the
    ``make`` children (a forked child's ru_maxrss starts at its parent's)."""
    cmd = [sys.executable, __file__, "--plain-only", str(data), "--base", model, "--plain-epochs", str(epochs)]
    out = subprocess.run([*cmd, *(["--threads", str(threads)] if threads else [])], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parent)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dialogues", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--base", default=None, help="base model (default: the 88M benchmark llama)")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain peft loop")
    ap.add_argument("--plain-epochs", type=int, default=1, help="epochs of the plain loop (its tokens/s is per step)")
    ap.add_argument("--plain-only", type=Path, default=None, help=argparse.SUPPRESS)  # DATA: the child's job
    args = ap.parse_args()
    if args.plain_only is not None:
        print(plain_loop_tokens_per_s(args.base, args.plain_only, args.plain_epochs, args.threads))
        return
    model = args.base or str(benchmark_hf_model()[0])
    threads = ["--threads", str(args.threads)] if args.threads else []
    print(f"base: {model}; {args.dialogues} dialogues; {os.cpu_count()} cores; {load()}")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        env = isolated_env(tmp)
        data = write_data(tmp / "data.jsonl", args.dialogues)
        plain: list[float] = []
        if not args.no_plain:  # before and after ours: the load of a shared machine drifts
            plain.append(plain_in_child(model, data, args.plain_epochs, args.threads))
            print(f"plain peft loop: {plain[-1]:.0f} tokens/s in the steps; {load()}")
        base = [*chat_command(), "personas", "make"]
        rss, _, wall = run_measuring_rss([*base, "v", "-b", model, "--from", str(data), "--vector",
                                          "-o", str(tmp / "v"), *threads], env)
        vec = json.loads((tmp / "v" / "make.json").read_text())
        print(f"make --vector: {wall:.1f} s wall ({vec['times']['vector_s']:.1f} s making the vector, "
              f"{vec['times']['load_s']:.1f} s loading), peak RSS {rss / 2**20:.0f} MiB, "
              f"{vec['vector']['pairs']} pairs; {load()}")
        rss, _, wall = run_measuring_rss([*base, "l", "-b", model, "--from", str(data), "--lora",
                                          "--epochs", str(args.epochs), "-o", str(tmp / "l"), *threads], env)
        made = json.loads((tmp / "l" / "make.json").read_text())
        lora = made["lora"]
        print(f"make --lora: {wall:.1f} s wall ({made['times']['lora_s']:.1f} s training, of which "
              f"{lora['step_seconds']:.1f} s in {lora['steps']} steps; {made['times']['load_s']:.1f} s loading; "
              f"{args.epochs} epoch(s), {args.dialogues} dialogues), peak RSS {rss / 2**20:.0f} MiB; {load()}")
        print(ratio_line("held-out loss with the card ÷ without",
                         lora["held_loss_with"] / lora["held_loss_without"], "< 1, lower is better"))
        if args.no_plain:
            return
        plain.append(plain_in_child(model, data, args.plain_epochs, args.threads))
        print(f"training tokens/s, steps alone: make {lora['step_tokens_per_s']:.0f}, plain peft loop "
              f"{' / '.join(f'{x:.0f}' for x in plain)} (before / after; make overall, evaluations included: "
              f"{lora['tokens_per_s']:.0f}); {load()}")
        # Against the plain loop's faster run: a run slowed by another job must not flatter ours.
        print(ratio_line("make ÷ plain loop tokens/s (steps alone, vs its faster run)",
                         lora["step_tokens_per_s"] / max(plain), "≥ 0.9"))


if __name__ == "__main__":
    main()

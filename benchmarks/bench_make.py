"""``chat personas make`` benchmarks, measured in one run (CPU):

    python benchmarks/bench_make.py [--dialogues 200] [--epochs 1] [--threads N]

1. time and peak memory of ``make --vector`` and ``make --lora`` (each a child process: RSS is its own)
2. training tokens/s of ``make --lora`` ÷ a plain peft/transformers loop with the same settings      goal ≥ 0.9
   (same model, data, batches, rank, optimizer; ours includes its held-out evaluations)
3. held-out loss with the card ÷ without (from the card's make.json)                                  lower is better

The model is the benchmark Hugging Face llama of bench_transformers.py (88M parameters,
random weights); the data is N short dialogues whose answers share one style.
"""

from __future__ import annotations

import argparse
import json
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


def plain_loop_tokens_per_s(model_dir: Path, data: Path, epochs: int, threads: int | None) -> float:
    """The same LoRA training written directly against peft/transformers: tokens/s of the steps alone."""
    import torch
    from peft import LoraConfig, get_peft_model

    from chat.make.base import load_base
    from chat.make.data import read_data, split
    from chat.make.encode import batch, encode
    from chat.make.lora import TARGETS, LoraSettings

    s = LoraSettings(epochs=epochs)
    base = load_base(str(model_dir), threads)
    d = read_data(data)
    train_idx, _ = split(len(d), 0.1, s.seed)
    items = [encode(base, d.dialogues[i], d.system) for i in train_idx]
    torch.manual_seed(s.seed)
    model = get_peft_model(base.model, LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=0.0,
                                                  target_modules=list(TARGETS), task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s.lr, weight_decay=0.0)
    model.train()
    tokens, started = 0, time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(epoch)).tolist()
        for k in range(0, len(order), s.batch_size):
            ids, attn, labels = batch([items[i] for i in order[k : k + s.batch_size]], base.tokenizer.pad_token_id)
            model(input_ids=ids, attention_mask=attn, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens += int(attn.sum())
    return tokens / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dialogues", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    model_dir, _, _ = benchmark_hf_model()
    threads = ["--threads", str(args.threads)] if args.threads else []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        env = isolated_env(tmp)
        data = write_data(tmp / "data.jsonl", args.dialogues)
        base = [*chat_command(), "personas", "make"]
        rss, _, wall = run_measuring_rss([*base, "v", "-b", str(model_dir), "--from", str(data), "--vector",
                                          "-o", str(tmp / "v"), *threads], env)
        vec = json.loads((tmp / "v" / "make.json").read_text())
        print(f"make --vector: {wall:.1f} s wall ({vec['times']['vector_s']:.1f} s making the vector, "
              f"{vec['times']['load_s']:.1f} s loading), peak RSS {rss / 2**20:.0f} MiB, "
              f"{vec['vector']['pairs']} pairs")
        rss, _, wall = run_measuring_rss([*base, "l", "-b", str(model_dir), "--from", str(data), "--lora",
                                          "--epochs", str(args.epochs), "-o", str(tmp / "l"), *threads], env)
        made = json.loads((tmp / "l" / "make.json").read_text())
        lora = made["lora"]
        print(f"make --lora: {wall:.1f} s wall ({made['times']['lora_s']:.1f} s training, {lora['steps']} steps, "
              f"{args.epochs} epoch(s), {args.dialogues} dialogues), peak RSS {rss / 2**20:.0f} MiB")
        plain = plain_loop_tokens_per_s(model_dir, data, args.epochs, args.threads)
        print(f"training tokens/s: make {lora['tokens_per_s']:.0f}, plain peft loop {plain:.0f}")
        print(ratio_line("make ÷ plain loop tokens/s", lora["tokens_per_s"] / plain, "≥ 0.9"))
        print(ratio_line("held-out loss with the card ÷ without",
                         lora["held_loss_with"] / lora["held_loss_without"], "< 1, lower is better"))


if __name__ == "__main__":
    main()

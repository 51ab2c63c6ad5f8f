"""Issue 14 benchmarks, measured in one run: knowledge per turn and card import.

    python benchmarks/bench_knowledge.py [--runs N]

1. lorebook activation with 1,000 entries, added time per turn        goal ≤ 5 ms
2. FTS5 retrieval over 10,000 chunks, added time per turn             goal ≤ 20 ms
3. import of 1,000 PNG cards (parse, map, write, validate): per card (reported)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from cardfiles import png_card, v3_doc  # noqa: E402

from chat.backend import Message  # noqa: E402
from chat.knowledge.entry import KnowledgeItem  # noqa: E402
from chat.knowledge.index import KnowledgeIndex, NotesRetriever  # noqa: E402
from chat.persona import Persona  # noqa: E402
from chat.prompt import assemble  # noqa: E402

WORDS = "castle river dragon elf forest sword king queen moat tower bridge storm village ember frost".split()


def _conversation(rng: random.Random, n: int = 8) -> list[Message]:
    return [
        Message("user" if i % 2 == 0 else "assistant", " ".join(rng.choice(WORDS + [f"w{i}"]) for _ in range(60)))
        for i in range(n)
    ]


def _per_turn_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def bench_lorebook(runs: int) -> float:
    rng = random.Random(1)
    entries = tuple(
        KnowledgeItem(
            text=f"Lore {i}: " + " ".join(rng.choice(WORDS) for _ in range(30)),
            keys=(f"key{i}", rng.choice(WORDS) + str(i % 50)),
            secondary_keys=(rng.choice(WORDS),) if i % 3 == 0 else (),
            whole_words=i % 2 == 0,
            insertion_order=i,
            priority=i % 10,
        )
        for i in range(1000)
    )
    conversation = _conversation(rng) + [Message("user", "tell me about key7 and key500 and dragon3")]
    plain, lore = Persona(name="p", system="S"), Persona(name="p", system="S", knowledge=entries, scan_depth=4)
    base = _per_turn_ms(lambda: assemble(plain, conversation), runs)
    return _per_turn_ms(lambda: assemble(lore, conversation), runs) - base


def bench_retrieval(runs: int, folder: Path) -> tuple[float, int]:
    rng = random.Random(2)
    notes = folder / "notes"
    notes.mkdir()
    for f in range(1000):  # 1,000 files of 10 chunks each
        paras = [" ".join(rng.choice(WORDS + [f"term{f}x{p}"]) for _ in range(150)) for p in range(10)]
        (notes / f"n{f}.md").write_text("\n\n".join(paras))
    index = KnowledgeIndex(folder / "knowledge.db")
    retriever = NotesRetriever(index, [notes])
    retriever.refresh()
    chunks = index.db.execute("SELECT count(*) FROM chunks").fetchone()[0]
    conversation = _conversation(rng) + [Message("user", "what about term500x3 near the castle?")]
    plain = Persona(name="p", system="S", knowledge=(KnowledgeItem(path=notes),))
    base = _per_turn_ms(lambda: assemble(plain, conversation), runs)
    added = _per_turn_ms(lambda: assemble(plain, conversation, retriever=retriever), runs) - base
    return added, chunks


def bench_import(folder: Path, n: int = 1000) -> float:
    from chat.importers.cardio import parse_card_file, save

    raws = []
    for i in range(n):
        doc = v3_doc(name=f"Card {i}")
        raws.append(png_card({"ccv3": json.dumps(doc)}))
    start = time.perf_counter()
    for i, raw in enumerate(raws):
        save(parse_card_file(raw, folder / f"c{i}.png"), folder / "personas", folder / f"c{i}.png")
    return (time.perf_counter() - start) * 1000 / n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--cards", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lore_ms = bench_lorebook(args.runs)
        retrieval_ms, chunks = bench_retrieval(args.runs, Path(tmp))
        import_ms = bench_import(Path(tmp), args.cards)
    print(f"lorebook activation, 1,000 entries: +{lore_ms:.2f} ms per turn (goal ≤ 5 ms)")
    print(f"FTS5 retrieval over {chunks:,} chunks: +{retrieval_ms:.2f} ms per turn (goal ≤ 20 ms)")
    print(f"PNG card import ({args.cards:,} cards): {import_ms:.2f} ms per card")


if __name__ == "__main__":
    main()

"""The examples a persona is made from: read, checked and split, before any model is loaded.

``DATA`` is one of three things, told apart by what it is:

* a **card** (a folder with ``persona.toml``, or the file itself): its ``system`` prompt and
  its ``[[examples]]``, each example one dialogue;
* **JSONL** (``.jsonl`` / ``.json``): one conversation per line in the OpenAI chat format,
  ``{"messages": [{"role": "system"|"user"|"assistant", "content": "…"}, …]}``; the first
  system message found becomes the card's system prompt;
* **plain text** (anything else): the persona's own writing; every paragraph (blank-line
  separated) becomes an answer to the prompt :data:`TEXT_PROMPT`.

Files come from anywhere, so every problem is one :class:`DataError` naming the file and the
line, and nothing in them is run or sent to the terminal unquoted.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from chat.errors import InputError
from chat.parts.files import open_regular
from chat.tomlfile import quote, shorten

#: Dialogues needed to make anything: some to learn from and at least one held out to check on.
MIN_DIALOGUES = 4
MAX_DATA_BYTES = 64 << 20  # a few hundred dialogues are well under a megabyte
ROLES = ("system", "user", "assistant")
#: What a plain-text paragraph answers (the persona talking about anything).
TEXT_PROMPT = "Tell me something."
_FORMAT_HINT = 'one JSON object per line: {"messages": [{"role": "user", "content": "…"}, …]}'


class DataError(InputError):
    """The examples file is unreadable, malformed or too small."""


@dataclass(frozen=True)
class Turn:
    role: str
    content: str


@dataclass(frozen=True)
class Dialogue:
    """One conversation without its system prompt; at least one assistant turn."""

    turns: tuple[Turn, ...]

    @property
    def first_prompt(self) -> str:
        return next((t.content for t in self.turns if t.role == "user"), "")

    @property
    def first_answer(self) -> str:
        return next((t.content for t in self.turns if t.role == "assistant"), "")


@dataclass(frozen=True)
class MakeData:
    """What was read: the system prompt (may be empty), the dialogues, and where they came from."""

    source: Path
    kind: str  # "jsonl", "card" or "text"
    system: str
    dialogues: tuple[Dialogue, ...]
    sha256: str
    examples: tuple[tuple[str, str], ...] = field(default=())  # a card's own examples, kept for the new card

    def __len__(self) -> int:
        return len(self.dialogues)


def _read_text(path: Path, what: str = "data file") -> tuple[str, str]:
    """The file's text and sha256: a regular file, within the size limit, UTF-8."""
    try:
        with open_regular(path, what, DataError) as fh:
            raw = fh.read(MAX_DATA_BYTES + 1)
    except DataError:
        raise
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if len(raw) > MAX_DATA_BYTES:
        raise DataError(f"{path}: larger than {MAX_DATA_BYTES >> 20} MiB", "a few hundred short dialogues are enough")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start})", "save the file as UTF-8") from None
    return text, hashlib.sha256(raw).hexdigest()


def read_data(path: str | Path) -> MakeData:
    """Read ``path`` (JSONL, a card, or plain text) and check that there is enough to learn from."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder", "pass a JSONL file, a card folder or a text file")
    if p.is_dir() or p.name == "persona.toml":
        data = _read_card(p)
    elif p.suffix.lower() in (".jsonl", ".json"):
        data = _read_jsonl(p)
    else:
        data = _read_plain(p)
    if not data.dialogues:
        raise DataError(f"{p}: no assistant turns", "the persona's answers are what a card learns from")
    if len(data.dialogues) < MIN_DIALOGUES:
        raise DataError(
            f"{p}: {len(data.dialogues)} dialogue(s) with an assistant answer; at least {MIN_DIALOGUES} are needed",
            "add more examples (50–500 short dialogues work best)",
        )
    return data


def _read_jsonl(p: Path) -> MakeData:
    text, digest = _read_text(p)
    system = ""
    dialogues: list[Dialogue] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            why = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            raise DataError(f"{p}: line {n} is not JSON ({why})", _FORMAT_HINT) from None
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list):
            raise DataError(f'{p}: line {n} has no "messages" list', _FORMAT_HINT)
        turns: list[Turn] = []
        for i, m in enumerate(messages, start=1):
            role = m.get("role") if isinstance(m, dict) else None
            content = m.get("content") if isinstance(m, dict) else None
            if not isinstance(role, str) or not isinstance(content, str):
                missing = "role" if not isinstance(role, str) else "content"
                raise DataError(f"{p}: line {n}, message {i} has no {missing} (a string)", _FORMAT_HINT)
            if role not in ROLES:
                raise DataError(
                    f"{p}: line {n}, message {i}: role {quote(shorten(role, 30))} is not one of {', '.join(ROLES)}",
                    _FORMAT_HINT,
                )
            if role == "system":
                system = system or content
                continue
            turns.append(Turn(role, content))
        if any(t.role == "assistant" and t.content.strip() for t in turns):
            dialogues.append(Dialogue(tuple(turns)))
    return MakeData(p, "jsonl", system, tuple(dialogues), digest)


def _read_card(p: Path) -> MakeData:
    from chat.card import read_card
    from chat.errors import PersonaError

    folder = p.parent if p.name == "persona.toml" else p
    try:
        loaded = read_card(folder)
    except PersonaError as exc:
        raise DataError(exc.message, exc.hint) from None
    card = loaded.card
    digest = hashlib.sha256(loaded.file.read_bytes()).hexdigest()
    examples = tuple((e.user, e.assistant) for e in card.examples)
    dialogues = tuple(Dialogue((Turn("user", u), Turn("assistant", a))) for u, a in examples if a.strip())
    return MakeData(loaded.file, "card", card.system, dialogues, digest, examples)


def _read_plain(p: Path) -> MakeData:
    text, digest = _read_text(p)
    paragraphs = [" ".join(block.split()) for block in text.replace("\r\n", "\n").split("\n\n")]
    dialogues = tuple(Dialogue((Turn("user", TEXT_PROMPT), Turn("assistant", t))) for t in paragraphs if t)
    return MakeData(p, "text", "", dialogues, digest)


def read_pairs(positive: Path, negative: Path) -> list[tuple[Dialogue, Dialogue]]:
    """Contrastive pairs: the same prompts answered the persona's way (``positive``) and neutrally."""
    pos, neg = read_data(positive), read_data(negative)
    if len(pos) != len(neg):
        raise DataError(
            f"{negative}: {len(neg)} dialogues but {positive} has {len(pos)}",
            "--positive and --negative pair up line by line",
        )
    return list(zip(pos.dialogues, neg.dialogues, strict=True))


def split(n: int, held_out: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) indices: a seeded shuffle, at least one held out and at least three to train on."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = min(max(1, round(n * held_out)), n - 3)
    return sorted(order[k:]), sorted(order[:k])

"""Character Card data ⇄ our card (``persona.toml`` data): the field mapping README documents.

Import: ``name`` → ``character.name`` (what ``{{char}}`` becomes; the card's own name is a safe
folder name), ``nickname``; ``description``/``personality``/``scenario`` → ``[character]`` (sent
after the system prompt, labelled); ``system_prompt`` → ``system``; ``first_mes`` → ``greeting``;
``alternate_greetings`` → ``greetings``; ``mes_example`` split on ``<START>`` → ``[[examples]]``;
``post_history_instructions``, ``creator_notes`` as they are; ``creator``/``character_version``/``tags``
→ ``author``/``version``/``tags``; ``character_book`` → ``[[knowledge]]`` lorebook entries and the
card's ``token_budget``/``scan_depth``/``recursive_scanning``; ``extensions.chat.sampling`` →
``[sampling]``. Everything else is kept only for export.

Export is a diff: the card data written at import (the *snapshot*) is compared with
``persona.toml`` now, and only the fields that differ are written over the imported data. So an
untouched card exports exactly what was imported, and an edit changes only what it edits.
"""

from __future__ import annotations

import copy
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from chat.card import MAX_NAME_CHARS

LOGIC = ("and_any", "not_all", "not_any", "and_all")  # SillyTavern's selectiveLogic 0..3
MAPPED = {
    "name",
    "nickname",
    "description",
    "personality",
    "scenario",
    "first_mes",
    "alternate_greetings",
    "mes_example",
    "system_prompt",
    "post_history_instructions",
    "creator_notes",
    "creator",
    "character_version",
    "tags",
    "character_book",
}
_START = re.compile(r"<START>", re.IGNORECASE)
_SPEAKER = re.compile(r"^\s*(\{\{user\}\}|<user>|\{\{char\}\}|<bot>)\s*:\s?", re.IGNORECASE)


@dataclass
class Report:
    """What an import did: mapped fields, and fields kept only as metadata (for export)."""

    mapped: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


def folder_name(text: str, fallback: str = "character") -> str:
    """A card name from a character's name: ASCII letters, digits, '-', '_', '.'; "Señor Ñu!" → "senor-nu"."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    slug = re.sub(r"[^a-z0-9_.-]+", "-", ascii_text).strip("-._")[:MAX_NAME_CHARS].strip("-._")
    return slug or fallback


def clean(text: str) -> str:
    """Text that TOML can hold: lone surrogates (from JSON escapes) become U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _s(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    return clean(value) if isinstance(value, str) else ""


def _list(data: dict[str, Any], key: str) -> list[str]:
    value = data.get(key)
    return [clean(v) for v in value if isinstance(v, str)] if isinstance(value, list) else []


def card_from_data(data: dict[str, Any], name: str) -> tuple[dict[str, Any], Report]:
    """Our card (as ``persona.toml`` data) from a card's ``data`` object, and what was mapped or kept."""
    report = Report()
    card: dict[str, Any] = {"name": name}
    listing = (_s(data, "creator_notes") or _s(data, "description")).strip().splitlines()
    if listing:
        card["description"] = listing[0][:120]
    card["character"] = {
        k: v
        for k, v in (
            ("name", _s(data, "name")),
            ("description", _s(data, "description")),
            ("personality", _s(data, "personality")),
            ("scenario", _s(data, "scenario")),
        )
        if v
    }
    simple = {
        "nickname": "nickname",
        "system": "system_prompt",
        "greeting": "first_mes",
        "post_history_instructions": "post_history_instructions",
        "creator_notes": "creator_notes",
        "author": "creator",
        "version": "character_version",
    }
    for ours, theirs in simple.items():
        if _s(data, theirs):
            card[ours] = _s(data, theirs)
            report.mapped.append(f"{theirs} → {ours}")
    for ours, theirs in (("greetings", "alternate_greetings"), ("tags", "tags")):
        if _list(data, theirs):
            card[ours] = _list(data, theirs)
            report.mapped.append(f"{theirs} ({len(card[ours])}) → {ours}")
    parts = [k for k in ("description", "personality", "scenario") if _s(data, k)]
    if parts:
        report.mapped.append(f"{', '.join(parts)} → [character] (sent after the system prompt)")
    examples = split_examples(_s(data, "mes_example"))
    if examples:
        card["examples"] = examples
        report.mapped.append(f"mes_example → {len(examples)} example exchange(s)")
    book = data.get("character_book") if isinstance(data.get("character_book"), dict) else None
    if book:
        _book_to_card(book, card, report)
    sampling = (data.get("extensions") or {}).get("chat", {})
    if isinstance(sampling, dict) and isinstance(sampling.get("sampling"), dict):
        card["sampling"] = copy.deepcopy(sampling["sampling"])
        report.mapped.append("extensions.chat.sampling → [sampling]")
    for key in data:
        if key not in MAPPED:
            value = data[key]
            size = f" ({len(value)})" if isinstance(value, (list, dict)) and value else ""
            report.kept.append(f"{key}{size}")
    if card.get("creator_notes"):
        report.kept.append("creator_notes (shown by `chat personas show`, never sent to the model)")
    return {k: v for k, v in card.items() if v not in ({}, [], "")}, report


def split_examples(text: str) -> list[dict[str, str]]:
    """``mes_example`` → user/assistant exchanges: blocks split on ``<START>``, turns on ``{{user}}:``/``{{char}}:``."""
    out: list[dict[str, str]] = []
    for block in _START.split(text):
        turns: list[list[str]] = []  # [role, text]
        for line in block.splitlines():
            m = _SPEAKER.match(line)
            if m:
                role = "user" if m.group(1).lower() in ("{{user}}", "<user>") else "assistant"
                turns.append([role, line[m.end() :]])
            elif turns:
                turns[-1][1] += "\n" + line
            elif line.strip():
                turns.append(["assistant", line])
        pending: str | None = None
        for role, said in turns:
            said = said.strip()
            if role == "user":
                if pending is not None:
                    out.append({"user": pending, "assistant": ""})
                pending = said
            else:
                out.append({"user": pending or "", "assistant": said})
                pending = None
        if pending is not None:
            out.append({"user": pending, "assistant": ""})
    return out


def join_examples(examples: list[dict[str, str]]) -> str:
    """Our examples as ``mes_example``: one ``<START>`` block per exchange."""
    blocks = []
    for ex in examples:
        lines = ["<START>"]
        if ex.get("user"):
            lines.append(f"{{{{user}}}}: {ex['user']}")
        if ex.get("assistant"):
            lines.append(f"{{{{char}}}}: {ex['assistant']}")
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def _book_to_card(book: dict[str, Any], card: dict[str, Any], report: Report) -> None:
    if isinstance(book.get("token_budget"), (int, float)) and book["token_budget"] >= 0:
        card["token_budget"] = min(int(book["token_budget"]), 1_000_000)
    if isinstance(book.get("scan_depth"), (int, float)) and 0 <= book["scan_depth"] <= 1000:
        card["scan_depth"] = int(book["scan_depth"])
    if book.get("recursive_scanning") is True:
        card["recursive_scanning"] = True
    entries = [entry_to_knowledge(e, i) for i, e in enumerate(book.get("entries") or []) if isinstance(e, dict)]
    if entries:
        card["knowledge"] = entries
        report.mapped.append(f"character_book → {len(entries)} lorebook [[knowledge]] entries")
    extra = sorted(k for k in book if k not in ("entries", "token_budget", "scan_depth", "recursive_scanning"))
    if extra:
        report.kept.append(f"character_book: {', '.join(extra)}")


def _int(value: Any, default: int, low: int = -(10**9), high: int = 10**9) -> int:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
        return int(max(low, min(high, value)))
    return default


def entry_to_knowledge(entry: dict[str, Any], index: int) -> dict[str, Any]:
    """One ``character_book`` entry as a ``[[knowledge]]`` entry (SillyTavern's extensions read too)."""
    ext: dict[str, Any] = entry["extensions"] if isinstance(entry.get("extensions"), dict) else {}
    out: dict[str, Any] = {"title": _s(entry, "comment") or _s(entry, "name"), "text": _s(entry, "content")}
    out["keys"] = _list(entry, "keys")
    if entry.get("selective") and _list(entry, "secondary_keys"):
        out["secondary_keys"] = _list(entry, "secondary_keys")
        logic = ext.get("selectiveLogic")
        if isinstance(logic, int) and not isinstance(logic, bool) and 0 <= logic < len(LOGIC):
            out["selective_logic"] = LOGIC[logic]
    for ours, value in (
        ("constant", entry.get("constant")),
        ("enabled", entry.get("enabled")),
        ("case_sensitive", entry.get("case_sensitive", ext.get("case_sensitive"))),
        ("whole_words", ext.get("match_whole_words")),
        ("use_regex", entry.get("use_regex")),
    ):
        if isinstance(value, bool):
            out[ours] = value
    out["insertion_order"] = _int(entry.get("insertion_order"), 100)
    if entry.get("priority") is not None:
        out["priority"] = _int(entry.get("priority"), 10)
    position = entry.get("position")
    if position == "after_char" or (position is None and ext.get("position") == 1):
        out["position"] = "after_char"
    depth = ext.get("scan_depth")
    if isinstance(depth, int) and not isinstance(depth, bool) and 0 <= depth <= 1000:
        out["scan_depth"] = depth
    probability = ext.get("probability")
    if ext.get("useProbability", True) and isinstance(probability, (int, float)) and not isinstance(probability, bool):
        out["probability"] = _int(probability, 100, 0, 100)
    out["book_index"] = index
    return {k: v for k, v in out.items() if v != ""}


def knowledge_to_entry(item: dict[str, Any], base: dict[str, Any] | None, index: int) -> dict[str, Any]:
    """A ``[[knowledge]]`` entry as a ``character_book`` entry, over the imported entry it came from (if any)."""
    out = copy.deepcopy(base) if base else {"extensions": {}}
    ext = out.setdefault("extensions", {}) if isinstance(out.get("extensions", {}), dict) else {}
    keys = item.get("keys")
    out["keys"] = list(keys) if keys is not None else []
    out["content"] = item.get("text", "")
    title_key = "name" if base and "name" in base and "comment" not in base else "comment"
    out[title_key] = item.get("title", "")
    out["enabled"] = item.get("enabled", True)
    out["constant"] = item.get("constant", False) or keys is None
    out["insertion_order"] = item.get("insertion_order", 100)
    out["case_sensitive"] = item.get("case_sensitive", False)
    out["use_regex"] = item.get("use_regex", False)
    out["priority"] = item.get("priority", 10)
    out["position"] = item.get("position", "before_char")
    out.setdefault("id", index)
    secondary = item.get("secondary_keys") or []
    if secondary or not (base and base.get("secondary_keys")):
        out["secondary_keys"] = list(secondary)
        out["selective"] = bool(secondary)
    ext["selectiveLogic"] = LOGIC.index(item.get("selective_logic", "and_any"))
    ext["match_whole_words"] = item.get("whole_words", False)
    ext["probability"] = item.get("probability", 100)
    ext["useProbability"] = item.get("probability", 100) < 100 or ext.get("useProbability", False)
    ext["position"] = 1 if item.get("position") == "after_char" else 0
    if item.get("scan_depth") is not None:
        ext["scan_depth"] = item["scan_depth"]
    return out


def data_from_card(current: dict[str, Any], snapshot: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """The card ``data`` to export: ``base`` (as imported) with each field that changed since ``snapshot``."""
    data = copy.deepcopy(base)

    def changed(*path: str) -> bool:
        return _get(current, path) != _get(snapshot, path)

    char = current.get("character", {})
    if changed("character", "name") or changed("name") or "name" not in data:
        data["name"] = char.get("name") or current.get("name", "")
    for theirs, path in (
        ("description", ("character", "description")),
        ("personality", ("character", "personality")),
        ("scenario", ("character", "scenario")),
        ("nickname", ("nickname",)),
        ("system_prompt", ("system",)),
        ("first_mes", ("greeting",)),
        ("post_history_instructions", ("post_history_instructions",)),
        ("creator_notes", ("creator_notes",)),
        ("creator", ("author",)),
        ("character_version", ("version",)),
    ):
        if changed(*path) or (theirs not in data and theirs != "nickname"):
            data[theirs] = _get(current, path) or ""
    for theirs, ours in (("alternate_greetings", "greetings"), ("tags", "tags")):
        if changed(ours) or theirs not in data:
            data[theirs] = list(current.get(ours, []))
    if changed("examples") or "mes_example" not in data:
        data["mes_example"] = join_examples(current.get("examples", []))
    if changed("sampling"):
        ext = data.setdefault("extensions", {})
        ext.setdefault("chat", {})["sampling"] = copy.deepcopy(current.get("sampling", {}))
    data.setdefault("extensions", {})
    book_keys = ("knowledge", "token_budget", "scan_depth", "recursive_scanning")
    if any(changed(k) for k in book_keys):
        _card_to_book(current, snapshot, data)
    return data


def _card_to_book(current: dict[str, Any], snapshot: dict[str, Any], data: dict[str, Any]) -> None:
    old: dict[str, Any] = data["character_book"] if isinstance(data.get("character_book"), dict) else {}
    book = copy.deepcopy(old) or {"extensions": {}}
    base_entries: list[Any] = old["entries"] if isinstance(old.get("entries"), list) else []
    before = {e.get("book_index"): e for e in snapshot.get("knowledge", []) if e.get("book_index") is not None}
    entries = []
    for i, item in enumerate(current.get("knowledge", [])):
        if item.get("path"):
            continue  # note folders stay with the card; a card file has no place for them
        idx = item.get("book_index")
        base = base_entries[idx] if isinstance(idx, int) and 0 <= idx < len(base_entries) else None
        if base is not None and before.get(idx) == item:
            entries.append(copy.deepcopy(base))  # untouched: exactly as imported
        else:
            entries.append(knowledge_to_entry(item, base if isinstance(base, dict) else None, i))
    book["entries"] = entries
    for key in ("token_budget", "scan_depth"):
        if current.get(key) is not None:
            book[key] = current[key]
        elif key in book and snapshot.get(key) is not None:
            del book[key]
    book["recursive_scanning"] = bool(current.get("recursive_scanning", False))
    if not entries and not old:
        data.pop("character_book", None)
        return
    data["character_book"] = book


def _get(data: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        data = data.get(key) if isinstance(data, dict) else None  # type: ignore[assignment]
    return data

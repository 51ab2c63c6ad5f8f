"""Character Card JSON, V1, V2 and V3: read one into a checked V3-shaped document, and write one back.

A V2 or V3 card keeps its fields in ``data``; a V1 card has them at the top. Reading returns the
document as it was (every unknown field and ``extensions`` kept) with a V1 card's fields moved
under ``data``; :func:`check_data` type-checks every field chat maps, one line per problem,
with ``null`` taken as absent (common in cards from the wild).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chat.importers import MAX_CARD_JSON_BYTES, CardFileError
from chat.tomlfile import quote

V3 = {"spec": "chara_card_v3", "spec_version": "3.0"}
V2 = {"spec": "chara_card_v2", "spec_version": "2.0"}
V1_FIELDS = ("name", "description", "personality", "scenario", "first_mes", "mes_example")
TEXT_FIELDS = (
    "name",
    "description",
    "personality",
    "scenario",
    "first_mes",
    "mes_example",
    "creator_notes",
    "system_prompt",
    "post_history_instructions",
    "creator",
    "character_version",
    "nickname",
)
LIST_FIELDS = ("alternate_greetings", "tags", "group_only_greetings")
ENTRY_TEXT = ("content", "name", "comment")
ENTRY_BOOL = ("enabled", "case_sensitive", "constant", "selective", "use_regex")
ENTRY_INT = ("insertion_order", "priority", "id")
MAX_ENTRIES = 10_000
MAX_DEPTH = 64  # nesting in the JSON (extensions can hold anything, but not a stack overflow)


def parse(raw: bytes, where: Path) -> dict[str, Any]:
    """A card document from JSON bytes: V2/V3 as they are, V1 wrapped as V3; raises CardFileError."""
    if len(raw) > MAX_CARD_JSON_BYTES:
        raise CardFileError(f"{where}: card data of {len(raw):,} bytes", f"at most {MAX_CARD_JSON_BYTES >> 20} MiB")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CardFileError(f"{where}: card data is not UTF-8 (byte {exc.start})", "the card is damaged") from None
    if _too_deep(text):
        raise CardFileError(f"{where}: card JSON is nested more than {MAX_DEPTH} levels deep", "the card is damaged")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CardFileError(f"{where}: not valid JSON: {str(exc)[:120]}", "the card is damaged") from None
    if not isinstance(doc, dict):
        raise CardFileError(f"{where}: card JSON is a {type(doc).__name__}, not an object", "is this a character card?")
    spec = doc.get("spec")
    if spec in ("chara_card_v2", "chara_card_v3"):
        if not isinstance(doc.get("data"), dict):
            raise CardFileError(f"{where}: {spec} card without a 'data' object", "the card is damaged")
        data = doc["data"]
    elif spec is None and isinstance(doc.get("name"), str) and any(k in doc for k in V1_FIELDS[1:]):
        data = doc
        doc = {**V3, "data": dict(doc)}
    else:
        what = f"spec {quote(spec)}" if spec is not None else "no 'spec' and no V1 fields"
        raise CardFileError(f"{where}: not a character card ({what})", "expected Character Card V1, V2 or V3 JSON")
    check_data(data, where)
    return doc


def version(doc: dict[str, Any], raw: bytes) -> str:
    """ "V3", "V2" or "V1": what the file said (:func:`parse` wraps a V1 card as V3)."""
    if doc.get("spec") == "chara_card_v2":
        return "V2"
    return "V3" if b"chara_card_v3" in raw else "V1"


def _too_deep(text: str) -> bool:
    """Whether brackets nest deeper than MAX_DEPTH (a cheap scan; brackets in strings only make it stricter)."""
    depth = 0
    for c in text:
        if c in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif c in "]}":
            depth -= 1
    return False


def check_data(data: dict[str, Any], where: Path) -> None:
    """Every mapped field has its type; the first problem is one CardFileError naming it."""
    for key in TEXT_FIELDS:
        _expect(data.get(key), str, where, f"data.{key}", "text")
    for key in LIST_FIELDS:
        items = data.get(key)
        _expect(items, list, where, f"data.{key}", "a list of text")
        for i, item in enumerate(items or []):
            _expect(item, str, where, f"data.{key}[{i}]", "text")
    _expect(data.get("extensions"), dict, where, "data.extensions", "an object")
    book = data.get("character_book")
    _expect(book, dict, where, "data.character_book", "an object")
    if not book:
        return
    for key in ("scan_depth", "token_budget"):
        _expect_int(book.get(key), where, f"data.character_book.{key}")
    _expect(book.get("recursive_scanning"), bool, where, "data.character_book.recursive_scanning", "true or false")
    entries = book.get("entries")
    _expect(entries, list, where, "data.character_book.entries", "a list")
    if entries and len(entries) > MAX_ENTRIES:
        raise CardFileError(f"{where}: {len(entries):,} lorebook entries", f"at most {MAX_ENTRIES:,}")
    for i, entry in enumerate(entries or []):
        at = f"data.character_book.entries[{i}]"
        _expect(entry, dict, where, at, "an object")
        for key in ENTRY_TEXT:
            _expect(entry.get(key), str, where, f"{at}.{key}", "text")
        for key in ENTRY_BOOL:
            _expect(entry.get(key), bool, where, f"{at}.{key}", "true or false")
        for key in ENTRY_INT:
            if key != "id" or not isinstance(entry.get(key), str):  # ids are numbers or text in the wild
                _expect_int(entry.get(key), where, f"{at}.{key}")
        for key in ("keys", "secondary_keys"):
            _expect(entry.get(key), list, where, f"{at}.{key}", "a list of text")
            for j, k in enumerate(entry.get(key) or []):
                _expect(k, str, where, f"{at}.{key}[{j}]", "text")
        _expect(entry.get("position"), str, where, f"{at}.position", "text")
        _expect(entry.get("extensions"), dict, where, f"{at}.extensions", "an object")


def _expect(value: Any, kind: type, where: Path, field: str, what: str) -> None:
    if value is None or (isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))):
        return
    raise CardFileError(f"{where}: {field}: expected {what} (got {quote(value)})", "fix or remove the field")


def _expect_int(value: Any, where: Path, field: str) -> None:
    ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e15)
    if not ok or (isinstance(value, float) and value != value):
        raise CardFileError(f"{where}: {field}: expected a number (got {quote(value)})", "fix or remove the field")


def card_bytes(doc: dict[str, Any], version: int = 3) -> bytes:
    """``doc`` as the JSON a V3 (or, for PNG's ``chara`` chunk, V2) reader expects; V1 fields mirrored at the top."""
    out = {k: v for k, v in doc.items() if k not in ("spec", "spec_version", "data")}
    data = doc.get("data", {})
    for key in V1_FIELDS:  # readers of old cards look at the top (SillyTavern writes them there too)
        if key in out or version == 2:
            out[key] = data.get(key, "")
    if version == 3 and "group_only_greetings" not in data:  # required by the V3 spec
        data = {**data, "group_only_greetings": []}
    out = {**(V3 if version == 3 else V2), **out, "data": data}
    try:
        return json.dumps(out, ensure_ascii=False, indent=2).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a "\ud800" escape: keep it escaped
        return json.dumps(out, indent=2).encode("ascii")

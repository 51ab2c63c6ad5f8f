"""Reading the history: the records a read returns and the queries behind them.

:class:`chat.store.Store` owns the connection, its lock and error handling; the
functions here take an open connection and return plain, immutable records.
"""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import dataclass
from typing import Any

from chat.backend import Message


@dataclass(frozen=True)
class Conversation:
    """One saved conversation's metadata (its messages come from :meth:`Store.messages`)."""

    id: str
    created_at: str  # ISO 8601, UTC
    updated_at: str  # time of the last message added
    title: str  # the first user message, on one line and shortened
    model: str | None
    persona: str | None  # label of the persona (or mix) the conversation started with
    system: str | None  # the system prompt it started with
    sampling: dict[str, Any]
    message_count: int


@dataclass(frozen=True)
class StoredMessage:
    """One saved message with what it cost to produce."""

    id: int
    conversation_id: str
    seq: int  # position within the conversation, from 1
    role: str
    content: str
    persona: str | None  # the persona or mix that produced an answer, e.g. "teacher:0.7,pirate:0.3"
    model: str | None
    created_at: str
    finish_reason: str | None  # stop / length / interrupted / error; None for user messages
    prompt_tokens: int | None
    completion_tokens: int | None
    ttft_s: float | None
    tokens_per_s: float | None

    def to_message(self) -> Message:
        """The message as the backend sees it."""
        return Message(self.role, self.content)  # type: ignore[arg-type]


@dataclass(frozen=True)
class SearchHit:
    """A message that matched :meth:`Store.search`."""

    conversation_id: str
    message_id: int
    role: str
    snippet: str  # the matching part of the message, on one line
    created_at: str


CONVERSATION_SELECT = (
    "SELECT c.id, c.created_at, c.updated_at, c.title, c.model, c.persona, c.system, c.sampling,"
    " (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) FROM conversations c"
)
MESSAGE_SELECT = (
    "SELECT id, conversation_id, seq, role, content, persona, model, created_at, finish_reason,"
    " prompt_tokens, completion_tokens, ttft_s, tokens_per_s FROM messages"
)


def conversation_from_row(row: tuple[Any, ...]) -> Conversation:
    cid, created, updated, title, model, persona, system, sampling, count = row
    try:
        settings = json.loads(sampling) if sampling else {}
    except ValueError:
        settings = {}
    return Conversation(cid, created, updated, title, model, persona, system, settings, count)


def _snippet(content: str, word: str, mark: tuple[str, str], width: int = 60) -> str:
    """A one-line window of ``content`` around the first ``word`` (the LIKE fallback's snippet)."""
    line = " ".join(content.split())
    at = line.lower().find(word.lower())
    if at < 0:
        return line[:width] + ("…" if len(line) > width else "")
    start = max(0, at - width // 2)
    end = min(len(line), at + len(word) + width // 2)
    found = line[at : at + len(word)]
    return (
        ("…" if start else "")
        + line[start:at]
        + mark[0]
        + found
        + mark[1]
        + line[at + len(word) : end]
        + ("…" if end < len(line) else "")
    )


def search_messages(
    db: sqlite3.Connection, text: str, *, fts: bool, limit: int, mark: tuple[str, str]
) -> list[SearchHit]:
    """Messages containing every word of ``text`` (words match as prefixes), best matches first.

    With FTS5 (``fts``) the index ranks them; without it a LIKE scan finds them, newest first.
    """
    words = text.split()
    if not words:
        return []
    if fts:
        query = " ".join('"' + w.replace('"', '""') + '"*' for w in words)
        rows = db.execute(
            "SELECT m.conversation_id, m.id, m.role, snippet(messages_fts, 0, ?, ?, '…', 16), m.created_at"
            " FROM messages_fts JOIN messages m ON m.id = messages_fts.rowid"
            " WHERE messages_fts MATCH ? ORDER BY rank, m.id DESC LIMIT ?",
            (*mark, query, limit),
        ).fetchall()
        return [SearchHit(cid, mid, role, " ".join(snip.split()), at) for cid, mid, role, snip, at in rows]
    where = " AND ".join(["content LIKE ? ESCAPE '\\'"] * len(words))
    patterns = ["%" + re.sub(r"([\\%_])", r"\\\1", w) + "%" for w in words]
    rows = db.execute(
        f"SELECT conversation_id, id, role, content, created_at FROM messages WHERE {where} ORDER BY id DESC LIMIT ?",
        (*patterns, limit),
    ).fetchall()
    return [SearchHit(cid, mid, role, _snippet(body, words[0], mark), at) for cid, mid, role, body, at in rows]

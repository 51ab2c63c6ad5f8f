"""The conversation history: one SQLite file shared by every chat process.

Every write commits at once, so a message survives the process being killed
the moment after it was saved: the user's message before generation starts,
the answer as soon as it ends or is interrupted. The file runs in WAL mode with
``synchronous=NORMAL``, which keeps committed transactions across a crash of
the process (not necessarily across a power cut), and a busy timeout lets two
chat processes share it. Every sqlite3 failure reaches the user as a
:class:`StoreError` naming the file and a way out, never as a traceback.

The schema and its migrations live in :mod:`chat.store_schema`, the read queries
and the records they return in :mod:`chat.store_reading`, the Markdown transcript
in :mod:`chat.transcript`; this module owns the connection, its lock, writing and errors.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from chat.backend import Timings, Usage
from chat.errors import StoreError
from chat.store_reading import (
    CONVERSATION_SELECT,
    MESSAGE_SELECT,
    Conversation,
    SearchHit,
    StoredMessage,
    conversation_from_row,
    search_messages,
)
from chat.store_schema import (
    MIGRATIONS,
    NO_HISTORY_HINT,
    SCHEMA_VERSION,
    empty_history,
    fts5_available,
    has_table,
    migrate,
    rollback,
)

BUSY_TIMEOUT_S = 5.0
ID_BYTES = 6  # 12 hex characters: short enough to type, random so short prefixes are unique
TITLE_CHARS = 80

_HINT = NO_HISTORY_HINT
_FIND_IDS = "`chat history list` shows recent conversations; `chat history search TEXT` finds one by its words"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _title(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1].rstrip() + "…"


# --- the store ---------------------------------------------------------------------------


class Store:
    """Saved conversations in one SQLite file; safe to share between processes and threads."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        """Open (or create, with its parent folders) the history database at ``path``.

        ``readonly``: only read (``chat history list/show/search/export``): nothing is created or
        migrated, and a data dir the user cannot write to is fine. A missing database reads as empty.
        """
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        self.has_fts = False
        if readonly:
            self._open_readonly()
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot create its folder ({exc.strerror or exc})", _HINT) from None
        if self.path.is_dir():
            raise StoreError(f"{self.path}: is a folder, not a history database", _HINT)
        try:
            # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves, so that
            # a writer takes the lock up front and waits (busy timeout) instead of failing.
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise self._error(exc, "cannot open") from None
        self._db = db
        try:
            with self._guard("cannot open"):
                db.execute("PRAGMA foreign_keys = ON")
                db.execute("PRAGMA journal_mode = WAL").fetchone()
                db.execute("PRAGMA synchronous = NORMAL")
                self._migrate()
                self.has_fts = self._has_table("messages_fts")
        except BaseException:
            db.close()
            self._db = None
            raise

    def _open_readonly(self) -> None:
        """Read without writing anything: ``mode=ro``, or ``immutable=1`` where a read-only folder
        keeps SQLite from creating the WAL index (no writer can be running there anyway)."""
        from urllib.parse import quote

        if not self.path.is_file():
            self._db = empty_history()  # no history yet: every read finds nothing
            return
        uri = "file:" + quote(str(self.path.resolve()))
        for extra in ("?mode=ro", "?mode=ro&immutable=1"):
            try:
                db = sqlite3.connect(
                    uri + extra, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
                )
                (version,) = db.execute("PRAGMA user_version").fetchone()
            except sqlite3.Error as exc:
                last = exc
                continue
            if version != SCHEMA_VERSION:
                db.close()
                raise StoreError(
                    f"{self.path}: schema {version}, this chat reads {SCHEMA_VERSION}",
                    "run chat once with write access to upgrade it, or " + _HINT,
                )
            self._db = db
            self.has_fts = self._has_table("messages_fts")
            return
        raise self._error(last, "cannot open for reading")

    # --- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Close the database; calling it twice is harmless."""
        with self._lock:
            if self._db is None:
                return
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA optimize")
            self._db.close()
            self._db = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- writing -----------------------------------------------------------------------

    def new_conversation(
        self, model: str | None, persona: str | None, system: str | None, sampling: dict[str, Any] | None = None
    ) -> str:
        """Start a conversation and return its id (12 hex characters)."""
        now = _now()
        with self._write("cannot save a new conversation") as db:
            while True:
                cid = secrets.token_hex(ID_BYTES)
                if db.execute("SELECT 1 FROM conversations WHERE id = ?", (cid,)).fetchone() is None:
                    break
            db.execute(
                "INSERT INTO conversations (id, created_at, updated_at, model, persona, system, sampling)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (cid, now, now, model, persona, system, json.dumps(sampling or {}, sort_keys=True)),
            )
        return cid

    def update_conversation(
        self,
        cid: str,
        *,
        title: str | None = None,
        model: str | None = None,
        persona: str | None = None,
        system: str | None = None,
        sampling: dict[str, Any] | None = None,
    ) -> None:
        """Change a conversation's metadata (e.g. the persona after a switch); None leaves a field alone."""
        fields: dict[str, Any] = {"title": title, "model": model, "persona": persona, "system": system}
        if sampling is not None:
            fields["sampling"] = json.dumps(sampling, sort_keys=True)
        fields = {k: v for k, v in fields.items() if v is not None}
        if not fields:
            return
        assignments = ", ".join(f"{k} = ?" for k in fields)
        with self._write("cannot update a conversation") as db:
            cur = db.execute(f"UPDATE conversations SET {assignments} WHERE id = ?", (*fields.values(), cid))
            if cur.rowcount == 0:
                raise self._unknown(cid)

    def add_message(
        self,
        cid: str,
        role: str,
        content: str,
        *,
        persona: str | None = None,
        model: str | None = None,
        finish_reason: str | None = None,
        usage: Usage | None = None,
        timings: Timings | None = None,
    ) -> int:
        """Append a message to conversation ``cid`` (its full id) and commit; return the message id.

        The first user message becomes the conversation's title.
        """
        now = _now()
        with self._write("cannot save a message") as db:
            row = db.execute("SELECT title FROM conversations WHERE id = ?", (cid,)).fetchone()
            if row is None:
                raise self._unknown(cid)
            (seq,) = db.execute(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM messages WHERE conversation_id = ?", (cid,)
            ).fetchone()
            cur = db.execute(
                "INSERT INTO messages (conversation_id, seq, role, content, persona, model, created_at, finish_reason,"
                " prompt_tokens, completion_tokens, ttft_s, tokens_per_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    cid,
                    seq,
                    role,
                    content,
                    persona,
                    model,
                    now,
                    finish_reason,
                    usage.prompt_tokens if usage else None,
                    usage.completion_tokens if usage else None,
                    timings.ttft_s if timings else None,
                    timings.tokens_per_s if timings else None,
                ),
            )
            title = row[0] or (_title(content) if role == "user" else "")
            db.execute("UPDATE conversations SET updated_at = ?, title = ? WHERE id = ?", (now, title, cid))
            return int(cur.lastrowid)  # type: ignore[arg-type]

    def update_message(
        self,
        message_id: int,
        *,
        content: str | None = None,
        finish_reason: str | None = None,
        usage: Usage | None = None,
        timings: Timings | None = None,
        persona: str | None = None,
        model: str | None = None,
    ) -> None:
        """Change a saved message (e.g. an answer replaced by /retry); None leaves a field alone."""
        fields: dict[str, Any] = {
            "content": content,
            "finish_reason": finish_reason,
            "persona": persona,
            "model": model,
        }
        if usage is not None:
            fields |= {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
        if timings is not None:
            fields |= {"ttft_s": timings.ttft_s, "tokens_per_s": timings.tokens_per_s}
        fields = {k: v for k, v in fields.items() if v is not None}
        if not fields:
            return
        assignments = ", ".join(f"{k} = ?" for k in fields)
        with self._write("cannot update a message") as db:
            cur = db.execute(f"UPDATE messages SET {assignments} WHERE id = ?", (*fields.values(), message_id))
            if cur.rowcount == 0:
                raise StoreError(f"{self.path}: there is no message {message_id}")

    def delete_last_answer(self, cid: str) -> int:
        """``/retry``: delete the conversation's last message if it is an answer; return how many were deleted."""
        with self._write("cannot delete a message") as db:
            return self._delete_last(db, cid, "assistant")

    def delete_last_exchange(self, cid: str) -> int:
        """``/undo``: delete the last answer and the user message before it; return how many were deleted.

        Mirrors the session: whichever of the two is at the end goes, so an unanswered
        message is undone on its own.
        """
        with self._write("cannot delete messages") as db:
            return self._delete_last(db, cid, "assistant") + self._delete_last(db, cid, "user")

    def delete_conversation(self, cid: str) -> None:
        """Delete a conversation and its messages (``cid`` may be a unique prefix)."""
        full = self.get_conversation(cid).id
        with self._write("cannot delete a conversation") as db:
            db.execute("DELETE FROM conversations WHERE id = ?", (full,))

    # --- reading -----------------------------------------------------------------------

    def last_conversation_id(self) -> str | None:
        """The conversation a message was most recently added to (for ``chat -c``)."""
        with self._read("cannot read the history") as db:
            row = db.execute("SELECT id FROM conversations ORDER BY updated_at DESC, rowid DESC LIMIT 1").fetchone()
        return row[0] if row else None

    def get_conversation(self, cid: str) -> Conversation:
        """The conversation with id ``cid``, or the only one whose id starts with it."""
        with self._read("cannot read the history") as db:
            rows = db.execute(CONVERSATION_SELECT + " WHERE c.id = ?", (cid,)).fetchall()
            if not rows and cid:
                rows = db.execute(
                    CONVERSATION_SELECT + " WHERE substr(c.id, 1, ?) = ? ORDER BY c.updated_at DESC LIMIT 6",
                    (len(cid), cid.lower()),
                ).fetchall()
        if not rows:
            raise self._unknown(cid)
        if len(rows) > 1:
            ids = ", ".join(r[0] for r in rows[:5]) + (", …" if len(rows) > 5 else "")
            raise StoreError(f"conversation id {cid!r} is ambiguous: it starts {ids}", "type more of the id")
        return conversation_from_row(rows[0])

    def messages(self, cid: str) -> list[StoredMessage]:
        """The conversation's messages in order (``cid`` may be a unique prefix)."""
        full = self.get_conversation(cid).id
        with self._read("cannot read the history") as db:
            rows = db.execute(MESSAGE_SELECT + " WHERE conversation_id = ? ORDER BY seq", (full,)).fetchall()
        return [StoredMessage(*row) for row in rows]

    def list_conversations(self, limit: int | None = 20) -> list[Conversation]:
        """The most recently updated conversations, newest first (all of them when ``limit`` is None)."""
        with self._read("cannot read the history") as db:
            rows = db.execute(
                CONVERSATION_SELECT + " ORDER BY c.updated_at DESC, c.rowid DESC LIMIT ?",
                (-1 if limit is None else limit,),
            ).fetchall()
        return [conversation_from_row(r) for r in rows]

    def count_conversations(self) -> int:
        with self._read("cannot read the history") as db:
            return int(db.execute("SELECT count(*) FROM conversations").fetchone()[0])

    def search(self, text: str, limit: int = 50, mark: tuple[str, str] = ("", "")) -> list[SearchHit]:
        """Messages containing every word of ``text`` (words match as prefixes), best matches first.

        ``mark`` wraps the matched words in the snippet, e.g. ``("[", "]")``.
        """
        with self._read("cannot search the history") as db:
            return search_messages(db, text, fts=self.has_fts, limit=limit, mark=mark)

    def export(self, cid: str, format: Literal["json", "md"] = "md") -> str:
        """The conversation as JSON (metadata + messages) or as a readable Markdown transcript."""
        conv = self.get_conversation(cid)
        messages = self.messages(conv.id)
        if format == "json":
            return json.dumps({**asdict(conv), "messages": [asdict(m) for m in messages]}, indent=2, ensure_ascii=False)
        if format == "md":
            from chat.transcript import markdown_transcript

            return markdown_transcript(conv, messages)
        raise StoreError(f"export format {format!r} is unknown", "use json or md")

    # --- internals ---------------------------------------------------------------------

    def _migrate(self) -> None:
        migrate(self._conn(), self.path)

    def _has_table(self, name: str) -> bool:
        return has_table(self._conn(), name)

    def _delete_last(self, db: sqlite3.Connection, cid: str, role: str) -> int:
        row = db.execute(
            "SELECT id, role FROM messages WHERE conversation_id = ? ORDER BY seq DESC LIMIT 1", (cid,)
        ).fetchone()
        if row is None or row[1] != role:
            return 0
        db.execute("DELETE FROM messages WHERE id = ?", (row[0],))
        return 1

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"{self.path}: the history database is closed")
        return self._db

    @contextlib.contextmanager
    def _read(self, what: str) -> Iterator[sqlite3.Connection]:
        with self._lock, self._guard(what):
            yield self._conn()

    @contextlib.contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """One committed transaction; the write lock is taken up front so the busy timeout applies."""
        with self._lock, self._guard(what):
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                rollback(db)
                raise

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise self._error(exc, what) from None

    def _error(self, exc: sqlite3.Error, what: str) -> StoreError:
        detail = str(exc)
        code = getattr(exc, "sqlite_errorname", "")
        if code.startswith("SQLITE_NOTADB") or code.startswith("SQLITE_CORRUPT") or "not a database" in detail:
            return StoreError(
                f"{self.path}: {what}: the file is damaged or not a history database ({detail})",
                "move the file aside to start a fresh history, or " + _HINT,
            )
        if code.startswith("SQLITE_BUSY") or code.startswith("SQLITE_LOCKED"):
            return StoreError(
                f"{self.path}: {what}: the database stayed locked for {BUSY_TIMEOUT_S:g} s ({detail})",
                "another chat process is holding it; try again, or run with --no-history",
            )
        if code.startswith("SQLITE_FULL"):
            return StoreError(f"{self.path}: {what}: the disk is full", "free some space, or run with --no-history")
        return StoreError(f"{self.path}: {what} ({detail})", _HINT)

    def _unknown(self, cid: str) -> StoreError:
        return StoreError(f"there is no saved conversation {cid!r}", _FIND_IDS)


__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Conversation",
    "SearchHit",
    "Store",
    "StoredMessage",
    "fts5_available",
]

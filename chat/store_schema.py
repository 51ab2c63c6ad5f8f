"""The history database's schema and how an older file is brought up to date.

The schema version lives in ``PRAGMA user_version``; :data:`MIGRATIONS` lists the
steps that bring an older file up to :data:`SCHEMA_VERSION`. Messages get an FTS5
full-text index where this Python's SQLite has FTS5 (search falls back to LIKE).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from pathlib import Path

from chat.errors import StoreError

SCHEMA_VERSION = 1
NO_HISTORY_HINT = "set CHAT_DATA_DIR to a writable folder, or run with --no-history"

_SCHEMA_V1 = [
    """CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        title TEXT NOT NULL DEFAULT '',
        model TEXT,
        persona TEXT,
        system TEXT,
        sampling TEXT NOT NULL DEFAULT '{}'
    )""",
    "CREATE INDEX conversations_updated ON conversations (updated_at)",
    """CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        role TEXT NOT NULL,
        content TEXT NOT NULL,
        persona TEXT,
        model TEXT,
        created_at TEXT NOT NULL,
        finish_reason TEXT,
        prompt_tokens INTEGER,
        completion_tokens INTEGER,
        ttft_s REAL,
        tokens_per_s REAL,
        UNIQUE (conversation_id, seq)
    )""",
]

# An external-content FTS5 index over messages.content, kept in step by triggers.
_FTS_SCHEMA = [
    "CREATE VIRTUAL TABLE messages_fts USING fts5(content, content='messages', content_rowid='id')",
    """CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
        INSERT INTO messages_fts (rowid, content) VALUES (new.id, new.content);
    END""",
    """CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
        INSERT INTO messages_fts (messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
    END""",
    """CREATE TRIGGER messages_fts_update AFTER UPDATE OF content ON messages BEGIN
        INSERT INTO messages_fts (messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
        INSERT INTO messages_fts (rowid, content) VALUES (new.id, new.content);
    END""",
    "INSERT INTO messages_fts (messages_fts) VALUES ('rebuild')",
]


def _migrate_to_1(db: sqlite3.Connection) -> None:
    for statement in _SCHEMA_V1:
        db.execute(statement)


# MIGRATIONS[n] turns a version n-1 file into version n; each runs inside the same
# write transaction that bumps user_version, so a half-migrated file never exists.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _migrate_to_1}


def fts5_available() -> bool:
    """Whether this Python's SQLite was built with FTS5 (search falls back to LIKE without it)."""
    try:
        sqlite3.connect(":memory:").execute("CREATE VIRTUAL TABLE t USING fts5(x)")
    except sqlite3.Error:
        return False
    return True


def has_table(db: sqlite3.Connection, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (name,)).fetchone() is not None


def migrate(db: sqlite3.Connection, path: Path) -> None:
    """Bring the open database at ``path`` to :data:`SCHEMA_VERSION` (and build the FTS5 index), in one transaction.

    A file written by a newer chat is a StoreError; two processes migrating at once are safe.
    """
    (version,) = db.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path}: written by a newer chat (schema {version}, this one knows {SCHEMA_VERSION})",
            "upgrade chat, or " + NO_HISTORY_HINT,
        )
    want_fts = fts5_available()
    if version == SCHEMA_VERSION and (has_table(db, "messages_fts") or not want_fts):
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        # Read again under the write lock: another process may have migrated meanwhile.
        (version,) = db.execute("PRAGMA user_version").fetchone()
        for step in range(version + 1, SCHEMA_VERSION + 1):
            MIGRATIONS[step](db)
        if want_fts and not has_table(db, "messages_fts"):
            for statement in _FTS_SCHEMA:
                db.execute(statement)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        rollback(db)
        raise


def empty_history() -> sqlite3.Connection:
    """An in-memory database with the schema: what reading a history that does not exist yet finds."""
    db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    for step in range(1, SCHEMA_VERSION + 1):
        MIGRATIONS[step](db)
    return db


def rollback(db: sqlite3.Connection) -> None:
    """Roll back an open transaction without masking the first error.

    SQLite rolls back by itself after some errors (a full disk), so there may be nothing to roll back.
    """
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")

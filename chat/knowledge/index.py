"""A card's note files, chunked into a SQLite FTS5 index in the data dir and retrieved by BM25.

``[[knowledge]] path = "notes/"`` names Markdown or text files inside the card folder. They are
read once: the index keeps each file's size, mtime and content hash, and the chunks of each
content hash, so an unchanged file is never read again, a changed one is re-chunked, and the same
file in two cards is indexed once. Each turn the recent messages become an FTS5 query (their words
OR-ed, rarer words weighing more under BM25) and the best chunks are kept within the budget.

The :class:`NotesRetriever` answers ``search(query, budget)``; prompt assembly only knows that
shape, so an embedding retriever can take its place later. A data dir that cannot be written
turns retrieval off (one note), never the conversation.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from chat.knowledge.entry import estimate_tokens

NOTE_SUFFIXES = (".md", ".markdown", ".txt", ".text", ".rst")
MAX_NOTE_FILES = 50_000  # per card
MAX_NOTE_BYTES = 4 << 20  # a larger file is skipped
CHUNK_CHARS = 1200
MAX_QUERY_TERMS = 48
MAX_RESULTS = 24
REFRESH_EVERY_S = 10.0  # how often a turn looks at the files again
_WORD = re.compile(r"\w{3,}", re.UNICODE)
_STOP = frozenset(
    "the and for are but not you your with this that have from they will would there their what when which "
    "who how can could should about into than then them these those was were been has had his her its our "
    "out all any some just like also very more most such only other".split()
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS files(path TEXT PRIMARY KEY, mtime_ns INTEGER, size INTEGER, hash TEXT);
CREATE INDEX IF NOT EXISTS files_hash ON files(hash);
CREATE TABLE IF NOT EXISTS docs(hash TEXT PRIMARY KEY, chunks INTEGER);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks USING fts5(text, title UNINDEXED, hash UNINDEXED,
    tokenize = 'unicode61 remove_diacritics 2');
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_vocab USING fts5vocab(chunks, 'row');
"""
COMMON_SHARE = 0.05  # a word in more than this share of all chunks says little and costs a scan of them all
MIN_QUERY_TERMS = 3


@dataclass(frozen=True)
class Chunk:
    """A retrieved piece of a note: where it comes from, its text, its estimated tokens."""

    title: str
    text: str
    tokens: int
    score: float = 0.0


def chunk_text(text: str, title: str) -> list[tuple[str, str]]:
    """(title, text) pieces of at most about CHUNK_CHARS, split at blank lines; a Markdown heading names its pieces."""
    pieces: list[tuple[str, str]] = []
    heading = ""
    buf: list[str] = []

    def flush() -> None:
        body = "\n\n".join(buf).strip()
        buf.clear()
        for start in range(0, len(body), CHUNK_CHARS):
            part = body[start : start + CHUNK_CHARS].strip()
            if part:
                pieces.append((f"{title} › {heading}" if heading else title, part))

    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        if para.startswith("#"):
            flush()
            heading = para.splitlines()[0].lstrip("#").strip()[:80]
        if sum(len(p) for p in buf) + len(para) > CHUNK_CHARS:
            flush()
        buf.append(para)
    flush()
    return pieces


def query_words(text: str) -> list[str]:
    """The distinct words of some messages worth searching for, newest first."""
    words: dict[str, None] = {}
    for w in reversed(_WORD.findall(text.lower())):
        if w not in _STOP and not w.isdigit():
            words.setdefault(w, None)
        if len(words) >= MAX_QUERY_TERMS:
            break
    return list(words)


def fts_query(words: list[str]) -> str:
    """The FTS5 query: the words OR-ed, each quoted (they are \\w+ only, so quoting is enough)."""
    return " OR ".join(f'"{w}"' for w in words)


class KnowledgeIndex:
    """The FTS5 index file (``knowledge.db`` in the data dir), shared by every card."""

    def __init__(self, db_path: Path) -> None:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(db_path), timeout=10, isolation_level=None)
        self.db.executescript(SCHEMA)
        self.db.execute("CREATE TEMP TABLE IF NOT EXISTS wanted(hash TEXT PRIMARY KEY)")
        self._wanted: frozenset[str] = frozenset()

    def close(self) -> None:
        self.db.close()

    def refresh(self, roots: Sequence[Path]) -> frozenset[str]:
        """Index what changed under ``roots`` (files or folders); the content hashes of their notes."""
        known = {row[0]: row[1:] for row in self.db.execute("SELECT path, mtime_ns, size, hash FROM files")}
        hashes: set[str] = set()
        seen: set[str] = set()
        self.db.execute("BEGIN")
        try:
            for path in _note_files(roots):
                try:
                    st = path.stat()
                except OSError:
                    continue
                key = str(path)
                seen.add(key)
                old = known.get(key)
                if old and old[0] == st.st_mtime_ns and old[1] == st.st_size:
                    hashes.add(old[2])
                    continue
                digest = self._add_file(path, key)
                if digest:
                    hashes.add(digest)
            gone = [p for p in known if p not in seen and any(_under(p, r) for r in roots)]
            self.db.executemany("DELETE FROM files WHERE path = ?", [(p,) for p in gone])
            if gone:
                self._drop_orphans()
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return frozenset(hashes)

    def _add_file(self, path: Path, key: str) -> str | None:
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_NOTE_BYTES + 1)
            st = os.stat(path)
        except OSError:
            return None
        if len(data) > MAX_NOTE_BYTES:
            return None
        digest = hashlib.sha256(data).hexdigest()
        if self.db.execute("SELECT 1 FROM docs WHERE hash = ?", (digest,)).fetchone() is None:
            pieces = chunk_text(data.decode("utf-8", errors="replace"), path.name)
            self.db.executemany(
                "INSERT INTO chunks(text, title, hash) VALUES (?, ?, ?)", [(t, n, digest) for n, t in pieces]
            )
            self.db.execute("INSERT INTO docs(hash, chunks) VALUES (?, ?)", (digest, len(pieces)))
        self.db.execute(
            "INSERT OR REPLACE INTO files(path, mtime_ns, size, hash) VALUES (?, ?, ?, ?)",
            (key, st.st_mtime_ns, st.st_size, digest),
        )
        return digest

    def _drop_orphans(self) -> None:
        orphans = [r[0] for r in self.db.execute("SELECT hash FROM docs WHERE hash NOT IN (SELECT hash FROM files)")]
        for digest in orphans:
            self.db.execute("DELETE FROM chunks WHERE hash = ?", (digest,))
            self.db.execute("DELETE FROM docs WHERE hash = ?", (digest,))

    def _telling_words(self, words: list[str]) -> list[str]:
        """The words that occur in the index but not in most chunks (BM25 gives those little weight anyway,
        and each one makes the query visit every chunk holding it); the rarest few when all are common."""
        if not words:
            return []
        counts = {}
        for w in words:  # one lookup per word: fts5vocab seeks on "term = ?" but scans for "term IN (…)"
            row = self.db.execute("SELECT doc FROM chunks_vocab WHERE term = ?", (w,)).fetchone()
            counts[w] = row[0] if row else 0
        present = sorted((counts[w], w) for w in words if counts.get(w))
        if not present:
            return []
        total = self.db.execute("SELECT sum(chunks) FROM docs").fetchone()[0] or 1
        limit = max(50, int(total * COMMON_SHARE))
        telling = [w for n, w in present if n <= limit]
        return telling or [w for _, w in present[:MIN_QUERY_TERMS]]

    def search(self, query: str, hashes: frozenset[str], budget: int) -> list[Chunk]:
        """The best chunks among the files with ``hashes`` for ``query``, best first, within ``budget`` tokens."""
        match = fts_query(self._telling_words(query_words(query)))
        if not match or not hashes or budget <= 0:
            return []
        if hashes != self._wanted:
            self.db.execute("DELETE FROM temp.wanted")
            self.db.executemany("INSERT OR IGNORE INTO temp.wanted(hash) VALUES (?)", [(h,) for h in hashes])
            self._wanted = hashes
        rows = self.db.execute(
            "SELECT title, text, bm25(chunks) AS score FROM chunks "
            "WHERE chunks MATCH ? AND hash IN (SELECT hash FROM temp.wanted) ORDER BY score LIMIT ?",
            (match, MAX_RESULTS),
        ).fetchall()
        out: list[Chunk] = []
        used = 0
        for title, text, score in rows:
            tokens = estimate_tokens(text)
            if used + tokens > budget:
                continue
            out.append(Chunk(title, text, tokens, score))
            used += tokens
        return out


def _note_files(roots: Sequence[Path]) -> Iterable[Path]:
    """The note files under each root (a file counts itself), inside it, at most MAX_NOTE_FILES in all."""
    n = 0
    for root in roots:
        if root.is_file():
            candidates: Iterable[Path] = [root]
        else:
            candidates = (p for p in sorted(root.rglob("*")) if p.suffix.lower() in NOTE_SUFFIXES)
        for path in candidates:
            try:
                if not path.is_file() or not path.resolve().is_relative_to(root.resolve()):
                    continue  # a link out of the card folder's notes is not followed
            except (OSError, RuntimeError):
                continue
            n += 1
            if n > MAX_NOTE_FILES:
                return
            yield path


def _under(path: str, root: Path) -> bool:
    return path == str(root) or path.startswith(str(root) + os.sep)


class NotesRetriever:
    """Retrieval over one persona's note paths; files are looked at again at most every REFRESH_EVERY_S."""

    def __init__(self, index: KnowledgeIndex | None, roots: Sequence[Path], problem: str | None = None) -> None:
        self.index = index
        self.roots = tuple(roots)
        self._hashes: frozenset[str] = frozenset()
        self._checked = 0.0
        self.problem = problem if index is not None else problem or "knowledge notes are off"

    def refresh(self) -> None:
        assert self.index is not None
        self._hashes = self.index.refresh(self.roots)
        self._checked = time.monotonic()

    def search(self, query: str, budget: int) -> list[Chunk]:
        """Chunks for ``query`` within ``budget``; an index that fails turns retrieval off with ``problem`` set."""
        if self.problem or self.index is None:
            return []
        try:
            if time.monotonic() - self._checked > REFRESH_EVERY_S:
                self.refresh()
            return self.index.search(query, self._hashes, budget)
        except (sqlite3.Error, OSError) as exc:
            self.problem = f"knowledge notes are off: the index failed ({exc})"
            return []


def retriever_for(roots: Sequence[Path], data_dir: Path | None = None) -> NotesRetriever | None:
    """A retriever over ``roots`` using the index in the data dir; None when there are no roots."""
    if not roots:
        return None
    if data_dir is None:
        from chat.config import Paths

        data_dir = Paths().data_dir
    try:
        index = KnowledgeIndex(data_dir / "knowledge.db")
    except (sqlite3.Error, OSError) as exc:
        return NotesRetriever(None, roots, f"knowledge notes are off: cannot open the index in {data_dir} ({exc})")
    return NotesRetriever(index, roots)

"""The history store on real SQLite files: round trips, ids, undo/retry, search, export, failures, durability."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from chat.backend import Timings, Usage
from chat.errors import StoreError
from chat.store import SCHEMA_VERSION, Store, fts5_available

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "data" / "history.db")
    yield s
    s.close()


def chat_with(store: Store, *pairs: tuple[str, str], persona: str = "teacher") -> str:
    cid = store.new_conversation("tiny.gguf", persona, "Be kind.", {"temperature": 0.7})
    for user, answer in pairs:
        store.add_message(cid, "user", user, model="tiny.gguf")
        store.add_message(cid, "assistant", answer, persona=persona, model="tiny.gguf", finish_reason="stop")
    return cid


# --- round trip and ordering -----------------------------------------------------------


def test_round_trip_keeps_every_field(tmp_path):
    path = tmp_path / "deep" / "er" / "history.db"
    with Store(path) as store:
        sampling = {"temperature": 0.7, "top_p": 0.9}
        cid = store.new_conversation("tiny.gguf", "teacher:0.7,pirate:0.3", "Be kind.", sampling)
        store.add_message(cid, "user", "  What is a\n noun?  ", model="tiny.gguf")
        mid = store.add_message(
            cid,
            "assistant",
            "A noun names a thing.",
            persona="teacher:0.7,pirate:0.3",
            model="tiny.gguf",
            finish_reason="stop",
            usage=Usage(prompt_tokens=12, completion_tokens=6),
            timings=Timings(ttft_s=0.05, tokens_per_s=88.5),
        )
    with Store(path) as store:  # reopened: everything was committed
        conv = store.get_conversation(cid)
        assert len(cid) == 12 and int(cid, 16) >= 0
        assert conv.title == "What is a noun?"
        assert (conv.model, conv.persona, conv.system) == ("tiny.gguf", "teacher:0.7,pirate:0.3", "Be kind.")
        assert conv.sampling == {"temperature": 0.7, "top_p": 0.9}
        assert conv.message_count == 2
        assert conv.created_at <= conv.updated_at
        user, answer = store.messages(cid)
        assert (user.seq, user.role, user.content, user.finish_reason, user.prompt_tokens) == (
            1, "user", "  What is a\n noun?  ", None, None,
        )
        assert answer.id == mid and answer.seq == 2
        assert (answer.persona, answer.finish_reason, answer.prompt_tokens, answer.completion_tokens) == (
            "teacher:0.7,pirate:0.3", "stop", 12, 6,
        )
        assert answer.ttft_s == pytest.approx(0.05) and answer.tokens_per_s == pytest.approx(88.5)
        assert answer.to_message().role == "assistant"


def test_long_first_message_makes_a_short_one_line_title(store):
    cid = store.new_conversation("m", None, None, {})
    store.add_message(cid, "user", "word " * 100)
    store.add_message(cid, "user", "second message")
    title = store.get_conversation(cid).title
    assert len(title) <= 80 and title.endswith("…") and "\n" not in title


def test_messages_keep_their_order_and_listing_is_newest_first(store):
    first = chat_with(store, ("one", "1"), ("two", "2"), ("three", "3"))
    second = chat_with(store, ("hello", "hi"))
    assert [m.content for m in store.messages(first)] == ["one", "1", "two", "2", "three", "3"]
    assert [m.seq for m in store.messages(first)] == [1, 2, 3, 4, 5, 6]
    assert [c.id for c in store.list_conversations()] == [second, first]
    assert store.last_conversation_id() == second
    store.add_message(first, "user", "back to the first")
    assert store.last_conversation_id() == first
    assert [c.id for c in store.list_conversations()] == [first, second]
    assert [c.message_count for c in store.list_conversations()] == [7, 2]
    assert len(store.list_conversations(limit=1)) == 1


def test_empty_store_has_no_last_conversation(store):
    assert store.last_conversation_id() is None
    assert store.list_conversations() == []


def test_update_message_and_conversation(store):
    cid = chat_with(store, ("hi", "partial"))
    answer = store.messages(cid)[-1]
    store.update_message(answer.id, content="partial answer", finish_reason="interrupted", usage=Usage(3, 4))
    store.update_conversation(cid, persona="pirate")
    updated = store.messages(cid)[-1]
    assert (updated.content, updated.finish_reason, updated.prompt_tokens, updated.completion_tokens) == (
        "partial answer", "interrupted", 3, 4,
    )
    assert store.get_conversation(cid).persona == "pirate"
    with pytest.raises(StoreError):
        store.update_message(999_999, content="x")


# --- ids -------------------------------------------------------------------------------


def test_unique_prefix_finds_a_conversation(store):
    cid = chat_with(store, ("hi", "hello"))
    assert store.get_conversation(cid[:4]).id == cid
    assert store.get_conversation(cid[:4].upper()).id == cid
    assert [m.content for m in store.messages(cid[:5])] == ["hi", "hello"]
    assert "# hi" in store.export(cid[:6], "md")


def test_unknown_id_says_how_to_find_ids(store):
    chat_with(store, ("hi", "hello"))
    with pytest.raises(StoreError) as err:
        store.get_conversation("zzzz")
    assert "zzzz" in err.value.message
    assert "chat history list" in err.value.hint
    with pytest.raises(StoreError):
        store.get_conversation("")
    with pytest.raises(StoreError):
        store.add_message("zzzz", "user", "hi")


def test_ambiguous_prefix_is_refused(store):
    for cid in ("abc111111111", "abc222222222"):  # fixed ids sharing a prefix
        store._conn().execute(
            "INSERT INTO conversations (id, created_at, updated_at) VALUES (?, '2024-01-01', '2024-01-01')", (cid,)
        )
    with pytest.raises(StoreError, match="ambiguous") as err:
        store.get_conversation("abc")
    assert "abc111111111" in err.value.message and "abc222222222" in err.value.message
    assert store.get_conversation("abc1").id == "abc111111111"


# --- undo / retry / delete -------------------------------------------------------------


def test_delete_last_answer_removes_only_an_answer(store):
    cid = chat_with(store, ("one", "1"), ("two", "2"))
    assert store.delete_last_answer(cid) == 1
    assert [m.content for m in store.messages(cid)] == ["one", "1", "two"]
    assert store.delete_last_answer(cid) == 0  # the last message is the user's: nothing to drop
    assert [m.content for m in store.messages(cid)] == ["one", "1", "two"]
    store.add_message(cid, "assistant", "2 again", finish_reason="stop")
    assert [m.seq for m in store.messages(cid)] == [1, 2, 3, 4]


def test_delete_last_exchange_removes_answer_and_question(store):
    cid = chat_with(store, ("one", "1"), ("two", "2"))
    assert store.delete_last_exchange(cid) == 2
    assert [m.content for m in store.messages(cid)] == ["one", "1"]
    store.add_message(cid, "user", "unanswered")
    assert store.delete_last_exchange(cid) == 1  # like the session: an unanswered message goes alone
    assert [m.content for m in store.messages(cid)] == ["one", "1"]
    assert store.delete_last_exchange(cid) == 2
    assert store.delete_last_exchange(cid) == 0
    assert store.messages(cid) == []


def test_delete_conversation_cascades(store):
    cid = chat_with(store, ("apples", "pears"))
    other = chat_with(store, ("apples too", "yes"))
    store.delete_conversation(cid[:6])
    assert [c.id for c in store.list_conversations()] == [other]
    (orphans,) = store._conn().execute("SELECT COUNT(*) FROM messages WHERE conversation_id = ?", (cid,)).fetchone()
    assert orphans == 0
    assert {h.conversation_id for h in store.search("apples")} == {other}  # the index forgot them too
    with pytest.raises(StoreError):
        store.get_conversation(cid)


# --- search ----------------------------------------------------------------------------


def test_search_finds_words_across_conversations(store):
    a = chat_with(store, ("How do rivers form?", "Rain gathers into streams."))
    b = chat_with(store, ("Tell me about rivers and mountains", "Mountains feed rivers."))
    hits = store.search("rivers")
    assert {(h.conversation_id, h.role) for h in hits} == {(a, "user"), (b, "user"), (b, "assistant")}
    assert all("rivers" in h.snippet.lower() for h in hits)
    assert {h.conversation_id for h in store.search("rivers mountains")} == {b}  # every word must match
    assert {h.conversation_id for h in store.search("moun")} == {b}  # words match as prefixes
    assert store.search("volcano") == []
    assert store.search("   ") == []
    assert len(store.search("rivers", limit=1)) == 1


def test_search_survives_query_syntax_and_follows_edits(store):
    cid = chat_with(store, ('He said "hi" (AND left) -- NEAR*', "ok"))
    assert [h.conversation_id for h in store.search('"hi" (AND NEAR*')] == [cid]
    msg = store.messages(cid)[0]
    store.update_message(msg.id, content="completely different")
    assert store.search("NEAR") == []
    assert [h.message_id for h in store.search("different")] == [msg.id]


def test_search_marks_matches_when_asked(store):
    chat_with(store, ("the quick brown fox", "jumps"))
    (hit,) = store.search("brown", mark=("[", "]"))
    assert "[brown]" in hit.snippet


def test_search_falls_back_to_like_without_fts5(tmp_path, monkeypatch):
    import chat.store_schema as schema

    monkeypatch.setattr(schema, "fts5_available", lambda: False)
    with Store(tmp_path / "h.db") as store:
        assert not store.has_fts
        cid = chat_with(store, ("100% of the_rivers", "Mountains feed rivers."))
        assert {h.role for h in store.search("rivers")} == {"user", "assistant"}
        assert [h.role for h in store.search("100%")] == ["user"]
        assert store.search("1000") == []
        assert store.search("the_r")[0].conversation_id == cid
        assert store.search("_") != [] and store.search("x_y") == []  # _ and % are literal
        (hit,) = store.search("feed", mark=("<", ">"))
        assert "<feed>" in hit.snippet
    monkeypatch.undo()
    if fts5_available():  # reopened with FTS5: the index is built for the existing messages
        with Store(tmp_path / "h.db") as store:
            assert store.has_fts
            assert {h.role for h in store.search("rivers")} == {"user", "assistant"}


# --- export ----------------------------------------------------------------------------


def test_export_json_has_metadata_and_messages(store):
    cid = chat_with(store, ("What is a noun?", "A naming word."), persona="teacher")
    data = json.loads(store.export(cid, "json"))
    assert data["id"] == cid
    assert (data["model"], data["persona"], data["system"], data["sampling"]) == (
        "tiny.gguf", "teacher", "Be kind.", {"temperature": 0.7},
    )
    assert [(m["role"], m["content"]) for m in data["messages"]] == [
        ("user", "What is a noun?"),
        ("assistant", "A naming word."),
    ]
    assert data["messages"][1]["finish_reason"] == "stop"


def test_export_markdown_is_a_readable_transcript(store):
    cid = store.new_conversation("tiny.gguf", "teacher", "Be kind.", {})
    store.add_message(cid, "user", "What is a noun?")
    store.add_message(cid, "assistant", "A naming word.", persona="teacher:0.7,pirate:0.3", finish_reason="stop")
    store.add_message(cid, "user", "And a verb?")
    store.add_message(cid, "assistant", "A doing wo", persona="teacher", finish_reason="interrupted")
    md = store.export(cid, "md")
    assert md.startswith("# What is a noun?\n")
    assert f"`{cid}`" in md and "`tiny.gguf`" in md
    assert "## System\n\nBe kind." in md
    assert md.count("## User") == 2
    assert "## Assistant (teacher:0.7,pirate:0.3)\n\nA naming word." in md
    assert "## Assistant (teacher)\n\nA doing wo\n\n*[interrupted]*" in md
    assert md.index("What is a noun?\n\n## Assistant") < md.index("And a verb?")
    with pytest.raises(StoreError):
        store.export(cid, "pdf")  # type: ignore[arg-type]


# --- the file itself -------------------------------------------------------------------


def test_database_runs_in_wal_mode_with_a_versioned_schema(store):
    db = store._conn()
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    raw = sqlite3.connect(store.path)  # WAL is a property of the file, seen by every connection
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    raw.close()


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "h.db"
    Store(path).close()
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.commit()
    raw.close()
    with pytest.raises(StoreError, match="newer") as err:
        Store(path)
    assert "upgrade" in err.value.hint


def test_two_stores_share_one_file(tmp_path):
    path = tmp_path / "h.db"
    with Store(path) as one, Store(path) as two:
        cid = chat_with(one, ("from one", "ok"))
        two.add_message(cid, "user", "from two")
        assert [m.content for m in one.messages(cid)][-1] == "from two"

        # a writer holding the lock briefly makes the other wait (busy timeout), not fail
        raw = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        raw.execute("BEGIN IMMEDIATE")
        timer = threading.Timer(0.3, lambda: raw.execute("COMMIT"))
        timer.start()
        two.add_message(cid, "assistant", "after the wait")
        timer.join()
        raw.close()
        assert one.messages(cid)[-1].content == "after the wait"


def test_closed_store_raises_store_error(tmp_path):
    store = Store(tmp_path / "h.db")
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.list_conversations()


def test_parent_is_a_file_gives_store_error(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(StoreError) as err:
        Store(blocker / "history.db")
    assert str(blocker) in err.value.message
    assert "CHAT_DATA_DIR" in err.value.hint and "--no-history" in err.value.hint


def test_path_is_a_folder_gives_store_error(tmp_path):
    with pytest.raises(StoreError, match="folder"):
        Store(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permissions")
def test_unwritable_folder_gives_store_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(StoreError) as err:
            Store(locked / "history.db")
        assert str(locked / "history.db") in err.value.message
        assert "CHAT_DATA_DIR" in err.value.hint
        with pytest.raises(StoreError):
            Store(locked / "sub" / "history.db")
    finally:
        locked.chmod(0o700)


def test_corrupt_file_gives_store_error(tmp_path):
    path = tmp_path / "history.db"
    path.write_bytes(os.urandom(8192))
    with pytest.raises(StoreError) as err:
        Store(path)
    assert str(path) in err.value.message and "damaged" in err.value.message
    assert "move the file aside" in err.value.hint


def test_truncated_database_gives_store_error(tmp_path):
    path = tmp_path / "history.db"
    with Store(path) as store:
        for i in range(50):
            chat_with(store, (f"question {i} " + "x" * 500, "answer"))
    raw = sqlite3.connect(path)
    raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    raw.close()
    data = path.read_bytes()
    path.write_bytes(data[:100] + b"\xff" * 4096 + data[4196 : len(data) // 2])
    with pytest.raises(StoreError):
        with Store(path) as store:
            for c in store.list_conversations(limit=1000):
                store.messages(c.id)


# --- durability ------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import sqlite3, sys, time
    from pathlib import Path
    from chat.store import Store

    store = Store(Path(sys.argv[1]))
    cid = store.new_conversation("m", "p", None, {})
    print(cid, flush=True)
    for i in range(20):
        store.add_message(cid, "user" if i % 2 == 0 else "assistant", f"message {i}")
        print(i, flush=True)
    # a second writer that never commits: its row must vanish with the process
    raw = sqlite3.connect(sys.argv[1], isolation_level=None)
    raw.execute("BEGIN IMMEDIATE")
    raw.execute("INSERT INTO messages (conversation_id, seq, role, content, created_at)"
                " VALUES (?, 99, 'user', 'never committed', 'x')", (cid,))
    print("open", flush=True)
    time.sleep(60)
    """
)


def test_commits_survive_sigkill(tmp_path):
    path = tmp_path / "history.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path)], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    try:
        cid = child.stdout.readline().strip()
        lines = [child.stdout.readline().strip() for _ in range(21)]
        assert lines[-1] == "open", lines
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()

    wal = path.with_name(path.name + "-wal")
    assert wal.exists() and wal.stat().st_size > 0  # the commits were only in the WAL when the process died
    with Store(path) as store:
        assert store._conn().execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        messages = store.messages(cid)
        assert [m.content for m in messages] == [f"message {i}" for i in range(20)]
        assert store.search("committed") == []
        if store.has_fts:  # the search index agrees with the table (raises if not)
            store._conn().execute("INSERT INTO messages_fts (messages_fts) VALUES ('integrity-check')")
        store.add_message(cid, "user", "after the crash")  # and the file is writable again

"""A real ``kill -9`` in the middle of a generation loses nothing already said."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess

from conftest import chat_exe


def test_kill_9_mid_generation_keeps_user_message_and_history(subprocess_env, chat_home):
    first = subprocess.run(
        chat_exe() + ["-m", "scripted", "--json", "first question"],
        capture_output=True, text=True, env=subprocess_env, timeout=60,
    )
    assert first.returncode == 0, first.stderr
    cid = json.loads(first.stdout)["conversation_id"]

    env = dict(subprocess_env, CHAT_SCRIPTED_DELAY="0.05")
    proc = subprocess.Popen(chat_exe() + ["-m", "scripted", "-c", "now sing long"], stdout=subprocess.PIPE, env=env)
    assert proc.stdout.read(5) == b"la la"  # generation is under way
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL

    db = sqlite3.connect(chat_home / "data" / "history.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = db.execute(
        "SELECT role, content FROM messages WHERE conversation_id = ? ORDER BY id", (cid,)
    ).fetchall()
    db.close()
    assert rows[:3] == [
        ("user", "first question"),
        ("assistant", "[default] echo: first question"),
        ("user", "now sing long"),
    ]

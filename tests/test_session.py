"""Session behaviour a user notices across turns: failures save nothing, /retry replaces, -c restores."""

from __future__ import annotations

import json

import pytest

from chat.backend import BackendOptions
from chat.catalog import PersonaCatalog
from chat.errors import ChatError
from chat.session import Session
from chat.store import Store


@pytest.fixture
def llama_session(tiny_gguf, chat_home):
    from chat_plugins.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(str(tiny_gguf), BackendOptions(threads=1))
    store = Store(chat_home / "history.db")
    session = Session(backend, catalog=PersonaCatalog(None), store=store, flag_sampling={"temperature": "0", "max_tokens": "6"})
    yield session, store
    backend.close()
    store.close()


def test_a_turn_refused_before_generation_saves_nothing(llama_session):
    session, store = llama_session
    "".join(session.send("first question"))
    cid = session.conversation_id
    session.set_option("logit_bias 99999:-5")  # valid setting, but not a token of this model
    with pytest.raises(ChatError):
        session.send("doomed question")
    session.set_option("logit_bias default")
    "".join(session.send("second question"))
    roles = [(m.role, m.content) for m in store.messages(cid) if m.role == "user"]
    assert roles == [("user", "first question"), ("user", "second question")]
    assert [m.role for m in session.turns] == ["user", "assistant", "user", "assistant"]


def test_retry_replaces_the_answer_only_when_the_new_one_exists(llama_session):
    session, store = llama_session
    first = "".join(session.send("keep this answer"))
    cid = session.conversation_id
    session.set_option("logit_bias 99999:1")
    with pytest.raises(ChatError):
        session.regenerate()
    assert [m.content for m in store.messages(cid)][-1] == first  # nothing lost
    assert session.turns[-1].content == first
    session.set_option("logit_bias default")
    session.set_option("temperature 1")
    session.set_option("seed 7")
    again = "".join(session.regenerate())
    msgs = store.messages(cid)
    assert [m.role for m in msgs] == ["user", "assistant"]
    assert msgs[-1].content == again


def test_back_to_back_user_messages_still_render_for_strict_templates(llama_session):
    from chat.backend import Message
    from chat.session import _alternating

    merged = _alternating([Message("user", "a"), Message("user", "b"), Message("assistant", "c")])
    assert merged == [Message("user", "a\n\nb"), Message("assistant", "c")]


def test_continue_restores_system_prompt_path_card_and_weight(cli, tmp_path):
    card = tmp_path / "mycard"
    card.mkdir()
    (card / "persona.toml").write_text('name = "mine"\nsystem = "Card prompt."\n')
    first = json.loads(cli("-m", "scripted", "--json", "-p", f"{card}:0.5", "--system", "Be terse.", "system?").stdout)
    assert first["persona"] == "mine:0.5" and first["text"] == "system: Be terse."
    again = json.loads(cli("-m", "scripted", "--json", "-c", "system?").stdout)
    assert again["persona"] == "mine:0.5"
    assert again["text"] == "system: Be terse."


def test_version_flag(cli):
    r = cli("--version")
    assert r.exit_code == 0 and r.stdout.startswith("chat ")

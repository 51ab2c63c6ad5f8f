"""Session behaviour a user notices across turns: failures save nothing, /retry replaces, -c restores."""

from __future__ import annotations

import json

import pytest

from chat.backend import BackendOptions
from chat.catalog import PersonaCatalog
from chat.errors import ChatError
from chat.samplerlayers import SamplerLayers
from chat.session import Session, Turn
from chat.store import Store


@pytest.fixture
def llama_session(tiny_gguf, chat_home):
    from chat_plugins.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(str(tiny_gguf), BackendOptions(threads=1))
    store = Store(chat_home / "history.db")
    layers = SamplerLayers(flags={"temperature": "0", "max_tokens": "6"})
    session = Session(backend, catalog=PersonaCatalog(None), store=store, layers=layers)
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


def test_back_to_back_user_messages_still_render_for_strict_templates():
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


class FailingBackend:
    """A backend plugin with a bug: its library raises a plain exception (not a ChatError) mid-answer."""

    name = "failing"

    @classmethod
    def can_load(cls, model: str) -> bool:
        return model.startswith("failing")

    def __init__(self, model: str, options: BackendOptions) -> None:
        self.model_name = model
        self.context_size = 256

    def apply(self, persona):
        return []

    def count_tokens(self, messages):
        return sum(len(m.content.split()) + 4 for m in messages)

    def stream(self, messages, sampling):
        yield "half"
        yield " an answer"
        raise RuntimeError("device lost")

    def info(self):
        return {"template": "none"}

    def close(self):
        pass


@pytest.fixture
def failing_backend(monkeypatch):
    """``chat -m failing`` picks FailingBackend, as if a plugin registered it."""
    from chat.plugins import get_registry

    monkeypatch.setitem(get_registry().backends, FailingBackend.name, FailingBackend)
    return FailingBackend


def test_a_backend_failing_mid_answer_saves_the_partial_answer_marked_error(chat_home):
    store = Store(chat_home / "history.db")
    session = Session(FailingBackend("failing", BackendOptions()), store=store)
    chunks = session.send("question")
    got = []
    with pytest.raises(RuntimeError, match="device lost"):  # the failure still reaches the caller
        for chunk in chunks:
            got.append(chunk)
    assert "".join(got) == "half an answer"
    assert session.last.finish.reason == "error"
    assert session.turns[-1] == Turn("assistant", "half an answer", "default")
    saved = store.messages(session.conversation_id)
    assert [(m.role, m.content, m.finish_reason) for m in saved] == [
        ("user", "question", None),
        ("assistant", "half an answer", "error"),
    ]
    store.close()


def test_closing_an_answer_early_is_still_interrupted_not_error(chat_home):
    store = Store(chat_home / "history.db")
    session = Session(FailingBackend("failing", BackendOptions()), store=store)
    chunks = session.send("question")
    assert next(chunks) == "half"
    chunks.close()
    assert session.last.finish.reason == "interrupted"
    assert store.messages(session.conversation_id)[-1].finish_reason == "interrupted"
    store.close()


def test_cli_says_the_answer_failed_keeps_it_as_error_and_exits_1(cli, failing_backend, chat_home):
    r = cli("-m", "failing", "--backend", "failing", "question")
    assert r.exit_code == 1
    assert r.stdout == "half an answer\n"  # what was said before the failure is shown
    assert "the answer failed: RuntimeError: device lost" in r.stderr
    assert "marked as an error" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr

    store = Store(chat_home / "data" / "history.db")
    last = store.messages(store.last_conversation_id())[-1]
    assert (last.role, last.content, last.finish_reason) == ("assistant", "half an answer", "error")
    store.close()
    assert "*[ended with an error]*" in cli("history", "show", last.conversation_id).stdout


def test_cli_json_reports_the_error_finish(cli, failing_backend):
    r = cli("-m", "failing", "--backend", "failing", "--json", "question")
    assert r.exit_code == 1
    data = json.loads(r.stdout)
    assert data["finish_reason"] == "error" and data["text"] == "half an answer"


def test_debug_shows_the_backends_own_exception(cli, failing_backend):
    with pytest.raises(RuntimeError, match="device lost"):
        cli("-m", "failing", "--backend", "failing", "--no-history", "--debug", "question")


def test_a_user_preset_is_read_from_the_paths_the_session_was_given(tmp_path, chat_home):
    from chat.config import Paths

    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "presets").mkdir(parents=True)
    (elsewhere / "presets" / "calm.toml").write_text("temperature = 0.15\n")
    paths = Paths()
    paths.config_dir = elsewhere  # not CHAT_CONFIG_DIR: only these paths know the preset
    layers = SamplerLayers.read(preset="calm", paths=paths)
    session = Session(FailingBackend("failing", BackendOptions()), layers=layers)
    assert session.sampling.temperature == 0.15
    assert session.sampling_sources["temperature"] == "preset calm"

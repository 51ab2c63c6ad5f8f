"""Chat templates: the table of well-known ones, choosing one for a file without a template, overrides, end-of-turn markers."""

from __future__ import annotations

import pytest

from chat.backend import Message
from chat.errors import ModelError, PersonaError
from chat.template import choose_template, detect_template, family_of, known_templates

CONVERSATION = [
    Message("system", "Be brief."),
    Message("user", "Hi"),
    Message("assistant", "Hello."),
    Message("user", "Why?"),
]


def tokens_of(*markers: str):
    return lambda text: text in markers


@pytest.mark.parametrize(
    "name, expected",
    [
        (
            "gemma",
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
            "<start_of_turn>user\nWhy?<end_of_turn>\n<start_of_turn>model\n",
        ),
        (
            "llama3",
            "<bos><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
            "Hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nWhy?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
        (
            "chatml",
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
            "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n",
        ),
        (
            "phi3",
            "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n<|user|>\nWhy?<|end|>\n<|assistant|>\n",
        ),
        ("mistral", "<bos>[INST] Be brief.\n\nHi [/INST] Hello.<eos>[INST] Why? [/INST]"),
        ("llama2", "<bos>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. <eos><bos>[INST] Why? [/INST]"),
        (
            "command-r",
            "<bos><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>Be brief.<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi"
            "<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Hello.<|END_OF_TURN_TOKEN|>"
            "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Why?<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
        ),
        ("deepseek", "<bos>Be brief.<｜User｜>Hi<｜Assistant｜>Hello.<｜end▁of▁sentence｜><｜User｜>Why?<｜Assistant｜>"),
    ],
)
def test_every_known_template_renders_its_family_format(name, expected):
    t = choose_template(None, override=name, bos_token="<bos>", eos_token="<eos>")
    assert t.name == name and not t.compile_error
    assert t.render(CONVERSATION) == expected
    assert t.stops, "every family names its end-of-turn marker"


@pytest.mark.parametrize(
    "tokens, architecture, family",
    [
        (("<start_of_turn>", "<end_of_turn>"), "gemma3", "gemma"),
        (("<start_of_turn>", "<end_of_turn>"), "llama", "gemma"),  # the vocabulary wins over the architecture
        (("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "llama", "llama3"),
        (("<|im_start|>", "<|im_end|>"), "llama", "chatml"),
        (("<|user|>", "<|assistant|>", "<|end|>"), "llama", "phi3"),
        (("[INST]", "[/INST]"), "llama", "mistral"),
        (("<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>"), "x", "command-r"),
        ((), "gemma3", "gemma"),
        ((), "qwen2", "chatml"),
        ((), "phi3", "phi3"),
        ((), "llama", "chatml"),  # nothing to go by: the last resort
    ],
)
def test_a_file_without_a_template_gets_one_from_its_tokens_then_its_architecture(tokens, architecture, family):
    t = choose_template(None, has_token=tokens_of(*tokens), architecture=architecture)
    assert t.name == family
    assert "no chat template" in t.reason
    if tokens:
        assert "vocabulary" in t.reason
    elif family != "chatml" or architecture == "qwen2":
        assert repr(architecture) in t.reason
    else:
        assert "last resort" in t.reason


def test_only_one_marker_of_a_family_is_not_enough():
    known, why = detect_template(tokens_of("<start_of_turn>"), "llama")
    assert known.name == "chatml" and "last resort" in why


def test_the_files_own_template_wins_and_its_family_gives_the_stops():
    source = known_templates()["llama3"].source.replace("assistant", "assistant")  # a file carrying a llama3 template
    t = choose_template(source, has_token=tokens_of("<start_of_turn>", "<end_of_turn>"))
    assert t.name == "llama3" and t.reason == "the file's own tokenizer.chat_template"
    assert "<|eot_id|>" in t.stops


def test_a_file_template_that_does_not_compile_falls_back_and_says_why():
    t = choose_template("{% for x in %}", has_token=tokens_of("<|im_start|>", "<|im_end|>"))
    assert t.name == "chatml" and "does not compile" in t.reason


def test_override_by_name_by_file_and_refusals(tmp_path):
    t = choose_template(known_templates()["chatml"].source, override="gemma", override_from="--template")
    assert t.name == "gemma" and t.reason == "set by --template"
    custom = tmp_path / "mine.jinja"
    custom.write_text("{% for m in messages %}<start_of_turn>{{ m['content'] }}{% endfor %}", encoding="utf-8")
    t = choose_template(None, override=str(custom), override_from="config models.x")
    assert t.name == "gemma" and str(custom) in t.reason and "config models.x" in t.reason
    with pytest.raises(ModelError, match="neither a known template nor a file"):
        choose_template(None, override="gemmma")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% if %}", encoding="utf-8")
    with pytest.raises(ModelError, match="does not compile"):
        choose_template(None, override=str(broken))


def test_family_of_a_template_text():
    assert family_of("... '<|im_start|>' + role ...").name == "chatml"
    assert family_of("plain {{ messages }}") is None


def test_a_card_names_a_template_by_name_or_by_a_file_inside_its_folder(tmp_path):
    from chat.persona import read_card, resolve_card

    card = tmp_path / "c"
    card.mkdir()
    (card / "t.jinja").write_text("{{ messages }}", encoding="utf-8")
    (card / "persona.toml").write_text('name = "c"\ntemplate = "t.jinja"\n', encoding="utf-8")
    loaded = read_card(card)
    assert resolve_card(loaded, lambda n: loaded).template == str((card / "t.jinja").resolve())
    (card / "persona.toml").write_text('name = "c"\ntemplate = "gemma"\n', encoding="utf-8")
    loaded = read_card(card)
    assert resolve_card(loaded, lambda n: loaded).template == "gemma"
    (card / "persona.toml").write_text('name = "c"\ntemplate = "../outside.jinja"\n', encoding="utf-8")
    with pytest.raises(PersonaError, match="outside the card folder"):
        read_card(card)
    (card / "persona.toml").write_text('name = "c"\ntemplate = "nope"\n', encoding="utf-8")
    with pytest.raises(PersonaError, match="neither a known template nor a file"):
        read_card(card)

"""The context-window policy: drop the oldest exchanges after system prompt and examples."""

import pytest

from chat.backend import Message
from chat.context import fit_context
from chat.errors import ContextOverflowError


def words(messages):
    return sum(len(m.content.split()) + 1 for m in messages)


FIXED = [Message("system", "sys " * 4), Message("user", "ex"), Message("assistant", "ex")]


def convo(n):
    out = []
    for i in range(n):
        out += [Message("user", f"q{i} " * 5), Message("assistant", f"a{i} " * 5)]
    return out + [Message("user", "last question")]


def test_everything_fits_nothing_dropped():
    fitted = fit_context(FIXED, convo(2), words, context_size=200, max_tokens=10)
    assert fitted.dropped == 0 and fitted.messages == FIXED + convo(2)


def test_oldest_exchanges_go_first_and_fixed_part_stays():
    turns = convo(6)
    fitted = fit_context(FIXED, turns, words, context_size=60, max_tokens=10)
    assert fitted.messages[:3] == FIXED
    assert fitted.messages[-1] == Message("user", "last question")
    assert fitted.dropped % 2 == 0 and fitted.dropped > 0  # whole exchanges
    assert fitted.messages[3].role == "user"
    assert fitted.prompt_tokens <= 50


def test_a_single_message_longer_than_the_context_is_an_error():
    with pytest.raises(ContextOverflowError) as err:
        fit_context(FIXED, [Message("user", "w " * 500)], words, context_size=100, max_tokens=None)
    assert "100" in err.value.message and "--ctx" in err.value.hint

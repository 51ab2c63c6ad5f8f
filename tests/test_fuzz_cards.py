"""Fuzzing the card importers: mutated PNG, JSON, CHARX and Modelfile inputs, and card JSON of the wrong shape.

Every input goes through the importer as ``chat personas import`` runs it: sniff, parse, map, and
(for what parses) write ``persona.toml`` and validate it as a card. The only failure allowed is a
ChatError; the TOML written must read back to the data mapped. A fast run is in the default
suite; the ``fuzz`` run does 10,000 inputs (CHAT_FUZZ_SEED picks them).
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest
from cardfiles import OLLAMA_FULL, OLLAMA_MARIO, charx_bytes, image, png_card, v1_doc, v2_doc, v3_doc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chat.card import validated_card
from chat.errors import ChatError
from chat.importers.cardio import parse_card_file
from chat.importers.tomlwriter import dumps

SEED = int(os.environ.get("CHAT_FUZZ_SEED", "1414"))
SEEDS = [
    png_card({"ccv3": json.dumps(v3_doc()), "chara": json.dumps(v2_doc())}),
    json.dumps(v3_doc()).encode(),
    json.dumps(v2_doc()).encode(),
    json.dumps(v1_doc()).encode(),
    charx_bytes(v3_doc(), {"assets/a.png": image()}),
    OLLAMA_FULL.encode(),
    OLLAMA_MARIO.encode(),
]

ops = st.lists(
    st.tuples(st.sampled_from(["flip", "byte", "cut", "dup", "insert"]), st.integers(0, 2**20), st.integers(0, 255)),
    min_size=1,
    max_size=4,
)
junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=20),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
text_or_junk = st.one_of(st.text(max_size=40), junk)
entry = st.fixed_dictionaries(
    {},
    optional={k: text_or_junk for k in ("content", "comment", "name", "position")}
    | {k: st.one_of(st.booleans(), junk) for k in ("enabled", "constant", "selective", "use_regex")}
    | {k: st.one_of(st.integers(-5, 5), junk) for k in ("insertion_order", "priority")}
    | {k: st.one_of(st.lists(st.text(max_size=12), max_size=3), junk) for k in ("keys", "secondary_keys")}
    | {
        "extensions": st.one_of(
            st.fixed_dictionaries(
                {}, optional={"selectiveLogic": junk, "probability": junk, "scan_depth": junk, "position": junk}
            ),
            junk,
        )
    },
)
card_data = st.fixed_dictionaries(
    {"name": st.one_of(st.text(max_size=30), junk)},
    optional={
        k: text_or_junk
        for k in (
            "description",
            "first_mes",
            "mes_example",
            "system_prompt",
            "nickname",
            "creator_notes",
            "post_history_instructions",
        )
    }
    | {
        "alternate_greetings": st.one_of(st.lists(text_or_junk, max_size=3), junk),
        "character_book": st.one_of(
            st.fixed_dictionaries(
                {"entries": st.lists(entry, max_size=3)}, optional={"token_budget": junk, "scan_depth": junk}
            ),
            junk,
        ),
        "extensions": st.one_of(st.dictionaries(st.text(max_size=5), junk, max_size=3), junk),
    },
)


def mutate(data: bytes, changes) -> bytes:
    buf = bytearray(data)
    for op, where, value in changes:
        at = where % (len(buf) or 1)
        if op == "flip" and buf:
            buf[at] ^= 1 << (value % 8)
        elif op == "byte" and buf:
            buf[at] = value
        elif op == "cut":
            del buf[at:]
        elif op == "dup":
            buf[at:at] = buf[at : at + value]
        else:
            buf[at:at] = bytes([value]) * (value % 7 + 1)
    return bytes(buf)


def run_importer(raw: bytes, folder: Path) -> None:
    """The whole import but the final rename: parse, map, write TOML, read it back, validate as a card."""
    try:
        imported = parse_card_file(raw, folder / "card.bin")
        text = dumps(imported.card)
        assert tomllib.loads(text) == imported.card
        validated_card(folder, folder / "persona.toml", tomllib.loads(text), "user")
    except ChatError:
        pass


def _check(tmp_path_factory, n: int, derandomize: bool):
    folder = tmp_path_factory.mktemp("fuzzcards")
    count = [0]

    @settings(
        max_examples=n, deadline=None, database=None, derandomize=derandomize, suppress_health_check=list(HealthCheck)
    )
    @given(st.one_of(st.tuples(st.sampled_from(range(len(SEEDS))), ops), card_data))
    def case(value):
        count[0] += 1
        if isinstance(value, tuple):
            raw = mutate(SEEDS[value[0]], value[1])
        else:
            doc = {"spec": "chara_card_v3", "spec_version": "3.0", "data": value}
            raw = json.dumps(doc).encode("utf-8", "surrogatepass")
            run_importer(png_card({"ccv3": raw}), folder)
        run_importer(raw, folder)

    case()
    return count[0]


def test_importers_survive_mutated_and_misshapen_cards_fast(tmp_path_factory):
    assert _check(tmp_path_factory, 150, True) == 150


@pytest.mark.fuzz
def test_importers_survive_ten_thousand_inputs(tmp_path_factory):
    import random

    random.seed(SEED)
    assert _check(tmp_path_factory, 10_000, False) >= 10_000


def test_charx_naming_a_zip_version_python_cannot_read_is_one_error(tmp_path):
    """Found by the long fuzz run: zipfile raises NotImplementedError for 'zip file version 8.4'."""
    data = bytearray(charx_bytes(v3_doc(), {"assets/a.png": image()}))
    at = data.index(b"PK\x01\x02")  # the central directory: version made by (2 bytes), version needed (2 bytes)
    data[at + 6] = 84
    with pytest.raises(ChatError, match="not a readable zip"):
        parse_card_file(bytes(data), tmp_path / "odd.charx")

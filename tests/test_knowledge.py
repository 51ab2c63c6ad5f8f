"""Lorebook activation (one case per rule), prompt assembly, and FTS5 retrieval of a card's notes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from chat.backend import Message
from chat.knowledge.entry import KnowledgeItem
from chat.knowledge.index import KnowledgeIndex, NotesRetriever
from chat.knowledge.lorebook import activate
from chat.persona import Example, Persona
from chat.prompt import assemble, static_system


def lore(text: str, *keys: str, **kw) -> KnowledgeItem:
    return KnowledgeItem(text=text, keys=tuple(keys), **kw)


def fired(entries, messages, **kw) -> list[str]:
    return [f.entry.text for f in activate(entries, messages, **kw).fired if f.kept]


@pytest.mark.parametrize(
    "entry, messages, fires",
    [
        (lore("D", "dragon"), ["a dragon!"], True),  # a key hit
        (lore("D", "dragon"), ["a wyvern"], False),  # a miss
        (lore("D", "dragon"), ["A DRAGON"], True),  # case-insensitive by default
        (lore("D", "Dragon", case_sensitive=True), ["a dragon"], False),
        (lore("D", "dragon", whole_words=True), ["dragonfly"], False),
        (lore("D", "dragon", whole_words=True), ["the dragon."], True),
        (lore("D", r"/drag(o|0)n/i", use_regex=True), ["DRAG0N"], True),
        (lore("D", "dragon", enabled=False), ["dragon"], False),  # disabled
        (lore("D", constant=True), ["nothing"], True),  # constant
        (lore("D", "dragon", secondary_keys=("fire", "ice")), ["dragon ice"], True),  # and_any
        (lore("D", "dragon", secondary_keys=("fire", "ice")), ["dragon"], False),
        (lore("D", "dragon", secondary_keys=("fire", "ice"), selective_logic="and_all"), ["dragon ice"], False),
        (lore("D", "dragon", secondary_keys=("fire", "ice"), selective_logic="and_all"), ["dragon ice fire"], True),
        (lore("D", "dragon", secondary_keys=("fire", "ice"), selective_logic="not_any"), ["dragon ice"], False),
        (lore("D", "dragon", secondary_keys=("fire", "ice"), selective_logic="not_any"), ["dragon"], True),
        (lore("D", "dragon", secondary_keys=("fire", "ice"), selective_logic="not_all"), ["dragon fire ice"], False),
        (lore("D", "dragon", secondary_keys=("fire", "ice"), selective_logic="not_all"), ["dragon fire"], True),
        (lore("D", "dragon", probability=0), ["dragon"], False),
        (KnowledgeItem(text="plain fact"), ["anything"], False),  # plain facts live outside the lorebook
    ],
)
def test_activation_rules(entry, messages, fires):
    assert fired([entry], messages) == (["D"] if fires else [])


def test_scan_depth_card_default_and_entry_override():
    history = ["the dragon", "b", "c"]
    assert fired([lore("D", "dragon")], history, scan_depth=2) == []
    assert fired([lore("D", "dragon")], history, scan_depth=3) == ["D"]
    assert fired([lore("D", "dragon", scan_depth=3)], history, scan_depth=1) == ["D"]
    assert fired([lore("D", "dragon")], history, scan_depth=0) == []


def test_budget_drops_lowest_priority_first_and_keeps_insertion_order():
    entries = [
        lore("a" * 400, "x", priority=1, insertion_order=1),  # 100 tokens, lowest priority
        lore("b" * 400, "x", priority=5, insertion_order=3),
        lore("c" * 400, "x", priority=9, insertion_order=2),
    ]
    result = activate(entries, ["x"], token_budget=200)
    assert [f.entry.text[0] for f in result.fired if f.kept] == ["c", "b"]  # by insertion order
    dropped = [f for f in result.fired if not f.kept]
    assert [f.entry.text[0] for f in dropped] == ["a"] and "over the token budget" in dropped[0].reason
    assert result.used_tokens == 200


def test_recursion_lets_entries_fire_entries_only_when_on():
    entries = [lore("The castle has a moat.", "castle"), lore("Moats hold eels.", "moat"), lore("Eels bite.", "eel")]
    assert fired(entries, ["to the castle"]) == ["The castle has a moat."]
    both = activate(entries, ["to the castle"], recursive=True)
    assert [f.entry.text for f in both.fired] == [e.text for e in entries]
    assert "recursion" in both.fired[1].reason


def test_probability_uses_the_given_random_source():
    entry = lore("D", "dragon", probability=50)
    hits = sum(bool(fired([entry], ["dragon"], rng=random.Random(i))) for i in range(200))
    assert 60 < hits < 140


def test_assemble_orders_parts_resolves_macros_and_keeps_plain_facts():
    persona = Persona(
        name="sera",
        nickname="Sera",
        system="{{original}} Be brief.",
        character=(("Description", "Guards {{user}}."), ("Scenario", "A glade.")),
        examples=(Example("Who?", "I am {{char}}."),),
        knowledge=(
            lore("Before text about <BOT>.", "dragon"),
            lore("After text.", "dragon", position="after_char"),
            KnowledgeItem(text="Sky is blue", title="Fact"),
        ),
        post_history_instructions="Answer as {{char}}.",
    )
    prompt = assemble(persona, [Message("user", "a dragon")], user_name="Ann")
    system = prompt.fixed[0].content
    assert system == (
        "Write Sera's next reply in a fictional chat between Sera and Ann. Be brief.\n\nBefore text about Sera."
        "\n\nDescription:\nGuards Ann.\n\nScenario:\nA glade.\n\nAfter text.\n\nWhat you know:\n- Fact: Sky is blue"
    )
    assert prompt.fixed[2] == Message("assistant", "I am Sera.")
    assert prompt.conversation == [Message("user", "a dragon\n\nAnswer as Sera.")]
    assert [line.split(":")[0] for line in prompt.knowledge_lines()] == ["lorebook", "lorebook"]
    assert static_system(persona, user_name="Ann") == system.replace("\n\nBefore text about Sera.", "").replace(
        "\n\nAfter text.", ""
    )


def test_a_plain_card_prompt_is_as_before():
    persona = Persona(name="t", system="You teach.", knowledge=(KnowledgeItem(text="x"),))
    assert assemble(persona, []).fixed == [Message("system", "You teach.\n\nWhat you know:\n- x")]
    assert assemble(persona, [], system="Other.").fixed[0].content == "Other.\n\nWhat you know:\n- x"


def test_retrieval_picks_the_right_chunk_among_hundreds_and_reindexes_changes(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    for i in range(300):
        (notes / f"note{i:03}.md").write_text(f"# Note {i}\n\nRoutine entry {i} about weather and crops.\n")
    (notes / "secret.md").write_text("# Vault\n\nThe vault combination is hidden under the lighthouse stairs.\n")
    index = KnowledgeIndex(tmp_path / "data" / "knowledge.db")
    retriever = NotesRetriever(index, [notes])
    found = retriever.search("where is the vault combination?", 200)
    assert found and found[0].title == "secret.md › Vault" and "lighthouse" in found[0].text
    (notes / "secret.md").write_text("The vault moved to the windmill.\n")
    retriever._checked = 0.0  # the next turn looks at the files again
    assert "windmill" in retriever.search("vault", 200)[0].text
    assert retriever.search("vault", 1) == []  # nothing fits a budget of one token


def test_card_with_notes_folder_reaches_the_prompt(cli, chat_home, tmp_path):
    folder = chat_home / "config" / "personas" / "librarian"
    (folder / "notes").mkdir(parents=True)
    (folder / "notes" / "a.md").write_text("The library opens at nine.\n")
    (folder / "notes" / "b.txt").write_text("Cats are not allowed.\n")
    (folder / "persona.toml").write_text('name = "librarian"\nsystem = "You help."\n[[knowledge]]\npath = "notes"\n')
    r = cli("-m", "scripted", "-p", "librarian", "--show-prompt", "when does the library open?")
    assert r.exit_code == 0, r.output
    assert "From a.md:\nThe library opens at nine." in r.stdout and "Cats" not in r.stdout
    assert "notes: a.md" in r.stderr
    outside = 'name = "x"\n[[knowledge]]\npath = "../../"\n'
    (folder / "persona.toml").write_text(outside)
    assert "outside the card folder" in cli("personas", "validate", str(folder)).output


def test_card_rejects_catastrophic_regex_keys(cli, tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "persona.toml").write_text('name = "c"\n[[knowledge]]\ntext = "t"\nkeys = ["(a+)+$"]\nuse_regex = true\n')
    r = cli("personas", "validate", str(folder))
    assert r.exit_code == 4 and "take forever" in r.output


def test_scan_of_a_huge_message_stays_fast():
    import time

    entries = [lore(f"entry {i}", f"key{i}", whole_words=True) for i in range(1000)]
    start = time.perf_counter()
    activate(entries, ["word " * 200_000])
    assert time.perf_counter() - start < 2.0
    assert Path  # keep the import used

"""Resolving cards: extends merge rules and persona mixing."""

from pathlib import Path

import pytest

from chat.catalog import PersonaCatalog
from chat.errors import PersonaError
from chat.persona import parse_mix


def card(root: Path, name: str, body: str, files=()):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "persona.toml").write_text(f'name = "{name}"\n{body}', encoding="utf-8")
    for f in files:
        (folder / f).parent.mkdir(parents=True, exist_ok=True)
        (folder / f).write_bytes(b"GGUF")
    return folder


@pytest.fixture
def catalog(tmp_path, chat_home):
    root = tmp_path / "cards"
    card(root, "base", 'system = "BASE"\ngreeting = "hi"\n[sampling]\ntemperature = 0.5\ntop_k = 10\n[[examples]]\nuser = "u0"\nassistant = "a0"\n')
    card(
        root, "a",
        'extends = ["base"]\nsystem = "A"\n[sampling]\ntemperature = 0.9\n[[examples]]\nuser = "u1"\nassistant = "a1"\n'
        '[[adapters]]\npath = "x.gguf"\nscale = 0.5\n[[adapters]]\npath = "shared.gguf"\nscale = 1.0\n',
        files=["x.gguf", "shared.gguf"],
    )
    card(root, "b", 'system = "B"\n[sampling]\nmin_p = 0.1\n[[steering]]\npath = "v.gguf"\nscale = 2.0\nlayers = [1, 3]\n', files=["v.gguf"])
    return PersonaCatalog(root)  # the test dir stands in for the user's personas folder


def test_extends_merges_parent_first(catalog):
    p = catalog.resolve("a")
    assert p.system == "A" and p.greeting == "hi"
    assert [e.user for e in p.examples] == ["u0", "u1"]
    assert p.sampling == {"temperature": 0.9, "top_k": 10}


def test_mix_scales_parts_by_weight_and_merges_prompts_in_order(catalog):
    p = catalog.resolve("a:0.7,b:0.3")
    assert p.label == "a:0.7,b:0.3"
    assert p.system == "A\n\nB"
    scales = {a.path.name: a.scale for a in p.adapters}
    assert scales == {"x.gguf": pytest.approx(0.35), "shared.gguf": pytest.approx(0.7)}
    assert [(s.path.name, s.scale, s.layers) for s in p.steering] == [("v.gguf", pytest.approx(0.6), (1, 3))]
    assert p.sampling == {"temperature": 0.9, "top_k": 10}  # the first card's sampler settings only


def test_same_adapter_in_two_mixed_cards_adds_scales(catalog, tmp_path):
    shared = tmp_path / "cards" / "a" / "shared.gguf"
    card(tmp_path / "cards", "c", f'[[adapters]]\npath = "{shared}"\nscale = 1.0\n')
    p = catalog.resolve("a:0.5,c:0.25")
    scales = {a.path.name: a.scale for a in p.adapters}
    assert scales["shared.gguf"] == pytest.approx(0.5 + 0.25)


def test_parameter_key_ignores_prompt_parts(catalog):
    assert catalog.resolve("a").parameter_key == catalog.resolve("a:1").parameter_key
    assert catalog.resolve("a").parameter_key != catalog.resolve("a:0.5").parameter_key


@pytest.mark.parametrize("spec", ["a:x", "a:99", ""])
def test_bad_mix_specs(spec):
    with pytest.raises(PersonaError):
        parse_mix(spec)

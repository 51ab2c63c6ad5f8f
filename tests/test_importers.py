"""``chat personas import`` / ``export``: Character Cards V1/V2/V3 (PNG, JSON, CHARX) and ollama Modelfiles."""

from __future__ import annotations

import io
import json
import subprocess
import tomllib
import zipfile
from pathlib import Path

import pytest
from cardfiles import OLLAMA_FULL, OLLAMA_MARIO, charx_bytes, chunk, image, png_card, v1_doc, v2_doc, v3_doc
from conftest import chat_exe

from chat.importers import CardFileError, modelfile, png
from chat.importers.cardio import parse_card_file


def _card_dir(chat_home: Path, name: str) -> Path:
    return chat_home / "config" / "personas" / name


def _png_doc(data: bytes) -> dict:
    return json.loads(png.card_texts(data, Path("x"))["ccv3"])


def _export(cli, name: str, fmt: str, target: Path) -> bytes:
    r = cli("personas", "export", name, "--format", fmt, "-o", str(target), "--force")
    assert r.exit_code == 0, r.output
    return target.read_bytes()


def test_png_v3_import_maps_fields_and_round_trips_every_field(cli, chat_home, tmp_path):
    doc = v3_doc()
    src = tmp_path / "sera.png"
    src.write_bytes(
        png_card({"chara": json.dumps({"spec": "chara_card_v2", "data": {"name": "Stale"}}), "ccv3": json.dumps(doc)})
    )
    r = cli("personas", "import", str(src))
    assert r.exit_code == 0, r.output
    assert "Character Card V3 in PNG" in r.stdout  # ccv3 preferred over chara
    assert "first_mes → greeting" in r.stdout and "kept as metadata: extensions" in r.stdout
    card = tomllib.loads((_card_dir(chat_home, "seraphina") / "persona.toml").read_text())
    assert card["character"]["name"] == "Seraphina" and card["nickname"] == "Sera"
    assert card["greeting"] == doc["data"]["first_mes"] and card["greetings"] == doc["data"]["alternate_greetings"]
    assert card["examples"][0] == {"user": "Who are you?", "assistant": "I am <BOT>."}
    assert [k.get("title") for k in card["knowledge"]] == ["Dragons", "Elves", None]
    assert card["knowledge"][1]["selective_logic"] == "and_all" and card["knowledge"][1]["position"] == "after_char"

    out = _export(cli, "seraphina", "png", tmp_path / "out.png")
    assert _png_doc(out)["data"] == doc["data"]  # every field, unknown extensions and nulls included
    assert json.loads(png.card_texts(out, Path("x"))["chara"])["spec"] == "chara_card_v2"
    again = tmp_path / "again"
    again.mkdir()
    (again / "sera.png").write_bytes(out)
    assert cli("personas", "import", str(again / "sera.png"), "--name", "sera2").exit_code == 0
    assert _png_doc(_export(cli, "sera2", "png", tmp_path / "out2.png"))["data"] == doc["data"]
    assert out.startswith(png.SIGNATURE) and b"IDAT" in out  # the avatar image travels


@pytest.mark.parametrize("fmt", ["json", "charx"])
def test_v2_json_and_charx_round_trip_with_assets(cli, chat_home, tmp_path, fmt):
    if fmt == "json":
        doc = v2_doc()
        (tmp_path / "card.json").write_text(json.dumps(doc))
        src = tmp_path / "card.json"
    else:
        doc = v3_doc()
        src = tmp_path / "card.charx"
        src.write_bytes(charx_bytes(doc, {"assets/icon/images/main.png": image(), "x/readme.txt": b"hi"}))
    assert cli("personas", "import", str(src), "--name", "c").exit_code == 0
    first = json.loads(_export(cli, "c", "json", tmp_path / "a.json"))
    assert first["spec"] == "chara_card_v3"
    assert first["data"] == {"group_only_greetings": [], **doc["data"]}  # every field kept; V3 requires this one
    if fmt == "charx":
        with zipfile.ZipFile(io.BytesIO(_export(cli, "c", "charx", tmp_path / "a.charx"))) as z:
            assert z.read("assets/icon/images/main.png") == image() and z.read("x/readme.txt") == b"hi"
            assert json.loads(z.read("card.json"))["data"] == {"group_only_greetings": [], **doc["data"]}
    assert cli("personas", "import", str(tmp_path / "a.json"), "--name", "d").exit_code == 0
    assert json.loads(_export(cli, "d", "json", tmp_path / "b.json")) == first


def test_v1_json_becomes_a_card_and_exports_as_v3(cli, chat_home, tmp_path):
    (tmp_path / "old.json").write_text(json.dumps(v1_doc()))
    r = cli("personas", "import", str(tmp_path / "old.json"))
    assert r.exit_code == 0 and "Character Card V1 in JSON" in r.stdout
    card = tomllib.loads((_card_dir(chat_home, "old-timer") / "persona.toml").read_text())
    assert card["examples"] == [{"user": "hi", "assistant": "go away"}]
    out = json.loads(_export(cli, "old-timer", "json", tmp_path / "o.json"))
    assert out["data"]["chat"] == "x-123" and out["data"]["personality"] == "grumpy"


def test_an_edit_in_persona_toml_changes_only_that_field_on_export(cli, chat_home, tmp_path):
    (tmp_path / "c.json").write_text(json.dumps(v3_doc()))
    cli("personas", "import", str(tmp_path / "c.json"), "--name", "c")
    toml = _card_dir(chat_home, "c") / "persona.toml"
    text = toml.read_text().replace('greeting = "Hello {{user}}, I am {{char}}."', 'greeting = "Changed."')
    text = text.replace('text = "Dragons sleep under the mountain."', 'text = "Dragons are awake."')
    toml.write_text(text)
    out = json.loads(_export(cli, "c", "json", tmp_path / "e.json"))["data"]
    want = v3_doc()["data"]
    assert out["first_mes"] == "Changed."
    entry = out["character_book"]["entries"][0]
    assert entry["content"] == "Dragons are awake." and entry["extensions"]["vendor"] == [1, None, {"x": True}]
    assert out["character_book"]["entries"][1:] == want["character_book"]["entries"][1:]
    assert {k: v for k, v in out.items() if k not in ("first_mes", "character_book")} == {
        k: v for k, v in want.items() if k not in ("first_mes", "character_book")
    }


def test_prompt_uses_mapping_macros_lorebook_and_post_history(cli, chat_home, tmp_path):
    (tmp_path / "c.json").write_text(json.dumps(v3_doc()))
    cli("personas", "import", str(tmp_path / "c.json"), "--name", "c")
    (chat_home / "config" / "config.toml").write_text('user_name = "Ann"\n')
    r = cli("-m", "scripted", "-p", "c", "--show-prompt", "--ctx", "4096", "where is the dragon?")
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "Write Sera's next reply in a fictional chat between Sera and Ann. Stay in character." in out
    assert out.index("Stay in character.") < out.index("Dragons sleep") < out.index("Description:\nA guardian of Ann")
    assert "Elves fear war." not in out  # its keys are not in the conversation
    assert "where is the dragon?\n\nReply in two sentences.</user>" in out
    assert "<assistant>I am Sera.</assistant>" in out
    assert "lorebook: 'Dragons'" in r.stderr and "key 'dragon'" in r.stderr and "constant" in r.stderr


def test_greeting_flag_is_checked_against_the_cards_greetings(cli, chat_home, tmp_path):
    (tmp_path / "c.json").write_text(json.dumps(v3_doc()))
    cli("personas", "import", str(tmp_path / "c.json"), "--name", "c")
    r = cli("-m", "scripted", "-p", "c", "--greeting", "9", "hi")
    assert r.exit_code == 2 and "has 3 greeting(s)" in r.output
    show = cli("personas", "show", "c").stdout
    assert "3. Oh, it's you." in show and "Made for testing." in show


def test_modelfile_import_maps_instructions_and_exports_unchanged(cli, chat_home, tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    (tmp_path / "Pirate.Modelfile").write_text(OLLAMA_FULL)
    r = cli("personas", "import", str(tmp_path / "Pirate.Modelfile"))
    assert r.exit_code == 0, r.output
    assert "TEMPLATE" in r.stdout and "num_gpu" in r.stdout and "missing-adapter.gguf" in r.stdout
    card = tomllib.loads((_card_dir(chat_home, "pirate") / "persona.toml").read_text())
    assert card["model"] == str((tmp_path / "model.gguf").resolve())
    assert card["sampling"] == {
        "top_k": 40,
        "penalty_last_n": 64,
        "max_tokens": 128,
        "stop": ["<|im_end|>", "<|im_start|>"],
    }
    assert card["system"] == "You are a\nhelpful pirate." and len(card["examples"]) == 2
    assert card["license"].startswith("MIT License")
    assert _export(cli, "pirate", "modelfile", tmp_path / "out").decode() == OLLAMA_FULL
    card_file = _card_dir(chat_home, "pirate") / "persona.toml"
    card_file.write_text(card_file.read_text().replace("top_k = 40", "top_k = 7"))
    again = modelfile.parse(_export(cli, "pirate", "modelfile", tmp_path / "out").decode(), Path("m"))
    assert ("top_k", "7") in [(k, v) for k, v, _ in again.parameters] and "num_gpu" in [
        k for k, _, _ in again.parameters
    ]
    assert again.template is not None and again.template.startswith("{{ if .System }}")


def test_modelfile_parser_follows_ollamas_documented_example():
    mf = modelfile.parse(OLLAMA_MARIO, Path("Modelfile"))
    assert mf.model == "llama3.2" and mf.system == "You are Mario from super mario bros, acting as an assistant."
    assert [(k, v) for k, v, _ in mf.parameters] == [("temperature", "1"), ("num_ctx", "4096")]
    card, _ = modelfile.card_from_modelfile(mf, "mario", Path("."))
    assert card["context_size"] == 4096 and card["sampling"] == {"temperature": 1} and card["model"] == "llama3.2"


@pytest.mark.parametrize(
    "text, needle",
    [
        ("FROM x\nBOGUS y\n", "line 2: unknown instruction 'BOGUS'"),
        ('FROM x\nSYSTEM """never closed\n\n', 'line 2: SYSTEM: """ is never closed'),
        ("FROM x\n\nMESSAGE narrator hi\n", "line 3: MESSAGE role 'narrator'"),
        ("# only a comment\nSYSTEM hi\n", "no FROM instruction"),
        ('FROM x\nSYSTEM """a"""  trailing\n', "line 2: text after the closing quotes"),
        ("FROM x\nPARAMETER num_ctx lots\n", "num_ctx"),
    ],
)
def test_modelfile_errors_name_the_line(tmp_path, text, needle):
    with pytest.raises(CardFileError) as err:
        parse_card_file(text.encode(), tmp_path / "Modelfile")
    assert needle in err.value.message


def test_bad_card_files_are_one_line_each(cli, tmp_path):
    big = tmp_path / "big.png"
    body = b"ccv3\0" + b"A" * (50 << 20)
    big.write_bytes(image()[:-12] + chunk(b"tEXt", body) + image()[-12:])
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("card.json", json.dumps(v3_doc()))
        z.writestr("assets/zeros.bin", b"\0" * (10 << 20))
    (tmp_path / "bomb.charx").write_bytes(bomb.getvalue())
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("card.json", json.dumps(v3_doc()))
        z.writestr("../../escape.txt", b"x")
    (tmp_path / "evil.charx").write_bytes(evil.getvalue())
    bad_type = v3_doc()
    bad_type["data"]["alternate_greetings"] = ["ok", 5]
    (tmp_path / "type.json").write_text(json.dumps(bad_type))
    (tmp_path / "nocard.png").write_bytes(image())
    cases = {
        "big.png": "the 'ccv3' chunk is 52,428,805 bytes",
        "bomb.charx": "a zip bomb",
        "evil.charx": "points outside the card",
        "type.json": "data.alternate_greetings[1]: expected text (got 5)",
        "nocard.png": "holds no character card",
    }
    for name, needle in cases.items():
        r = cli("personas", "import", str(tmp_path / name))
        assert r.exit_code == 4, (name, r.output)
        assert needle in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path.parent / "escape.txt").exists()


def test_import_and_export_in_a_real_subprocess(subprocess_env, chat_home, tmp_path):
    src = tmp_path / "sera.png"
    src.write_bytes(png_card({"ccv3": json.dumps(v3_doc())}))
    run = subprocess.run(
        [*chat_exe(), "personas", "import", str(src)], env=subprocess_env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    again = subprocess.run(
        [*chat_exe(), "personas", "import", str(src)], env=subprocess_env, capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    out = tmp_path / "out.json"
    run = subprocess.run(
        [*chat_exe(), "personas", "export", "seraphina", "-f", "json", "-o", str(out)],
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(out.read_text())["data"] == v3_doc()["data"]

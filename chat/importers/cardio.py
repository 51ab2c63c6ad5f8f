"""A card file ⇄ a card folder: sniff the format, map it, write the folder; export it back.

The folder an import makes holds ``persona.toml`` (what chat uses; edit it freely),
``imported.json`` (the file's card data as read, and the card data as first written, so an export
can tell what the user changed), and the assets: ``avatar.png`` from a PNG card, ``charx/…`` from a
CHARX zip. The folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from chat.card import CARD_FILE, NAME_RULE, card_data, is_valid_name, validated_card
from chat.errors import ConfigError, PersonaError, UsageError
from chat.importers import MAX_INPUT_BYTES, CardFileError, ccjson, charx, mapping, modelfile, png
from chat.importers.tomlwriter import dumps
from chat.tomlfile import quote, read_regular

SOURCE_FILE = "imported.json"
AVATAR = "avatar.png"
ASSETS = "charx"
FORMATS = ("png", "json", "charx", "modelfile")
Format = Literal["png", "json", "charx", "modelfile"]


@dataclass
class Imported:
    """A card file read and mapped, not yet written."""

    card: dict[str, Any]
    report: mapping.Report
    kind: str  # "Character Card V3 in PNG", "ollama Modelfile", …
    source: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)


def read_bytes(path: Path, limit: int = MAX_INPUT_BYTES) -> bytes:
    """A regular file's bytes, at most ``limit`` (a FIFO or device is refused without blocking)."""
    return read_regular(path, CardFileError, limit, "import a PNG, JSON, CHARX or Modelfile")


def parse_card_file(raw: bytes, where: Path, name: str | None = None) -> Imported:
    """Map a card file's bytes to our card; ``name``: the card's name (default: from the character's)."""
    files: dict[str, bytes] = {}
    if png.is_png(raw):
        raw_json = png.card_json(raw, where)
        doc = ccjson.parse(raw_json, where)
        files[AVATAR] = png.with_card(raw, {})
        container, fmt = "PNG", "png"
    elif charx.is_zip(raw):
        raw_json, assets = charx.read(raw, where)
        doc = ccjson.parse(raw_json, where)
        files.update({f"{ASSETS}/{k}": v for k, v in assets.items()})
        container, fmt = "CHARX", "charx"
    elif raw.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{"):
        raw_json = raw
        doc = ccjson.parse(raw, where)
        container, fmt = "JSON", "json"
    else:
        return _modelfile(raw, where, name)
    data = doc["data"]
    name = name or mapping.folder_name(data.get("name") or "", mapping.folder_name(where.stem))
    card, report = mapping.card_from_data(data, name)
    source = {"format": fmt, "document": doc}
    return Imported(card, report, f"Character Card {ccjson.version(doc, raw_json)} in {container}", source, files)


def _modelfile(raw: bytes, where: Path, name: str | None) -> Imported:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CardFileError(
            f"{where}: not a card: neither PNG, CHARX, JSON nor a UTF-8 Modelfile (byte {exc.start})",
            "import a Character Card (PNG, JSON, CHARX) or an ollama Modelfile",
        ) from None
    mf = modelfile.parse(text, where)
    stem = where.stem if where.name.lower() != "modelfile" else where.parent.name
    name = name or mapping.folder_name(stem, "modelfile")
    card, report = modelfile.card_from_modelfile(mf, name, where.parent)
    return Imported(card, report, "ollama Modelfile", {"format": "modelfile", "modelfile": text})


def save(imported: Imported, personas_dir: Path, where: Path, *, force: bool = False) -> Path:
    """Write the card folder under ``personas_dir``; the card is validated before it lands."""
    name = imported.card["name"]
    if not is_valid_name(name):
        raise UsageError(f"{quote(name)} is not a valid persona name", NAME_RULE)
    folder = personas_dir / name
    if os.path.lexists(folder) and not force:
        raise UsageError(f"{folder} already exists", "pick another --name, or pass --force to replace it")
    tmp = personas_dir / f".importing-{name}-{os.getpid()}"
    text = f"# imported from {where.name} ({imported.kind}); {SOURCE_FILE} keeps the original for export\n"
    text += dumps(imported.card)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for rel, body in imported.files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(body)
        (tmp / CARD_FILE).write_text(text, encoding="utf-8")
        snapshot = tomllib.loads(text)
        _check(tmp, where, snapshot)
        source = {**imported.source, "card": snapshot}
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=1), encoding="utf-8")
        if os.path.lexists(folder):
            if not (folder / CARD_FILE).is_file():
                raise UsageError(f"{folder} is not a card folder", "--force only replaces a card")
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except OSError as exc:
        raise ConfigError(f"cannot write {folder}: {exc.strerror or exc}", "check the config dir") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _check(folder: Path, where: Path, data: dict[str, Any]) -> None:
    """The mapped card must be a valid card; a problem names the source file."""
    try:
        validated_card(folder, folder / CARD_FILE, dict(data), "user")
    except PersonaError as exc:
        message = exc.message.replace(str(folder / CARD_FILE), f"{where} (as {CARD_FILE})")
        raise CardFileError(message, exc.hint) from None


def load_source(folder: Path) -> dict[str, Any]:
    """``imported.json`` of a card folder ({} for a card made here)."""
    path = folder / SOURCE_FILE
    if not path.is_file():
        return {}
    try:
        source = json.loads(read_bytes(path, 4 * MAX_INPUT_BYTES))
    except (ValueError, RecursionError):
        raise PersonaError(f"{path}: not valid JSON", f"delete it to export from {CARD_FILE} alone") from None
    return source if isinstance(source, dict) and isinstance(source.get("card", {}), dict) else {}


def export_card(folder: Path, fmt: Format, system: str, render: Callable[[str], str] = str) -> tuple[bytes, list[str]]:
    """The card folder as ``fmt`` bytes, and notes on what the format cannot carry.

    For a Modelfile, which has no macros: ``system`` is the card's system message and ``render``
    resolves ``{{char}}``/``{{user}}`` in its examples.
    """
    folder, file, current = card_data(folder)
    validated_card(folder, file, dict(current), "path")
    source = load_source(folder)
    snapshot = source.get("card", {}) if isinstance(source.get("card"), dict) else {}
    notes: list[str] = []
    if current.get("extends"):
        notes.append("note: parts inherited through `extends` are not exported; only this card's own fields")
    if fmt == "modelfile":
        return _export_modelfile(current, snapshot, source, system, notes, render)
    doc: dict[str, Any] = source["document"] if isinstance(source.get("document"), dict) else {**ccjson.V3, "data": {}}
    base: dict[str, Any] = doc["data"] if isinstance(doc.get("data"), dict) else {}
    if not source.get("document"):
        snapshot = {}
    data = mapping.data_from_card(current, snapshot, base)
    if not base and not data.get("creator_notes"):
        data["creator_notes"] = current.get("description", "")
    doc = {**doc, "data": data}
    if any(k.get("path") for k in current.get("knowledge", []) if isinstance(k, dict)):
        notes.append("note: knowledge note folders stay with the card folder; the card file does not carry them")
    if current.get("adapters") or current.get("steering") or current.get("soft_prompt"):
        notes.append("note: adapters, control vectors and soft prompts are not part of a character card")
    if fmt == "json":
        return ccjson.card_bytes(doc, 3), notes
    if fmt == "png":
        avatar = folder / AVATAR
        image = read_bytes(avatar) if avatar.is_file() else png.blank_png()
        return png.with_card(image, {"chara": ccjson.card_bytes(doc, 2), "ccv3": ccjson.card_bytes(doc, 3)}), notes
    assets: dict[str, bytes] = {}
    root = folder / ASSETS
    if root.is_dir():
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink():
                assets[path.relative_to(root).as_posix()] = read_bytes(path)
    return charx.write(ccjson.card_bytes(doc, 3), assets), notes


def _export_modelfile(
    current: dict[str, Any],
    snapshot: dict[str, Any],
    source: dict[str, Any],
    system: str,
    notes: list[str],
    render: Callable[[str], str],
) -> tuple[bytes, list[str]]:
    kept = None
    if source.get("format") == "modelfile" and isinstance(source.get("modelfile"), str):
        if current == snapshot:
            return source["modelfile"].encode("utf-8"), notes
        try:
            kept = modelfile.parse(source["modelfile"], Path(SOURCE_FILE))
        except CardFileError:
            kept = None
    lore = [k for k in current.get("knowledge", []) if isinstance(k, dict) and k.get("keys") is not None]
    if lore:
        notes.append(f"note: {len(lore)} lorebook entries are not exported: a Modelfile has no keyword activation")
    if current.get("greeting") or current.get("greetings"):
        notes.append("note: greetings are not exported: a Modelfile has none")
    examples = [{k: render(v) for k, v in ex.items()} for ex in current.get("examples", []) if isinstance(ex, dict)]
    return modelfile.write({**current, "examples": examples}, system, kept).encode("utf-8"), notes

"""``chat personas import`` and ``export``: Character Cards (PNG, JSON, CHARX) and ollama Modelfiles."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from chat.cli.common import AppContext, echo, guard


def register(personas_app: typer.Typer) -> None:
    personas_app.command("import")(import_card)
    personas_app.command("export")(export_card)


def import_card(
    file: Annotated[Path, typer.Argument(help="A Character Card (PNG, JSON, CHARX) or an ollama Modelfile.")],
    name: Annotated[Optional[str], typer.Option("--name", help="Name of the new card (default: from the file).")] = (
        None
    ),
    force: Annotated[bool, typer.Option("--force", help="Replace a card of that name in your config dir.")] = False,
) -> None:
    """Import a card file into your config dir, printing what was mapped and what was kept as metadata."""
    with guard():
        from chat.importers.cardio import parse_card_file, read_bytes, save

        app = AppContext()
        imported = parse_card_file(read_bytes(file), file, name)
        folder = save(imported, app.paths.personas_dir, file, force=force)
        shown = imported.card.get("character", {}).get("name") or imported.card["name"]
        echo(f"imported {shown} ({imported.kind}) → {folder}")
        for line in imported.report.mapped:
            echo(f"  mapped: {line}")
        for line in imported.report.kept:
            echo(f"  kept as metadata: {line}")
        echo(f"talk to it: chat -p {imported.card['name']}")


def export_card(
    name: Annotated[str, typer.Argument(help="Card name or path.")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="png, json, charx or modelfile.")] = "png",
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="File to write (default: NAME.EXT).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite the output file.")] = False,
    merged_lora: Annotated[
        bool, typer.Option("--merged-lora", help="Write the card's adapters, at their scales, as one LoRA GGUF.")
    ] = False,
) -> None:
    """Write a card as a Character Card V3 (PNG, JSON, CHARX) or an ollama Modelfile; imported fields come back."""
    if merged_lora:
        return _export_merged_lora(name, output, force)
    with guard():
        import os

        from chat.errors import ConfigError, UsageError
        from chat.importers.cardio import FORMATS, export_card
        from chat.prompt import static_system

        if fmt not in FORMATS:
            raise UsageError(f"--format {fmt!r}: not a format", f"choose one of {', '.join(FORMATS)}")
        app = AppContext()
        loaded = app.catalog.load(name)
        persona = app.catalog.resolve(name)
        system = static_system(persona, user_name=app.config.user_name)
        from chat.macros import render

        def names(text: str) -> str:
            return render(text, char=persona.char_name, user=app.config.user_name)

        data, notes = export_card(loaded.folder, fmt, system, names)  # type: ignore[arg-type]
        ext = {"png": ".png", "json": ".json", "charx": ".charx", "modelfile": ".Modelfile"}[fmt]
        target = output or Path(f"{loaded.card.name}{ext}")
        if os.path.lexists(target) and not force:
            raise UsageError(f"{target} already exists", "pass --force to overwrite it, or -o another file")
        try:
            target.write_bytes(data)
        except OSError as exc:
            raise ConfigError(f"cannot write {target}: {exc.strerror or exc}", "choose a file you can write") from None
        for note in notes:
            echo(note, err=True)
        echo(f"exported {loaded.card.name} → {target} ({len(data):,} bytes)")


def _export_merged_lora(name: str, output: Optional[Path], force: bool) -> None:
    """``--merged-lora``: one adapter for engines that apply one per request (vLLM); chat.convert.merge."""
    with guard():
        import os

        from chat.convert.merge import merge_adapters
        from chat.errors import UsageError

        persona = AppContext().catalog.resolve(name)
        target = output or Path(f"{persona.name}-merged.gguf")
        if os.path.lexists(target) and not force:
            raise UsageError(f"{target} already exists", "pass --force to overwrite it, or -o another file")
        merged = merge_adapters(persona, target)
        echo(f"merged {merged.parts} adapter(s) of {persona.label} → {merged.path} (rank {merged.rank}, scale 1)")


def card_details(persona) -> list[str]:
    """The Character Card parts ``chat personas show`` adds: greetings, notes, character, knowledge, metadata."""
    lines: list[str] = []
    if persona.char_name != persona.name:
        lines.append(f"character:   {persona.char_name}  ({{{{char}}}})")
    for label, text in persona.character:
        lines.append(f"{label.lower() + ':':<13}{text.splitlines()[0][:100] if text.strip() else ''}")
    if len(persona.all_greetings) > 1:
        lines.append(f"greetings:   {len(persona.all_greetings)} (--greeting N, /greeting N)")
        for i, g in enumerate(persona.all_greetings, 1):
            lines.append(f"  {i}. {g.splitlines()[0][:80] if g.strip() else ''}")
    if persona.post_history_instructions:
        lines.append(f"after the conversation: {persona.post_history_instructions.splitlines()[0][:90]}")
    lore = [k for k in persona.knowledge if k.is_lorebook]
    notes = [k for k in persona.knowledge if k.path is not None]
    if lore:
        budget = persona.token_budget if persona.token_budget is not None else "default"
        lines.append(f"lorebook:    {len(lore)} entries (scan depth {persona.scan_depth}, token budget {budget})")
    for k in notes:
        lines.append(f"notes:       {k.path}")
    for key, value in persona.metadata:
        lines.append(f"{key + ':':<13}{value}")
    if persona.creator_notes:
        lines.append("creator notes (never sent to the model):")
        lines += [f"  {line}" for line in persona.creator_notes.splitlines()]
    return lines

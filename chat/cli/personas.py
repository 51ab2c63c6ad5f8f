"""``chat personas …``: list, show, validate and scaffold persona cards."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from chat.cli.common import AppContext, echo, guard

personas_app = typer.Typer(help="List, show, validate and create persona cards.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(personas_app, name="personas")


def _register_subcommands() -> None:
    from chat.cli import cardio

    cardio.register(personas_app)  # import / export (Character Cards, Modelfiles)
    from chat.cli import make

    make.register(personas_app)  # make / eval (parameter parts from examples: chat.make)


_register_subcommands()


@personas_app.command("list")
def list_personas() -> None:
    """Every card you can name, where it comes from, and what it overrides."""
    with guard():
        app = AppContext()
        entries = app.catalog.entries()
        if not entries:
            echo("no persona cards found")
            return
        width = max(len(n) for n in entries)
        for name in sorted(entries):
            e = entries[name]
            try:
                desc = app.catalog.load(name).card.description
                app.catalog.resolve(name)  # an `extends` cycle or a missing parent shows here too
            except Exception as exc:  # a broken card still shows up, with its problem
                desc = f"(invalid: {getattr(exc, 'message', exc)})"
            shadow = f" (overrides {', '.join(e.shadows)})" if e.shadows else ""
            echo(f"{name:<{width}}  [{e.source}]{shadow}  {desc}")


@personas_app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="Card name, path, or mix.")],
    model: Annotated[
        str | None,
        typer.Option("-m", "--model", help="Base model the parameter parts must fit (default: the configured model)."),
    ] = None,
) -> None:
    """The resolved card: prompt parts, sampler preset and parameter parts (rank, targets, size, fit)."""
    with guard():
        app = AppContext()
        persona = app.catalog.resolve(name)
        echo(f"name:        {persona.label}")
        echo(f"source:      {persona.source}" + (f" ({persona.path})" if persona.path else ""))
        if persona.description:
            echo(f"description: {persona.description}")
        if persona.greeting:
            echo(f"greeting:    {persona.greeting}")
        if persona.system:
            echo("system:")
            for line in persona.system.splitlines():
                echo(f"  {line}")
        if persona.examples:
            echo(f"examples:    {len(persona.examples)}")
            for ex in persona.examples:
                echo(f"  user:      {ex.user.splitlines()[0][:70]}")
                echo(f"  assistant: {ex.assistant.splitlines()[0][:70]}")
        if persona.knowledge:
            echo(f"knowledge:   {len(persona.knowledge)} entries")
        from chat.cli.cardio import card_details

        for line in card_details(persona):
            echo(line)
        if persona.sampling:
            echo("sampling:    " + ", ".join(f"{k}={v}" for k, v in persona.sampling.items()))
        from chat.partsinfo import describe_parts

        base, note = (None, None)
        if persona.adapters or persona.steering or persona.soft_prompts:
            base, note = _base_model(app, model)
        for line in describe_parts(persona, base, note, details=True):
            echo(line)


def _base_model(app: AppContext, spec: str | None):
    """(BaseShape, None) for the -m or configured GGUF model, or (None, why not)."""
    import os

    from chat.errors import ChatError
    from chat.models import choose_model
    from chat.parts.shape import BaseShape

    explicit = spec is not None
    if not (spec or os.environ.get("CHAT_MODEL") or app.config.default_model):
        return None, "no base model given; pass -m MODEL.gguf"
    try:
        choice = choose_model(spec, app.config, app.paths)
    except ChatError:
        if explicit:
            raise
        return None, "the configured model was not found"
    location = Path(choice.location)
    if location.suffix.lower() != ".gguf" or not location.is_file():
        return None, f"{choice.label} is not a GGUF file; GGUF parts are checked against GGUF bases"
    return BaseShape.from_gguf(location), None


@personas_app.command("validate")
def validate(path: Annotated[Path, typer.Argument(help="A card folder or its persona.toml.")]) -> None:
    """Check a card (and the cards it extends) without loading a model."""
    with guard():
        from chat.card import CARD_FILE, read_card
        from chat.cli.common import error_line
        from chat.persona import card_problems

        app = AppContext()
        problems = card_problems(path, app.catalog.load)
        if problems:
            for problem in problems:
                error_line(problem)
            if len(problems) > 1:
                file = path if path.name == CARD_FILE else path / CARD_FILE
                echo(f"{file}: {len(problems)} problems", err=True)
            raise typer.Exit(problems[0].exit_code)
        loaded = read_card(path)
        echo(f"ok: {loaded.file} ({loaded.card.name})")


TEMPLATE = '''name = "{name}"
description = "One line for listings: who this persona is and when to use it."
greeting = "Hello! I'm {name}."
system = """You are {name}. Describe the personality, tone, values and what to avoid."""
# extends = ["assistant"]      # inherit another card's parts

[sampling]                      # any sampler setting (`chat samplers`)
temperature = 0.7
top_p = 0.95

[[examples]]                    # example dialogue, sent before the conversation
user = "Who are you?"
assistant = "I'm {name}."

# [[adapters]]                  # LoRA adapter (GGUF, or a PEFT folder), relative to this folder
# path = "adapters/{name}.gguf"
# scale = 1.0

# [[steering]]                  # control vector (llama.cpp cvector GGUF)
# path = "vectors/{name}.gguf"
# scale = 0.5
# layers = [1, 16]

# [[soft_prompt]]               # soft prompt: PEFT prompt-tuning folder or soft prompt GGUF
# path = "soft/{name}.gguf"
'''


@personas_app.command("new")
def new(name: Annotated[str, typer.Argument(help="Name of the new card.")]) -> None:
    """Scaffold a card in your config dir, ready to edit."""
    with guard():
        from chat.card import NAME_RULE, is_valid_name
        from chat.errors import ConfigError, UsageError
        from chat.tomlfile import quote

        if not is_valid_name(name):
            raise UsageError(f"{quote(name)} is not a valid persona name", NAME_RULE)
        app = AppContext()
        folder = app.paths.personas_dir / name
        try:
            if (folder / "persona.toml").exists():
                raise UsageError(f"{folder / 'persona.toml'} already exists", "edit it, or pick another name")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "persona.toml").write_text(TEMPLATE.format(name=name), encoding="utf-8")
        except OSError as exc:  # a read-only config dir, a file where a folder should be
            why = exc.strerror or exc
            raise ConfigError(f"cannot write {folder / 'persona.toml'}: {why}", "check the config dir") from None
        echo(f"created {folder / 'persona.toml'}")
        echo(f"edit it, then: chat --persona {name}")
